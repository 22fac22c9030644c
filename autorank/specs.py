"""Objects named by a spec: ``package.module:attr`` or ``path/to/file.py:attr``.

Used for the user's model specs (:mod:`autorank.zoo`) and task specs
(:mod:`autorank.tasks.loader`). Importing a spec runs the code it names: only
specs the user gave (command line, Python call) are resolved here.

The trust rule, in one place (:func:`is_safe_spec`): a spec read from a file (a
saved model, a run directory's ``settings.json``) is resolved only when doing so
runs no code outside autorank — a plain name (autorank's built-ins; any other
plain name is refused without importing anything), a ``hf:`` directory (loaded
with ``local_files_only`` and without remote code) or a ``perplexity:`` text file — or when the caller says it
trusts the file (``trust_spec=True``, ``--trust-spec``), in the spirit of
Hugging Face's ``trust_remote_code``. Anything else (``package.module:callable``,
``file.py:callable``) raises :class:`UntrustedSpecError`, whose message says how to
opt in.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from autorank.errors import ModelSpecError, SaveLoadError

__all__ = ["resolve_target", "import_file", "is_safe_spec", "require_trusted", "UntrustedSpecError", "SAFE_PREFIXES", "SPEC_ATTR"]

#: attribute under which a model loaded from a spec records it (set by autorank.zoo.load_model)
SPEC_ATTR = "_autorank_spec"

#: spec prefixes autorank resolves itself, without importing anyone's module or file
#: (``hf:DIR``: a Hugging Face directory, loaded offline and without remote code;
#: ``perplexity:FILE``: the perplexity task on a text file, read as text)
SAFE_PREFIXES: tuple[str, ...] = ("hf:", "perplexity:")


class UntrustedSpecError(SaveLoadError, ModelSpecError):
    """A spec read from a file that would import code, and the caller did not say it trusts the file."""


def is_safe_spec(spec: Any) -> bool:
    """Whether resolving ``spec`` can run only autorank's own code (see the module docstring).

    True for a plain name (``demo``, ``resnet50``: built-ins; an unknown plain name is
    refused by the loaders without importing anything) and for the prefixes in
    :data:`SAFE_PREFIXES`; False for ``package.module:callable``, ``file.py:callable`` and
    anything that is not a non-empty string.
    """
    if not isinstance(spec, str) or not spec.strip():
        return False
    s = spec.strip()
    return s.startswith(SAFE_PREFIXES) or (":" not in s and "/" not in s and "\\" not in s and not s.endswith(".py"))


def require_trusted(spec: Any, trust: bool, *, what: str, source: str, how: str) -> None:
    """Nothing when ``spec`` is safe or ``trust``; else UntrustedSpecError, one line naming ``source``, ``spec`` and ``how``."""
    if trust or is_safe_spec(spec):
        return
    text = spec if isinstance(spec, str) else repr(spec)
    target = text.rpartition(":")[0] or text
    kind = "file" if target.endswith(".py") or "/" in target else "module"
    raise UntrustedSpecError(
        f"{source} names {what} {text[:200]!r}, which would import and run the {kind} {target[:200]!r}; {how}"
    )


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
    if not target or not attr or spec.strip().startswith(SAFE_PREFIXES):  # a safe prefix is never imported
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
