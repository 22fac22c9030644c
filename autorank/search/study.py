"""The search: an Optuna multi-objective study over per-layer (method, ρ), repaired to the budget.

The path of one search (see docs/DESIGN.md)::

    profile → choices per layer (search space) → cost model (budget)
      → warm start: sensitivity table, uniform-ρ plans per method, greedy and
        Lagrangian allocations, enqueued as the first trials
      → trials: ask → repair to budget (analytic) → zero-shot score → tell
      → fine-tune the promising plans → front (measured latency) → front.json

Every trial is scored zero-shot (data-aware initialisation, no training); the
most promising — the zero-shot Pareto front, best first — are then fine-tuned,
and the front reports their fine-tuned scores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import optuna
from torch import nn

from autorank import methods as registry
from autorank.cost.budget import Budget, BudgetError, check_reachable, parse_budget
from autorank.cost.cost_model import ChoicePlan, CostModel
from autorank.cost.profile import profile_model
from autorank.errors import AutorankError, NotApplicableError, SearchError
from autorank.search.allocate import Sensitivity, cheapest_plan, describe_plan, local_moves, penalty_fn, repair, to_plan
from autorank.search.executor_base import BaseExecutor, InProcessExecutor, run_one
from autorank.search.finetune_stage import finetune_stage, materialize_front
from autorank.search.identity import model_identity, task_identity
from autorank.search.latency import latency_table_for, measure_front
from autorank.search.params import (
    DEFAULT_SAMPLER, SAMPLERS, StaticTPESampler, choice_to_params, distributions, make_sampler, params_choice, suggest,
)
from autorank.search.result import build_front
from autorank.search.journal import RunJournal
from autorank.search.rundir import RunDir
from autorank.search.sensitivity import SENSITIVITY_MODES
from autorank.search.space import SearchSpace
from autorank.search.warm_start import enqueue_warm_start, measure_sensitivity
from autorank.tasks import load_task
from autorank.zoo import SPEC_ATTR, load_model

logger = logging.getLogger("autorank")

__all__ = ["search", "SearchError", "STUDY_NAME"]

STUDY_NAME = "autorank"
Progress = Callable[[dict[str, Any]], None]


def search(
    model: Union[nn.Module, str] = "demo",
    task: Any = None,
    *,
    budget: Union[str, Budget],
    space: Union[str, Path, dict, SearchSpace, None] = None,
    trials: int = 40,
    out: Union[str, Path, None] = None,
    seed: int = 0,
    sampler: str = DEFAULT_SAMPLER,
    finetune: int = 4,
    finetune_steps: Optional[int] = None,
    warm_start: bool = True,
    sensitivity_points: int = 4,
    cache_dir: Union[str, Path, None] = None,
    executor: Optional[BaseExecutor] = None,
    progress: Optional[Progress] = None,
    measure_latency: bool = True,
    sensitivity: Union[Sensitivity, str, Path, None] = None,
    local_every: int = 3,
    sensitivity_mode: str = "estimate",
):
    """Search per-layer methods and ranks for ``model`` under ``budget``; returns a :class:`SearchResult`.

    ``model``: an ``nn.Module`` or a model spec (``demo``, ``pkg.mod:callable``,
    ``file.py:callable``). ``task``: a Task, a task spec, or None for the built-in
    task of a built-in model. ``budget``: ``"30%flops"`` etc. ``space``: a built-in
    space name, a YAML path, a dict or a SearchSpace. ``trials``: zero-shot trials
    in total (warm-start plans included); a run directory that already holds some
    continues up to this number. ``finetune``: how many promising plans to
    fine-tune, for ``finetune_steps`` steps each (default: the task's
    ``default_finetune_steps`` or 100). ``out``: the run directory (default: a new
    temporary directory). ``executor``: where trials run (default: in this
    process; see :mod:`autorank.search.executor` for Ray). ``sensitivity``: a
    per-layer sensitivity table to reuse (a :class:`Sensitivity` or the
    ``sensitivity.json`` of an earlier run of the same model and task) instead of
    measuring it. ``local_every``: after this many sampler trials, one local move
    around the best plan so far (0: none; only with ``warm_start``).
    ``sensitivity_mode``: ``estimate`` (default: layer output errors from one pass
    over the calibration batches, calibrated by a few evaluations; see
    :mod:`autorank.search.sensitivity`) or ``full`` (every probe evaluated).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t_start = time.perf_counter()
    emit = progress or (lambda _e: None)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise SearchError(f"trials must be a positive integer, got {trials!r}")
    if not isinstance(finetune, int) or finetune < 0:
        raise SearchError(f"finetune must be an integer >= 0, got {finetune!r}")
    if not isinstance(sensitivity_points, int) or isinstance(sensitivity_points, bool) or sensitivity_points < 2:
        raise SearchError(f"sensitivity_points must be an integer >= 2 (the ends of the ρ grid at least), got {sensitivity_points!r}")
    if sensitivity_mode not in SENSITIVITY_MODES:
        raise SearchError(f"sensitivity mode {sensitivity_mode!r}: expected one of {', '.join(SENSITIVITY_MODES)}")
    if sampler.lower() not in SAMPLERS:
        raise SearchError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    budget = budget if isinstance(budget, Budget) else parse_budget(budget)
    space = SearchSpace.load(space)

    model_spec = model if isinstance(model, str) else None
    if isinstance(model, str):
        model = load_model(model)
    if not isinstance(model, nn.Module):
        raise SearchError(f"model must be an nn.Module or a model spec string, got {type(model).__name__}")
    task_spec = task if isinstance(task, str) else None
    task = load_task(task, model_spec or model.__dict__.get(SPEC_ATTR))
    steps = int(finetune_steps if finetune_steps is not None else getattr(task, "default_finetune_steps", 100))

    run = RunDir(out if out is not None else tempfile.mkdtemp(prefix="autorank-run-"))
    settings = {
        "model": model_identity(model),
        "task": task_identity(task, task_spec),
        "budget": budget.text(),
        "space": space.to_dict(),
        "seed": int(seed),
        "sampler": sampler.lower(),
        "trials": trials,
        "finetune": finetune,
        "finetune_steps": steps,
        "warm_start": bool(warm_start),
        "sensitivity": sensitivity_mode,
        "autorank_version": _version(),
    }
    resuming = run.prepare(settings)
    logger.info("%s run directory %s", "resuming" if resuming else "new", run.path)

    # ---- profile and choices
    emit({"phase": "profile"})
    original = model.eval()
    task.setup(original)
    example = task.example_inputs()
    profile = profile_model(original, example)
    choices = space.choices(profile)
    if not choices:
        raise NotApplicableError(
            f"{type(original).__name__}: no layer to decompose in search space {space.source} "
            f"({len(profile.layers)} candidate layers, none allowed by the space's layer rules and methods)"
        )
    check_reachable(budget, profile, space.decomposable_methods())
    latency = None
    if budget.needs_latency:
        latency = latency_table_for(original, profile, choices, task, space, emit)
    cost = CostModel(profile, budget, space.align, latency)
    cheapest = cheapest_plan(choices, cost)
    if not cost.fits(cost.costs(cheapest)):
        reached = ", ".join(f"{m} {100 * v:.1f}%" for m, v in cost.ratios(cost.costs(cheapest)).items())
        raise BudgetError(
            f"budget {budget.text()!r} cannot be met by any plan of search space {space.source}: "
            f"the cheapest plan reaches {reached} of the original"
        )

    # ---- workers
    executor = executor or InProcessExecutor()
    calibrate = [n for n in choices if any(registry.get(m).data_aware for m in choices[n].methods if m != "none")]
    cache_dir = str(cache_dir) if cache_dir is not None else str(run.path / "factor-cache")
    executor.start(original, task, calibrate=calibrate, cache_dir=cache_dir, setup=False,
                   model_spec=model_spec, task_spec=task_spec)
    try:
        storage, journal = run.storage()
        study = optuna.create_study(
            storage=storage, study_name=STUDY_NAME, load_if_exists=True,
            directions=["maximize", "minimize"], sampler=make_sampler(sampler, seed, len(choices), distributions(choices, space)),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["score", f"{cost.objective_metric}_ratio"])
        _recover_interrupted(study, run, cost)
        base = _base_score(run, executor, original, task)
        sens = None
        if warm_start:
            if sensitivity is not None and run.read_json("sensitivity.json") is None:
                if not isinstance(sensitivity, Sensitivity):
                    sensitivity = Sensitivity.from_dict(json.loads(Path(sensitivity).read_text()))
                run.write_json("sensitivity.json", sensitivity.to_dict())
            sens = measure_sensitivity(run, executor, choices, cost, base, sensitivity_points, emit, mode=sensitivity_mode, seed=seed)
            if not resuming or not study.get_trials(deepcopy=False):
                enqueue_warm_start(study, choices, cost, sens)
        penalty = penalty_fn(sens)
        _run_trials(study, run, executor, choices, space, cost, penalty, trials, emit, t_start, local_every if warm_start else 0,
                    journal=journal)
        finetune_stage(study, run, executor, finetune, steps, seed, model_spec, emit, t_start, space.training)
        result = build_front(run, study, cost, budget, base)
        materialize_front(result, run, executor, model_spec)
    finally:
        executor.close()
    if measure_latency:
        measure_front(result, original, example, task)
    result.write()
    emit({"phase": "done", "elapsed_s": time.perf_counter() - t_start, "front_size": len(result.front)})
    result.model = original
    return result


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("autorank")
    except Exception:  # pragma: no cover
        return "unknown"


def _recover_interrupted(study: optuna.Study, run: RunDir, cost: Optional[CostModel] = None) -> None:
    """Trials left RUNNING by a killed driver.

    A trial whose result reached its record file (the driver died between writing
    it and telling the study) is told now; one that was still running is marked
    failed as interrupted and its plan queued again, so nothing finished is lost
    and nothing unfinished is skipped.
    """
    S = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(S.RUNNING,)):
        rec = run.read_trial(t.number) or {}
        if rec.get("state") == "COMPLETE" and rec.get("score") is not None and cost is not None:
            study.tell(t.number, [rec["score"], cost.objective(rec["costs"])])
            logger.info("trial %d had finished before the interruption; recorded", t.number)
            continue
        if rec.get("state") == "FAIL":
            study._storage.set_trial_user_attr(t._trial_id, "error", rec.get("error", "failed"))
            study.tell(t.number, state=S.FAIL)
            continue
        study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted: the search stopped while this trial ran")
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, S.FAIL)
        if rec:
            rec["state"] = "INTERRUPTED"
            run.write_trial(t.number, rec)
        if t.params:
            study.enqueue_trial(dict(t.params), user_attrs={k: v for k, v in t.user_attrs.items() if k == "origin"})
        logger.info("trial %d was interrupted; it will run again", t.number)


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    S = optuna.trial.TrialState
    return [t for t in study.get_trials(deepcopy=False, states=(S.COMPLETE, S.FAIL)) if not t.user_attrs.get("interrupted")]


def _base_score(run: RunDir, executor: Any, model: nn.Module, task: Any) -> float:
    saved = run.read_json("baseline.json")
    if saved is not None:
        return float(saved["score"])
    res = run_one(executor, "zero_shot", {"plan": {"layers": {}}})
    if "error" in res:
        raise AutorankError(f"the task cannot score the original model: {res['error']}")
    run.write_json("baseline.json", {"score": res["score"], "time_evaluate_s": res.get("time_evaluate_s")})
    return float(res["score"])


def _key(cp: ChoicePlan) -> tuple:
    return tuple(sorted((n, m, round(float(r), 6)) for n, (m, r) in cp.items()))


class _Front:
    """The zero-shot front of feasible results, kept as they come (a point is added in O(front size))."""

    def __init__(self) -> None:
        self.points: list[tuple[float, float]] = []  # (cost, score), cost ascending, score ascending
        self.best: Optional[float] = None

    def add(self, score: float, cost_: float) -> None:
        self.best = score if self.best is None else max(self.best, score)
        if any(c <= cost_ and s >= score for c, s in self.points):
            return
        self.points = sorted([(c, s) for c, s in self.points if not (cost_ <= c and score >= s)] + [(cost_, score)])

    def stats(self) -> dict[str, Any]:
        return {"front_size": len(self.points), "best_score": self.best}


def _ask(study, run: RunDir, choices, space, cost: CostModel, penalty, tried: set, dists: Optional[dict] = None,
         given: Optional[ChoicePlan] = None, n_complete: Optional[int] = None) -> tuple[optuna.Trial, dict, Any]:
    """One trial: ask, repair to the budget, the attributes the study keeps; returns (trial, record, plan).

    With ``dists`` (the study's parameters; :class:`~autorank.search.params.StaticTPESampler`
    and no queued trial), the trial is created with its parameters and attributes in
    one storage operation instead of one per parameter (108 on a ResNet-50-sized
    space): the sampler's proposal, or ``given`` (a local move). Otherwise it goes
    through ``study.ask()`` (queued warm-start plans; other samplers).
    """
    fast = dists is not None
    origin = "sampler"
    if fast:
        if given is not None:
            params, origin = choice_to_params(given), "local"
        else:
            params = study.sampler.sample_params(study, n_complete)
        params.update({k: d.to_external_repr(d.to_internal_repr(_single(d))) for k, d in dists.items() if k not in params})
        cp = dict(given) if given is not None else params_choice(params, choices)
        trial = None
    else:
        trial = study.ask()
        origin = trial.user_attrs.get("origin", "sampler")
        cp = suggest(trial, choices, space)
    fixed, fits = repair(cp, choices, cost, penalty)
    costs = cost.costs(fixed)
    plan = to_plan(fixed, cost)
    tried.add(_key(fixed))
    attrs = {"plan": plan.to_dict()["layers"], "repaired": fixed != cp, "summary": describe_plan(fixed),
             **{f"{m}_ratio": v for m, v in cost.ratios(costs).items()}, **({"origin": origin} if fast and given is not None else {})}
    if fast:
        template = optuna.trial.FrozenTrial(
            number=-1, state=optuna.trial.TrialState.RUNNING, value=None, datetime_start=datetime.now(), datetime_complete=None,
            params=params, distributions=dict(dists), user_attrs=attrs,
            system_attrs={"constraints:budget": float(cost.violation(costs))}, intermediate_values={}, trial_id=-1,
        )
        trial = optuna.trial.Trial(study, study._storage.create_new_trial(study._study_id, template_trial=template))
    record = {
        "number": trial.number,
        "origin": origin,
        "sampled": {n: list(c) for n, c in cp.items()},
        "repaired": fixed != cp,
        "choice": {n: list(c) for n, c in fixed.items()},
        "plan": plan.to_dict(),
        "summary": describe_plan(fixed),
        "costs": costs,
        "ratios": cost.ratios(costs),
        "feasible": bool(fits),
        "state": "RUNNING",
    }
    if not fast:
        for k, v in attrs.items():
            if k != "origin":
                trial.set_user_attr(k, v)
        trial.set_constraint("budget", cost.violation(costs))
    return trial, record, plan


def _tell(study, trial: optuna.Trial, values: list[float]) -> None:
    """``study.tell(trial, values)`` for a finished zero-shot trial.

    With :class:`~autorank.search.params.StaticTPESampler` (whose ``after_trial`` does
    nothing) the state and values are stored directly: ``study.tell`` first reads back a
    deep copy of the trial (108 parameters and the plan: a few ms, more than the rest of the tell).
    """
    if isinstance(study.sampler, StaticTPESampler) and all(isinstance(v, float) and math.isfinite(v) for v in values):
        study._thread_local.cached_all_trials = None
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.COMPLETE, values)
    else:
        study.tell(trial, values)


def _single(d):
    """The one value of a distribution with one choice (such parameters are not sampled)."""
    return d.choices[0] if hasattr(d, "choices") else d.low


def _run_trials(study, run: RunDir, executor, choices, space, cost: CostModel, penalty, total: int, emit: Progress,
                t_start: float, local_every: int = 3, journal: Optional[RunJournal] = None) -> None:
    """Ask, repair, run, tell until ``total`` trials have finished.

    Every idle worker gets a plan in one batch of asks (the constant liar keeps
    them apart); the batch reaches the study's journal in one write, before the
    trial records are written and the jobs submitted. Results are recorded, then
    told, one journal write per batch of results. Every ``local_every`` sampler
    trials, a local move around the best plan so far
    (:func:`~autorank.search.allocate.local_moves`) is queued: the sampler explores,
    the local moves exploit what the sensitivity table says about the best plan.
    The driver's own time per trial (ask, repair, records, tell) goes to ``driver.json``.
    """
    S = optuna.trial.TrialState
    batch = journal.batch if journal is not None else contextlib.nullcontext
    done_before = _finished(study)
    finished = len(done_before)
    failed = sum(1 for t in done_before if t.state == S.FAIL)
    inflight: dict[int, tuple[optuna.Trial, dict]] = {}
    t0 = time.perf_counter()
    started_with = finished
    conc = max(1, executor.concurrency)
    # plans tried so far and the scores of finished ones: for local moves around the best
    tried: set = set()
    scored: list[tuple[float, float, ChoicePlan]] = []
    front = _Front()
    for r in run.trial_records().values():
        cp_r = {n: (c[0], float(c[1])) for n, c in (r.get("choice") or {}).items()}
        tried.add(_key(cp_r))
        if r.get("state") == "COMPLETE" and r.get("feasible", True):
            scored.append((r["score"], -cost.objective(r["costs"]), cp_r))
            front.add(r["score"], cost.objective(r["costs"]))
    best = max(scored, key=lambda t: (t[0], t[1])) if scored else None
    dists = distributions(choices, space)
    static = isinstance(study.sampler, StaticTPESampler)
    waiting = len(study.get_trials(deepcopy=False, states=(S.WAITING,)))  # queued plans: only this driver queues them
    since_local = 0
    local: Optional[tuple[tuple, Iterator[ChoicePlan]]] = None  # (best plan's key, its neighbours not yet looked at)
    driver_s: dict[int, float] = {}
    while finished + len(inflight) < total or inflight:
        n_ask = min(total - finished - len(inflight), conc - len(inflight))
        if n_ask > 0:
            tb = time.perf_counter()
            asked = []
            with batch():
                for _ in range(n_ask):
                    move = None
                    if local_every and since_local >= local_every and best is not None and not waiting:
                        since_local = 0
                        if local is None or local[0] != _key(best[2]):  # neighbours of a new best plan
                            local = (_key(best[2]), local_moves(best[2], choices, cost, penalty))
                        for mv in local[1]:  # resumes where the last local move stopped: each neighbour made once
                            if _key(mv) not in tried:
                                move = mv
                                break
                    fast = static and not waiting
                    if move is not None and not fast:  # through the study's queue, like the warm start
                        study.enqueue_trial(choice_to_params(move), user_attrs={"origin": "local"})
                        waiting += 1
                        move = None
                    trial, record, plan = _ask(study, run, choices, space, cost, penalty, tried, dists if fast else None,
                                               given=move, n_complete=finished - failed)
                    if not fast:
                        waiting = max(0, waiting - 1)
                    if record["origin"] == "sampler":
                        since_local += 1
                    asked.append((trial, record, plan))
            # the batch is in the journal before any record names its trials or any job runs
            for trial, record, plan in asked:
                run.write_trial(trial.number, record)
            share = (time.perf_counter() - tb) / len(asked)
            for trial, record, plan in asked:
                driver_s[trial.number] = share
                executor.submit(trial.number, "zero_shot", {"plan": plan.to_dict()})
                inflight[trial.number] = (trial, record)
        results = executor.wait()
        if results:
            tb = time.perf_counter()
            with batch():
                for number, res in results:
                    trial, record = inflight.pop(number)
                    record.update({k: v for k, v in res.items()})
                    # the record is written before the study is told: a driver killed in between is recovered on resume
                    if "error" in res:
                        record["state"] = "FAIL"
                        run.write_trial(number, record)
                        trial.set_user_attr("error", res["error"])
                        study.tell(trial, state=S.FAIL)
                        failed += 1
                        logger.warning("trial %d failed: %s", number, res["error"])
                    else:
                        record["state"] = "COMPLETE"
                        run.write_trial(number, record)
                        if record.get("feasible", True):
                            item = (res["score"], -cost.objective(record["costs"]),
                                    {n: (c[0], float(c[1])) for n, c in record["choice"].items()})
                            scored.append(item)
                            front.add(item[0], -item[1])
                            if best is None or (item[0], item[1]) > (best[0], best[1]):
                                best = item
                        _tell(study, trial, [res["score"], cost.objective(record["costs"])])
                    finished += 1
            share = (time.perf_counter() - tb) / len(results)
            for number, _ in results:
                driver_s[number] = driver_s.get(number, 0.0) + share
            done_now = finished - started_with
            rate = (time.perf_counter() - t0) / max(1, done_now)
            emit({
                "phase": "trials", "done": finished, "total": total, "running": len(inflight), "failed": failed,
                "elapsed_s": time.perf_counter() - t_start, "remaining_s": rate * (total - finished),
                **front.stats(),
            })
        elif inflight and not executor.has_results():
            time.sleep(0.002)
    if driver_s:
        old = run.read_json("driver.json") or {}
        per = {**old.get("driver_s", {}), **{str(k): v for k, v in driver_s.items()}}
        run.write_json("driver.json", {"driver_s": per, "what": "driver time per trial: ask, repair, records, tell (seconds)"})
