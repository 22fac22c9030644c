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

Starting is all or nothing: the run directory is locked (one search per
directory), then every check that can refuse the search — the budget, the
space, the task scoring the original — runs before the first file is written
to it, so a refused start leaves the directory as it found it. A plan already
scored is not run again (the trial that repeats it records ``duplicate_of``),
and the sampler is reseeded before every ask from the seed and the trial's
position, so a run killed and resumed asks for the same plans as one that was
not (with one worker; with several, which trials have finished at each ask
depends on timing, as in Optuna's own parallel mode). A full disk stops the
search with :class:`~autorank.fileio.DiskFullError`; the same command resumes it
once there is space.
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

import numpy as np
import optuna
from torch import nn

from autorank import methods as registry
from autorank.cost.budget import Budget, BudgetError, check_reachable, parse_budget
from autorank.cost.cost_model import ChoicePlan, CostModel
from autorank.cost.profile import profile_model
from autorank.errors import AutorankError, NotApplicableError, SearchError
from autorank.fileio import DiskFullError, disk_full_error
from autorank.hf import is_hf_spec
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
from autorank.search.rundir import RunDir, RunDirError
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
    space name, a YAML path, a dict or a SearchSpace (default: ``default``, or ``llm``
    for a ``hf:`` model). ``trials``: zero-shot trials
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
    if space is None and isinstance(model, str) and is_hf_spec(model):
        space = "llm"  # decoder LLMs: the projections, svd or tt, aligned ranks
    space = SearchSpace.load(space)
    sensitivity = _given_sensitivity(sensitivity)

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
        "sensitivity": sensitivity_mode,
        "autorank_version": _version(),
    }
    run.check(settings)  # another search's directory is refused before anything is touched
    lock = run.lock().acquire()
    lock.created_dir = lock.created_dir or out is None  # a temporary directory of our own: removed if refused
    committed = False  # whether the run directory has been written to
    try:
        # ---- every check that can refuse the search, before anything is written
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
        if run.settings_path.exists():  # a resumed run's records are checked before anything is written
            run.trial_records(set(choices))
            saved_sens = run.read_json("sensitivity.json")
            if saved_sens is not None:
                _sensitivity_from(saved_sens, run.path / "sensitivity.json", RunDirError)
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
        guarded = _StopOnFullDisk(executor)
        try:
            saved_base = run.read_json("baseline.json")
            base = _saved_base(run, saved_base) if saved_base is not None else _score_original(guarded)
            # ---- every check has passed: from here on the run directory is written
            resuming = run.prepare(settings)
            committed = True
            logger.info("%s run directory %s", "resuming" if resuming else "new", run.path)
            if saved_base is None:
                run.write_json("baseline.json", {"score": base["score"], "time_evaluate_s": base.get("time_evaluate_s")})
            base = float(base["score"])
            storage, journal = run.storage()
            study = optuna.create_study(
                storage=storage, study_name=STUDY_NAME, load_if_exists=True,
                directions=["maximize", "minimize"],
                sampler=make_sampler(sampler, seed, len(choices), distributions(choices, space)),
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(["score", f"{cost.objective_metric}_ratio"])
            _recover_interrupted(study, run, cost)
            sens = None
            if warm_start:
                if sensitivity is not None and run.read_json("sensitivity.json") is None:
                    run.write_json("sensitivity.json", sensitivity.to_dict())
                sens = measure_sensitivity(run, guarded, choices, cost, base, sensitivity_points, emit,
                                           mode=sensitivity_mode, seed=seed)
                if not resuming or not study.get_trials(deepcopy=False):
                    enqueue_warm_start(study, choices, cost, sens)
            penalty = penalty_fn(sens)
            _run_trials(study, run, guarded, choices, space, cost, penalty, trials, emit, t_start,
                        local_every if warm_start else 0, journal=journal,
                        reseed=lambda st, i: _reseed(st, sampler, seed, i, len(choices)))
            finetune_stage(study, run, guarded, finetune, steps, seed, model_spec, emit, t_start, space.training)
            result = build_front(run, study, cost, budget, base, layers=set(choices))
            materialize_front(result, run, guarded, model_spec)
        finally:
            executor.close()
        if measure_latency:
            measure_front(result, original, example, task)
        result.files = result.write()
    except Exception as exc:
        full = disk_full_error(exc, run.path / "study.db" if _mentions_database(exc) else run.path)
        if full is not None and full is not exc:
            raise full from None
        raise
    finally:
        lock.release()
        if not committed:
            _leave_as_found(run, lock)
    emit({"phase": "done", "elapsed_s": time.perf_counter() - t_start, "front_size": len(result.front)})
    result.model = original
    return result


def _mentions_database(exc: BaseException) -> bool:
    """Whether the study's storage (SQLite: "database or disk is full") raised ``exc`` or what caused it."""
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if "database" in str(e).lower() or type(e).__module__.startswith(("sqlite3", "sqlalchemy")):
            return True
        e = e.__cause__ or e.__context__
    return False


def _given_sensitivity(sensitivity: Union[Sensitivity, str, Path, None]) -> Optional[Sensitivity]:
    """The ``sensitivity=`` argument as a table, checked before the search starts."""
    if sensitivity is None or isinstance(sensitivity, Sensitivity):
        return sensitivity
    path = Path(sensitivity)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SearchError(f"sensitivity table {path}: cannot be read ({type(exc).__name__}: {exc})") from None
    return _sensitivity_from(data, path, SearchError)


def _sensitivity_from(data: Any, source: Path, error: type[AutorankError]) -> Sensitivity:
    """A sensitivity table from its JSON (``{"base": x, "scores": {layer: {method: [[rho, score], ...]}}}``), checked."""
    def num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    ok = isinstance(data, dict) and num(data.get("base")) and isinstance(data.get("scores"), dict) and all(
        isinstance(ms, dict) and all(isinstance(pts, list) and all(isinstance(pt, list) and len(pt) == 2 and all(map(num, pt))
                                                                    for pt in pts) for pts in ms.values())
        for ms in data["scores"].values())
    if not ok:
        raise error(f"{source}: not a sensitivity table ({{\"base\": score, \"scores\": {{layer: {{method: [[rho, score], ...]}}}}}})")
    return Sensitivity.from_dict(data)


def _leave_as_found(run: RunDir, lock) -> None:
    """After a refused start: remove the run directory if this search created it and it is empty again."""
    if lock.created_dir:
        try:
            run.path.rmdir()
        except OSError:
            pass


class _StopOnFullDisk(BaseExecutor):
    """The executor as the search's phases see it: a job that failed on a full disk stops the search.

    A worker that cannot write (fine-tuned weights, a saved front member) reports
    ``DiskFullError``; recording that as a failed job would lose the work for good, so
    the search stops instead with that one line, and the same command resumes it.
    """

    def __init__(self, inner: BaseExecutor):
        self.inner = inner
        self.name = getattr(inner, "name", "executor")
        self.concurrency = inner.concurrency

    def start(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - started before wrapping
        self.inner.start(*args, **kwargs)

    def submit(self, ticket: Any, kind: str, payload: dict) -> None:
        self.inner.submit(ticket, kind, payload)

    def wait(self) -> list[tuple[Any, dict]]:
        done = self.inner.wait()
        for _, res in done:
            if isinstance(res, dict) and res.get("error_type") == "DiskFullError":
                raise DiskFullError.from_message(str(res.get("error", "")))
        return done

    def has_results(self) -> bool:
        return self.inner.has_results()

    def running(self) -> int:
        return self.inner.running()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # anything else an executor offers
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _reseed(study: optuna.Study, name: str, seed: int, index: int, n_layers: int) -> None:
    """Seed the study's sampler for the ``index``-th ask from the run's seed and the ask's position.

    A sampler's random state lives in memory; reseeding it per ask from (seed, index)
    makes the plan asked at position ``index`` depend only on the study's history, so a
    resumed run asks for what an uninterrupted one would have (in one process: with
    several workers the order results come back in is not reproducible anyway).
    :class:`~autorank.search.params.StaticTPESampler` keeps its fits and reseeds its
    generators; other samplers are rebuilt with the derived seed.
    """
    derived = int(np.random.SeedSequence((int(seed) % 2**32, int(index))).generate_state(1)[0])
    if isinstance(study.sampler, StaticTPESampler):
        study.sampler.reseed(derived)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.sampler = make_sampler(name, derived, n_layers)


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
    """Trials that count toward the total: finished (a repeated plan included), not interrupted."""
    S = optuna.trial.TrialState
    return [t for t in study.get_trials(deepcopy=False, states=(S.COMPLETE, S.FAIL)) if not t.user_attrs.get("interrupted")]


def _saved_base(run: RunDir, saved: Any) -> dict:
    """The original's score recorded in baseline.json (checked: a number)."""
    score = saved.get("score") if isinstance(saved, dict) else None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not np.isfinite(score):
        raise RunDirError(f"{run.path / 'baseline.json'}: 'score' must be a finite number, got {score!r}; remove it to score again")
    return saved


def _score_original(executor: BaseExecutor) -> dict:
    """Score the original model once (no plan); AutorankError when the task cannot."""
    res = run_one(executor, "zero_shot", {"plan": {"layers": {}}})
    if "error" in res:
        raise AutorankError(f"the task cannot score the original model: {res['error']}")
    return res


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
                t_start: float, local_every: int = 3, *, journal: Optional[RunJournal] = None,
                reseed: Optional[Callable[[optuna.Study, int], None]] = None) -> None:
    """Ask, repair, run, tell until ``total`` trials have finished.

    Every idle worker gets a plan in one batch of asks (the constant liar keeps
    them apart); the batch reaches the study's journal in one write, before the
    trial records are written and the jobs submitted. Results are recorded, then
    told, one journal write per batch of results. Every ``local_every`` sampler
    trials, a local move around the best plan so far
    (:func:`~autorank.search.allocate.local_moves`) is made: the sampler explores,
    the local moves exploit what the sensitivity table says about the best plan.

    A repaired plan that was already scored is not run again: the trial records
    ``duplicate_of`` and the study is told the earlier result (a plan still running
    waits for it; one that failed runs again). ``reseed(study, i)`` seeds the sampler
    for the ``i``-th ask (see :func:`_reseed`). Everything this loop keeps in memory
    (plans tried, scores, the front, trials since the last local move) is rebuilt from
    the records on resume, so a resumed run continues as the uninterrupted one would.
    The driver's own time per trial (ask, repair, records, tell) goes to ``driver.json``.
    """
    S = optuna.trial.TrialState
    batch = journal.batch if journal is not None else contextlib.nullcontext
    done_before = _finished(study)
    finished = len(done_before)
    failed = sum(1 for t in done_before if t.state == S.FAIL)
    inflight: dict[int, tuple[optuna.Trial, dict, tuple]] = {}
    deferred: dict[int, list[tuple[optuna.Trial, dict]]] = {}  # running plan's trial -> trials repeating it
    t0 = time.perf_counter()
    started_with = finished
    conc = max(1, executor.concurrency)
    # plans tried so far and the scores of finished ones: for local moves around the best and for duplicates
    tried: set = set()
    scored: list[tuple[float, float, ChoicePlan]] = []
    scored_plans: dict[tuple, dict] = {}
    running_plans: dict[tuple, int] = {}
    front = _Front()
    since_local = 0
    for number, r in sorted(run.trial_records(set(choices)).items()):
        cp_r = {n: (c[0], float(c[1])) for n, c in (r.get("choice") or {}).items()}
        key = _key(cp_r)
        tried.add(key)
        if r.get("state") == "INTERRUPTED":
            continue  # its plan was queued again and counts when it is asked
        since_local = since_local + 1 if r.get("origin", "sampler") == "sampler" else 0
        if r.get("state") == "COMPLETE":
            scored_plans.setdefault(key, {**r, "number": number})
            if r.get("feasible", True) and r.get("duplicate_of") is None:
                scored.append((r["score"], -cost.objective(r["costs"]), cp_r))
                front.add(r["score"], cost.objective(r["costs"]))
    best = max(scored, key=lambda t: (t[0], t[1])) if scored else None
    asked_n = sum(1 for t in study.get_trials(deepcopy=False) if t.state != S.WAITING and not t.user_attrs.get("interrupted"))
    dists = distributions(choices, space)
    static = isinstance(study.sampler, StaticTPESampler)
    waiting = len(study.get_trials(deepcopy=False, states=(S.WAITING,)))  # queued plans: only this driver queues them
    local: Optional[tuple[tuple, Iterator[ChoicePlan]]] = None  # (best plan's key, its neighbours not yet looked at)
    driver_s: dict[int, float] = {}

    def progress() -> None:
        done_now = finished - started_with
        rate = (time.perf_counter() - t0) / max(1, done_now)
        emit({
            "phase": "trials", "done": finished, "total": total, "running": len(inflight), "failed": failed,
            "elapsed_s": time.perf_counter() - t_start, "remaining_s": rate * (total - finished), **front.stats(),
        })

    def tell_duplicate(trial, record: dict, prior: dict) -> None:
        record.update({"state": "COMPLETE", "duplicate_of": prior["number"], "score": prior["score"], "time_total_s": 0.0})
        run.write_trial(trial.number, record)
        trial.set_user_attr("duplicate_of", prior["number"])
        _tell(study, trial, [prior["score"], cost.objective(record["costs"])])
        logger.info("trial %d repeats the plan of trial %d: not run again", trial.number, prior["number"])

    def submit(trial, record: dict, key: tuple) -> None:
        record.pop("duplicate_of", None)
        record["state"] = "RUNNING"
        run.write_trial(trial.number, record)
        executor.submit(trial.number, "zero_shot", {"plan": record["plan"]})
        inflight[trial.number] = (trial, record, key)
        running_plans[key] = trial.number

    def pending() -> int:
        return finished + len(inflight) + sum(len(v) for v in deferred.values())

    while pending() < total or inflight:
        n_ask = min(total - pending(), conc - len(inflight))
        if n_ask > 0:
            tb = time.perf_counter()
            asked = []
            with batch():
                for _ in range(n_ask):
                    move = None
                    if local_every and since_local >= local_every and best is not None and not waiting:
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
                    if reseed is not None:
                        reseed(study, asked_n)
                    trial, record, plan = _ask(study, run, choices, space, cost, penalty, tried, dists if fast else None,
                                               given=move, n_complete=finished - failed)
                    asked_n += 1
                    if not fast:
                        waiting = max(0, waiting - 1)
                    since_local = since_local + 1 if record["origin"] == "sampler" else 0
                    asked.append((trial, record, _key({n: (c[0], float(c[1])) for n, c in record["choice"].items()})))
                # the batch is in the journal before any record names its trials or any job runs; a plan
                # already scored is told at once, one still running waits for it
                for trial, record, key in asked:
                    if key in scored_plans:
                        tell_duplicate(trial, record, scored_plans[key])
                        finished += 1
                    elif key in running_plans:
                        record.update({"state": "RUNNING", "duplicate_of": running_plans[key]})
                        run.write_trial(trial.number, record)
                        deferred.setdefault(running_plans[key], []).append((trial, record))
                    else:
                        submit(trial, record, key)
            share = (time.perf_counter() - tb) / len(asked)
            for trial, _, _ in asked:
                driver_s[trial.number] = share
            progress()
        results = executor.wait()
        if results:
            tb = time.perf_counter()
            with batch():
                for number, res in results:
                    trial, record, key = inflight.pop(number)
                    running_plans.pop(key, None)
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
                        scored_plans.setdefault(key, record)
                        if record.get("feasible", True):
                            item = (res["score"], -cost.objective(record["costs"]),
                                    {n: (c[0], float(c[1])) for n, c in record["choice"].items()})
                            scored.append(item)
                            front.add(item[0], -item[1])
                            if best is None or (item[0], item[1]) > (best[0], best[1]):
                                best = item
                        _tell(study, trial, [res["score"], cost.objective(record["costs"])])
                    finished += 1
                    for dup, dup_record in deferred.pop(number, []):
                        if record["state"] == "COMPLETE":
                            tell_duplicate(dup, dup_record, record)
                            finished += 1
                        else:  # the first run of this plan failed (perhaps its worker did): run it again
                            submit(dup, dup_record, key)
            share = (time.perf_counter() - tb) / len(results)
            for number, _ in results:
                driver_s[number] = driver_s.get(number, 0.0) + share
            progress()
        elif inflight and not executor.has_results():
            time.sleep(0.002)
    if driver_s:
        old = run.read_json("driver.json") or {}
        per = {**old.get("driver_s", {}), **{str(k): v for k, v in driver_s.items()}}
        run.write_json("driver.json", {"driver_s": per, "what": "driver time per trial: ask, repair, records, tell (seconds)"})
