"""Timing a module on a device: warm-up, repeated samples, median and quartiles.

:func:`measure` times one module (a whole model or a single layer) on a device:
warm-up, repeated samples, median and quartiles, CUDA events on a GPU, the torch
thread count fixed for the measurement and recorded (then restored).
:func:`device_name` is the stable name of the hardware behind a device, which
keys every latency table.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from autorank._format import format_seconds
from autorank.errors import AutorankError

__all__ = [
    "DeviceError", "LatencyError", "Timing", "measure", "measure_side_by_side", "measure_paired", "measure_rounds", "paired_ratios",
    "device_name", "resolve_device",
    "combine_timings", "default_threads", "cpu_share", "MEMORY_FORMATS", "memory_format_name", "to_memory_format",
]

#: how a model's 4-D weights and inputs are laid out when it is measured (and deployed): PyTorch's default NCHW
#: (``contiguous``) or NHWC (``channels_last``: where oneDNN's CPU convolutions need no layout conversion)
MEMORY_FORMATS = ("contiguous", "channels_last")

#: a timed sample on CPU/GPU is at least this long: tiny layers are called several times per sample
_TARGET_SAMPLE_S = 1e-3
_MAX_NUMBER = 10_000
_MAX_SAMPLES = 100_000


class DeviceError(AutorankError, ValueError):
    """A device that is not available here (``cuda`` without CUDA, ``cuda:3`` out of range, ...)."""


class LatencyError(AutorankError, ValueError):
    """A latency that cannot be measured or looked up (missing table entry, meta-device module, ...)."""


def memory_format_name(name: Any) -> str:
    """``contiguous`` or ``channels_last`` (``channels-last`` accepted); LatencyError naming the value otherwise."""
    text = str(name).replace("-", "_") if isinstance(name, str) else None
    if text not in MEMORY_FORMATS:
        raise LatencyError(f"memory format must be contiguous or channels-last, got {name!r}")
    return text


def to_memory_format(module: Optional[nn.Module], args: tuple, name: str) -> tuple:
    """Lay out ``module``'s 4-D weights (in place) and ``args``' 4-D tensors as ``name`` says; returns the new args."""
    fmt = torch.channels_last if memory_format_name(name) == "channels_last" else torch.contiguous_format
    if module is not None:
        module.to(memory_format=fmt)
    return tuple(a.contiguous(memory_format=fmt) if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)


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


@functools.lru_cache(maxsize=1)
def _physical_cores() -> int:
    """Physical cores this process may run on (/proc/cpuinfo's core ids within the affinity mask), else logical CPUs."""
    try:
        allowed = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        allowed = set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    try:
        proc = phys = core = None
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in [*f, ""]:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    proc = int(value)
                elif key == "physical id":
                    phys = value
                elif key == "core id":
                    core = value
                elif not key:  # end of one processor's block
                    if proc is not None and proc in allowed:
                        cores.add((phys or "0", core if core is not None else str(proc)))
                    proc = phys = core = None
    except (OSError, ValueError):
        pass
    return max(1, len(cores) or len(allowed))


def default_threads() -> int:
    """The machine's default number of CPU threads for latency: its physical cores (torch's own default).

    Not ``torch.get_num_threads()``, which a process may have lowered (a Ray
    worker runs with ``OMP_NUM_THREADS`` set to the CPUs it reserved; test suites
    set one thread): a latency target means the machine as deployed.
    """
    return _physical_cores()


def cpu_share(seconds: float = 0.2) -> float:
    """The share of a core a busy thread gets right now: 1.0 on an idle machine, 0.5 when it shares a core with one other.

    A latency measured with several threads on a machine where this is well
    below 1 includes waiting for cores (every parallel region waits for its
    slowest thread); one thread, or the ``cpu`` clock, measures more steadily.
    """
    w0, c0 = time.perf_counter(), time.thread_time()
    x = 0
    while time.perf_counter() - w0 < seconds:
        x += 1
    return min(1.0, (time.thread_time() - c0) / max(time.perf_counter() - w0, 1e-9))


def omp_wait_policy() -> str:
    """How this process's OpenMP threads wait between parallel regions (``OMP_WAIT_POLICY``: ``ACTIVE``,
    ``PASSIVE``, or ``default``). It changes CPU latency a lot on small operators: the digits demo at batch 1
    on two threads of a 2-core machine ran in 1.2 ms by default and in 2.6 ms with ``PASSIVE`` (every
    batch norm waits for a sleeping thread), so it is part of a CPU latency table's key."""
    return (os.environ.get("OMP_WAIT_POLICY") or "default").strip().upper() or "DEFAULT"


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
    max_time: Optional[float] = None,
    memory_format: str = "contiguous",
) -> Timing:
    """Time ``module(*inputs)`` on ``device``.

    The module runs in eval mode under ``torch.inference_mode``, on ``device``
    (moved there in place, and moved back and returned to its training mode
    afterwards; nothing is deep-copied). ``inputs``: a tensor or a tuple of
    tensors, moved to ``device``. ``threads`` fixes ``torch.set_num_threads``
    during the measurement (default: the current count) and is restored after.

    ``warmup`` untimed calls, then at least ``repeats`` samples, and more until
    ``min_time`` seconds have been timed. ``max_time`` bounds a slow module
    (a whole model at batch 32): warm-up stops once it has taken half of it, and
    sampling once 3 samples have and the samples have taken it all. Each sample times ``number``
    consecutive calls (default: enough calls for about 1 ms, so that timer and
    event overheads vanish for tiny layers). On CUDA, samples are timed with
    CUDA events and the device is synchronised before results are read.

    ``clock``: ``wall`` (default: elapsed time, the latency) or ``cpu`` (CPU
    time of the calling thread, CPU device with ``threads=1`` only). With one
    thread every kernel runs on the calling thread, so its CPU time is the
    latency the layer would have on an idle core: on a shared, busy machine it
    leaves out the time the thread waited for a core.

    ``memory_format``: ``channels_last`` times the module with its 4-D weights
    and inputs in NHWC (converted back afterwards), as a CNN deployed that way runs.

    Raises :class:`DeviceError` for a device this machine does not have.
    """
    dev = resolve_device(device)
    _check_clock(clock, dev, threads if threads is not None else torch.get_num_threads())
    if warmup < 0 or repeats < 1:
        raise LatencyError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    args = _as_args(inputs)
    nhwc = memory_format_name(memory_format) == "channels_last"
    if any(p.is_meta for p in module.parameters()) or any(b.is_meta for b in module.buffers()):
        raise LatencyError(f"{type(module).__name__} has tensors on the meta device; load or initialise its weights first")
    home = _module_device(module)
    was_training = module.training
    with _threads(threads) as n_threads:
        try:
            module.to(dev)
            module.eval()
            args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)
            if nhwc:
                args = to_memory_format(module, args, "channels_last")
            on_device = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
            with torch.inference_mode(), on_device:
                samples, used_number = _time_calls(lambda: module(*args), dev, warmup, repeats, min_time, number, clock, max_time)
        finally:
            if nhwc:
                module.to(memory_format=torch.contiguous_format)
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
    max_time: Optional[float] = None,
) -> tuple[list[float], int]:
    """Per-call seconds of each sample, and the number of calls per sample."""
    t_warm = time.perf_counter()
    for _ in range(warmup):
        call()
        if max_time is not None:
            _sync(dev)
            if time.perf_counter() - t_warm > max_time / 2:
                break
    _sync(dev)
    cap = float("inf") if max_time is None else float(max_time)
    enough = max(1, min(repeats, 3))
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
        while (len(samples) < repeats or (total < min_time and len(samples) < _MAX_SAMPLES)) and not (
                len(samples) >= enough and total >= cap):
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
    while (len(samples) < repeats or (total < min_time and len(samples) < _MAX_SAMPLES)) and not (
            len(samples) >= enough and total >= cap):
        t0 = timer()
        for _ in range(number):
            call()
        dt = timer() - t0
        samples.append(dt / number)
        total += dt
    return samples, number


def combine_timings(timings: Sequence[Timing]) -> Timing:
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


def measure_side_by_side(
    modules: Mapping[Any, nn.Module],
    inputs: Any,
    *,
    device: Union[str, torch.device] = "cpu",
    threads: Optional[int] = None,
    rounds: int = 5,
    warmup: int = 3,
    repeats: int = 10,
    min_time: float = 0.05,
    clock: str = "wall",
    max_time: Optional[float] = None,
    memory_format: str = "contiguous",
) -> dict[Any, Timing]:
    """Time several modules on the same inputs, interleaved: ``rounds`` rounds, each timing every module once.

    The order of the modules rotates from round to round, and each module's
    statistics are the medians over its rounds (:func:`combine_timings`): a slow
    or fast moment of a shared machine falls on every module alike instead of
    deciding one of them. With ``max_time``, a
    module whose first measurement shows that ``warmup + repeats`` calls take
    longer is timed by one call per later round (a whole model at batch 32).
    ``memory_format``: as in :func:`measure`; the modules and inputs are laid out once, before
    the first round (a fresh copy of the weights per round would add oneDNN's weight reordering
    to the first call of every round: a one-call round then measures it).
    To compare modules with one of them, :func:`measure_paired` (what the search uses).
    """
    per = measure_rounds(modules, inputs, device=device, threads=threads, rounds=rounds, warmup=warmup,
                         repeats=repeats, min_time=min_time, clock=clock, max_time=max_time, memory_format=memory_format)
    return {k: combine_timings(v) for k, v in per.items()}


def measure_paired(
    modules: Mapping[Any, nn.Module],
    inputs: Any,
    *,
    reference: Any,
    statistic: str = "median",
    **kwargs: Any,
) -> tuple[dict[Any, Timing], dict[Any, float]]:
    """:func:`measure_side_by_side`, and each module's speed-up over ``modules[reference]``, paired by round.

    The speed-up of a module is the median over the rounds of ``reference's
    statistic / the module's statistic`` *in the same round*, measured moments
    apart. On a shared machine whose speed drifts over seconds (another tenant's
    load, the clock), a slow spell that falls on the reference's measurement in
    one round moves one ratio of several; the ratio of the two modules'
    statistics over all rounds can move with it. Re-measuring one ResNet-50 front
    five times on two threads of a shared VM, the members' speed-ups spread over
    34% (min to max) taken the second way and 10-14% taken paired.
    ``kwargs``: as in :func:`measure_side_by_side`. Returns ``(timings, {key: speed-up})``
    (every key but ``reference``; a module timed at 0 s has no speed-up and is left out).
    """
    if reference not in modules:
        raise LatencyError(f"reference {reference!r} is not one of the modules measured")
    per = measure_rounds(modules, inputs, **kwargs)
    speedups = {k: _quantile(r, 0.5) for k, r in paired_ratios(per, reference, statistic).items()}
    return {k: combine_timings(v) for k, v in per.items()}, speedups


def paired_ratios(per: Mapping[Any, Sequence[Timing]], reference: Any, statistic: str = "median") -> dict[Any, list[float]]:
    """Each module's speed-up over ``reference`` in each round (``per``: :func:`measure_rounds`), sorted.

    Rounds of two measurements can be pooled by concatenating their lists
    (what the latency calibration does for a plan it measures again).
    """
    ref = per[reference]
    out: dict[Any, list[float]] = {}
    for k, timings in per.items():
        if k == reference:
            continue
        ratios = sorted(getattr(r, statistic) / getattr(t, statistic) for r, t in zip(ref, timings) if getattr(t, statistic) > 0)
        if ratios:
            out[k] = ratios
    return out


def measure_rounds(modules: Mapping[Any, nn.Module], inputs: Any, *, device: Union[str, torch.device] = "cpu",
                   threads: Optional[int] = None, rounds: int = 5, warmup: int = 3, repeats: int = 10,
                   min_time: float = 0.05, clock: str = "wall", max_time: Optional[float] = None,
                   memory_format: str = "contiguous") -> dict[Any, list[Timing]]:
    """Each module's timing in each round, ``{key: [Timing per round]}`` (see :func:`measure_side_by_side`)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise LatencyError(f"rounds must be a positive integer, got {rounds!r}")
    keys = list(modules)
    nhwc = memory_format_name(memory_format) == "channels_last"
    if nhwc:
        inputs = to_memory_format(None, _as_args(inputs), "channels_last")
        for m in modules.values():
            m.to(memory_format=torch.channels_last)
    try:
        return _side_by_side(modules, keys, inputs, device, threads, rounds, warmup, repeats, min_time, clock, max_time)
    finally:
        if nhwc:
            for m in modules.values():
                m.to(memory_format=torch.contiguous_format)


def _side_by_side(modules: Mapping[Any, nn.Module], keys: list, inputs: Any, device: Union[str, torch.device],
                  threads: Optional[int], rounds: int, warmup: int, repeats: int, min_time: float, clock: str,
                  max_time: Optional[float]) -> dict[Any, list[Timing]]:
    per: dict[Any, list[Timing]] = {k: [] for k in keys}
    slow: set = set()
    for i in range(rounds):
        shift = i % len(keys) if keys else 0
        for k in keys[shift:] + keys[:shift]:
            if k in slow:
                per[k].append(measure(modules[k], inputs, device=device, warmup=0, repeats=1, threads=threads, min_time=0.0,
                                      number=1, clock=clock))
                continue
            t = measure(modules[k], inputs, device=device, warmup=warmup, repeats=repeats, threads=threads,
                        min_time=min_time, clock=clock, max_time=max_time)
            per[k].append(t)
            if max_time is not None and t.median * (warmup + repeats) > max_time:
                slow.add(k)
    return per
