"""Latency measured on the hardware the user targets, and a per-layer lookup table to estimate plans.

Built on :func:`autorank.cost.timing.measure` (timing one module on a device)
and :class:`autorank.cost.latency_table.LatencyTable` (per-layer latencies on
disk, one file per device configuration):

- :func:`build_table` measures what a table lacks for a model's candidate
  (layer, method, rank) triples;
- :func:`estimate_latency` gives any plan's latency without running it::

      latency(plan) = base latency − Σ dense latency of replaced layers + Σ replacement latency

  Everything between the layers (activations, norms, pooling, attention
  matmuls) is in the base latency and unchanged by a plan.

:func:`align_plan` rounds a plan's ranks to multiples of 8 or 16
(:func:`autorank.methods._base.align_rank`): factorized layers with odd inner
dimensions are a known reason for poor GPU efficiency (tensor-core tiles,
vectorised loads). A plan entry's ``align`` option (applied by
:func:`autorank.decompose`) is honoured by :func:`estimate_latency`.

**Device-aware alignment and break-even** (:func:`device_ranks`). A layer's
latency is not a smooth function of its rank: kernels tile the inner dimension
(SIMD width and cache blocking on a CPU, tensor-core tiles on a GPU), so the
time often stays flat over a range of ranks and jumps at the edge of a tile. A
rank just above an edge costs as much as the top of the next step and keeps
less. :func:`grid_candidates` adds, around each rank of the search's ρ grid, the
multiples of 8, 16 and 32 (and 64 on a GPU) just below and above it; once they
are measured, each grid rank moves up to the largest probed rank that is no
slower (within :data:`SNAP_TOLERANCE`): the top of its step *on this device*,
instead of a fixed multiple of 8. Under a latency budget a replacement that the
table says is not faster than the dense layer is never offered (its ρ is mapped
to the largest rank that is, or the method is dropped for that layer): the
latency break-even, next to the FLOPs break-even of
:meth:`autorank.cost.profile.LayerProfile.break_even`.

Measured here (2-core shared CPU, see ``benchmarks/bench_latency_estimator.py``):
the estimate's median absolute error against end-to-end measurement of
decomposed ResNet-50, demo-CNN and BERT-style models is about 5%, against about
18% for the FLOPs proxy (base latency × kept fraction of FLOPs).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from autorank import methods as registry
from autorank.cost.latency_table import LatencyTable, layer_signature, model_signature, rank_text, with_batch
from autorank.cost.timing import LatencyError, Timing, combine_timings
from autorank.errors import RankError
from autorank.methods._base import Rank, align_rank
from autorank.plan import LayerPlan, Plan

logger = logging.getLogger("autorank")

__all__ = [
    "DeviceRanks",
    "PROBE_MULTIPLES",
    "SNAP_TOLERANCE",
    "align_plan",
    "batch_inputs",
    "device_ranks",
    "grid_candidates",
    "probe_ranks",
    "build_table",
    "concrete_rank",
    "model_dtype",
    "normalise_rank",
    "default_candidates",
    "estimate_latency",
    "DEFAULT_RHOS",
]

#: kept fractions of FLOPs measured per (layer, method) when no candidates are given
DEFAULT_RHOS: tuple[float, ...] = (0.25, 0.5, 0.75)


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
        concrete = concrete_rank(profile, name, method, rank, options)
        out[name] = (m.name, align_rank(concrete, multiple, m.max_rank(profile.layers[name].spec), mode=mode))
    return out


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


def concrete_rank(profile: Any, name: str, method: str, rank: Any, options: Optional[dict] = None) -> Rank:
    """The rank :func:`autorank.decompose` would build for this plan entry (fractions resolved, ``align`` applied)."""
    rank = normalise_rank(rank)
    concrete = profile.concrete_rank(name, method, rank)
    align = (options or {}).get("align")
    if align and isinstance(rank, float):
        concrete = align_rank(concrete, align, registry.get(method).max_rank(profile.layers[name].spec))
    return concrete


def normalise_rank(rank: Any) -> Any:
    """A rank as plans and tables key it (lists as tuples)."""
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


def _example_inputs(model: nn.Module, profile: Any, batch_size: int) -> tuple:
    """The profiled example input at ``batch_size`` (repeated along the batch), in the model's float dtype."""
    example = getattr(profile, "example_inputs", None)
    if not example:
        shape = with_batch(tuple(profile.input_shape), batch_size, profile.input_shape[0])
        return (torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(model_dtype(model)),)
    return batch_inputs(example, batch_size, model_dtype(model))


def batch_inputs(example: Any, batch_size: int, dtype: Optional[torch.dtype] = None) -> tuple:
    """``example`` (a tensor or a tuple) at ``batch_size``: repeated (or cut) along the first dimension of each tensor.

    Floating-point tensors are cast to ``dtype`` when given; everything else is kept.
    """
    example = example if isinstance(example, (tuple, list)) else (example,)
    out = []
    for t in example:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            shape = with_batch(tuple(t.shape), batch_size, int(t.shape[0]))
            reps = shape[0] // int(t.shape[0]) if t.shape[0] else 1
            t = t.repeat(reps, *([1] * (t.dim() - 1))) if reps > 1 else t[: shape[0]]
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
        out.append(t)
    return tuple(out)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when it has none)."""
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
    memory_format: str = "contiguous",
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
            directory, device=device, dtype=model_dtype(model), threads=threads,
            batch_size=batch_size if batch_size is not None else profile_batch, clock=clock, memory_format=memory_format,
        )
    elif batch_size is not None and batch_size != table.batch_size:
        raise LatencyError(f"batch size {batch_size} differs from the table's ({table.batch_size}); pass a table for batch {batch_size}")
    if model_dtype(model) != table.dtype:
        raise LatencyError(
            f"the model's dtype is {str(model_dtype(model)).replace('torch.', '')} but the table is for "
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
            concrete = concrete_rank(profile, name, method, rank, rest[0] if rest else None)
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
        shape = with_batch(profile.layers[name].input_shape, bs, profile_batch)
        table.measure_layer(named[name], shape, method, rank, save=False)
        done += 1
        if progress is not None:
            progress(done, total, f"{name} {method or 'dense'} {rank_text(rank)}")
        if table._dirty and time.monotonic() - last_save > 10.0:  # keep progress if the job is interrupted
            table.save()
            last_save = time.monotonic()
    if need_base:
        table.put_model(msig, combine_timings(base_timings))
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

    ``base latency + k · (Σ replacement latency − Σ dense latency of replaced layers)
    + c · (operators the replacements add)``, ``k`` and ``c`` the model's calibration on
    the table's target (1 and 0 until :func:`autorank.cost.latency_calibration.calibrate`
    has fitted them).
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
    change: dict[str, float] = {}
    added = 0
    for name, method, rank, options in _plan_items(plan):
        if method in ("none", None):
            continue
        concrete = concrete_rank(profile, name, method, rank, options)
        lp = profile.layers[name]
        mname = registry.get(method).name
        shape = with_batch(lp.input_shape, bs, profile_batch)
        sig = layer_signature(lp.spec, shape, type_name=lp.type)
        dense = table.get(sig, shape)
        repl = table.get(sig, shape, mname, concrete)
        if dense is None or repl is None:
            if name not in named:
                what = "dense layer" if dense is None else f"{mname} at rank {rank_text(concrete)}"
                raise LatencyError(
                    f"layer {name!r}: no latency for its {what} in {table.path.name} ({table.device_name}, batch {bs}); "
                    "run build_table with this candidate or pass model="
                )
            if dense is None:
                dense = table.measure_layer(named[name], shape)
            if repl is None:
                repl = table.measure_layer(named[name], shape, mname, concrete)
        change[mname] = change.get(mname, 0.0) + repl - dense
        added += table.get_ops(sig, shape, mname, concrete) - table.get_ops(sig, shape)
    k, per_op = table.get_calibration(model_signature(profile, bs))
    scales = table.get_method_scales(model_signature(profile, bs))
    return base + sum(scales.get(m, k) * d for m, d in change.items()) + per_op * added


# ---------------------------------------------------------------------- device-aware ranks
#: a larger rank whose measured latency is at most this much above a rank's counts as costing the same
SNAP_TOLERANCE = 0.03
#: the multiples probed around each grid rank (their floors and ceilings), on a CPU and on a GPU
PROBE_MULTIPLES = {"cpu": (8, 16, 32), "cuda": (8, 16, 32, 64)}


def _multiples_for(device: Union[str, torch.device, None]) -> tuple[int, ...]:
    kind = torch.device(device).type if device is not None else "cpu"
    return PROBE_MULTIPLES.get(kind, PROBE_MULTIPLES["cpu"])


def probe_ranks(method: str, spec: Any, rank: Rank, multiples: Sequence[int] = PROBE_MULTIPLES["cpu"]) -> list[Rank]:
    """The ranks around ``rank`` where a latency step may end: multiples of each ``multiples`` just below and above it.

    Tuple ranks (Tucker-2's ``(r_in, r_out)``) move every component to the same
    multiple. Only valid ranks of the method on ``spec`` are returned, ``rank``
    itself included, without duplicates, smallest first.
    """
    m = registry.get(method)
    mx = m.max_rank(spec)
    out: list[Rank] = [rank]

    def add(cand: Any) -> None:
        try:
            r = m.normalize_rank(spec, list(cand) if isinstance(cand, tuple) else cand)
        except RankError:
            return
        if r not in out:
            out.append(r)

    for g in multiples:
        if isinstance(rank, tuple):
            maxes = mx if isinstance(mx, tuple) else (mx,) * len(rank)
            add(tuple(max(1, (r // g) * g) for r in rank))
            add(tuple(min(int(x), -(-r // g) * g) for r, x in zip(rank, maxes)))
        else:
            if rank // g:
                add((rank // g) * g)
            add(min(int(mx), -(-rank // g) * g) if isinstance(mx, int) else -(-rank // g) * g)
    return sorted(out, key=lambda r: m.cost(spec, r).flops)


def grid_candidates(
    profile: Any,
    grid: Mapping[str, Sequence[tuple[str, float]]],
    *,
    align: Optional[int] = None,
    probe: bool = True,
    device: Union[str, torch.device, None] = "cpu",
) -> dict[str, list[tuple[str, Rank]]]:
    """``{layer: [(method, concrete rank), ...]}`` to measure for a search grid ``{layer: [(method, ρ), ...]}``.

    Each ρ's rank (``align`` applied, as the cost model does), and with
    ``probe`` the ranks :func:`probe_ranks` adds around it (multiples for
    ``device``'s kind). Pass the result to :func:`build_table`.
    """
    multiples = _multiples_for(device)
    out: dict[str, list[tuple[str, Rank]]] = {}
    for name, pairs in grid.items():
        lp = profile.layers[name]
        seen: list[tuple[str, Rank]] = []
        for method, rho in pairs:
            if method in ("none", "dense", None):
                continue
            mname = registry.get(method).name
            r0 = profile.replacement_delta(name, mname, float(rho), align)[2]
            for r in (probe_ranks(mname, lp.spec, r0, multiples) if probe else [r0]):
                if (mname, r) not in seen:
                    seen.append((mname, r))
        out[name] = seen
    return out


@dataclass
class DeviceRanks:
    """What the latency table says about the search grid on one device (see :func:`device_ranks`).

    ``ranks``: ``{(layer, method, ρ): rank to build}``; ``refused``: ``{layer:
    [(method, ρ), ...]}`` whose rank is not faster than the dense layer (only
    with the break-even rule); ``dropped``: ``{layer: [methods refused at every
    ρ]}``; ``break_even``: ``{layer: {method: the largest measured rank faster
    than the dense layer, or None}}``; ``moved``: how many grid ranks the
    alignment changed.
    """

    ranks: dict[tuple[str, str, float], Rank] = field(default_factory=dict)
    refused: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    break_even: dict[str, dict[str, Optional[Rank]]] = field(default_factory=dict)
    moved: int = 0
    #: seconds a latency budget keeps in reserve (the table's calibration margin; set by the caller)
    margin: float = 0.0

    @property
    def n_refused(self) -> int:
        return sum(len(v) for v in self.refused.values())


def _flops(method: Any, lp: Any, rank: Rank) -> int:
    return method.cost(lp.spec, rank, lp.input_shape).flops


def _layer_lookup(profile: Any, table: LatencyTable, name: str) -> tuple[Callable[[str, Optional[Rank]], Optional[float]], Any]:
    lp = profile.layers[name]
    profile_batch = int(profile.input_shape[0]) if profile.input_shape else 1
    shape = with_batch(lp.input_shape, table.batch_size, profile_batch)
    sig = layer_signature(lp.spec, shape, type_name=lp.type)

    def latency(method: str, rank: Optional[Rank]) -> Optional[float]:
        return table.get(sig, shape) if rank is None else table.get(sig, shape, method, rank)

    return latency, lp


def device_ranks(
    profile: Any,
    table: LatencyTable,
    grid: Mapping[str, Sequence[tuple[str, float]]],
    *,
    snap: bool = True,
    break_even: bool = False,
    align: Optional[int] = None,
    tolerance: float = SNAP_TOLERANCE,
) -> DeviceRanks:
    """The rank each grid choice builds on this device, from the measured table.

    For every (layer, method), ρ ascending: the ρ's rank (``align`` applied);
    with ``snap``, moved up to the largest probe of :func:`probe_ranks` whose
    measured latency is at most ``(1 + tolerance)`` × the rank's (the top of its
    latency step: more rank at the same cost), never to a rank the method
    refuses (:meth:`~autorank.methods.BaseMethod.rank_refusal`), and never below
    the previous ρ's rank. With ``break_even``, a (method, ρ) whose rank's
    measured latency is not below the dense layer's is refused (the search never
    offers it: :class:`autorank.search.space.LayerChoice` runs the largest
    offered ρ below it instead); a method refused at every ρ is dropped for the
    layer. Ranks missing from the table stay as they are and are offered.
    """
    out = DeviceRanks()
    multiples = _multiples_for(table.device)
    for name, pairs in grid.items():
        latency, lp = _layer_lookup(profile, table, name)
        dense = latency("", None)
        by_method: dict[str, list[float]] = {}
        for method, rho in pairs:
            if method not in ("none", "dense", None):
                by_method.setdefault(registry.get(method).name, []).append(float(rho))
        for mname, rhos in by_method.items():
            m = registry.get(mname)
            flops = functools.partial(_flops, m, lp)
            rhos = sorted(rhos)
            chosen: list[Rank] = []
            for rho in rhos:
                r0 = profile.replacement_delta(name, mname, rho, align)[2]
                r = r0
                t0 = latency(mname, r0)
                if snap and t0 is not None:
                    for c in probe_ranks(mname, lp.spec, r0, multiples):
                        t = latency(mname, c)
                        if (t is not None and t <= t0 * (1 + tolerance) and flops(c) > flops(r)
                                and m.rank_refusal(lp.spec, c, lp.input_shape) is None):
                            r = c
                if chosen and flops(chosen[-1]) > flops(r):
                    r = chosen[-1]
                out.moved += r != r0
                chosen.append(r)
                out.ranks[(name, mname, round(rho, 6))] = r
            measured = [r for r in {*chosen, *(c for r0 in chosen for c in probe_ranks(mname, lp.spec, r0, multiples))}
                        if latency(mname, r) is not None]
            faster = [r for r in measured if dense is not None and latency(mname, r) < dense]
            out.break_even.setdefault(name, {})[mname] = max(faster, key=flops) if faster else None
            if break_even and dense is not None:
                slow = [(mname, rho) for rho, r in zip(rhos, chosen) if latency(mname, r) is not None and latency(mname, r) >= dense]
                if slow:
                    out.refused.setdefault(name, []).extend(slow)
                if len(slow) == len(rhos):
                    out.dropped.setdefault(name, []).append(mname)
    return out
