"""Saving and loading decomposed models without pickled code.

A saved model is one ``torch.save`` file holding only plain data and tensors:
the model spec (how to rebuild the original architecture), the concrete plan
(which layers are decomposed, how), and the state dict. :func:`load` reads it
with ``torch.load(weights_only=True)``, rebuilds the architecture from the spec
(or from a model instance you pass), swaps in skeletons of the decomposed layers
and loads the weights: no code is unpickled.
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
from autorank.fileio import atomic_write
from autorank.plan import Plan
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
    atomic_write(path, lambda tmp: torch.save(blob, tmp))
    return path


def read(path: Union[str, os.PathLike]) -> dict:
    """The raw contents of a saved file (weights_only), checked to be an autorank model."""
    p = Path(path)
    if not p.exists():
        raise SaveLoadError(f"no such file: {p}")
    if p.is_dir():
        raise SaveLoadError(f"expected a file, got a directory: {p}")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SaveLoadError(f"{p} is not a readable autorank model file: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise SaveLoadError(f"{p} is not an autorank model file (saved with autorank.save or `autorank decompose`)")
    if int(blob.get("version", 0)) > VERSION:
        raise SaveLoadError(f"{p} was written by a newer autorank (format version {blob['version']})")
    return blob


def load(
    path: Union[str, os.PathLike],
    model: Optional[nn.Module] = None,
    *,
    map_location: Union[str, torch.device, None] = None,
) -> nn.Module:
    """Load a model saved by :func:`save`, in eval mode.

    ``model``: an instance of the original architecture to rebuild from (left
    untouched; a copy is used) when the file holds no spec or to avoid importing it.
    """
    blob = read(path)
    plan = Plan.from_dict(json.loads(blob["plan"]), source=str(path))
    if model is not None:
        base = copy.deepcopy(model)
    elif blob.get("spec"):
        base = load_model(blob["spec"])
    else:
        raise SaveLoadError(
            f"{path} records no model spec; pass the original architecture: autorank.load(path, model=MyModel())"
        )
    try:
        apply_skeleton(base, plan)
    except AutorankError as exc:
        raise SaveLoadError(f"{path}: the model does not match the saved plan: {exc}") from None
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
    if blob.get("spec"):
        base.__dict__[SPEC_ATTR] = blob["spec"]
    return base.eval()


def metadata(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The spec, plan and metadata stored in a saved file (no model is built)."""
    blob = read(path)
    return {
        "spec": blob.get("spec"),
        "plan": json.loads(blob["plan"]),
        "metadata": json.loads(blob.get("metadata", "{}")),
        "torch": blob.get("torch"),
    }
