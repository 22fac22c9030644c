"""Saving and loading decomposed models without pickled code.

A saved model is one ``torch.save`` file holding only plain data and tensors:
the model spec (how to rebuild the original architecture), the concrete plan
(which layers are decomposed, how), and the state dict. :func:`load` reads it
with ``torch.load(weights_only=True)``, rebuilds the architecture from the spec
(or from a model instance you pass), swaps in skeletons of the decomposed layers
and loads the weights: no code is unpickled.

Nor is a spec imported on the file's say-so. The spec stored in a file is only a
label until the caller trusts it: :func:`load` rebuilds the architecture from a
built-in name or a ``hf:`` directory (:func:`autorank.specs.is_safe_spec`), from the
``model=`` the caller passes, or — for ``package.module:callable`` and
``file.py:callable`` — only with ``trust_spec=True`` (the CLI's ``--trust-spec``);
otherwise :class:`~autorank.specs.UntrustedSpecError` says how to opt in. Anything a
crafted file can hold (random bytes, a pickle, a zip of the wrong shape, odd types
under the right keys) is refused with one :class:`SaveLoadError` line naming it.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from autorank.errors import AutorankError, SaveLoadError
from autorank.fileio import atomic_torch_save
from autorank.plan import Plan
from autorank.specs import is_safe_spec, require_trusted
from autorank.surgery import apply_skeleton, plan_of
from autorank.zoo import SPEC_ATTR, load_model

__all__ = ["save", "load", "read", "metadata", "class_spec", "FORMAT", "VERSION"]

FORMAT = "autorank.model"
VERSION = 1


def class_spec(model: nn.Module) -> Optional[str]:
    """``module:Class`` when the model's class is importable and constructible without arguments."""
    cls = type(model)
    if cls.__module__ in ("__main__", "builtins") or "<locals>" in cls.__qualname__:
        return None
    if cls.__module__.split(".")[0] == "torch":  # nn.Sequential() & co. build an empty container
        return None
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())[1:]
    required = [p for p in params if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required or any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return f"{cls.__module__}:{cls.__qualname__}"


def save(model: nn.Module, path: Union[str, os.PathLike], *, spec: Optional[str] = None, metadata: Optional[dict] = None) -> Path:
    """Save a (decomposed) model so that :func:`load` rebuilds it in another process.

    ``spec``: how to rebuild the original architecture (see :mod:`autorank.zoo`);
    default: the spec the model was loaded from, else its class when that is
    importable and takes no arguments. Without one, :func:`load` needs ``model=``.
    The file is written atomically.
    """
    if not isinstance(model, nn.Module):
        raise SaveLoadError(f"save() expects an nn.Module, got {type(model).__name__}")
    spec = spec or model.__dict__.get(SPEC_ATTR) or class_spec(model)
    plan = plan_of(model)
    blob = {
        "format": FORMAT,
        "version": VERSION,
        "spec": spec,
        "plan": json.dumps(plan.to_dict()),
        "metadata": json.dumps(metadata or {}, default=str),
        "torch": str(torch.__version__),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    atomic_torch_save(path, blob)
    return path


#: what every torch.save file starts with: a zip archive (torch >= 1.6) or a legacy pickle (protocol 2+)
_ZIP_MAGIC = b"PK\x03\x04"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:200] + "..."


def read(path: Union[str, os.PathLike]) -> dict:
    """The raw contents of a saved file (weights_only), checked to be an autorank model of the right shape."""
    p = Path(path)
    if not p.exists():
        raise SaveLoadError(f"no such file: {p}")
    if p.is_dir():
        raise SaveLoadError(f"expected a file, got a directory: {p}")
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise SaveLoadError(f"cannot read {p}: {exc.strerror or exc}") from None
    if head[:4] != _ZIP_MAGIC and not (len(head) >= 2 and head[0] == 0x80 and head[1] in range(2, 6)):
        raise SaveLoadError(f"{p} is not an autorank model file: not a file written by torch.save "
                            "(autorank.save, `autorank decompose`, `autorank export --format pt`)")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged archive, or a pickle asking for something weights_only refuses
        raise SaveLoadError(f"{p} is not a readable autorank model file: {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise SaveLoadError(f"{p} is not an autorank model file (saved with autorank.save or `autorank decompose`)")
    version = blob.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise SaveLoadError(f"{p}: 'version' is {type(version).__name__}, expected an integer")
    if version > VERSION:
        raise SaveLoadError(f"{p} was written by a newer autorank (format version {version})")
    spec = blob.get("spec")
    if spec is not None and not isinstance(spec, str):
        raise SaveLoadError(f"{p}: 'spec' is {type(spec).__name__}, expected a string")
    for key in ("plan", "metadata"):
        if key in blob and not isinstance(blob[key], str):
            raise SaveLoadError(f"{p}: {key!r} is {type(blob[key]).__name__}, expected a JSON string")
    if "plan" not in blob:
        raise SaveLoadError(f"{p}: no 'plan' recorded")
    state = blob.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise SaveLoadError(f"{p}: 'state_dict' must map parameter names to tensors")
    return blob


def _json(blob: dict, key: str, path: Union[str, os.PathLike], default: str) -> Any:
    try:
        return json.loads(blob.get(key, default))
    except (ValueError, RecursionError) as exc:
        raise SaveLoadError(f"{path}: {key!r} is not valid JSON: {_first_line(exc)}") from None


def _untrusted_how(path: Union[str, os.PathLike]) -> str:
    return (f"if you trust this file, load it with autorank.load({str(path)!r}, trust_spec=True) "
            "(command line: --trust-spec); or pass the architecture yourself: autorank.load(path, model=MyModel())")


def load(
    path: Union[str, os.PathLike],
    model: Optional[nn.Module] = None,
    *,
    map_location: Union[str, torch.device, None] = None,
    trust_spec: bool = False,
) -> nn.Module:
    """Load a model saved by :func:`save`, in eval mode.

    ``model``: an instance of the original architecture to rebuild from (left
    untouched; a copy is used); then the file's spec is not used. Without it the
    architecture is rebuilt from the spec stored in the file: a built-in name or a
    ``hf:`` directory always; a ``package.module:callable`` or ``file.py:callable``
    spec only with ``trust_spec=True``, because resolving it imports and runs that
    module or file (:class:`~autorank.specs.UntrustedSpecError` otherwise).
    """
    blob = read(path)
    plan = Plan.from_dict(_json(blob, "plan", path, "{}"), source=str(path))
    spec = blob.get("spec") or None
    trusted_spec = spec if spec is not None and (trust_spec or is_safe_spec(spec)) else None
    if model is not None:
        if not isinstance(model, nn.Module):
            raise SaveLoadError(f"load(model=...) expects an nn.Module, got {type(model).__name__}")
        base = copy.deepcopy(model)
    elif spec:
        require_trusted(spec, trust_spec, what="model spec", source=str(path), how=_untrusted_how(path))
        base = load_model(spec)
    else:
        raise SaveLoadError(
            f"{path} records no model spec; pass the original architecture: autorank.load(path, model=MyModel())"
        )
    try:
        apply_skeleton(base, plan)
    except AutorankError as exc:
        raise SaveLoadError(f"{path}: the model does not match the saved plan: {exc}") from None
    except Exception as exc:  # a crafted plan (absurd ranks, options) must not escape as a traceback
        raise SaveLoadError(f"{path}: the saved plan cannot be applied: {type(exc).__name__}: {_first_line(exc)}") from None
    state = blob["state_dict"]
    # give the skeletons real (uninitialised) storage, then copy values in place: unlike
    # assign=True, this keeps tied parameters tied
    for module in base.modules():
        if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
    try:
        base.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        # torch's message starts "Error(s) in loading state_dict for X:"; the next line says what
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        first = (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]) if lines else "mismatch"
        if len(first) > 300:
            first = first[:300] + "..."
        raise SaveLoadError(f"{path}: weights do not fit the model: {first}") from None
    leftover = [n for n, p in list(base.named_parameters()) + list(base.named_buffers()) if p.device.type == "meta"]
    if leftover:
        raise SaveLoadError(f"{path}: no saved value for {leftover[0]}")
    if map_location is not None:
        base = base.to(map_location)
    # the spec label travels with the model (save / export record it) only when it is trusted:
    # a file's unvetted spec never becomes something a later step imports
    if trusted_spec and (model is None or SPEC_ATTR not in base.__dict__):
        base.__dict__[SPEC_ATTR] = trusted_spec
    return base.eval()


def metadata(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The spec, plan and metadata stored in a saved file (no model is built)."""
    blob = read(path)
    return {
        "spec": blob.get("spec"),
        "plan": _json(blob, "plan", path, "{}"),
        "metadata": _json(blob, "metadata", path, "{}"),
        "torch": blob.get("torch"),
    }
