"""Objects named by a spec: ``package.module:attr`` or ``path/to/file.py:attr``.

Used for the user's model specs (:mod:`autorank.zoo`) and task specs
(:mod:`autorank.tasks.loader`). Importing a spec runs the code it names: only
specs the user gave (command line, Python call) are resolved here.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from autorank.errors import ModelSpecError

__all__ = ["resolve_target", "import_file"]


def import_file(path: Path, spec: str, *, what: str = "model spec", error: type[Exception] = ModelSpecError):
    """Import a Python file as a uniquely named module (once per resolved path)."""
    if not path.exists():
        raise error(f"{what} {spec!r}: file not found: {path}")
    digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=6).hexdigest()
    mod_name = f"_autorank_user_{path.stem}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    ispec = importlib.util.spec_from_file_location(mod_name, path)
    if ispec is None or ispec.loader is None:
        raise error(f"{what} {spec!r}: cannot import {path}")
    module = importlib.util.module_from_spec(ispec)
    sys.modules[mod_name] = module
    sys.path.insert(0, str(path.resolve().parent))
    try:
        ispec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[mod_name]
        raise error(f"{what} {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        try:
            sys.path.remove(str(path.resolve().parent))
        except ValueError:
            pass
    return module


def resolve_target(spec: str, *, what: str = "model spec", error: type[Exception] = ModelSpecError) -> Any:
    """The object ``package.module:attr`` or ``path/to/file.py:attr`` names (``attr`` may be dotted).

    Errors are ``error`` instances whose message starts with ``{what} {spec!r}``.
    """
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise error(f"{what} {spec!r}: expected 'package.module:callable' or 'file.py:callable'")
    if target.endswith(".py") or os.sep in target or "/" in target:
        module = import_file(Path(target), spec, what=what, error=error)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise error(f"{what} {spec!r}: cannot import module {target!r}: {type(exc).__name__}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{what} {spec!r}: {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
