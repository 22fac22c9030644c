"""The search: an Optuna multi-objective study over per-layer (method, ρ), repaired to the budget.

The path of one search (see ../DESIGN.md)::

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

import copy
import hashlib
import json
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import optuna
from torch import nn

from autorank import methods as registry
from autorank.cost.budget import Budget, BudgetError, check_reachable, parse_budget
from autorank.cost.profile import profile_model
from autorank.errors import AutorankError, NotApplicableError
from autorank.search.allocate import (
    ChoicePlan,
    CostModel,
    Sensitivity,
    best_uniform,
    cheapest_plan,
    describe_plan,
    greedy_plan,
    lagrangian_plan,
    local_moves,
    penalty_fn,
    probe_rhos,
    repair,
    to_plan,
)
from autorank.search.rundir import RunDir
from autorank.search.space import LayerChoice, SearchSpace
from autorank.search.trial import TrialRunner
from autorank.zoo import SPEC_ATTR, load_model

logger = logging.getLogger("autorank")

__all__ = ["search", "SAMPLERS", "make_sampler", "params_to_choice", "choice_to_params"]

SAMPLERS = ("tpe", "nsga2", "gp", "random")
#: the default sampler, chosen by benchmarks/bench_search.py (see the README)
DEFAULT_SAMPLER = "tpe"
STUDY_NAME = "autorank"
Progress = Callable[[dict[str, Any]], None]


class SearchError(AutorankError, ValueError):
    """A search that cannot start (bad arguments, nothing to search)."""


# ---------------------------------------------------------------------- samplers and params
def make_sampler(name: str, seed: int, n_layers: int) -> optuna.samplers.BaseSampler:
    name = name.lower()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10, constant_liar=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, min(50, 2 * n_layers + 4)))
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=10)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise SearchError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")


def _mkey(name: str) -> str:
    return f"method:{name}"


def _rkey(name: str) -> str:
    return f"rho:{name}"


def suggest(trial: optuna.Trial, choices: dict[str, LayerChoice], space: SearchSpace) -> ChoicePlan:
    cp: ChoicePlan = {}
    for name, ch in choices.items():
        m = trial.suggest_categorical(_mkey(name), list(ch.methods))
        if space.rho_step is not None and len(ch.rhos) > 1:
            r = trial.suggest_float(_rkey(name), ch.rhos[0], ch.rhos[-1], step=space.rho_step)
            r = min(ch.rhos, key=lambda g: abs(g - r))
        else:
            r = trial.suggest_categorical(_rkey(name), list(ch.rhos))
        cp[name] = (m, float(r))
    return cp


def choice_to_params(cp: ChoicePlan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (m, r) in cp.items():
        out[_mkey(name)] = m
        out[_rkey(name)] = r
    return out


def params_to_choice(params: dict[str, Any], choices: dict[str, LayerChoice]) -> ChoicePlan:
    return {n: (params[_mkey(n)], float(params[_rkey(n)])) for n in choices if _mkey(n) in params}


# ---------------------------------------------------------------------- identity
def model_identity(model: nn.Module) -> dict[str, Any]:
    from autorank.cache import weight_digest

    h = hashlib.blake2b(digest_size=8)
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(weight_digest(v.detach()).encode() if v.is_floating_point() else str(v.tolist()).encode()[:256])
    return {
        "spec": model.__dict__.get(SPEC_ATTR),
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "params": sum(p.numel() for p in model.parameters()),
        "weights": h.hexdigest(),
    }


def task_identity(task: Any, spec: Optional[str]) -> dict[str, Any]:
    fp = task.fingerprint() if hasattr(task, "fingerprint") else {"class": f"{type(task).__module__}.{type(task).__qualname__}"}
    return {"spec": spec, **fp}


# ---------------------------------------------------------------------- executors
class InProcessExecutor:
    """Runs trials one at a time in this process (the default without Ray)."""

    name = "in-process"
    concurrency = 1

    def __init__(self) -> None:
        self.runner: Optional[TrialRunner] = None
        self._done: list[tuple[Any, str, dict]] = []  # queued jobs, run by wait()

    def start(self, model: nn.Module, task: Any, *, calibrate: list[str], cache_dir: Optional[str], setup: bool = True, **_: Any) -> None:
        self.runner = TrialRunner(model, task, calibrate=calibrate, cache_dir=cache_dir, setup=setup)

    def submit(self, ticket: Any, kind: str, payload: dict) -> None:
        assert self.runner is not None
        self._done.append((ticket, kind, payload))

    def wait(self) -> list[tuple[Any, dict]]:
        """Runs the oldest queued job and returns its result (one at a time, so progress is reported per job)."""
        if not self._done:
            return []
        ticket, kind, payload = self._done.pop(0)
        return [(ticket, self.runner.run(kind, payload))]

    def has_results(self) -> bool:
        return bool(self._done)

    def running(self) -> int:
        return 0

    def close(self) -> None:
        self.runner = None


# ---------------------------------------------------------------------- the search
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
    executor: Any = None,
    progress: Optional[Progress] = None,
    measure_latency: bool = True,
    sensitivity: Union[Sensitivity, str, Path, None] = None,
    local_every: int = 3,
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
    """
    from autorank.search.result import build_front
    from autorank.tasks import load_task

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t_start = time.perf_counter()
    emit = progress or (lambda _e: None)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise SearchError(f"trials must be a positive integer, got {trials!r}")
    if not isinstance(finetune, int) or finetune < 0:
        raise SearchError(f"finetune must be an integer >= 0, got {finetune!r}")
    if not isinstance(sensitivity_points, int) or isinstance(sensitivity_points, bool) or sensitivity_points < 2:
        raise SearchError(f"sensitivity_points must be an integer >= 2 (the ends of the ρ grid at least), got {sensitivity_points!r}")
    if sampler.lower() not in SAMPLERS:
        raise SearchError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    budget = budget if isinstance(budget, Budget) else parse_budget(budget)
    space = SearchSpace.load(space)

    model_spec = model if isinstance(model, str) else None
    if isinstance(model, str):
        model = load_model(model)
        model_spec = model.__dict__.get(SPEC_ATTR) or model_spec  # normalised (absolute paths): what workers and saved files rebuild from
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
        latency = _latency_table(original, profile, choices, task, space, emit)
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
        study = optuna.create_study(
            storage=run.storage_url, study_name=STUDY_NAME, load_if_exists=True,
            directions=["maximize", "minimize"], sampler=make_sampler(sampler, seed, len(choices)),
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
            sens = _sensitivity(run, executor, choices, cost, base, sensitivity_points, emit)
            if not resuming or not study.trials:
                _enqueue_warm_start(study, choices, cost, sens)
        penalty = penalty_fn(sens)
        _run_trials(study, run, executor, choices, space, cost, penalty, trials, emit, t_start, local_every if warm_start else 0)
        _finetune_stage(study, run, executor, finetune, steps, seed, model_spec, emit, t_start, space.training)
        result = build_front(run, study, cost, budget, base)
        _materialize_front(result, run, executor, model_spec)
    finally:
        executor.close()
    if measure_latency:
        _measure_front(result, original, example, task)
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
    res = _run_one(executor, "zero_shot", {"plan": {"layers": {}}})
    if "error" in res:
        raise AutorankError(f"the task cannot score the original model: {res['error']}")
    run.write_json("baseline.json", {"score": res["score"], "time_evaluate_s": res.get("time_evaluate_s")})
    return float(res["score"])


def _run_one(executor: Any, kind: str, payload: dict) -> dict:
    executor.submit(0, kind, payload)
    while True:
        done = executor.wait()
        if done:
            return done[0][1]


def _sensitivity(run, executor, choices, cost: CostModel, base: float, points: int, emit: Progress) -> Sensitivity:
    saved = run.read_json("sensitivity.json")
    if saved is not None:
        return Sensitivity.from_dict(saved)
    jobs = []
    for name, ch in choices.items():
        for m in ch.methods:
            if m == "none":
                continue
            for r in probe_rhos(ch.rhos, points):
                jobs.append((name, m, r))
    sens = Sensitivity(base)
    t0 = time.perf_counter()
    pending = list(jobs)
    inflight = 0
    done_n = 0
    while pending or inflight:
        while pending and inflight < max(1, getattr(executor, "concurrency", 1)):
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


def _enqueue_warm_start(study, choices, cost, sens) -> None:
    for origin, cp in warm_start_plans(choices, cost, sens):
        study.enqueue_trial(choice_to_params(cp), user_attrs={"origin": origin})
        logger.info("warm start: %s (%s)", origin, describe_plan(cp))


def _key(cp: ChoicePlan) -> tuple:
    return tuple(sorted((n, m, round(float(r), 6)) for n, (m, r) in cp.items()))


def _waiting(study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def _run_trials(study, run: RunDir, executor, choices, space, cost: CostModel, penalty, total: int, emit: Progress,
                t_start: float, local_every: int = 3) -> None:
    """Ask, repair, run, tell until ``total`` trials have finished.

    Every ``local_every`` sampler trials, a local move around the best plan so far
    (:func:`~autorank.search.allocate.local_moves`) is queued: the sampler explores,
    the local moves exploit what the sensitivity table says about the best plan.
    """
    S = optuna.trial.TrialState
    done_before = _finished(study)
    finished = len(done_before)
    failed = sum(1 for t in done_before if t.state == S.FAIL)
    inflight: dict[int, tuple[optuna.Trial, dict]] = {}
    t0 = time.perf_counter()
    started_with = finished
    conc = max(1, getattr(executor, "concurrency", 1))
    # plans tried so far and the scores of finished ones: for local moves around the best
    tried: set = set()
    scored: list[tuple[float, float, ChoicePlan]] = []
    for r in run.trial_records().values():
        cp_r = {n: (c[0], float(c[1])) for n, c in (r.get("choice") or {}).items()}
        tried.add(_key(cp_r))
        if r.get("state") == "COMPLETE" and r.get("feasible", True):
            scored.append((r["score"], -cost.objective(r["costs"]), cp_r))
    since_local = 0
    while finished + len(inflight) < total or inflight:
        while finished + len(inflight) < total and len(inflight) < conc:
            if local_every and since_local >= local_every and scored and not _waiting(study):
                since_local = 0
                best = max(scored, key=lambda t: (t[0], t[1]))[2]
                for move in local_moves(best, choices, cost, penalty):
                    if _key(move) not in tried:
                        study.enqueue_trial(choice_to_params(move), user_attrs={"origin": "local"})
                        break
            trial = study.ask()
            cp = suggest(trial, choices, space)
            fixed, fits = repair(cp, choices, cost, penalty)
            costs = cost.costs(fixed)
            plan = to_plan(fixed, cost)
            tried.add(_key(fixed))
            if trial.user_attrs.get("origin", "sampler") == "sampler":
                since_local += 1
            record = {
                "number": trial.number,
                "origin": trial.user_attrs.get("origin", "sampler"),
                "sampled": {n: list(c) for n, c in cp.items()},
                "repaired": fixed != cp,
                "choice": {n: list(c) for n, c in fixed.items()},
                "plan": plan.to_dict(),
                "summary": describe_plan(fixed),
                "costs": costs,
                "ratios": cost.ratios(costs),
                "feasible": bool(fits),
            }
            trial.set_user_attr("plan", plan.to_dict()["layers"])
            trial.set_user_attr("repaired", record["repaired"])
            trial.set_user_attr("summary", record["summary"])
            for m, v in cost.ratios(costs).items():
                trial.set_user_attr(f"{m}_ratio", v)
            trial.set_constraint("budget", cost.violation(costs))
            record["state"] = "RUNNING"
            run.write_trial(trial.number, record)
            executor.submit(trial.number, "zero_shot", {"plan": plan.to_dict()})
            inflight[trial.number] = (trial, record)
        for number, res in executor.wait():
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
                    scored.append((res["score"], -cost.objective(record["costs"]),
                                   {n: (c[0], float(c[1])) for n, c in record["choice"].items()}))
                study.tell(trial, [res["score"], cost.objective(record["costs"])])
            finished += 1
            done_now = finished - started_with
            rate = (time.perf_counter() - t0) / max(1, done_now)
            emit({
                "phase": "trials", "done": finished, "total": total, "running": len(inflight), "failed": failed,
                "elapsed_s": time.perf_counter() - t_start, "remaining_s": rate * (total - finished),
                **_front_stats(scored),
            })
        if inflight and not _has_results(executor):
            time.sleep(0.002)


def _has_results(executor) -> bool:
    fn = getattr(executor, "has_results", None)
    return True if fn is None else fn()


def _front_stats(scored: list) -> dict[str, Any]:
    """Size of the zero-shot front and best score within budget, from the run's own (score, -cost) list
    (``study.best_trials`` deep-copies every trial: 0.3–0.6 s per call at a hundred trials)."""
    from autorank.report import pareto_indices

    if not scored:
        return {"front_size": 0, "best_score": None}
    idx = pareto_indices([-c for _, c, _ in scored], [s for s, _, _ in scored])
    return {"front_size": len(idx), "best_score": max(s for s, _, _ in scored)}


def promising(study, k: int) -> list[optuna.trial.FrozenTrial]:
    """Up to ``k`` feasible trials to fine-tune: successive zero-shot Pareto fronts, best score first."""
    from autorank.report import pareto_indices

    S = optuna.trial.TrialState
    pool = [t for t in study.get_trials(deepcopy=False, states=(S.COMPLETE,)) if _feasible(t)]
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


def _feasible(t) -> bool:
    c = [v for k, v in t.system_attrs.items() if k.startswith("constraints")]
    vals = []
    for v in c:
        vals.extend(v if isinstance(v, (list, tuple)) else [v])
    return all(float(v) <= 1e-12 for v in vals)


def _finetune_stage(study, run: RunDir, executor, k: int, steps: int, seed: int, model_spec, emit: Progress, t_start: float,
                    training: Optional[dict] = None) -> list:
    if k <= 0 or steps <= 0:
        return []
    picks = promising(study, k)
    todo = []
    for t in picks:
        rec = run.read_trial(t.number) or {}
        if rec.get("finetune", {}).get("score") is not None:
            continue
        todo.append((t, rec))
    done_n = len(picks) - len(todo)
    emit({"phase": "finetune", "done": done_n, "total": len(picks), "elapsed_s": time.perf_counter() - t_start})
    records = {t.number: rec for t, rec in todo}
    for t, rec in todo:  # all at once: with several workers they fine-tune in parallel
        payload = {
            "plan": rec["plan"], "steps": steps, "seed": seed, "save_to": str(run.weights_path(t.number)), "training": training,
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
        if pending and not _has_results(executor):
            time.sleep(0.01)
    emit({"phase": "finetune", "done": done_n, "total": len(picks), "elapsed_s": time.perf_counter() - t_start})
    return picks


def _relative(run: RunDir, number: int) -> str:
    """Weights paths are stored relative to the run directory, so that the directory can be moved."""
    return run.weights_path(number).relative_to(run.path).as_posix()


def _materialize_front(result, run: RunDir, executor, model_spec) -> None:
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
        if members and not _has_results(executor):
            time.sleep(0.01)


def _latency_table(model, profile, choices, task, space, emit: Progress):
    """Latency lookup table for every (layer, method, ρ) the space allows, measured on the task's device."""
    from autorank.cost.latency import build_table

    device = getattr(task, "device", "cpu") or "cpu"
    candidates = {n: [(m, r) for m in ch.methods if m != "none" for r in ch.rhos] for n, ch in choices.items()}
    if space.align:
        candidates = {n: [(m, r, {"align": space.align}) for m, r in c] for n, c in candidates.items()}
    total = sum(len(v) for v in candidates.values())

    def prog(done, tot, what):
        emit({"phase": "latency", "done": done, "total": tot, "what": what})

    table = build_table(model, profile, candidates, device=device, progress=prog, example_inputs=task.example_inputs())
    base = profile.latency
    if base is None:
        from autorank.cost.latency import model_signature

        base = table.get_model(model_signature(profile, table.batch_size))
    logger.info("latency table: %d entries (%d candidates) on %s", len(table), total, table.device_name)
    return table, float(base)


def _measure_front(result, original: nn.Module, example: Any, task: Any) -> None:
    """Measured latency of the original and of each front member, on the task's device, side by side."""
    from autorank.cost.latency import measure

    device = getattr(task, "device", "cpu") or "cpu"
    inputs = example if isinstance(example, tuple) else (example,)
    try:
        base = measure(copy.deepcopy(original), inputs, device=device, threads=1, warmup=3, repeats=15)
    except Exception as exc:  # pragma: no cover - measuring is informative, never fatal
        logger.warning("could not measure the original's latency: %s", exc)
        return
    result.original_latency_s = base.median
    for member in result.front:
        try:
            model = result.build(member, original)
            member.latency_measured_s = measure(model, inputs, device=device, threads=1, warmup=3, repeats=15).median
        except Exception as exc:  # pragma: no cover
            logger.warning("could not measure trial %d: %s", member.trial, exc)
