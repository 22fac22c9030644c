"""After the zero-shot trials: fine-tune the promising plans, and save the weights of every front member."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import optuna

from autorank.report import pareto_indices
from autorank.search.executor_base import BaseExecutor
from autorank.search.rundir import RunDir

logger = logging.getLogger("autorank")

__all__ = ["promising", "finetune_stage", "materialize_front", "feasible"]

Progress = Callable[[dict[str, Any]], None]


def promising(study, k: int) -> list[optuna.trial.FrozenTrial]:
    """Up to ``k`` feasible trials to fine-tune: successive zero-shot Pareto fronts, best score first."""
    S = optuna.trial.TrialState
    # a trial that repeated an already scored plan (duplicate_of) is that plan: fine-tune it once
    pool = [t for t in study.get_trials(deepcopy=False, states=(S.COMPLETE,)) if feasible(t) and "duplicate_of" not in t.user_attrs]
    chosen: list = []
    while pool and len(chosen) < k:
        idx = pareto_indices([t.values[1] for t in pool], [t.values[0] for t in pool])
        layer = sorted((pool[i] for i in idx), key=lambda t: -t.values[0])
        need = k - len(chosen)
        if len(layer) <= need:
            chosen.extend(layer)
        else:  # the best, then spread over the cost range
            rest = sorted(layer[1:], key=lambda t: t.values[1])
            pick = [layer[0]] + [rest[round(i * (len(rest) - 1) / max(1, need - 2))] for i in range(need - 1)] if need > 1 else [layer[0]]
            for t in pick:
                if t not in chosen:
                    chosen.append(t)
        ids = {t.number for t in chosen} | {pool[i].number for i in idx}
        pool = [t for t in pool if t.number not in ids]
    return chosen[:k]


def feasible(t) -> bool:
    """Whether a finished trial met the budget (its Optuna constraint values are all <= 0)."""
    c = [v for k, v in t.system_attrs.items() if k.startswith("constraints")]
    vals = []
    for v in c:
        vals.extend(v if isinstance(v, (list, tuple)) else [v])
    return all(float(v) <= 1e-12 for v in vals)


def finetune_stage(study, run: RunDir, executor: BaseExecutor, k: int, steps: Optional[int], seed: int, model_spec, emit: Progress,
                   t_start: float, training: Optional[dict] = None, time_s: Optional[float] = None) -> list:
    """Recover up to ``k`` promising plans, each within ``steps`` steps and ``time_s`` seconds (None: no bound).

    The plans are submitted in order of promise (:func:`promising`): with fewer workers
    than plans, the most promising are recovered first.
    """
    if k <= 0 or (steps is not None and steps <= 0) or (steps is None and time_s is None):
        return []
    picks = _picks(study, run, k, steps)
    todo = []
    for t in picks:
        rec = run.read_trial(t.number) or {}
        if rec.get("finetune") is not None:  # finished (scored or failed) before an interruption: not redone
            continue
        todo.append((t, rec))
    done_n = len(picks) - len(todo)
    emit({"phase": "finetune", "done": done_n, "total": len(picks), "elapsed_s": time.perf_counter() - t_start})
    records = {t.number: rec for t, rec in todo}
    for t, rec in todo:  # all at once: with several workers they fine-tune in parallel
        payload = {
            "plan": rec["plan"], "steps": steps, "time_s": time_s, "seed": seed, "save_to": str(run.weights_path(t.number)),
            "training": training,
            "spec": model_spec, "metadata": {"trial": t.number, "run": str(run.path.resolve())},
        }
        executor.submit(t.number, "finetune", payload)
    pending = set(records)
    while pending:
        for number, res in executor.wait():
            pending.discard(number)
            rec = records[number]
            if res.get("weights"):
                res["weights"] = _relative(run, number)
            rec["finetune"] = res
            run.write_trial(number, rec)
            done_n += 1
            if "error" in res:
                logger.warning("fine-tuning trial %d failed: %s", number, res["error"])
            emit({"phase": "finetune", "done": done_n, "total": len(picks), "trial": number, "elapsed_s": time.perf_counter() - t_start})
        if pending and not executor.has_results():
            time.sleep(0.01)
    emit({"phase": "finetune", "done": done_n, "total": len(picks), "elapsed_s": time.perf_counter() - t_start})
    return picks


#: the fine-tuning stage's checkpoint: which trials it fine-tunes (each result lands in its trial record as it comes)
FINETUNE_PLAN = "finetune.json"


def _picks(study, run: RunDir, k: int, steps: Optional[int]) -> list:
    """The trials to fine-tune, chosen once and kept in ``finetune.json``: a resumed stage finishes the same set."""
    saved = run.read_json(FINETUNE_PLAN)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    if saved and saved.get("k") == k and saved.get("steps") == steps and all(n in by_number for n in saved.get("trials", [])):
        return [by_number[n] for n in saved["trials"]]
    picks = promising(study, k)
    run.write_json(FINETUNE_PLAN, {"k": k, "steps": steps, "trials": [t.number for t in picks]})
    return picks


def _relative(run: RunDir, number: int) -> str:
    """Weights paths are stored relative to the run directory, so that the directory can be moved."""
    return run.weights_path(number).relative_to(run.path).as_posix()


def materialize_front(result, run: RunDir, executor: BaseExecutor, model_spec) -> None:
    """Weights for every front member (zero-shot members are built from their plan and saved), in parallel."""
    members = {}
    for member in result.front:
        if member.weights and (run.path / member.weights).exists():
            continue
        members[member.trial] = member
        executor.submit(member.trial, "save", {"plan": member.plan.to_dict(), "save_to": str(run.weights_path(member.trial)),
                                               "spec": model_spec, "metadata": {"trial": member.trial, "run": str(run.path.resolve())}})
    while members:
        for number, res in executor.wait():
            member = members.pop(number)
            if "error" in res:
                logger.warning("could not save the weights of trial %d: %s", number, res["error"])
                continue
            member.weights = _relative(run, number)
            rec = run.read_trial(number) or {}
            rec["weights"] = member.weights
            run.write_trial(number, rec)
        if members and not executor.has_results():
            time.sleep(0.01)
