"""A per-layer latency lookup table on disk, one file per device configuration.

:class:`LatencyTable` is a per-layer lookup table on disk (JSON, written
atomically), one file per *validity key* — device name, torch version, dtype,
threads, batch size (and the clock, see :func:`autorank.cost.timing.measure`) —
because a latency measured under any other of these is not valid. Entries are
keyed by a layer signature (layer class and kind, :class:`~autorank.methods.LayerSpec`
fields, input shape), a method and a concrete rank (``dense`` for the original
layer). A replacement is measured alone, on its real input shape, built from the
method's meta skeleton and filled with random weights: latency does not depend on
the values, and no factorization (CP-ALS!) is ever computed for it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from autorank import methods as registry
from autorank.cost.timing import (
    LatencyError,
    Timing,
    device_name,
    measure,
    memory_format_name,
    omp_wait_policy,
    resolve_device,
)
from autorank.methods._base import Rank
from autorank.methods._layers import LayerSpec, layer_kind, layer_spec

logger = logging.getLogger("autorank")

__all__ = [
    "LatencyTable",
    "STATISTICS",
    "count_ops",
    "default_table_dir",
    "layer_signature",
    "model_signature",
    "random_fill_",
    "rank_text",
    "with_batch",
]

_FORMAT = "autorank-latency-table"
#: what a table may read of a timing: the median of the samples, or the fastest sample (the latency of an idle device:
#: on a shared machine the other processes only ever add time, see autorank.cost.timing.measure)
STATISTICS = ("median", "min")
_FORMAT_VERSION = 1


# ---------------------------------------------------------------------- signatures
def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def rank_text(rank: Optional[Rank]) -> str:
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
    shape = with_batch(tuple(profile.input_shape), batch_size, profile.input_shape[0] if profile.input_shape else 1)
    h = hashlib.blake2b(digest_size=10)
    h.update(json.dumps([profile.flops, profile.params], default=str).encode())
    for name, lp in profile.layers.items():
        h.update(f"{name}|{lp.type}|{lp.spec}|{lp.input_shape}".encode())
    return f"model:{h.hexdigest()}@{_shape_text(shape)}"


def _entry_key(signature: str, method: Optional[str], rank: Optional[Rank]) -> str:
    return f"{signature}|{method or 'dense'}|{rank_text(rank)}"


def with_batch(shape: tuple[int, ...], batch_size: Optional[int], profile_batch: int) -> tuple[int, ...]:
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


def count_ops(module: nn.Module) -> int:
    """The operators a layer or its replacement runs: its leaf modules (at least 1)."""
    return max(1, sum(1 for m in module.modules() if not any(True for _ in m.children())))


def random_fill_(module: nn.Module, seed: int = 0) -> None:
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
    threads, batch size, clock, and on a CPU the OpenMP wait policy,
    :func:`autorank.cost.timing.omp_wait_policy`). Change any of these and a fresh table (another
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
        statistic: str = "median",
        max_time: Optional[float] = None,
        wait_policy: Optional[str] = None,
        memory_format: str = "contiguous",
    ) -> None:
        """``device_name_override`` and ``torch_version`` name a configuration other than this
        machine's, to read a table measured elsewhere (see :meth:`open`); such a table cannot be
        added to here. ``statistic``: what :meth:`get` returns of each entry's timing, ``median``
        or ``min`` (every entry keeps both: it is a reading, not part of the validity key).
        ``wait_policy``: the OpenMP wait policy of a CPU table measured elsewhere (default: this
        process's; ``""``: a table that recorded none). ``memory_format``: ``channels_last``
        measures every layer and model with NHWC weights and inputs (part of the validity key)."""
        if statistic not in STATISTICS:
            raise LatencyError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
        self.statistic = statistic
        #: bounds each measurement of a slow layer or model (see :func:`autorank.cost.timing.measure`)
        self.max_time = max_time
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
        self.memory_format = memory_format_name(memory_format)
        self.directory = Path(directory) if directory is not None else default_table_dir()
        self.validity = {
            "device_name": self.device_name,
            "torch": torch_version or torch.__version__,
            "dtype": str(self.dtype).replace("torch.", ""),
            "threads": self.threads,
            "batch_size": self.batch_size,
            "clock": self.clock,
        }
        policy = omp_wait_policy() if wait_policy is None else str(wait_policy)
        if policy and not self.device_name.startswith("cuda"):  # CPU threads wait as OMP_WAIT_POLICY says: part of the latency
            self.validity["omp_wait_policy"] = policy
        if self.memory_format != "contiguous":  # (absent for the default: tables measured before the option keep their key)
            self.validity["memory_format"] = self.memory_format
        self.key = hashlib.blake2b(json.dumps(self.validity, sort_keys=True).encode(), digest_size=8).hexdigest()
        self.path = self.directory / (
            f"{_slug(self.device_name)}-{self.validity['dtype']}-t{self.threads}-b{self.batch_size}"
            f"{'-cpuclock' if self.clock == 'cpu' else ''}{'-nhwc' if self.memory_format == 'channels_last' else ''}-{self.key}.json"
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
        cls, data: Mapping[str, Any], directory: Union[str, os.PathLike, None] = None, *, expected_path: Optional[Path] = None,
        statistic: str = "median",
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
                device_name_override=str(v["device_name"]), torch_version=str(v["torch"]), statistic=statistic,
                wait_policy=str(v.get("omp_wait_policy", "")), memory_format=str(v.get("memory_format", "contiguous")),
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
        return (f"<LatencyTable {self.device_name}, {self.validity['dtype']}, {self.threads} threads, batch {self.batch_size}: "
                f"{len(self)} entries at {self.path}>")

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
        return None if hit is None else self._value(hit)

    def _value(self, record: Mapping[str, Any]) -> float:
        """The table's statistic of one recorded timing (records of a bare number have only a median)."""
        return float(record.get(self.statistic, record["median"]))

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
        return None if hit is None else self._value(hit)

    def get_ops(self, module_or_spec: Union[nn.Module, LayerSpec, str], input_shape: Sequence[int] = (),
                method: Optional[str] = None, rank: Optional[Rank] = None) -> int:
        """How many operators (leaf modules) the dense layer or replacement runs (recorded when measured; else 1 or 2)."""
        hit = self.entries.get(self._key_of(module_or_spec, input_shape, method, rank))
        default = 1 if method in (None, "dense") else 2
        return int(hit.get("ops", default)) if hit else default

    def get_calibration(self, signature: str) -> tuple[float, float]:
        """``(k, c)`` of the model under ``signature``: the estimated change is ``k · Σ (replacement − dense) +
        c · (operators added)``; ``(1, 0)`` when not calibrated (see :mod:`autorank.cost.latency_calibration`)."""
        hit = self.models.get(f"calibration|{signature}")
        if not hit:
            return 1.0, 0.0
        return float(hit.get("scale", 1.0)), float(hit.get("per_op", 0.0))

    def get_method_scales(self, signature: str) -> dict[str, float]:
        """``{method: k}`` of the model under ``signature`` where the calibration fitted one factor per method
        (then it replaces ``k`` for that method's layers); empty otherwise."""
        hit = self.models.get(f"calibration|{signature}")
        return {str(m): float(k) for m, k in ((hit or {}).get("method_scales") or {}).items()}

    def get_margin(self, signature: str) -> float:
        """Seconds a latency budget keeps in reserve for the model under ``signature`` (0 when not calibrated)."""
        hit = self.models.get(f"calibration|{signature}")
        return float(hit.get("margin", 0.0)) if hit else 0.0

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
            min_time=self.min_time, clock=self.clock, max_time=self.max_time, memory_format=self.memory_format,
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
            return self._value(self.entries[key])
        dev = self._check_can_measure()
        if m is None:
            layer = _dense_copy(module)
        else:
            layer = m.build(module, None, concrete, options)
            layer.to_empty(device=dev)
            random_fill_(layer)
        layer.to(device=dev, dtype=self.dtype)
        g = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(shape, generator=g, dtype=torch.float32).to(device=dev, dtype=self.dtype)
        timing = self._timing(layer, x, dev)
        ops = count_ops(layer)
        del layer
        self.measurements += 1
        self.put(module, shape, None if m is None else m.name, concrete, timing)
        self.entries[self._key_of(module, shape, None if m is None else m.name, concrete)]["ops"] = ops
        logger.debug("latency %s %s %s: %s", layer_signature(module, shape), m.name if m else "dense", rank_text(concrete), timing)
        if save:
            self.save()
        return self._value(timing.to_dict())

    def measure_model(self, model: nn.Module, inputs: Any, signature: str, *, force: bool = False, save: bool = True) -> float:
        """Median latency (s) of the whole ``model`` on ``inputs``, recorded under ``signature``."""
        if not force and signature in self.models:
            return self._value(self.models[signature])
        timing = self._model_timing(model, inputs)
        self.measurements += 1
        self.put_model(signature, timing)
        if save:
            self.save()
        return self._value(timing.to_dict())

    def _model_timing(self, model: nn.Module, inputs: Any) -> Timing:
        dev = self._check_can_measure()
        return measure(
            model, inputs, device=dev, warmup=max(2, self.warmup), repeats=self.repeats, threads=self.threads,
            min_time=max(self.min_time, 0.25), clock=self.clock, max_time=self.max_time, memory_format=self.memory_format,
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
        random_fill_(clone)
    return clone
