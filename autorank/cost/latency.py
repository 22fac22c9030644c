"""Latency measured on the hardware the user targets, and a per-layer lookup table to estimate plans.

Three layers of API:

- :func:`measure` times one module (a whole model or a single layer) on a device:
  warm-up, repeated samples, median and quartiles, CUDA events on a GPU, the
  torch thread count fixed for the measurement and recorded (then restored).
- :class:`LatencyTable` is a per-layer lookup table on disk (JSON, written
  atomically), one file per *validity key* — device name, torch version, dtype,
  threads, batch size (and the clock, see :func:`measure`) — because a latency
  measured under any other of these is not valid. Entries are keyed by a layer
  signature (layer class and kind, :class:`~autorank.methods.LayerSpec` fields,
  input shape), a method and a concrete rank (``dense`` for the original
  layer). A replacement is measured alone, on its real input shape, built from
  the method's meta skeleton and filled with random weights: latency does not
  depend on the values, and no factorization (CP-ALS!) is ever computed for it.
- :func:`estimate_latency` gives any plan's latency without running it::

      latency(plan) = base latency − Σ dense latency of replaced layers + Σ replacement latency

  Everything between the layers (activations, norms, pooling, attention
  matmuls) is in the base latency and unchanged by a plan.

:func:`profile_latency_job` wraps it all in a plain function of JSON-able
arguments (model spec, input shape, device), so that a worker process — a Ray
worker with the requested accelerator — can run it with nothing else.

:func:`align_rank` rounds ranks to multiples of 8 or 16: factorized layers with
odd inner dimensions are a known reason for poor GPU efficiency (tensor-core
tiles, vectorised loads). A plan entry's ``align`` option (applied by
:func:`autorank.decompose`) is honoured by :func:`estimate_latency`.

Measured here (2-core shared CPU, see ``benchmarks/bench_latency_estimator.py``):
the estimate's median absolute error against end-to-end measurement of
decomposed ResNet-50, demo-CNN and BERT-style models is about 5%, against about
18% for the FLOPs proxy (base latency × kept fraction of FLOPs).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import os
import platform
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from autorank import methods as registry
from autorank._format import format_seconds
from autorank.errors import AutorankError, RankError
from autorank.methods._base import Rank
from autorank.methods._layers import LayerSpec, layer_kind, layer_spec
from autorank.plan import LayerPlan, Plan

logger = logging.getLogger("autorank")

__all__ = [
    "DeviceError",
    "LatencyError",
    "Timing",
    "measure",
    "device_name",
    "resolve_device",
    "align_rank",
    "align_plan",
    "LatencyTable",
    "default_table_dir",
    "layer_signature",
    "model_signature",
    "build_table",
    "default_candidates",
    "estimate_latency",
    "profile_latency_job",
    "DEFAULT_RHOS",
]

#: kept fractions of FLOPs measured per (layer, method) when no candidates are given
DEFAULT_RHOS: tuple[float, ...] = (0.25, 0.5, 0.75)

#: a timed sample on CPU/GPU is at least this long: tiny layers are called several times per sample
_TARGET_SAMPLE_S = 1e-3
_MAX_NUMBER = 10_000
_MAX_SAMPLES = 100_000
_FORMAT = "autorank-latency-table"
_FORMAT_VERSION = 1


class DeviceError(AutorankError, ValueError):
    """A device that is not available here (``cuda`` without CUDA, ``cuda:3`` out of range, ...)."""


class LatencyError(AutorankError, ValueError):
    """A latency that cannot be measured or looked up (missing table entry, meta-device module, ...)."""


# ---------------------------------------------------------------------- devices
def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``device`` as a :class:`torch.device`, checked to be usable here; DeviceError otherwise."""
    if device is None:
        device = "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device {str(device)!r} is not a device name (use cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r} is not available: this machine has no usable CUDA (torch {torch.__version__})")
        n = torch.cuda.device_count()
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if not 0 <= index < n:
            raise DeviceError(f"device {str(device)!r} is not available: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return torch.device("cuda", index)
    raise DeviceError(f"device {str(device)!r} is not supported for latency measurement (use cpu, cuda or cuda:N)")


@functools.lru_cache(maxsize=1)
def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Processor", "cpu model") and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    name = platform.processor() or ""
    if not name and platform.system() == "Darwin":  # pragma: no cover - not on the CI machines
        with contextlib.suppress(Exception):
            import subprocess

            name = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
    return name or f"unknown {platform.machine() or 'cpu'}"


def device_name(device: Union[str, torch.device, None] = "cpu") -> str:
    """A stable name of the hardware behind ``device``, used in table keys.

    ``"cpu: <model name>"`` on CPU (from /proc/cpuinfo, else ``platform``);
    the CUDA device's name (``"cuda: NVIDIA H100 80GB HBM3"``) on a GPU.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    return f"cpu: {_cpu_model_name()}"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _module_device(module: nn.Module) -> Optional[torch.device]:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


# ---------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Latency of one forward pass: statistics over timed samples, in seconds.

    Each sample times ``number`` consecutive calls and is divided by ``number``
    (tiny layers are called several times per sample so that the timer's own
    cost is negligible). ``threads`` is the torch intra-op thread count during
    the measurement; ``device`` the hardware's name (see :func:`device_name`).
    """

    median: float
    p25: float
    p75: float
    min: float
    repeats: int
    warmup: int
    threads: int
    device: str
    batch_size: int
    number: int = 1
    max: float = float("nan")
    clock: str = "wall"

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.p75 - self.p25) / self.median if self.median > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spread"] = self.spread
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Timing":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})

    def __str__(self) -> str:
        return (
            f"{_fmt_s(self.median)} median (p25 {_fmt_s(self.p25)}, p75 {_fmt_s(self.p75)}, min {_fmt_s(self.min)}; "
            f"{self.repeats}x{self.number} calls, {self.threads} threads, {self.device}, batch {self.batch_size})"
        )


def _fmt_s(s: float) -> str:
    return format_seconds(s, ".3g")


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values (numpy's default)."""
    n = len(sorted_values)
    if n == 1:
        return float(sorted_values[0])
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac)


def _as_args(inputs: Any) -> tuple:
    if isinstance(inputs, tuple):
        return inputs
    if isinstance(inputs, list):
        return tuple(inputs)
    return (inputs,)


def _batch_of(args: tuple) -> int:
    for a in args:
        if isinstance(a, torch.Tensor):
            return int(a.shape[0]) if a.dim() > 0 else 1
    return 1


@contextlib.contextmanager
def _threads(n: Optional[int]) -> Iterator[int]:
    """Fix torch's intra-op thread count for the block (None: keep the current one); restore it after."""
    old = torch.get_num_threads()
    if n is None:
        yield old
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LatencyError(f"threads must be a positive integer, got {n!r}")
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)


def measure(
    module: nn.Module,
    inputs: Any,
    *,
    device: Union[str, torch.device] = "cpu",
    warmup: int = 5,
    repeats: int = 20,
    threads: Optional[int] = None,
    min_time: float = 0.0,
    number: Optional[int] = None,
    clock: str = "wall",
) -> Timing:
    """Time ``module(*inputs)`` on ``device``.

    The module runs in eval mode under ``torch.inference_mode``, on ``device``
    (moved there in place, and moved back and returned to its training mode
    afterwards; nothing is deep-copied). ``inputs``: a tensor or a tuple of
    tensors, moved to ``device``. ``threads`` fixes ``torch.set_num_threads``
    during the measurement (default: the current count) and is restored after.

    ``warmup`` untimed calls, then at least ``repeats`` samples, and more until
    ``min_time`` seconds have been timed. Each sample times ``number``
    consecutive calls (default: enough calls for about 1 ms, so that timer and
    event overheads vanish for tiny layers). On CUDA, samples are timed with
    CUDA events and the device is synchronised before results are read.

    ``clock``: ``wall`` (default: elapsed time, the latency) or ``cpu`` (CPU
    time of the calling thread, CPU device with ``threads=1`` only). With one
    thread every kernel runs on the calling thread, so its CPU time is the
    latency the layer would have on an idle core: on a shared, busy machine it
    leaves out the time the thread waited for a core.

    Raises :class:`DeviceError` for a device this machine does not have.
    """
    dev = resolve_device(device)
    _check_clock(clock, dev, threads if threads is not None else torch.get_num_threads())
    if warmup < 0 or repeats < 1:
        raise LatencyError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    args = _as_args(inputs)
    if any(p.is_meta for p in module.parameters()) or any(b.is_meta for b in module.buffers()):
        raise LatencyError(f"{type(module).__name__} has tensors on the meta device; load or initialise its weights first")
    home = _module_device(module)
    was_training = module.training
    with _threads(threads) as n_threads:
        try:
            module.to(dev)
            module.eval()
            args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)
            on_device = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
            with torch.inference_mode(), on_device:
                samples, used_number = _time_calls(lambda: module(*args), dev, warmup, repeats, min_time, number, clock)
        finally:
            if home is not None and home != dev:
                module.to(home)
            module.train(was_training)
    samples.sort()
    return Timing(
        median=_quantile(samples, 0.5),
        p25=_quantile(samples, 0.25),
        p75=_quantile(samples, 0.75),
        min=samples[0],
        max=samples[-1],
        repeats=len(samples),
        warmup=warmup,
        threads=n_threads,
        device=device_name(dev),
        batch_size=_batch_of(args),
        number=used_number,
        clock=clock,
    )


def _check_clock(clock: str, dev: torch.device, threads: int) -> None:
    if clock == "wall":
        return
    if clock != "cpu":
        raise LatencyError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    if dev.type != "cpu" or threads != 1:
        raise LatencyError(
            f"clock='cpu' measures the calling thread's CPU time, which is the latency only on the CPU with threads=1 "
            f"(got device {str(dev)!r}, threads={threads})"
        )


def _time_calls(
    call: Callable[[], Any],
    dev: torch.device,
    warmup: int,
    repeats: int,
    min_time: float,
    number: Optional[int],
    clock: str = "wall",
) -> tuple[list[float], int]:
    """Per-call seconds of each sample, and the number of calls per sample."""
    for _ in range(warmup):
        call()
    _sync(dev)
    if number is None:
        # one synchronised call tells how many make a sample of about _TARGET_SAMPLE_S
        timer = time.perf_counter if clock == "wall" else time.thread_time
        t0 = timer()
        call()
        _sync(dev)
        one = timer() - t0
        number = 1 if one >= _TARGET_SAMPLE_S else min(_MAX_NUMBER, max(1, int(math.ceil(_TARGET_SAMPLE_S / max(one, 1e-9)))))
    number = max(1, int(number))
    samples: list[float] = []
    total = 0.0
    if dev.type == "cuda":
        while len(samples) < repeats or (total < min_time and len(samples) < _MAX_SAMPLES):
            batch = []
            for _ in range(repeats - len(samples) if len(samples) < repeats else repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(number):
                    call()
                end.record()
                batch.append((start, end))
            torch.cuda.synchronize(dev)
            for start, end in batch:
                s = start.elapsed_time(end) / 1e3 / number
                samples.append(s)
                total += s * number
        return samples, number
    timer = time.perf_counter if clock == "wall" else time.thread_time
    while len(samples) < repeats or (total < min_time and len(samples) < _MAX_SAMPLES):
        t0 = timer()
        for _ in range(number):
            call()
        dt = timer() - t0
        samples.append(dt / number)
        total += dt
    return samples, number


# ---------------------------------------------------------------------- rank alignment
def _align_one(r: int, multiple: int, mx: Optional[int], mode: str) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise RankError(f"align_rank: a rank must be a positive integer, got {r!r}")
    if mode == "nearest":
        q = (r + multiple // 2) // multiple
    elif mode == "down":
        q = r // multiple
    elif mode == "up":
        q = -(-r // multiple)
    else:
        raise RankError(f"align_rank: mode must be nearest, down or up, got {mode!r}")
    out = max(q, 1) * multiple
    if mx is not None:
        if isinstance(mx, bool) or not isinstance(mx, int) or mx < 1:
            raise RankError(f"align_rank: max_rank must be a positive integer, got {mx!r}")
        if out > mx:
            out = (mx // multiple) * multiple if mx >= multiple else mx
    return out


def align_rank(rank: Rank, multiple: int, max_rank: Optional[Rank] = None, *, mode: str = "down") -> Rank:
    """``rank`` rounded to a multiple of ``multiple`` (8 or 16 suit GPU tensor cores).

    ``mode``: ``down`` (default: the same rule as a plan entry's ``align``
    option, see :func:`autorank.methods._base.align_rank`, so that a FLOPs budget
    stays met), ``nearest`` (ties round up) or ``up``. The result is
    never below ``multiple`` and never above ``max_rank`` (when given): when the
    two conflict (``max_rank < multiple``) ``max_rank`` wins, since a larger rank
    is invalid. Tuples (Tucker-2's ``(r_in, r_out)``) are aligned per component,
    against a tuple ``max_rank`` or the same integer for every component.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise RankError(f"align_rank: multiple must be a positive integer, got {multiple!r}")
    if isinstance(rank, (tuple, list)):
        if isinstance(max_rank, (tuple, list)):
            if len(max_rank) != len(rank):
                raise RankError(f"align_rank: rank {list(rank)} and max_rank {list(max_rank)} differ in length")
            maxes = list(max_rank)
        else:
            maxes = [max_rank] * len(rank)
        return tuple(_align_one(r, multiple, m, mode) for r, m in zip(rank, maxes))
    if isinstance(max_rank, (tuple, list)):
        raise RankError(f"align_rank: an integer rank {rank!r} needs an integer max_rank, got {list(max_rank)}")
    return _align_one(rank, multiple, max_rank, mode)


def align_plan(profile: Any, plan: Union[Plan, Mapping[str, Any]], multiple: int, *, mode: str = "down") -> dict[str, tuple[str, Rank]]:
    """``{name: (method, concrete rank)}`` with every rank of ``plan`` aligned to ``multiple``.

    Fractions are first resolved on the profiled input shapes, then aligned
    within the method's valid range for that layer.
    """
    out: dict[str, tuple[str, Rank]] = {}
    for name, method, rank, options in _plan_items(plan):
        if method == "none":
            continue
        m = registry.get(method)
        concrete = _concrete_rank(profile, name, method, rank, options)
        out[name] = (m.name, align_rank(concrete, multiple, m.max_rank(profile.layers[name].spec), mode=mode))
    return out


# ---------------------------------------------------------------------- signatures
def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _rank_text(rank: Optional[Rank]) -> str:
    if rank is None:
        return "dense"
    if isinstance(rank, (tuple, list)):
        return "x".join(str(int(r)) for r in rank)
    return str(int(rank))


def layer_signature(module_or_spec: Union[nn.Module, LayerSpec], input_shape: Sequence[int], type_name: Optional[str] = None) -> str:
    """What determines a layer's latency apart from the hardware: class, kind, LayerSpec fields, input shape.

    ``type_name`` defaults to the module's class name (``Linear``, ``Conv2d``,
    ``Conv1D``) or, given a spec, to the usual class of its kind.
    """
    if isinstance(module_or_spec, LayerSpec):
        spec = module_or_spec
        tname = type_name or {"linear": "Linear", "conv2d": "Conv2d", "conv1d": "Conv1D"}.get(spec.kind, spec.kind)
    else:
        spec = layer_spec(module_or_spec)
        tname = type_name or type(module_or_spec).__name__
    if spec.is_conv:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = spec.kernel_size, spec.stride, spec.padding, spec.dilation
        body = (
            f"{spec.in_channels}->{spec.out_channels},k{kh}x{kw},s{sh}x{sw},p{ph}x{pw},d{dh}x{dw},"
            f"g{spec.groups},{spec.padding_mode},bias={int(spec.bias)}"
        )
    else:
        body = f"{spec.in_channels}->{spec.out_channels},bias={int(spec.bias)}"
    return f"{tname}:{spec.kind}({body})@{_shape_text(input_shape)}"


def model_signature(profile: Any, batch_size: Optional[int] = None) -> str:
    """A key for a whole model's latency: its input shape (at ``batch_size``), FLOPs, parameters, layers."""
    shape = _with_batch(tuple(profile.input_shape), batch_size, profile.input_shape[0] if profile.input_shape else 1)
    h = hashlib.blake2b(digest_size=10)
    h.update(json.dumps([profile.flops, profile.params], default=str).encode())
    for name, lp in profile.layers.items():
        h.update(f"{name}|{lp.type}|{lp.spec}|{lp.input_shape}".encode())
    return f"model:{h.hexdigest()}@{_shape_text(shape)}"


def _entry_key(signature: str, method: Optional[str], rank: Optional[Rank]) -> str:
    return f"{signature}|{method or 'dense'}|{_rank_text(rank)}"


def _with_batch(shape: tuple[int, ...], batch_size: Optional[int], profile_batch: int) -> tuple[int, ...]:
    """``shape`` at another batch size: its first dimension scaled by batch_size / profile_batch."""
    if batch_size is None or not shape or batch_size == profile_batch:
        return tuple(shape)
    first = shape[0] * batch_size
    if profile_batch <= 0 or first % profile_batch:
        raise LatencyError(
            f"cannot scale input shape {list(shape)} from batch {profile_batch} to batch {batch_size}; "
            f"profile the model at batch {batch_size} instead"
        )
    return (first // profile_batch,) + tuple(shape[1:])


# ---------------------------------------------------------------------- the lookup table
def default_table_dir() -> Path:
    """``$AUTORANK_CACHE_DIR/latency``, else ``~/.cache/autorank/latency``."""
    root = os.environ.get("AUTORANK_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "autorank") / "latency"


def _dtype_of(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise LatencyError(f"unknown dtype {dtype!r} (use float32, float16 or bfloat16)")
    return d


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40] or "device"


def _random_fill_(module: nn.Module, seed: int = 0) -> None:
    """Fill parameters with small random values (weights ~ N(0, 1/fan_in), biases 0); buffers with 0/1s.

    Uninitialised memory may hold denormals or NaNs, which slow CPU arithmetic
    by orders of magnitude: never time a layer on ``torch.empty`` weights.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                fan_in = max(1, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(fan_in ** -0.5).to(p.dtype))
            else:
                p.zero_()
        for name, b in module.named_buffers():
            if b.is_floating_point():
                b.fill_(1.0 if "var" in name else 0.0)


class LatencyTable:
    """Per-layer latencies on one device configuration, on disk as JSON.

    The file is ``<directory>/<device>-<dtype>-t<threads>-b<batch>-<hash>.json``,
    where the hash is the *validity key*: (device name, torch version, dtype,
    threads, batch size, clock). Change any of these and a fresh table (another
    file) is used. Entries: ``layer signature | method | rank`` (``dense`` for the
    original layer) → timing; the whole models measured (``model:…``) are kept
    under ``models``. Writes are atomic (temporary file + ``os.replace``) and
    merge with what another process may have written meanwhile.

    ``measurements`` counts the measurements this instance made (not those it
    read from disk).
    """

    def __init__(
        self,
        directory: Union[str, os.PathLike, None] = None,
        *,
        device: Union[str, torch.device] = "cpu",
        dtype: Union[str, torch.dtype, None] = torch.float32,
        threads: Optional[int] = None,
        batch_size: int = 1,
        warmup: int = 5,
        repeats: int = 15,
        min_time: float = 0.05,
        clock: str = "wall",
        device_name_override: Optional[str] = None,
        torch_version: Optional[str] = None,
    ) -> None:
        """``device_name_override`` and ``torch_version`` name a configuration other than this
        machine's, to read a table measured elsewhere (see :meth:`open`); such a table cannot be
        added to here."""
        self.device = str(device)
        if device_name_override is not None:
            self.device_name = device_name_override
        else:
            self.device_name = device_name(device)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise LatencyError(f"threads must be a positive integer, got {threads!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LatencyError(f"batch size must be a positive integer, got {batch_size!r}")
        self.threads = int(threads) if threads is not None else torch.get_num_threads()
        self.dtype = _dtype_of(dtype)
        self.batch_size = int(batch_size)
        self.warmup, self.repeats, self.min_time = int(warmup), int(repeats), float(min_time)
        if clock not in ("wall", "cpu"):
            raise LatencyError(f"clock must be 'wall' or 'cpu', got {clock!r}")
        self.clock = clock
        self.directory = Path(directory) if directory is not None else default_table_dir()
        self.validity = {
            "device_name": self.device_name,
            "torch": torch_version or torch.__version__,
            "dtype": str(self.dtype).replace("torch.", ""),
            "threads": self.threads,
            "batch_size": self.batch_size,
            "clock": self.clock,
        }
        self.key = hashlib.blake2b(json.dumps(self.validity, sort_keys=True).encode(), digest_size=8).hexdigest()
        self.path = self.directory / (
            f"{_slug(self.device_name)}-{self.validity['dtype']}-t{self.threads}-b{self.batch_size}"
            f"{'-cpuclock' if self.clock == 'cpu' else ''}-{self.key}.json"
        )
        self.entries: dict[str, dict[str, Any]] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self.measured_on: dict[str, Any] = {}
        self.measurements = 0
        self._dirty = False
        self.reload()

    @classmethod
    def open(cls, path: Union[str, os.PathLike]) -> "LatencyTable":
        """The table saved at ``path``, whatever machine measured it (to estimate from a worker's table)."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise LatencyError(f"cannot read latency table {p}: {exc}") from None
        return cls.from_dict(data, p.parent, expected_path=p)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], directory: Union[str, os.PathLike, None] = None, *, expected_path: Optional[Path] = None
    ) -> "LatencyTable":
        """A table from :meth:`to_dict` (e.g. returned by :func:`profile_latency_job` on another machine).

        Its entries are kept in memory; :meth:`save` writes them under ``directory``.
        """
        where = str(expected_path or "latency table data")
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT or not isinstance(data.get("validity"), Mapping):
            raise LatencyError(f"{where} is not an autorank latency table")
        v = data["validity"]
        try:
            table = cls(
                directory, device=str((data.get("measured_on") or {}).get("device", "cpu")), dtype=v["dtype"],
                threads=int(v["threads"]), batch_size=int(v["batch_size"]), clock=v.get("clock", "wall"),
                device_name_override=str(v["device_name"]), torch_version=str(v["torch"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LatencyError(f"{where}: malformed validity key {dict(v)!r}: {exc}") from None
        if expected_path is not None and table.path.resolve() != Path(expected_path).resolve():
            raise LatencyError(f"{where}: its contents belong in {table.path.name} (renamed or edited?)")
        for k, e in dict(data.get("entries") or {}).items():
            table.entries.setdefault(k, dict(e))
        for k, e in dict(data.get("models") or {}).items():
            table.models.setdefault(k, dict(e))
        table.measured_on = table.measured_on or dict(data.get("measured_on") or {})
        return table

    # ------------------------------------------------------------------ io
    def _read_file(self) -> Optional[dict[str, Any]]:
        if not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != _FORMAT:
                raise ValueError("not an autorank latency table")
            if data.get("version") != _FORMAT_VERSION:
                raise ValueError(f"format version {data.get('version')!r}, expected {_FORMAT_VERSION}")
            if data.get("validity") != self.validity:
                raise ValueError("its validity key does not match this device configuration")
            if not isinstance(data.get("entries"), dict) or not isinstance(data.get("models", {}), dict):
                raise ValueError("'entries' is not an object")
            for k, v in data["entries"].items():
                if not isinstance(v, dict) or not isinstance(v.get("median"), (int, float)):
                    raise ValueError(f"entry {k!r} has no median latency")
            return data
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            logger.warning("ignoring unreadable latency table %s: %s", self.path, exc)
            return None

    def reload(self) -> None:
        """Read the table's file again (entries measured here and not yet saved are kept)."""
        data = self._read_file()
        if data is None:
            return
        for k, v in data["entries"].items():
            self.entries.setdefault(k, v)
        for k, v in data.get("models", {}).items():
            self.models.setdefault(k, v)
        self.measured_on = dict(data.get("measured_on") or {})

    def save(self) -> Path:
        """Write the table atomically, merged with entries another process saved meanwhile."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._lock():
            on_disk = self._read_file() or {}
            entries = dict(on_disk.get("entries", {}))
            entries.update(self.entries)
            models = dict(on_disk.get("models", {}))
            models.update(self.models)
            self.entries, self.models = entries, models
            if not self.measured_on:
                self.measured_on = dict(on_disk.get("measured_on") or {})
            data = {
                "format": _FORMAT,
                "version": _FORMAT_VERSION,
                "key": self.key,
                "validity": self.validity,
                "measured_on": self.measured_on or {"device": self.device, "device_name": self.device_name},
                "entries": dict(sorted(entries.items())),
                "models": dict(sorted(models.items())),
            }
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=1)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        self._dirty = False
        return self.path

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """An advisory lock between processes writing the same table (POSIX); a no-op elsewhere."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "key": self.key,
            "validity": dict(self.validity),
            "path": str(self.path),
            "measured_on": dict(self.measured_on),
            "entries": dict(self.entries),
            "models": dict(self.models),
        }

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"<LatencyTable {self.device_name}, {self.validity['dtype']}, {self.threads} threads, batch {self.batch_size}: {len(self)} entries at {self.path}>"

    # ------------------------------------------------------------------ entries
    def _key_of(
        self, module_or_spec: Union[nn.Module, LayerSpec, str], input_shape: Sequence[int], method: Optional[str], rank: Any
    ) -> str:
        sig = module_or_spec if isinstance(module_or_spec, str) else layer_signature(module_or_spec, input_shape)
        return _entry_key(sig, *self._resolve(module_or_spec, input_shape, method, rank))

    @staticmethod
    def _resolve(
        module_or_spec: Union[nn.Module, LayerSpec, str], input_shape: Sequence[int], method: Optional[str], rank: Any
    ) -> tuple[Optional[str], Optional[Rank]]:
        """(method name, concrete rank), or (None, None) for the dense layer."""
        if method is None or method == "dense":
            return None, None
        m = registry.get(method)
        if isinstance(rank, float):
            if isinstance(module_or_spec, str):
                raise LatencyError(f"rank {rank} is a fraction: give the layer or its LayerSpec, or a concrete rank")
            rank = m.resolve_rank(module_or_spec, rank, tuple(input_shape))
        elif isinstance(rank, list):
            rank = tuple(rank)
        if rank is None or isinstance(rank, (str, bool)):
            raise LatencyError(f"method {m.name!r} needs a concrete rank or a fraction, got {rank!r}")
        return m.name, rank

    def get(
        self,
        module_or_spec: Union[nn.Module, LayerSpec, str],
        input_shape: Sequence[int] = (),
        method: Optional[str] = None,
        rank: Optional[Rank] = None,
    ) -> Optional[float]:
        """Median latency (s) of the dense layer (``method=None``) or of its replacement at a concrete rank; None when absent.

        ``module_or_spec``: the layer, its LayerSpec, or a signature from :func:`layer_signature`.
        """
        hit = self.entries.get(self._key_of(module_or_spec, input_shape, method, rank))
        return None if hit is None else float(hit["median"])

    def put(
        self,
        module_or_spec: Union[nn.Module, LayerSpec, str],
        input_shape: Sequence[int],
        method: Optional[str],
        rank: Optional[Rank],
        timing: Union[Timing, float],
    ) -> None:
        """Record a latency (a Timing, or seconds) for the dense layer or a replacement; :meth:`save` writes it."""
        record = timing.to_dict() if isinstance(timing, Timing) else {"median": float(timing)}
        mname, concrete = self._resolve(module_or_spec, input_shape, method, rank)
        if mname is not None:
            record["method"] = mname
            record["rank"] = list(concrete) if isinstance(concrete, tuple) else concrete
        self.entries[self._key_of(module_or_spec, input_shape, method, rank)] = record
        self._dirty = True

    def get_model(self, signature: str) -> Optional[float]:
        """Median latency (s) of a whole model recorded under ``signature`` (see :func:`model_signature`)."""
        hit = self.models.get(signature)
        return None if hit is None else float(hit["median"])

    def put_model(self, signature: str, timing: Union[Timing, float]) -> None:
        self.models[signature] = timing.to_dict() if isinstance(timing, Timing) else {"median": float(timing)}
        self._dirty = True

    # ------------------------------------------------------------------ measuring
    def _check_can_measure(self) -> torch.device:
        if self.validity["torch"] != torch.__version__:
            raise LatencyError(
                f"latency table {self.path.name} is for torch {self.validity['torch']}; this is torch {torch.__version__}, "
                "so it cannot add measurements to it"
            )
        dev = resolve_device(self.device)
        here = device_name(dev)
        if here != self.device_name:
            raise LatencyError(
                f"latency table {self.path.name} is for {self.device_name!r}; this machine's {self.device} is {here!r}, "
                "so it cannot add measurements to it"
            )
        if not self.measured_on:
            self.measured_on = {"device": str(dev), "device_name": here, "host": platform.node()}
        return dev

    def _timing(self, module: nn.Module, x: torch.Tensor, dev: torch.device) -> Timing:
        return measure(
            module, x, device=dev, warmup=self.warmup, repeats=self.repeats, threads=self.threads,
            min_time=self.min_time, clock=self.clock,
        )

    def measure_layer(
        self,
        module: nn.Module,
        input_shape: Sequence[int],
        method: Optional[str] = None,
        rank: Any = None,
        *,
        options: Optional[dict] = None,
        force: bool = False,
        save: bool = True,
    ) -> float:
        """Median latency (s) of ``module`` (``method=None``) or of its replacement at ``rank``, alone on ``input_shape``.

        Looked up first; measured on the table's device and recorded only when
        absent (or ``force``). ``rank``: concrete, or a fraction ρ resolved on
        ``input_shape``. The replacement is the method's meta skeleton,
        materialised on the device with random weights (no factorization); the
        dense layer is a copy of ``module`` (hooks dropped, ``module`` untouched).
        """
        kind = layer_kind(module)
        if kind is None:
            raise LatencyError(f"{type(module).__name__} is not a layer autorank decomposes (Linear, Conv1D, Conv2d)")
        shape = tuple(int(s) for s in input_shape)
        concrete: Optional[Rank] = None
        m = None
        if method is not None and method != "dense":
            m = registry.get(method)
            m.check_applies(module)
            concrete = m.resolve_rank(module, rank, shape)
        key = self._key_of(module, shape, None if m is None else m.name, concrete)
        if not force and key in self.entries:
            return float(self.entries[key]["median"])
        dev = self._check_can_measure()
        if m is None:
            layer = _dense_copy(module)
        else:
            layer = m.build(module, None, concrete, options)
            layer.to_empty(device=dev)
            _random_fill_(layer)
        layer.to(device=dev, dtype=self.dtype)
        g = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(shape, generator=g, dtype=torch.float32).to(device=dev, dtype=self.dtype)
        timing = self._timing(layer, x, dev)
        del layer
        self.measurements += 1
        self.put(module, shape, None if m is None else m.name, concrete, timing)
        logger.debug("latency %s %s %s: %s", layer_signature(module, shape), m.name if m else "dense", _rank_text(concrete), timing)
        if save:
            self.save()
        return timing.median

    def measure_model(self, model: nn.Module, inputs: Any, signature: str, *, force: bool = False, save: bool = True) -> float:
        """Median latency (s) of the whole ``model`` on ``inputs``, recorded under ``signature``."""
        if not force and signature in self.models:
            return float(self.models[signature]["median"])
        timing = self._model_timing(model, inputs)
        self.measurements += 1
        self.put_model(signature, timing)
        if save:
            self.save()
        return timing.median

    def _model_timing(self, model: nn.Module, inputs: Any) -> Timing:
        dev = self._check_can_measure()
        return measure(
            model, inputs, device=dev, warmup=max(2, self.warmup), repeats=self.repeats, threads=self.threads,
            min_time=max(self.min_time, 0.25), clock=self.clock,
        )


def _combine(timings: Sequence[Timing]) -> Timing:
    """Several measurements of one thing, taken at different moments, as one (medians of their statistics)."""
    if len(timings) == 1:
        return timings[0]
    med = lambda attr: _quantile(sorted(getattr(t, attr) for t in timings), 0.5)  # noqa: E731
    first = timings[0]
    return Timing(
        median=med("median"), p25=med("p25"), p75=med("p75"), min=min(t.min for t in timings),
        max=max(t.max for t in timings), repeats=sum(t.repeats for t in timings), warmup=first.warmup,
        threads=first.threads, device=first.device, batch_size=first.batch_size, number=first.number, clock=first.clock,
    )


def _dense_copy(module: nn.Module) -> nn.Module:
    """A copy of one layer without hooks, with random weights if the original lives on the meta device."""
    clone = copy.deepcopy(module)
    for m in clone.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            d = getattr(m, attr, None)
            if isinstance(d, dict):
                d.clear()
    if any(p.is_meta for p in clone.parameters()):
        clone.to_empty(device="cpu")
        _random_fill_(clone)
    return clone


# ---------------------------------------------------------------------- plans and tables
def _plan_items(plan: Union[Plan, Mapping[str, Any]]) -> Iterator[tuple[str, str, Any, dict]]:
    """(name, method, rank, options) of each entry of a Plan or a ``{name: (method, rank)}`` mapping."""
    items = plan.layers.items() if isinstance(plan, Plan) else plan.items()
    for name, entry in items:
        if isinstance(entry, LayerPlan):
            yield name, entry.method, entry.rank, dict(entry.options or {})
        elif isinstance(entry, Mapping):
            yield name, entry["method"], entry["rank"], dict(entry.get("options") or {})
        else:
            method, rank, *rest = entry
            yield name, method, rank, dict(rest[0] or {}) if rest else {}


def _concrete_rank(profile: Any, name: str, method: str, rank: Any, options: Optional[dict] = None) -> Rank:
    """The rank :func:`autorank.decompose` would build for this plan entry (fractions resolved, ``align`` applied)."""
    from autorank.methods._base import align_rank as plan_align

    rank = _normalise_rank(rank)
    concrete = profile.concrete_rank(name, method, rank)
    align = (options or {}).get("align")
    if align and isinstance(rank, float):
        concrete = plan_align(concrete, align, registry.get(method).max_rank(profile.layers[name].spec))
    return concrete


def _normalise_rank(rank: Any) -> Any:
    return tuple(rank) if isinstance(rank, list) else rank


def default_candidates(
    profile: Any, rhos: Sequence[float] = DEFAULT_RHOS, methods: Optional[Sequence[str]] = None
) -> dict[str, list[tuple[str, float]]]:
    """Every applicable (method, ρ) for every candidate layer of ``profile``."""
    wanted = None if methods is None else {registry.get(m).name for m in methods}
    out: dict[str, list[tuple[str, float]]] = {}
    for name, lp in profile.layers.items():
        if not lp.input_shape:
            continue
        ms = [m for m in lp.applicable() if wanted is None or m in wanted]
        if ms:
            out[name] = [(m, float(r)) for m in ms for r in rhos]
    return out


def _example_inputs(model: nn.Module, profile: Any, batch_size: int) -> torch.Tensor:
    from autorank.zoo import SPEC_ATTR, example_input

    shape = _with_batch(tuple(profile.input_shape), batch_size, profile.input_shape[0])
    spec = model.__dict__.get(SPEC_ATTR)
    x = example_input(spec, shape) if spec is not None else None
    if x is None:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return x.to(_model_dtype(model)) if x.is_floating_point() else x


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def build_table(
    model: nn.Module,
    profile: Any,
    candidates: Optional[Mapping[str, Sequence[tuple[str, Any]]]] = None,
    *,
    device: Union[str, torch.device] = "cpu",
    batch_size: Optional[int] = None,
    table: Optional[LatencyTable] = None,
    progress: Optional[Callable[[int, int, str], None]] = None,
    example_inputs: Any = None,
    threads: Optional[int] = None,
    directory: Union[str, os.PathLike, None] = None,
    clock: str = "wall",
) -> LatencyTable:
    """Measure what ``table`` lacks: the base model, each candidate's dense layer, and each (method, rank).

    ``candidates``: ``{layer name: [(method, rank), ...]}`` with concrete ranks
    or fractions ρ (resolved by ``profile.concrete_rank``), optionally
    ``(method, rank, options)`` where ``options["align"]`` aligns a fraction's
    rank as ``autorank.decompose`` does; default: every
    applicable method at :data:`DEFAULT_RHOS`. ``batch_size``: default the
    profile's; otherwise every recorded input shape is scaled to it.
    ``example_inputs``: the base model's input at that batch size (default: the
    built-in spec's example input, else ``randn`` of the profiled shape).
    ``progress(done, total, what)`` is called after each item.

    Returns the table (a new one under ``directory`` / the default directory
    when ``table`` is None), saved. Sets ``profile.latency`` and each measured
    layer's ``latency`` when the batch size is the profile's.
    """
    profile_batch = int(profile.input_shape[0]) if profile.input_shape else 1
    if table is None:
        table = LatencyTable(
            directory, device=device, dtype=_model_dtype(model), threads=threads,
            batch_size=batch_size if batch_size is not None else profile_batch, clock=clock,
        )
    elif batch_size is not None and batch_size != table.batch_size:
        raise LatencyError(f"batch size {batch_size} differs from the table's ({table.batch_size}); pass a table for batch {batch_size}")
    if _model_dtype(model) != table.dtype:
        raise LatencyError(
            f"the model's dtype is {str(_model_dtype(model)).replace('torch.', '')} but the table is for "
            f"{table.validity['dtype']}; convert the model or use a table of its dtype"
        )
    bs = table.batch_size
    if candidates is None:
        candidates = default_candidates(profile)
    named = dict(model.named_modules())
    todo: list[tuple[str, Optional[str], Any]] = []
    for name, pairs in candidates.items():
        lp = profile.layers.get(name)
        if lp is None or name not in named:
            raise LatencyError(f"unknown layer {name!r}: not a decomposable layer of the profiled model")
        if not lp.input_shape:
            raise LatencyError(f"layer {name!r} has no recorded input shape (not called on the example input)")
        todo.append((name, None, None))
        for method, rank, *rest in pairs:
            if method in (None, "none", "dense"):
                continue
            concrete = _concrete_rank(profile, name, method, rank, rest[0] if rest else None)
            todo.append((name, registry.get(method).name, concrete))
    msig = model_signature(profile, bs)
    total = len(todo) + 1
    last_save = time.monotonic()
    done = 0
    # The base model is measured before, halfway through and after the layers, and the median kept:
    # every estimate starts from it, so a slow or fast moment of a shared machine must not decide it.
    base_timings: list[Timing] = []
    need_base = table.get_model(msig) is None
    pending = [i for i in (0, len(todo) // 2, len(todo))] if need_base else []
    x = None
    if need_base:
        x = example_inputs if example_inputs is not None else _example_inputs(model, profile, bs)
    for i, item in enumerate([*todo, None]):
        while pending and pending[0] == i:
            pending.pop(0)
            base_timings.append(table._model_timing(model, x))
        if item is None:
            break
        name, method, rank = item
        shape = _with_batch(profile.layers[name].input_shape, bs, profile_batch)
        table.measure_layer(named[name], shape, method, rank, save=False)
        done += 1
        if progress is not None:
            progress(done, total, f"{name} {method or 'dense'} {_rank_text(rank)}")
        if table._dirty and time.monotonic() - last_save > 10.0:  # keep progress if the job is interrupted
            table.save()
            last_save = time.monotonic()
    if need_base:
        table.put_model(msig, _combine(base_timings))
        table.measurements += 1
    done += 1
    if progress is not None:
        progress(done, total, "base model")
    if table._dirty:
        table.save()
    if bs == profile_batch:
        profile.latency = table.get_model(msig)
        for name in candidates:
            lp = profile.layers[name]
            lp.latency = table.get(named[name], lp.input_shape)
    return table


def estimate_latency(
    profile: Any,
    plan: Union[Plan, Mapping[str, Any]],
    table: LatencyTable,
    *,
    base_latency: Union[float, Timing, None] = None,
    model: Optional[nn.Module] = None,
) -> float:
    """Latency (s) of the model decomposed by ``plan``, from the table, with no model run.

    ``base latency − Σ dense latency of replaced layers + Σ replacement latency``.
    ``plan``: a Plan or ``{name: (method, rank)}`` (like ``ModelProfile.estimate``),
    ranks concrete or fractions. ``base_latency``: seconds or a Timing (default:
    the table's measurement of this model). Entries missing from the table are
    measured when ``model`` is given; otherwise LatencyError names the first.
    """
    profile_batch = int(profile.input_shape[0]) if profile.input_shape else 1
    bs = table.batch_size
    if base_latency is None:
        base = table.get_model(model_signature(profile, bs))
        if base is None:
            if model is None:
                raise LatencyError(
                    f"no base latency for this model at batch {bs} in {table.path.name}; pass base_latency= or model=, or run build_table"
                )
            base = table.measure_model(model, _example_inputs(model, profile, bs), model_signature(profile, bs))
    else:
        base = base_latency.median if isinstance(base_latency, Timing) else float(base_latency)
    named = dict(model.named_modules()) if model is not None else {}
    total = base
    for name, method, rank, options in _plan_items(plan):
        if method in ("none", None):
            continue
        concrete = _concrete_rank(profile, name, method, rank, options)
        lp = profile.layers[name]
        mname = registry.get(method).name
        shape = _with_batch(lp.input_shape, bs, profile_batch)
        sig = layer_signature(lp.spec, shape, type_name=lp.type)
        dense = table.get(sig, shape)
        repl = table.get(sig, shape, mname, concrete)
        if dense is None or repl is None:
            if name not in named:
                what = "dense layer" if dense is None else f"{mname} at rank {_rank_text(concrete)}"
                raise LatencyError(
                    f"layer {name!r}: no latency for its {what} in {table.path.name} ({table.device_name}, batch {bs}); "
                    "run build_table with this candidate or pass model="
                )
            if dense is None:
                dense = table.measure_layer(named[name], shape)
            if repl is None:
                repl = table.measure_layer(named[name], shape, mname, concrete)
        total += repl - dense
    return total


# ---------------------------------------------------------------------- worker job
def _parse_candidates(candidates: Optional[Mapping[str, Any]]) -> Optional[dict[str, list[tuple[str, Any]]]]:
    if candidates is None:
        return None
    out: dict[str, list[tuple[str, Any]]] = {}
    for name, pairs in candidates.items():
        lst = []
        for pair in pairs:
            if isinstance(pair, Mapping):
                method, rank, options = pair["method"], pair["rank"], pair.get("options")
            else:
                method, rank, *rest = pair
                options = rest[0] if rest else None
            lst.append((str(method), _normalise_rank(rank), dict(options or {})))
        out[str(name)] = lst
    return out


def profile_latency_job(
    model_spec: str,
    input_shape: Sequence[int],
    *,
    device: str = "cpu",
    batch_size: int = 1,
    candidates: Optional[Mapping[str, Any]] = None,
    threads: Optional[int] = None,
    table_dir: Optional[str] = None,
    rhos: Sequence[float] = DEFAULT_RHOS,
    clock: str = "wall",
    include_table: bool = False,
) -> dict[str, Any]:
    """Measure a model's latency table on this worker, from JSON-able arguments alone.

    Loads ``model_spec`` (:func:`autorank.zoo.load_model`), profiles it on an
    example input of ``input_shape`` with its first dimension set to
    ``batch_size``, fills the table under ``table_dir`` (default directory when
    None) for ``candidates`` (``{name: [[method, rank], ...]}``, default: every
    applicable method at ``rhos``) and returns a JSON-able summary: the device's
    name, the table's key and path, the base latency, each layer's dense latency
    and its replacements' latencies, and how many new measurements were made.
    ``include_table``: add the whole table (``"table"``), for a driver that does
    not share the worker's disk: ``LatencyTable.from_dict(result["table"])``.
    """
    from autorank.cost.profile import profile_model
    from autorank.zoo import example_input, load_model

    resolve_device(device)  # fail before loading anything
    shape = tuple(int(s) for s in input_shape)
    if not shape:
        raise LatencyError("input shape must have at least one dimension (the batch)")
    shape = (int(batch_size),) + shape[1:]
    model = load_model(model_spec)
    x = example_input(model_spec, shape)
    profile = profile_model(model, x)
    parsed = _parse_candidates(candidates) or default_candidates(profile, rhos)
    table = LatencyTable(
        table_dir, device=device, dtype=_model_dtype(model), threads=threads, batch_size=int(batch_size), clock=clock
    )
    t0 = time.perf_counter()
    build_table(model, profile, parsed, table=table, example_inputs=x)
    elapsed = time.perf_counter() - t0
    named = dict(model.named_modules())
    layers: dict[str, Any] = {}
    for name, pairs in parsed.items():
        lp = profile.layers[name]
        reps = []
        for method, rank, *rest in pairs:
            if method in ("none", "dense"):
                continue
            concrete = _concrete_rank(profile, name, method, rank, rest[0] if rest else None)
            mname = registry.get(method).name
            reps.append({
                "method": mname,
                "requested": list(rank) if isinstance(rank, tuple) else rank,
                **({"options": rest[0]} if rest and rest[0] else {}),
                "rank": list(concrete) if isinstance(concrete, tuple) else concrete,
                "latency_s": table.get(named[name], lp.input_shape, mname, concrete),
            })
        layers[name] = {
            "type": lp.type,
            "shape": lp.spec.describe(),
            "input_shape": list(lp.input_shape),
            "dense_s": table.get(named[name], lp.input_shape),
            "replacements": reps,
        }
    return {
        "model": model_spec,
        "device": device,
        "device_name": table.device_name,
        "torch": torch.__version__,
        "dtype": table.validity["dtype"],
        "threads": table.threads,
        "batch_size": table.batch_size,
        "clock": table.clock,
        "input_shape": list(shape),
        "table_key": table.key,
        "table_path": str(table.path),
        "base_latency_s": table.get_model(model_signature(profile, table.batch_size)),
        "layers": layers,
        "new_measurements": table.measurements,
        "elapsed_s": elapsed,
        "pid": os.getpid(),
        **({"table": table.to_dict()} if include_table else {}),
    }
