"""Export for deployment: :func:`export_model` writes a model for deployment in one of three formats
(``pt``: this module's own file; ``onnx``; ``torchscript``), checks that the
written file reproduces PyTorch's outputs, and records how it was made in a JSON
sidecar next to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from autorank._version import __version__
from autorank.errors import ExportError, SaveLoadError
from autorank.fileio import DiskFullError, disk_full_error
from autorank.saving import class_spec, load, read, save
from autorank.surgery import plan_of
from autorank.zoo import BUILTINS, SPEC_ATTR, example_input

__all__ = [
    "EXPORT_FORMATS",
    "ExportReport",
    "Tolerance",
    "default_tolerance",
    "export_model",
    "sidecar_path",
]

logger = logging.getLogger(__name__)


#: the formats :func:`export_model` writes
EXPORT_FORMATS: tuple[str, ...] = ("pt", "onnx", "torchscript")

#: ONNX files whose weights exceed this many bytes keep them in ``<file>.data`` beside the
#: file: protobuf cannot serialise a message of 2 GiB or more
_ONNX_EXTERNAL_DATA_BYTES = 1_800_000_000

_EXPORT_EXTRA = "pip install 'autorank[export]'"


@dataclass(frozen=True)
class Tolerance:
    """How close an exported model's outputs must be to PyTorch's.

    Elementwise ``|exported - pytorch| <= atol + rtol * |pytorch|`` (the rule of
    ``numpy.allclose``; NaN matches NaN, an infinity matches the same infinity).
    """

    atol: float
    rtol: float

    def __str__(self) -> str:
        return f"atol {self.atol:g} + rtol {self.rtol:g}"


# Why these numbers (float32: atol 1e-4 + rtol 1e-3): the exported graph is run by another
# runtime (onnxruntime) or another interpreter (TorchScript) which fuses and reorders operations
# (MatMul+Add, LayerNorm, GELU, convolution algorithms), so float32 results differ by rounding
# that grows with depth; measured here it is 1e-8..1e-6 on the CNNs and encoders autorank builds.
# A wrong export (a missing or stale weight, train-mode batch norm or dropout, a wrong branch
# traced) moves outputs by a sizeable fraction of their magnitude, far above the tolerance. Half
# precisions have ~3 significant digits; float64 is held to a tighter bound. Integer and boolean
# outputs must match exactly.
_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(1e-6, 1e-5),
    torch.float32: Tolerance(1e-4, 1e-3),
    torch.float16: Tolerance(1e-2, 1e-2),
    torch.bfloat16: Tolerance(5e-2, 5e-2),
}


def default_tolerance(dtype: torch.dtype) -> Tolerance:
    """The tolerance :func:`export_model` applies to outputs of ``dtype`` (exact for non-floats)."""
    if dtype in _TOLERANCES:
        return _TOLERANCES[dtype]
    if dtype.is_floating_point or dtype.is_complex:
        return _TOLERANCES[torch.float32]
    return Tolerance(0.0, 0.0)


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_model` wrote and how well the written file reproduces the model.

    ``bytes``: size of the exported model (with its external data file, if any; not the
    sidecar). ``max_abs_diff`` / ``max_rel_diff``: largest difference between the file's
    outputs and PyTorch's on ``example_inputs``, absolute and relative to the largest
    reference magnitude (None when not checked). ``checked``: whether the file was read
    back and compared. ``files``: every file written, the sidecar last.
    """

    path: Path
    sidecar: Path
    format: str
    bytes: int
    max_abs_diff: Optional[float]
    tolerance: Optional[Tolerance]
    checked: bool
    max_rel_diff: Optional[float] = None
    dynamic_batch: Optional[bool] = None
    files: tuple[Path, ...] = field(default_factory=tuple)


def sidecar_path(path: Union[str, os.PathLike]) -> Path:
    """``model.onnx`` -> ``model.onnx.json``: where :func:`export_model` describes an exported file."""
    p = Path(path)
    return p.with_name(p.name + ".json")


@dataclass
class _Comparison:
    ok: bool
    max_abs: float
    max_rel: float
    tolerance: Tolerance
    problem: Optional[str] = None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (terminal colours removed), then the root cause's, if any."""

    def one(e: BaseException) -> str:
        text = _ANSI.sub("", str(e)).strip()
        return f"{type(e).__name__}: {text.splitlines()[0].strip()}" if text else type(e).__name__

    root = exc
    seen = {id(exc)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    return one(exc) if root is exc else f"{one(exc)} (caused by {one(root)})"


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output (tensor, tuple, list, dict, dataclass-like ModelOutput) in order."""
    from torch.utils._pytree import tree_leaves

    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple") and callable(out.to_tuple):  # transformers' ModelOutput
        out = out.to_tuple()
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        if t.dtype in (torch.bfloat16,):
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def _compare(reference: Sequence[torch.Tensor], got: Sequence[Any], atol: Optional[float], rtol: Optional[float]) -> _Comparison:
    """Compare the exported file's outputs with PyTorch's, output by output."""
    floats = [r.dtype for r in reference if r.dtype.is_floating_point]
    base = max((default_tolerance(d) for d in floats), key=lambda t: (t.rtol, t.atol), default=_TOLERANCES[torch.float32])
    tol = Tolerance(float(base.atol if atol is None else atol), float(base.rtol if rtol is None else rtol))
    if len(got) != len(reference):
        return _Comparison(False, math.inf, math.inf, tol, f"PyTorch gives {len(reference)} outputs, the file {len(got)}")
    max_abs = max_rel = 0.0
    worst: Optional[str] = None
    for i, (r, g) in enumerate(zip(reference, got)):
        ref, out = _to_numpy(r), _to_numpy(g)
        if tuple(ref.shape) != tuple(out.shape):
            return _Comparison(False, math.inf, math.inf, tol, f"output {i} has shape {tuple(out.shape)}, PyTorch's {tuple(ref.shape)}")
        if ref.size == 0:
            continue
        if ref.dtype.kind in "fc":
            a, b = out.astype(np.float64), ref.astype(np.float64)
            with np.errstate(invalid="ignore"):
                diff = np.abs(a - b)
            same = (a == b) | (np.isnan(a) & np.isnan(b))
            diff = np.where(same, 0.0, np.nan_to_num(diff, nan=np.inf))
            allowed = tol.atol + tol.rtol * np.abs(np.where(np.isfinite(b), b, 0.0))
            ok = bool(np.all(diff <= allowed))
        else:
            diff = np.where(out == ref, 0.0, np.abs(out.astype(np.float64) - ref.astype(np.float64)))
            ok = bool(np.all(diff == 0))
        finite_ref = np.abs(ref[np.isfinite(ref)]) if ref.dtype.kind in "fc" else np.abs(ref.astype(np.float64))
        scale = float(finite_ref.max()) if finite_ref.size else 0.0
        m = float(diff.max())
        rel = m / scale if scale > 0 else (0.0 if m == 0 else math.inf)
        max_abs, max_rel = max(max_abs, m), max(max_rel, rel)
        if not ok and worst is None:
            worst = f"output {i}: max abs diff {m:.3g} (relative {rel:.3g}) exceeds {'exact match' if ref.dtype.kind not in 'fc' else tol}"
    return _Comparison(worst is None, max_abs, max_rel, tol, worst)


def _untemp(message: str, tmp: Path, path: Path) -> str:
    """A message about the temporary file, naming the file the user asked for instead."""
    return message.replace(str(tmp), str(path))


def _finite_or_str(x: Optional[float]) -> Any:
    return x if x is None or math.isfinite(x) else str(x)


def _describe(tensors: Sequence[torch.Tensor], names: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    out = []
    for i, t in enumerate(tensors):
        d: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        if names is not None and i < len(names):
            d = {"name": names[i], **d}
        out.append(d)
    return out


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the duration; every submodule's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence torch's internal deprecation chatter and its exporter's registry log during an export."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _example_inputs(example_inputs: Any, spec: Optional[str], fmt: str, path: Path) -> Optional[tuple[torch.Tensor, ...]]:
    if example_inputs is None:
        if spec in BUILTINS:
            return (example_input(spec),)
        if fmt == "pt":
            return None
        raise ExportError(
            f"exporting {path} as {fmt} needs example_inputs: a tensor or a tuple of tensors the model is called with"
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise ExportError(
        f"exporting {path}: example_inputs must be a tensor or a non-empty tuple of tensors, got {type(example_inputs).__name__}"
    )


def _require_onnx(path: Path, need_runtime: bool) -> None:
    wanted = ["onnx", "onnxscript"] + (["onnxruntime"] if need_runtime else [])
    missing = []
    for name in wanted:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"exporting {path} as onnx needs {', '.join(missing)}: {_EXPORT_EXTRA}")


# ---------------------------------------------------------------------- the three formats
def _export_pt(model: nn.Module, tmp: Path, *, spec: Optional[str], metadata: Optional[dict], **_: Any) -> dict[str, Any]:
    save(model, tmp, spec=spec, metadata=metadata)
    return {"spec": spec}


def _run_pt(model: nn.Module, tmp: Path, inputs: Optional[tuple[torch.Tensor, ...]]) -> tuple[Optional[list[torch.Tensor]], dict[str, Any]]:
    """Read the file back: its weights must equal the model's; with a spec, rebuild it and run it."""
    blob = read(tmp)
    state = blob["state_dict"]
    own = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if set(state) != set(own) or any(not torch.equal(state[k], v) for k, v in own.items()):
        raise ExportError("the weights read back differ from the model's")
    if inputs is None or not blob.get("spec"):
        return None, {"method": "weights read back (torch.load, weights_only) equal the model's"}
    try:
        # trust_spec: this spec is the caller's (spec=), the model's own record (set only from a
        # spec the caller gave or trusted: autorank.load never records an untrusted one), or the
        # class of the model in hand, already imported in this process; never a file's say-so
        loaded = load(tmp, trust_spec=True)
    except SaveLoadError as exc:
        raise ExportError(
            f"autorank.load cannot rebuild the model from its spec {blob['spec']!r} ({exc}); "
            "pass spec= naming a callable that builds this architecture"
        ) from exc
    with torch.no_grad():
        out = loaded(*(t.cpu() for t in inputs))
    return _flat_tensors(out), {"method": "autorank.load rebuilds the model; outputs compared"}


def _dynamic_shapes(inputs: tuple[torch.Tensor, ...]) -> tuple[Optional[dict[int, Any]], ...]:
    return tuple({0: torch.export.Dim.AUTO} if t.dim() > 0 else None for t in inputs)


def _export_onnx(model: nn.Module, tmp: Path, *, inputs: tuple[torch.Tensor, ...], **_: Any) -> dict[str, Any]:
    """Export with torch's ``torch.export``-based ONNX exporter (``dynamo=True``), batch axis dynamic.

    Exporter choice (torch 2.13, checked on the models autorank builds: Sequentials of
    factor convs/linears, Tucker-2 and spatial-SVD convs with reflect/circular padding, a
    BERT-like encoder with ``F.scaled_dot_product_attention`` fed int64 token ids): both the
    dynamo exporter and the legacy TorchScript exporter (``dynamo=False``) produce files that
    onnxruntime runs to within 1e-6 of PyTorch. The dynamo exporter is used because it is
    torch's default and maintained path since 2.9 while the legacy one is deprecated ("will be
    removed"), because ``torch.export`` refuses what it cannot capture instead of silently
    baking one branch of Python control flow into the graph, and because ``Dim.AUTO`` gives a
    dynamic batch axis where the model allows it and a static one (no error) where it does not.
    Its cost is time: about 2 s per small model (5 s for the first, which imports onnxscript)
    against 0.3 s for the legacy exporter. If the export with a dynamic batch fails, it is
    retried once with static shapes.
    """
    kwargs = dict(dynamo=True, verbose=False, optimize=True)
    with _quiet_exporter():
        try:
            program = torch.onnx.export(model, inputs, dynamic_shapes=_dynamic_shapes(inputs), **kwargs)
        except Exception as exc:
            logger.info("ONNX export with a dynamic batch axis failed (%s); retrying with static shapes", _first_line(exc))
            program = torch.onnx.export(model, inputs, **kwargs)
    if program is None:  # pragma: no cover - torch returns the program when no file is given
        raise ExportError("torch.onnx.export returned no program")
    dynamic = _name_batch_axis(program)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = weight_bytes > _ONNX_EXTERNAL_DATA_BYTES
    with _quiet_exporter():
        program.save(str(tmp), external_data=external)
    proto_inputs = [v.name for v in program.model.graph.inputs]
    opset = program.model.opset_imports.get("", None)
    data = tmp.with_name(tmp.name + ".data")
    return {
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": opset,
        "dynamic_batch": dynamic,
        "input_names": proto_inputs,
        "external_data": data.name if external and data.exists() else None,
    }


def _name_batch_axis(program: Any) -> bool:
    """Name the inputs' dynamic first axis ``batch``; whether every input's first axis is dynamic."""
    dims = [v.shape[0] for v in program.model.graph.inputs if v.shape is not None and len(v.shape) > 0]
    symbolic = [d for d in dims if not isinstance(d, int)]
    if not dims or len(symbolic) != len(dims):
        return False
    names = {str(d) for d in symbolic}
    if len(names) == 1 and "batch" not in names:
        try:
            program.rename_axes({symbolic[0]: "batch"})
        except Exception as exc:  # cosmetic: keep torch's own axis name
            logger.debug("could not rename the ONNX batch axis: %s", _first_line(exc))
    return True


def _run_onnx(model: nn.Module, tmp: Path, inputs: tuple[torch.Tensor, ...]) -> tuple[list[np.ndarray], dict[str, Any]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ExportError(f"the ONNX graph takes {len(names)} inputs ({', '.join(names)}), example_inputs has {len(inputs)}")
    feeds = {n: _to_numpy(t) for n, t in zip(names, inputs)}
    return list(session.run(None, feeds)), {"method": f"onnxruntime {ort.__version__} (CPUExecutionProvider); outputs compared"}


def _export_torchscript(model: nn.Module, tmp: Path, *, inputs: tuple[torch.Tensor, ...], **_: Any) -> dict[str, Any]:
    """``torch.jit.trace`` (the check below catches a trace that does not generalise to the inputs);
    ``torch.jit.script`` when tracing fails. torch deprecates both in favour of torch.export."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            with torch.no_grad():
                scripted = torch.jit.trace(model, inputs, check_trace=False, strict=False)
            how = "torch.jit.trace"
        except Exception as trace_exc:
            logger.info("torch.jit.trace failed (%s); trying torch.jit.script", _first_line(trace_exc))
            try:
                scripted = torch.jit.script(model)
            except Exception as script_exc:
                raise ExportError(
                    f"torch.jit.trace failed ({_first_line(trace_exc)}) and so did torch.jit.script ({_first_line(script_exc)})"
                ) from script_exc
            how = "torch.jit.script"
        torch.jit.save(scripted, str(tmp))
    return {"exporter": how}


def _run_torchscript(model: nn.Module, tmp: Path, inputs: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = torch.jit.load(str(tmp), map_location=inputs[0].device)
    loaded.eval()
    with torch.no_grad():
        out = loaded(*inputs)
    return _flat_tensors(out), {"method": "torch.jit.load; outputs compared"}


_EXPORTERS: dict[str, tuple[Callable[..., dict[str, Any]], Callable[..., tuple[Any, dict[str, Any]]]]] = {
    "pt": (_export_pt, _run_pt),
    "onnx": (_export_onnx, _run_onnx),
    "torchscript": (_export_torchscript, _run_torchscript),
}


# ---------------------------------------------------------------------- writing files safely
def _publish(moves: Sequence[tuple[Path, Path]], force: bool) -> None:
    """Move finished temporary files to their places, the last one (the sidecar) last.

    Without ``force`` a target that appeared meanwhile is never replaced: ``os.link`` fails on
    an existing name (where hard links are unsupported, an existence check is the fallback).
    On failure the files this call already placed are removed again.
    """
    placed: list[Path] = []
    try:
        for tmp, target in moves:
            if force:
                os.replace(tmp, target)
            else:
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    raise ExportError(f"{target} exists; pass force=True to overwrite it") from None
                except OSError:
                    if target.exists():
                        raise ExportError(f"{target} exists; pass force=True to overwrite it") from None
                    os.replace(tmp, target)
                else:
                    os.unlink(tmp)
            placed.append(target)
    except BaseException:
        if not force:
            for target in placed:
                with contextlib.suppress(OSError):
                    os.unlink(target)
        raise


def _raise_if_full(exc: BaseException, path: Path) -> None:
    """A full disk is :class:`DiskFullError` naming the file being written, not an exporter's message."""
    if isinstance(exc, DiskFullError):
        raise DiskFullError(path, exc.device) from None
    full = disk_full_error(exc, path)
    if full is not None:
        raise DiskFullError(path, full.device) from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_model(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    format: str = "pt",
    example_inputs: Any = None,
    force: bool = False,
    metadata: Optional[dict] = None,
    spec: Optional[str] = None,
    check: bool = True,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
) -> ExportReport:
    """Export ``model`` to ``path`` as ``pt``, ``onnx`` or ``torchscript``, check it, describe it.

    - ``pt``: :func:`save`'s file, loaded by :func:`autorank.load` (weights only, no pickled code).
    - ``onnx``: torch's ``torch.export``-based exporter, dynamic batch axis where the model
      allows it (see :func:`_export_onnx` for why this exporter); needs ``autorank[export]``.
    - ``torchscript``: ``torch.jit.trace`` (``torch.jit.script`` when tracing fails), loaded by
      ``torch.jit.load``.

    ``example_inputs``: a tensor or tuple of tensors the model is called with; needed for
    ``onnx`` and ``torchscript`` (for a built-in model spec, the spec's example input is the
    default). The model is exported in eval mode; its modes are restored afterwards.

    With ``check`` (default), the written file is read back by its own runtime (onnxruntime,
    ``torch.jit.load``, :func:`autorank.load`) and run on ``example_inputs``; its outputs must
    equal PyTorch's within :class:`Tolerance` (float32: ``atol 1e-4 + rtol 1e-3``, see
    :func:`default_tolerance`; ``atol``/``rtol`` override it). For ``pt`` without a model spec
    the saved weights are compared with the model's instead.

    Beside the file, ``<path>.json`` records the format, torch and autorank versions, the plan
    the model carries, input and output shapes and dtypes, the check's result, and
    ``metadata`` (the caller's: plan summary, metrics, source run, ...).

    Nothing is overwritten unless ``force``: an existing file or sidecar raises
    :class:`ExportError` and is left as it was. Everything is written to temporary files in
    the target directory and moved into place only once exported and checked, so a failure
    (exporter error, model error, mismatch) leaves neither a partial nor an unchecked file.
    """
    fmt = str(format).strip().lower()
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {format!r} for {path}; known formats: {', '.join(EXPORT_FORMATS)}")
    if not isinstance(model, nn.Module):
        raise ExportError(f"export_model() expects an nn.Module, got {type(model).__name__}")
    path = Path(path)
    sidecar = sidecar_path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"output directory does not exist: {parent}")
    for target in (path, sidecar):
        if target.is_dir():
            raise ExportError(f"output path is a directory: {target}")
        if target.exists() and not force:
            raise ExportError(f"{target} exists; pass force=True to overwrite it")
    if fmt == "onnx":
        _require_onnx(path, need_runtime=check)
    spec = spec or model.__dict__.get(SPEC_ATTR) or class_spec(model)
    inputs = _example_inputs(example_inputs, spec, fmt, path)
    export, run = _EXPORTERS[fmt]

    with _eval_mode(model):
        reference: Optional[list[torch.Tensor]] = None
        if inputs is not None:
            try:
                with torch.no_grad():
                    reference = [t.detach().clone() for t in _flat_tensors(model(*inputs))]
            except Exception as exc:
                raise ExportError(f"cannot export {path}: the model fails on example_inputs: {_first_line(exc)}") from exc

        try:
            workdir = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp"))
        except OSError as exc:
            _raise_if_full(exc, path)
            raise
        try:
            tmp = workdir / path.name
            try:
                info = export(model, tmp, inputs=inputs, spec=spec, metadata=metadata)
            except ExportError as exc:
                raise ExportError(f"cannot export {path} as {fmt}: {_untemp(str(exc), tmp, path)}") from exc
            except Exception as exc:
                _raise_if_full(exc, path)
                raise ExportError(f"cannot export {path} as {fmt}: {_untemp(_first_line(exc), tmp, path)}") from exc
            extra = [workdir / info["external_data"]] if info.get("external_data") else []

            comparison: Optional[_Comparison] = None
            check_info: dict[str, Any] = {"checked": False}
            if check:
                try:
                    outputs, how = run(model, tmp, inputs)
                except ExportError as exc:
                    raise ExportError(f"{path}: {_untemp(str(exc), tmp, path)}; nothing was written") from exc
                except Exception as exc:
                    raise ExportError(
                        f"{path}: the exported file does not load or run: {_untemp(_first_line(exc), tmp, path)}; nothing was written"
                    ) from exc
                if outputs is not None and reference is not None:
                    comparison = _compare(reference, outputs, atol, rtol)
                    if not comparison.ok:
                        raise ExportError(
                            f"{path}: the exported {fmt} model differs from PyTorch on example_inputs: {comparison.problem}; "
                            "nothing was written"
                        )
                    check_info = {
                        "checked": True,
                        **how,
                        "max_abs_diff": _finite_or_str(comparison.max_abs),
                        "max_rel_diff": _finite_or_str(comparison.max_rel),
                        "tolerance": asdict(comparison.tolerance),
                        "rule": "|exported - pytorch| <= atol + rtol * |pytorch| elementwise; "
                        "max_rel_diff = max abs diff / max |pytorch|",
                    }
                else:
                    check_info = {"checked": True, **how}

            files = [tmp, *extra]
            size = sum(f.stat().st_size for f in files)
            described = {
                "format": fmt,
                "file": path.name,
                "files": [f.name for f in files],
                "bytes": size,
                "sha256": _sha256(tmp),
                "autorank": __version__,
                "torch": str(torch.__version__),
                "spec": spec,
                "plan": plan_of(model).to_dict(),
                "export": {k: v for k, v in info.items() if k != "spec"},
                "inputs": _describe(inputs or (), info.get("input_names")),
                "outputs": _describe(reference or ()),
                "check": check_info,
                "metadata": metadata or {},
            }
            tmp_sidecar = workdir / sidecar.name
            try:
                tmp_sidecar.write_text(json.dumps(described, indent=2, default=str) + "\n")
                targets = [(f, parent / f.name) for f in extra] + [(tmp, path), (tmp_sidecar, sidecar)]
                _publish(targets, force)
            except OSError as exc:
                _raise_if_full(exc, sidecar)
                raise
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    logger.info("exported %s (%s, %d bytes%s)", path, fmt, size,
                f", max abs diff {comparison.max_abs:.3g}" if comparison is not None else "")
    return ExportReport(
        path=path,
        sidecar=sidecar,
        format=fmt,
        bytes=size,
        max_abs_diff=comparison.max_abs if comparison is not None else None,
        tolerance=comparison.tolerance if comparison is not None else None,
        checked=bool(check_info.get("checked")),
        max_rel_diff=comparison.max_rel if comparison is not None else None,
        dynamic_batch=info.get("dynamic_batch"),
        files=tuple(parent / f.name for f in files) + (sidecar,),
    )
