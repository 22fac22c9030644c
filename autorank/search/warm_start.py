"""The warm start: a per-layer sensitivity table, then baseline plans enqueued as the first trials.

The sensitivity table scores the model with one layer decomposed at a time, at a
few ρ per method, zero-shot; from it come the AIMET-style greedy plan and the
Lagrangian allocation, enqueued with the uniform-ρ plan of each method.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Optional

from autorank.cost.cost_model import ChoicePlan, CostModel
from autorank.search.allocate import Sensitivity, best_uniform, describe_plan, greedy_plan, lagrangian_plan, probe_rhos, to_plan
from autorank.search.executor_base import BaseExecutor
from autorank.search.params import choice_to_params
from autorank.search.rundir import RunDir

logger = logging.getLogger("autorank")

__all__ = ["measure_sensitivity", "warm_start_plans", "enqueue_warm_start"]

Progress = Callable[[dict[str, Any]], None]


def measure_sensitivity(run: RunDir, executor: BaseExecutor, choices, cost: CostModel, base: float, points: int,
                        emit: Progress) -> Sensitivity:
    """Each layer alone at ``points`` probe ρ per method, zero-shot (``sensitivity.json`` of the run, once)."""
    saved = run.read_json("sensitivity.json")
    if saved is not None:
        return Sensitivity.from_dict(saved)
    jobs = []
    for name, ch in choices.items():
        for m in ch.methods:
            if m == "none":
                continue
            for r in probe_rhos(ch.rhos_for(m), points):
                jobs.append((name, m, r))
    sens = Sensitivity(base)
    t0 = time.perf_counter()
    pending = list(jobs)
    inflight = 0
    done_n = 0
    while pending or inflight:
        while pending and inflight < max(1, executor.concurrency):
            name, m, r = pending.pop(0)
            plan = to_plan({name: (m, r)}, cost)
            executor.submit((name, m, r), "zero_shot", {"plan": plan.to_dict()})
            inflight += 1
        for (name, m, r), res in executor.wait():
            inflight -= 1
            done_n += 1
            score = res.get("score")
            if score is None:
                logger.warning("sensitivity of %s with %s at rho=%g failed: %s", name, m, r, res.get("error"))
                score = -math.inf
            sens.scores.setdefault(name, {}).setdefault(m, []).append((r, float(score) if math.isfinite(score) else base - 1.0))
            emit({"phase": "sensitivity", "done": done_n, "total": len(jobs), "elapsed_s": time.perf_counter() - t0})
        if inflight and not pending:
            time.sleep(0.001)
    for ms in sens.scores.values():
        for pts in ms.values():
            pts.sort()
    run.write_json("sensitivity.json", sens.to_dict())
    return sens


def warm_start_plans(choices, cost: CostModel, sens: Optional[Sensitivity]) -> list[tuple[str, ChoicePlan]]:
    """The baseline plans enqueued first: uniform ρ per method, greedy (AIMET), Lagrangian."""
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
