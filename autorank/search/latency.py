"""Latency where the search needs it: on the target device, as jobs an executor runs there.

The user names a target (:class:`LatencyTarget`: ``--device``, ``--batch-size``,
``--threads``). Two jobs measure on it, each a plain function of a model and a
JSON-able payload, so that an executor can run it in this process
(:class:`~autorank.search.executor_base.InProcessExecutor`) or as a Ray task on a
node that has the device (:class:`~autorank.search.executor.RayExecutor`):

- ``table`` (:func:`latency_job`): the per-layer latency table for every (layer,
  method, rank) of the search grid, the ranks probed for device-aware alignment
  and the whole model, at the target's batch size and threads;
- ``front``: the original and every front member, end to end, side by side; a
  member's speed-up is the median of its per-round ratios to the original
  (:func:`autorank.cost.timing.measure_paired`), its measured latency the
  original's divided by that.

The driver then turns the table into the ranks the search may build
(:func:`autorank.cost.latency.device_ranks`: alignment to the device's latency
steps, the latency break-even under a latency budget), keeps a copy of the table
in the run directory (``latency-table.json``, with ``latency.json`` saying where
and on what it was measured), and refuses, on a resumed run, a table measured on
another device or configuration.

:func:`profile_latency_job` loads a model spec, profiles it and fills the latency
table on the machine it runs on (see :func:`autorank.search.executor.measure_latency_remote`).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from autorank import methods as registry
from autorank.batches import to_device
from autorank.cost.latency import (
    DEFAULT_RHOS,
    batch_inputs,
    build_table,
    concrete_rank,
    default_candidates,
    device_ranks,
    grid_candidates,
    model_dtype,
    normalise_rank,
)
from autorank.cost.latency_calibration import calibrate_for_search, calibration_spec
from autorank.cost.latency_table import STATISTICS, LatencyTable, model_signature
from autorank.cost.profile import profile_model
from autorank.cost.timing import LatencyError, cpu_share, default_threads, measure_paired, memory_format_name, resolve_device
from autorank.saving import load
from autorank.search.space import LayerChoice
from autorank.zoo import example_input, load_model

logger = logging.getLogger("autorank")

Progress = Callable[[dict[str, Any]], None]

__all__ = [
    "ALIGN_MODES", "FRONT_ROUNDS", "LatencyTarget", "LatencyTableMismatch", "latency_job", "latency_table_for", "measure_front",
    "measured_front",
    "write_latency_files",
    "profile_latency_job", "profile_table", "search_grid",
]

#: ``align`` of a search: ``auto`` (device-aware under a latency budget when the space fixes none), ``device``
#: (device-aware for every budget: the table is measured even for a FLOPs budget), ``none``, or a multiple
ALIGN_MODES = ("auto", "device", "none")
TABLE_FILE = "latency-table.json"
INFO_FILE = "latency.json"


class LatencyTableMismatch(LatencyError):
    """A run directory's latency table was measured on another device or configuration than the target."""


def declared_threads(*owners: Any) -> Optional[int]:
    """The CPU thread count a task or model says it is deployed with (its ``latency_threads``), or None.

    A model deployed on fewer threads than the machine has declares it, so that a
    latency budget is measured as it would be deployed: the built-in demo (107 MFLOPs
    at batch 1) is served on one thread (`autorank.models.DigitsCNN`). ``--threads``
    always overrides it.
    """
    for owner in owners:
        n = getattr(owner, "latency_threads", None)
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise LatencyError(f"{type(owner).__name__}.latency_threads must be a positive integer, got {n!r}")
            return n
    return None


#: the most interleaved rounds a latency measurement takes
MAX_ROUNDS = 100


@dataclass(frozen=True)
class LatencyTarget:
    """Where the search measures latency: ``device`` (``cpu``, ``cuda``, ``cuda:N``), ``batch_size``, ``threads``.

    ``threads`` None: the thread count the model or task declares it is deployed
    with (:func:`declared_threads`: a ``latency_threads`` attribute, the demo's 1),
    else the target machine's default (its physical cores,
    :func:`autorank.cost.timing.default_threads`), resolved where the measurement
    runs. ``rounds``: interleaved rounds of the front's re-measurement and of the
    latency calibration (more rounds: a steadier estimate and front on a noisy
    machine, for proportionally more time measuring them).
    ``statistic``: what a latency is of its timed samples (each at least 1 ms of
    calls): ``min``, the fastest (default: the latency of the device when
    nothing else runs on it; on a shared machine other processes only ever add
    time, and the median of a 2-thread measurement moved by 40% from one call
    to the next on a loaded 2-core machine where the fastest sample moved by
    1-10%), or ``median``.
    """

    device: str = "cpu"
    batch_size: int = 1
    threads: Optional[int] = None
    rounds: int = 5
    statistic: str = "min"
    #: seconds one measurement of a slow layer or model takes at most (see :func:`autorank.cost.timing.measure`)
    max_time: float = 2.0
    #: ``wall`` (elapsed time, the default) or ``cpu`` (the measuring thread's CPU time: the latency on an idle core,
    #: for one thread on a CPU only; what a machine shared with other jobs can still measure)
    clock: str = "wall"
    #: ``contiguous`` (PyTorch's default NCHW) or ``channels_last``: the layout a CNN is measured, and deployed, in
    memory_format: str = "contiguous"

    @classmethod
    def make(cls, device: Optional[str], batch_size: Optional[int], threads: Optional[int], task: Any = None,
             statistic: str = "min", clock: str = "wall", model: Any = None, memory_format: str = "contiguous",
             rounds: int = 5) -> "LatencyTarget":
        """Checked settings; ``device`` None: the task's device (else cpu), ``batch_size`` None: 1, ``threads``
        None on a CPU: what the task or model declares (:func:`declared_threads`), else the machine's default."""
        dev = str(device if device is not None else (getattr(task, "device", None) or "cpu"))
        if threads is None and dev.startswith("cpu"):
            threads = declared_threads(task, model)
        try:
            kind = torch.device(dev).type
        except (RuntimeError, TypeError, ValueError):
            kind = None
        if kind not in ("cpu", "cuda"):
            raise LatencyError(f"device {dev!r} is not a device name (use cpu, cuda or cuda:N)")
        bs = 1 if batch_size is None else batch_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise LatencyError(f"batch size must be a positive integer, got {batch_size!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise LatencyError(f"threads must be a positive integer, got {threads!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= MAX_ROUNDS:
            raise LatencyError(f"latency rounds must be an integer from 1 to {MAX_ROUNDS}, got {rounds!r}")
        if statistic not in STATISTICS:
            raise LatencyError(f"latency statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
        if clock not in ("wall", "cpu") or (clock == "cpu" and (kind != "cpu" or threads != 1)):
            raise LatencyError(f"clock {clock!r}: use wall, or cpu with device cpu and threads 1 (got {dev}, threads {threads})")
        return cls(dev, int(bs), threads, rounds=rounds, statistic=statistic, clock=clock,
                   memory_format=memory_format_name(memory_format))

    def to_dict(self) -> dict[str, Any]:
        out = {"device": self.device, "batch_size": self.batch_size, "threads": self.threads, "statistic": self.statistic,
               "clock": self.clock}
        if self.memory_format != "contiguous":  # (absent for the default: run directories made before it resume)
            out["memory_format"] = self.memory_format
        return out

    def job(self) -> dict[str, Any]:
        """The settings a latency job needs (:meth:`to_dict`, rounds and the time bound)."""
        return {**self.to_dict(), "rounds": self.rounds, "max_time": self.max_time}

    def describe(self) -> str:
        return (f"{self.device}, batch {self.batch_size}, {self.threads if self.threads else 'default'} threads"
                + (", channels-last" if self.memory_format == "channels_last" else ""))


# ---------------------------------------------------------------------- the jobs (run on the target)
def latency_job(kind: str, model: nn.Module, payload: Mapping[str, Any], progress: Optional[Callable] = None) -> dict[str, Any]:
    """One latency job on this machine: ``table`` or ``front`` (see the module docstring); a JSON-able result."""
    if kind == "table":
        return _table_job(model, payload, progress)
    if kind == "front":
        return _front_job(model, payload)
    raise LatencyError(f"unknown latency job {kind!r}; expected table or front")


def _threads(payload: Mapping[str, Any]) -> int:
    return int(payload["threads"]) if payload.get("threads") else default_threads()


def _table_job(model: nn.Module, payload: Mapping[str, Any], progress: Optional[Callable]) -> dict[str, Any]:
    device, threads, bs = str(payload["device"]), _threads(payload), int(payload["batch_size"])
    resolve_device(device)
    example = tuple(payload["example"])
    profile = profile_model(model, example)
    table = LatencyTable(payload.get("table_dir"), device=device, dtype=model_dtype(model), threads=threads, batch_size=bs,
                         clock=payload.get("clock", "wall"), statistic=payload.get("statistic", "median"),
                         max_time=payload.get("max_time"), memory_format=payload.get("memory_format", "contiguous"))
    expect = payload.get("expect")
    if expect:
        _check_same(expect, table.validity, payload.get("run_dir", "the run directory"))
    for k, e in dict((payload.get("seed") or {}).get("entries") or {}).items():
        table.entries.setdefault(k, dict(e))
    for k, e in dict((payload.get("seed") or {}).get("models") or {}).items():
        table.models.setdefault(k, dict(e))
    cands = {n: [(m, normalise_rank(r)) for m, r in pairs] for n, pairs in dict(payload["candidates"]).items()}
    t0 = time.perf_counter()
    x = batch_inputs(example, bs, model_dtype(model))
    build_table(model, profile, cands, table=table, progress=progress, example_inputs=x)
    calibrate_for_search(model, profile, table, payload.get("calibration"), x, rounds=int(payload.get("rounds", 5)))
    return {
        "table": table.to_dict(), "device_name": table.device_name, "threads": table.threads, "batch_size": bs,
        "new_measurements": table.measurements, "elapsed_s": time.perf_counter() - t0, "pid": os.getpid(),
        "cpu_share": _busy(resolve_device(device), threads),
    }


def _check_same(expect: Mapping[str, Any], here: Mapping[str, Any], run_dir: str) -> None:
    if dict(expect) == dict(here):
        return
    diffs = [f"{k} {expect.get(k)!r} there, {here.get(k)!r} here" for k in sorted(set(expect) | set(here)) if expect.get(k) != here.get(k)]
    raise LatencyTableMismatch(
        f"{run_dir} holds a latency table measured on {expect.get('device_name')!r}, not on this target "
        f"({'; '.join(diffs)}); resume with the same --device, --batch-size, --threads and --channels-last (or not) on the same hardware, "
        "or use another --out"
    )


def _front_job(model: nn.Module, payload: Mapping[str, Any]) -> dict[str, Any]:
    device, threads, bs = str(payload["device"]), _threads(payload), int(payload["batch_size"])
    dev = resolve_device(device)
    inputs = batch_inputs(tuple(payload["example"]), bs, model_dtype(model))
    modules: dict[str, nn.Module] = {"original": copy.deepcopy(model).eval().to(dev)}
    for m in payload["members"]:
        modules[str(m["trial"])] = load(m["weights"], model=model).to(dev)
    inputs = to_device(inputs, dev)
    timings, speedups = measure_paired(modules, inputs, reference="original", statistic=payload.get("statistic", "median"),
                                       device=dev, threads=threads, rounds=int(payload.get("rounds", 5)),
                                       clock=payload.get("clock", "wall"), max_time=payload.get("max_time"),
                                       memory_format=payload.get("memory_format", "contiguous"))
    t = timings.pop("original")
    return {
        "original": t.to_dict(), "members": {k: v.to_dict() for k, v in timings.items()}, "speedups": speedups,
        "device_name": t.device,
        "threads": t.threads, "batch_size": bs, "pid": os.getpid(), "cpu_share": _busy(dev, threads),
    }


def _busy(dev: torch.device, threads: int) -> Optional[float]:
    """The CPU share a probe thread gets (CPU targets), with a warning when several threads share busy cores."""
    if dev.type != "cpu":
        return None
    share = cpu_share()
    if threads > 1 and share < 0.8:
        logger.warning("this machine is busy (a probe thread got %.0f%% of a core): latencies measured with %d threads include "
                       "waiting for cores; --threads 1 measures more steadily", 100 * share, threads)
    return share


# ---------------------------------------------------------------------- the driver's side
def search_grid(choices: Mapping[str, LayerChoice]) -> dict[str, list[tuple[str, float]]]:
    """``{layer: [(method, ρ), ...]}``: every choice of the search but ``none``."""
    return {n: [(m, float(r)) for m in ch.methods if m != "none" for r in ch.rhos_for(m)] for n, ch in choices.items()}


def _cpu_example(task: Any) -> tuple:
    x = task.example_inputs()
    x = x if isinstance(x, tuple) else (x,)
    return tuple(t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in x)


def latency_table_for(model, profile, choices, task, space, emit: Progress, *, target: Optional[LatencyTarget] = None,
                      executor: Any = None, run: Any = None, budget: Any = None, align: Union[str, int, None] = "auto"):
    """The latency table of the search grid, measured on the target (by ``executor``).

    Returns ``(table, base latency s, choices, ranks, files)``: ``choices`` without the
    (layer, method) pairs the latency break-even drops (under a latency
    budget), ``ranks`` the :class:`~autorank.cost.latency.DeviceRanks` the cost
    model builds from. With ``run``, the table is checked against the run
    directory's copy, and ``files`` holds what :func:`write_latency_files` then
    writes there (nothing is written before the search has passed its checks).
    """
    target = target or LatencyTarget.make(None, None, None, task)
    fixed = space.align if isinstance(space.align, int) else None
    snap = fixed is None and align in ("auto", "device")
    grid = search_grid(choices)
    cands = grid_candidates(profile, grid, align=fixed, probe=snap, device=target.device)
    seed = run.read_json(TABLE_FILE) if run is not None else None
    payload = {
        **target.job(), "example": _cpu_example(task), "candidates": {n: [[m, r] for m, r in c] for n, c in cands.items()},
        "calibration": calibration_spec(grid, fixed, snap),
        "seed": seed, "expect": (seed or {}).get("validity"), "run_dir": f"run directory {run.path}" if run is not None else "",
    }
    total = sum(len(v) for v in cands.values()) + 1
    emit({"phase": "latency", "done": 0, "total": total, "what": f"on {target.describe()}"})

    def prog(done, tot, what):
        emit({"phase": "latency", "done": done, "total": tot, "what": what})

    res = executor.measure_latency("table", model, payload, progress=prog) if executor is not None else \
        latency_job("table", model, payload, prog)
    emit({"phase": "latency", "done": total, "total": total, "what": "done"})
    table = LatencyTable.from_dict(res["table"], run.path / "latency" if run is not None else None, statistic=target.statistic)
    if seed is not None:
        _check_same(seed["validity"], table.validity, f"run directory {run.path}")
    needs = bool(budget is not None and budget.needs_latency)
    ranks = device_ranks(profile, table, grid, snap=snap, break_even=needs, align=fixed)
    ranks.margin = table.get_margin(model_signature(profile, table.batch_size))
    why = f"not faster than the dense layer on {table.device_name} (latency break-even)"
    kept = {}
    for n, ch in choices.items():
        methods = tuple(m for m in ch.methods if m not in ranks.dropped.get(n, ()))
        if len(methods) > 1:
            refused = ch.refused + tuple((m, r, why) for m, r in ranks.refused.get(n, ()) if m in methods)
            kept[n] = LayerChoice(ch.name, methods, ch.rhos, refused)
    base = table.get_model(model_signature(profile, table.batch_size))
    where = res.get("where", {})
    files: dict[str, Any] = {}
    if run is not None:
        files[TABLE_FILE] = res["table"]
        files[INFO_FILE] = {
            "target": target.to_dict(), "device_name": table.device_name, "validity": table.validity, "key": table.key,
            "measured_on": where, "entries": len(table), "new_measurements": res.get("new_measurements"),
            "elapsed_s": res.get("elapsed_s"), "cpu_share": res.get("cpu_share"), "align": "device" if snap else fixed,
            "break_even": needs,
            "calibration": table.models.get(f"calibration|{model_signature(profile, table.batch_size)}"),
            "margin_s": ranks.margin if needs else 0.0,
            "ranks_moved": ranks.moved, "refused": {n: [list(x) for x in v] for n, v in ranks.refused.items()},
            "dropped": ranks.dropped,
        }
    logger.info("latency table: %d entries on %s (%s), %d new; alignment moved %d ranks; break-even refused %d choices, "
                "dropped %s", len(table), table.device_name, where.get("node_ip") or where.get("host"),
                res.get("new_measurements", 0), ranks.moved, ranks.n_refused, ranks.dropped or "none")
    return table, float(base), kept, ranks, files


def write_latency_files(run: Any, files: dict[str, Any]) -> None:
    """Write what :func:`latency_table_for` returned for the run directory (once the search has passed its checks)."""
    for name, data in files.items():
        run.write_json(name, data)


def measure_front(result, original: nn.Module, task: Any, *, target: Optional[LatencyTarget] = None, executor: Any = None,
                  budget: Any = None, table_info: Optional[dict] = None, skip: Collection[int] = ()) -> list:
    """Re-measure the original and the front's members end to end on the target, side by side.

    Sets each measured member's ``latency_measured_s``, ``speedup`` (over the
    original measured beside it) and (under a latency budget) ``latency_breach``,
    and, unless already set by an earlier round, ``result.original_latency_s``
    and ``result.latency`` (the target, the device's name, where it was
    measured). Members whose trial is in ``skip`` (measured in an earlier round)
    are left as they are. Returns the members measured now.
    """
    target = target or LatencyTarget.make(None, None, None, task)
    members = [m for m in result.front if m.trial not in skip
               and result.weights_path(m) is not None and result.weights_path(m).exists()]
    if not members:
        return []
    payload = {**target.job(), "example": _cpu_example(task),
               "members": [{"trial": m.trial, "weights": str(result.weights_path(m).resolve())} for m in members]}
    res = executor.measure_latency("front", original, payload) if executor is not None else latency_job("front", original, payload)
    stat = target.statistic
    base = float(res["original"][stat])
    limits = []
    if budget is not None:
        limits = [c.limit(base) for c in budget.constraints if c.metric == "latency"]
    done = []
    for m in members:
        t = res["members"].get(str(m.trial))
        if t is None:
            continue
        paired = (res.get("speedups") or {}).get(str(m.trial))
        if paired:  # the speed-up paired by round (see measure_paired); the member's latency is the original's over it
            m.speedup = float(paired)
            m.latency_measured_s = base / m.speedup
        else:
            m.latency_measured_s = float(t[stat])
            m.speedup = base / m.latency_measured_s if m.latency_measured_s > 0 else None
        m.latency_breach = any(m.latency_measured_s > lim for lim in limits) if limits else None
        m.latency_original_s = base
        done.append(m)
    if result.original_latency_s is None:
        result.original_latency_s = base
        drift = _drift(base, table_info)
        result.latency = {
            **target.to_dict(), "threads_used": res.get("threads"), "device_name": res.get("device_name"), "rounds": target.rounds,
            "cpu_share": res.get("cpu_share"),
            "measured_on": res.get("where", {}), "limit_s": min(limits) if limits else None,
            **({"table": table_info} if table_info else {}), "drift": drift,
        }
    return done


#: the original measured this much slower or faster at the front than when the estimate was calibrated: say so
DRIFT_WARNING = 0.05


def _drift(base: float, table_info: Optional[Mapping[str, Any]]) -> Optional[float]:
    """How much slower (> 0) the original measured at the front than beside the latency calibration's plans.

    The speed-up a factorization gives depends on the machine's state, not only on the
    plan: on a shared VM whose other tenants take memory bandwidth, the memory-bound
    operators a factorization leaves weigh more. When the original itself measures
    differently at the front than when the estimate was calibrated (minutes apart),
    the members' estimates and measurements can differ by as much; the front's
    ``latency.drift`` records it and a warning says so.
    """
    calib = (table_info or {}).get("calibration") or {}
    ref = calib.get("base")
    if not ref or not base:
        return None
    drift = base / float(ref) - 1.0
    if abs(drift) > DRIFT_WARNING:
        logger.warning("the original measured %.0f%% %s at the front than when the latency estimate was calibrated: this "
                       "machine's speed changed, and the members' measured latencies may differ from their estimates by "
                       "as much (a quieter machine, or --threads 1, measures more steadily)",
                       100 * abs(drift), "slower" if drift > 0 else "faster")
    return drift


#: rounds of the front's end-to-end measurement: a member measured over the latency budget leaves the front and the
#: trials it had dominated are measured in its place, at most this many times
FRONT_ROUNDS = 3
_MEASURED = ("latency_measured_s", "speedup", "latency_breach", "latency_original_s")


def measured_front(result, rebuild: Callable[[set], Any], measure: Callable[[Any, set], list], emit: Optional[Progress] = None,
                   rounds: int = FRONT_ROUNDS):
    """The front, every member measured end to end; under a latency budget, the members measured over it left out.

    The estimate puts the front's members at the budget's edge, where what it
    misses (a few percent) decides. A member whose measurement breaks the budget
    is not a feasible plan: it leaves the front (``result.over_budget`` keeps
    it), ``rebuild(over)`` (a trial-number set) builds the front without it, and
    the trials it had dominated are measured in turn (``measure(result,
    skip)``, see :func:`measure_front`: the members already measured keep their
    figures). After ``rounds`` rounds, members still over the budget stay on the
    front, marked (``latency_breach``), and are never picked under it.
    """
    emit = emit or (lambda e: None)
    over: dict[int, dict[str, Any]] = {}
    measured: dict[int, Any] = {}
    original_s, where = None, None
    for rnd in range(rounds):
        if rnd:
            result = rebuild(set(over))
            result.original_latency_s, result.latency = original_s, where
            for m in result.front:
                if m.trial in measured:
                    for key in _MEASURED:
                        setattr(m, key, getattr(measured[m.trial], key))
        todo = [m for m in result.front if m.trial not in measured]
        if not todo:
            break
        emit({"phase": "front", "done": len(measured), "total": len(measured) + len(todo),
              "what": f"measuring {len(todo)} member(s) end to end" + (f", round {rnd + 1}" if rnd else "")})
        done = measure(result, set(measured))
        measured.update({m.trial: m for m in done})
        original_s, where = result.original_latency_s, result.latency
        emit({"phase": "front", "done": len(measured), "total": len(measured), "what": "measured"})
        breached = [m for m in done if m.latency_breach]
        if not breached or rnd == rounds - 1:
            break
        for m in breached:
            over[m.trial] = {"trial": m.trial, "summary": m.summary, "score": m.score, "cost_ratio": m.cost_ratio,
                             "latency_measured_s": m.latency_measured_s, "original_latency_s": m.latency_original_s,
                             "speedup": m.speedup, "limit_s": (result.latency or {}).get("limit_s")}
        logger.info("front: trial(s) %s measured over the latency budget; left out, the trials they dominated measured instead",
                    ", ".join(str(m.trial) for m in breached))
    result.over_budget = [over[k] for k in sorted(over)]
    return result


# ---------------------------------------------------------------------- `autorank profile`
def profile_table(model: nn.Module, example: Any, target: LatencyTarget, *, space: Any = None,
                  progress: Optional[Callable] = None, table_dir: Optional[str] = None) -> tuple[LatencyTable, Any, dict]:
    """The table ``autorank profile`` measures here, the very file a search on the same target reads.

    The base model and every candidate layer's dense latency at the target's
    batch size; with ``space`` (a :class:`~autorank.search.space.SearchSpace`)
    also every replacement of its grid and the probes of device-aware alignment,
    as the search measures them, so that a search under a latency budget finds
    them all on disk. Returns the table, the profile at the example's own batch
    size (the one the search keys the whole model by) and, with ``space``,
    ``{layer: {method: latency break-even rank}}``.
    """
    resolve_device(target.device)
    example = example if isinstance(example, tuple) else (example,)
    prof = profile_model(model, example)
    table = LatencyTable(table_dir, device=target.device, dtype=model_dtype(model), threads=target.threads or default_threads(),
                         batch_size=target.batch_size, statistic=target.statistic, max_time=target.max_time, clock=target.clock,
                         memory_format=target.memory_format)
    grid: dict[str, list[tuple[str, float]]] = {}
    if space is not None:
        grid = search_grid(space.choices(prof))
        cands = grid_candidates(prof, grid, align=space.align, probe=space.align is None, device=target.device)
    else:
        cands = {}
    for name, lp in prof.layers.items():
        if lp.input_shape:
            cands.setdefault(name, [])
    x = batch_inputs(example, target.batch_size, model_dtype(model))
    build_table(model, prof, cands, table=table, progress=progress, example_inputs=x)
    if grid:
        calibrate_for_search(model, prof, table, calibration_spec(grid, space.align, space.align is None), x, rounds=target.rounds)
    be = device_ranks(prof, table, grid, snap=False, align=space.align if space is not None else None).break_even if grid else {}
    return table, prof, be


# ---------------------------------------------------------------------- a model spec, on a worker
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
            lst.append((str(method), normalise_rank(rank), dict(options or {})))
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
    memory_format: str = "contiguous",
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
        table_dir, device=device, dtype=model_dtype(model), threads=threads, batch_size=int(batch_size), clock=clock,
        memory_format=memory_format,
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
            concrete = concrete_rank(profile, name, method, rank, rest[0] if rest else None)
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
        "memory_format": table.memory_format,
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
