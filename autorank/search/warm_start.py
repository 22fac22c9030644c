"""The warm start: a per-layer sensitivity table, then baseline plans enqueued as the first trials.

The sensitivity table gives the zero-shot score of the model with one layer
decomposed at a time, per method and ρ: estimated from layer output errors and
calibrated by a few evaluations (default), or measured at a few ρ per method
(``full``). From it come the AIMET-style greedy plan and the Lagrangian
allocation, enqueued with the uniform-ρ plan of each method.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, Callable, Optional

from autorank import methods as registry
from autorank.cost.cost_model import ChoicePlan, CostModel
from autorank.errors import SearchError
from autorank.search import sensitivity
from autorank.search.allocate import Sensitivity, best_uniform, describe_plan, greedy_plan, lagrangian_plan, probe_rhos, to_plan
from autorank.search.executor_base import BaseExecutor, run_one
from autorank.search.params import choice_to_params
from autorank.search.rundir import RunDir
from autorank.search.sensitivity import SENSITIVITY_MODES, calibrate, calibration_probes, estimated_scores

logger = logging.getLogger("autorank")

__all__ = ["measure_sensitivity", "warm_start_plans", "enqueue_warm_start"]

Progress = Callable[[dict[str, Any]], None]


#: the sensitivity phase's checkpoint in the run directory (JSON lines, appended as results come)
CHECKPOINT = "sensitivity.partial.jsonl"


def resolve_mode(run: RunDir, executor: BaseExecutor, choices, points: int, eval_s: Optional[float]) -> tuple[str, dict]:
    """``auto``'s choice for this run: ``full`` when the full table's evaluations would take at most
    :data:`sensitivity.AUTO_FULL_SECONDS` (``eval_s``, the original's evaluation time, × its probes / the
    executor's concurrency), else ``estimate``; made once and kept in the checkpoint (a resumed run keeps it)."""
    for rec in run.read_jsonl(CHECKPOINT):
        if rec.get("kind") == "mode" and rec.get("mode") in ("estimate", "full"):
            return rec["mode"], {k: v for k, v in rec.items() if k != "kind"}
    n_full = sum(len(probe_rhos(ch.rhos_for(m), points)) for ch in choices.values() for m in ch.methods if m != "none")
    seconds = None if eval_s is None else float(eval_s) * n_full / max(1, executor.concurrency)
    mode = "full" if seconds is not None and seconds <= sensitivity.AUTO_FULL_SECONDS else "estimate"
    info = {"mode": mode, "full_evaluations": n_full, "evaluate_s": eval_s, "full_seconds": seconds,
            "threshold_s": sensitivity.AUTO_FULL_SECONDS}
    logger.info("sensitivity: %s table (the full table's %d evaluations: about %s s of evaluation, threshold %g s)",
                mode, n_full, "?" if seconds is None else f"{seconds:.0f}", sensitivity.AUTO_FULL_SECONDS)
    run.append_jsonl(CHECKPOINT, {"kind": "mode", **info})
    return mode, info


def measure_sensitivity(run: RunDir, executor: BaseExecutor, choices, cost: CostModel, base: float, points: int,
                        emit: Progress, mode: str = "auto", seed: int = 0, eval_s: Optional[float] = None) -> Sensitivity:
    """The run's sensitivity table (``sensitivity.json``, made once; checkpointed as it goes).

    ``mode="full"``: each layer alone at ``points`` probe ρ per method, zero-shot.
    ``mode="estimate"`` (:mod:`autorank.search.sensitivity`): every layer's
    propagated output error at every grid ρ of every method from one pass over
    the calibration batches, calibrated by a few zero-shot probes. Every probe
    score and every layer's errors are appended to ``sensitivity.partial.jsonl``
    as they come back, so a driver killed in this phase and restarted loses only
    the jobs that were in flight; probes are shared between the two modes.
    ``mode="auto"``: one of the two, by :func:`resolve_mode` (``eval_s``: the
    original's evaluation time).
    """
    if mode not in SENSITIVITY_MODES:
        raise SearchError(f"sensitivity mode {mode!r}: expected one of {', '.join(SENSITIVITY_MODES)}")
    saved = run.read_json("sensitivity.json")
    if saved is not None:
        return Sensitivity.from_dict(saved)
    t0 = time.perf_counter()
    auto = None
    if mode == "auto":
        mode, auto = resolve_mode(run, executor, choices, points, eval_s)
    measured: dict[tuple[str, str, float], float] = {}
    errors: dict[str, dict[str, list[tuple[float, Optional[float]]]]] = {}
    failed_layers: set[str] = set()
    fraction = sensitivity.PROBE_FRACTION if mode == "estimate" else 1.0
    part_base: Optional[float] = None  # the original's score on that part of the held-out split
    for rec in run.read_jsonl(CHECKPOINT):
        if rec.get("kind") == "probe" and float(rec.get("fraction", 1.0)) == fraction:
            measured[(rec["layer"], rec["method"], float(rec["rho"]))] = float(rec["score"])
        elif rec.get("kind") == "probe_base" and float(rec.get("fraction", 1.0)) == fraction:
            part_base = float(rec["score"])
        elif rec.get("kind") == "errors":
            errors[rec["layer"]] = {m: [(float(r), e) for r, e in pts] for m, pts in rec["errors"].items()}
        elif rec.get("kind") == "errors_failed":
            failed_layers.add(rec["layer"])
    if measured or errors:
        logger.info("sensitivity: resuming with %d probe(s) and %d layer estimate(s) from %s", len(measured), len(errors), CHECKPOINT)
    sens = Sensitivity(base)
    if mode == "full":
        jobs = [(n, m, r) for n, ch in choices.items() for m in ch.methods if m != "none" for r in probe_rhos(ch.rhos_for(m), points)]
        _probe(run, executor, cost, jobs, measured, base, emit, t0)
        wanted = set(jobs)
        for (n, m, r), score in measured.items():
            if (n, m, r) in wanted:
                sens.scores.setdefault(n, {}).setdefault(m, []).append((r, score))
        doc = {"mode": "full"}
    else:
        _estimate_errors(run, executor, choices, cost, errors, failed_layers, emit, t0, seed, points)
        t_errors = time.perf_counter() - t0
        probes = calibration_probes({n: errors[n] for n in choices if n in errors}, per_role=sensitivity.CALIBRATION_PER_ROLE)
        # layers whose estimate failed are probed as the full table would
        probes += [(n, m, r) for n in choices if n in failed_layers for m in choices[n].methods if m != "none"
                   for r in probe_rhos(choices[n].rhos_for(m), points)]
        if fraction < 1.0 and part_base is None and any(p not in measured for p in probes):
            part_base = _part_base(executor, fraction, base)
            run.append_jsonl(CHECKPOINT, {"kind": "probe_base", "fraction": fraction, "score": part_base})
        _probe(run, executor, cost, probes, measured, base, emit, t0, fraction=fraction, part_base=part_base)
        fit = calibrate(errors, measured, base)
        sens.scores = estimated_scores(errors, fit, measured, base)
        for n in failed_layers:
            for m in choices[n].methods:
                pts = sorted((r, s) for (nn, mm, r), s in measured.items() if nn == n and mm == m)
                if pts:
                    sens.scores.setdefault(n, {})[m] = pts
        doc = {"mode": "estimate", "estimate": {
            "errors": errors, "fit": fit, "failed_layers": sorted(failed_layers), "time_errors_s": t_errors,
            "probe_fraction": fraction, "probe_base": part_base,
            "probes": [[n, m, r, measured[(n, m, r)]] for n, m, r in probes if (n, m, r) in measured],
        }}
    if auto is not None:
        doc["auto"] = auto
    for ms in sens.scores.values():
        for pts in ms.values():
            pts.sort()
    doc.update(sens.to_dict())
    doc["time_s"] = time.perf_counter() - t0
    run.write_json("sensitivity.json", doc)
    run.remove(CHECKPOINT)
    return sens


def _part_base(executor: BaseExecutor, fraction: float, base: float) -> float:
    """The original's score on the ``fraction`` of the held-out split the calibration probes score (the whole
    score when the task cannot score a part: the probes are then scored whole too)."""
    res = run_one(executor, "zero_shot", {"plan": {"layers": {}}, "fraction": fraction})
    score = res.get("score")
    if score is None or not math.isfinite(score):
        logger.warning("sensitivity: scoring the original on %.0f%% of the held-out split failed (%s); probes are "
                       "compared with the whole score", 100 * fraction, res.get("error"))
        return base
    return float(score)


def _probe(run: RunDir, executor: BaseExecutor, cost: CostModel, jobs: list[tuple[str, str, float]],
           measured: dict[tuple[str, str, float], float], base: float, emit: Progress, t0: float,
           fraction: float = 1.0, part_base: Optional[float] = None) -> None:
    """Score each layer alone at each (method, ρ) of ``jobs`` not yet in ``measured``; checkpointed per result.

    ``fraction`` < 1: each probe is scored on that part of the held-out split and its drop from
    ``part_base`` (the original's score on the same part) is taken off ``base``."""
    pending = [j for j in dict.fromkeys(jobs) if j not in measured]
    total, done_n = len(set(jobs)), len(set(jobs)) - len(pending)
    inflight = 0
    while pending or inflight:
        while pending and inflight < max(1, executor.concurrency):
            name, m, r = pending.pop(0)
            payload: dict = {"plan": to_plan({name: (m, r)}, cost).to_dict()}
            if fraction < 1.0:
                payload["fraction"] = fraction
            executor.submit(("probe", name, m, r), "zero_shot", payload)
            inflight += 1
        for (_, name, m, r), res in executor.wait():
            inflight -= 1
            done_n += 1
            score = res.get("score")
            if score is None or not math.isfinite(score):
                logger.warning("sensitivity of %s with %s at rho=%g failed: %s", name, m, r, res.get("error"))
                score = base - 1.0
            elif fraction < 1.0 and part_base is not None:
                score = base - (part_base - score)
            measured[(name, m, r)] = float(score)
            rec = {"kind": "probe", "layer": name, "method": m, "rho": r, "score": float(score)}
            run.append_jsonl(CHECKPOINT, {**rec, "fraction": fraction} if fraction < 1.0 else rec)
            emit({"phase": "sensitivity", "done": done_n, "total": total, "elapsed_s": time.perf_counter() - t0})
        if inflight and not executor.has_results():
            time.sleep(0.001)


def _estimate_errors(run: RunDir, executor: BaseExecutor, choices, cost: CostModel, errors: dict, failed: set, emit: Progress,
                     t0: float, seed: int, points: int = 4) -> None:
    """One ``estimate`` job per layer (every method, every grid ρ); each layer's errors checkpointed as they come."""
    names = list(choices)
    pending = [n for n in names if n not in errors and n not in failed]
    inflight = 0
    done_n = len(names) - len(pending)
    while pending or inflight:
        while pending and inflight < max(1, executor.concurrency):
            name = pending.pop(0)
            ch = choices[name]
            # a nested method gives every rank from one factorization: the whole grid; another (CP, BTD, TR)
            # pays a factorization per rank: the probe ρ of the full table, interpolated between like it
            methods = {m: [[r, _rank_json(cost.concrete_rank(name, m, r))]
                           for r in (ch.rhos_for(m) if registry.get(m).is_nested({}) else probe_rhos(ch.rhos_for(m), points))]
                       for m in ch.methods if m != "none"}
            executor.submit(("estimate", name), "estimate", {"layers": [{"name": name, "methods": methods}], "all_layers": names,
                                                            "seed": seed})
            inflight += 1
        for (_, name), res in executor.wait():
            inflight -= 1
            done_n += 1
            errs = (res.get("errors") or {}).get(name)
            if errs is None or "error" in res:
                logger.warning("sensitivity estimate of %s failed (%s); its probes are measured instead", name, res.get("error"))
                failed.add(name)
                run.append_jsonl(CHECKPOINT, {"kind": "errors_failed", "layer": name, "error": res.get("error")})
            else:
                errors[name] = {m: [(float(r), e) for r, e in pts] for m, pts in errs.items()}
                run.append_jsonl(CHECKPOINT, {"kind": "errors", "layer": name, "errors": errs})
            emit({"phase": "sensitivity", "done": done_n, "total": len(names), "elapsed_s": time.perf_counter() - t0})
        if inflight and not executor.has_results():
            time.sleep(0.001)


def _rank_json(rank: Any) -> Any:
    return list(rank) if isinstance(rank, tuple) else rank


#: fractions of the budget at which the Lagrangian allocation is also enqueued (points of the front below the budget)
FRONT_FRACTIONS = (0.9, 0.8)


def warm_start_plans(choices, cost: CostModel, sens: Optional[Sensitivity]) -> list[tuple[str, ChoicePlan]]:
    """The baseline plans enqueued first: uniform ρ per method, greedy (AIMET), Lagrangian at the budget and
    at :data:`FRONT_FRACTIONS` of it."""
    plans: list[tuple[str, ChoicePlan]] = []
    methods = sorted({m for ch in choices.values() for m in ch.methods if m != "none"})
    for m in methods:
        hit = best_uniform(m, choices, cost)
        if hit is not None:
            plans.append((f"uniform:{m}@{hit[0]:g}", hit[1]))
    if sens is not None:
        g = greedy_plan(choices, cost, sens)
        if g is not None:
            plans.append(("greedy", g))
        lg = lagrangian_plan(choices, cost, sens)
        if lg is not None:
            plans.append(("lagrangian", lg))
        # the front needs points below the budget too: the same allocation for tighter budgets
        for frac in FRONT_FRACTIONS:
            tight = copy.copy(cost)
            tight.limits = {m: v * frac for m, v in cost.limits.items()}
            lt = lagrangian_plan(choices, tight, sens)
            if lt is not None:
                plans.append((f"lagrangian@{frac:.0%}", lt))
    seen, out = set(), []
    for origin, cp in plans:
        key = tuple(sorted(cp.items()))
        if key not in seen:
            seen.add(key)
            out.append((origin, cp))
    return out


def enqueue_warm_start(study, choices, cost: CostModel, sens: Optional[Sensitivity]) -> None:
    """Enqueue :func:`warm_start_plans` as the study's first trials."""
    for origin, cp in warm_start_plans(choices, cost, sens):
        study.enqueue_trial(choice_to_params(cp), user_attrs={"origin": origin})
        logger.info("warm start: %s (%s)", origin, describe_plan(cp))
