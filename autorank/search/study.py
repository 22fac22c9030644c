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

import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

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
from autorank.report import pareto_indices
from autorank.search.allocate import Sensitivity, cheapest_plan, describe_plan, local_moves, penalty_fn, repair, to_plan
from autorank.search.executor_base import BaseExecutor, InProcessExecutor, run_one
from autorank.search.finetune_stage import finetune_stage, materialize_front
from autorank.search.identity import model_identity, task_identity
from autorank.search.latency import latency_table_for, measure_front
from autorank.search.params import DEFAULT_SAMPLER, SAMPLERS, choice_to_params, make_sampler, suggest
from autorank.search.result import build_front
from autorank.search.rundir import RunDir, RunDirError
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
            study = optuna.create_study(
                storage=run.storage_url, study_name=STUDY_NAME, load_if_exists=True,
                directions=["maximize", "minimize"], sampler=make_sampler(sampler, seed, len(choices)),
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(["score", f"{cost.objective_metric}_ratio"])
            _recover_interrupted(study, run, cost)
            sens = None
            if warm_start:
                if sensitivity is not None and run.read_json("sensitivity.json") is None:
                    run.write_json("sensitivity.json", sensitivity.to_dict())
                sens = measure_sensitivity(run, guarded, choices, cost, base, sensitivity_points, emit)
                if not resuming or not study.trials:
                    enqueue_warm_start(study, choices, cost, sens)
            penalty = penalty_fn(sens)
            _run_trials(study, run, guarded, choices, space, cost, penalty, trials, emit, t_start,
                        local_every if warm_start else 0,
                        reseed=lambda i: _seeded_sampler(sampler, seed, i, len(choices)))
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


def _seeded_sampler(name: str, seed: int, index: int, n_layers: int) -> optuna.samplers.BaseSampler:
    """The sampler for the ``index``-th ask: seeded from the run's seed and the ask's position.

    A sampler's random state lives in memory; reseeding it per ask from (seed, index)
    makes the plan asked at position ``index`` depend only on the study's history, so a
    resumed run asks for what an uninterrupted one would have.
    """
    derived = int(np.random.SeedSequence((int(seed) % 2**32, int(index))).generate_state(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return make_sampler(name, derived, n_layers)


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


def _waiting(study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def _run_trials(study, run: RunDir, executor, choices, space, cost: CostModel, penalty, total: int, emit: Progress,
                t_start: float, local_every: int = 3, *,
                reseed: Optional[Callable[[int], optuna.samplers.BaseSampler]] = None) -> None:
    """Ask, repair, run, tell until ``total`` trials have finished.

    Every ``local_every`` sampler trials, a local move around the best plan so far
    (:func:`~autorank.search.allocate.local_moves`) is queued: the sampler explores,
    the local moves exploit what the sensitivity table says about the best plan.

    A repaired plan that was already scored is not run again: the trial records
    ``duplicate_of`` and the study is told the earlier result (a plan still running
    waits for it; one that failed runs again). ``reseed(i)``: the sampler for the
    ``i``-th ask (see :func:`_seeded_sampler`). Everything this loop keeps in memory
    (plans tried, scores, trials since the last local move) is rebuilt from the
    records on resume, so a resumed run continues as the uninterrupted one would.
    """
    S = optuna.trial.TrialState
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
    asked = sum(1 for t in study.get_trials(deepcopy=False) if t.state != S.WAITING and not t.user_attrs.get("interrupted"))

    def progress() -> None:
        done_now = finished - started_with
        rate = (time.perf_counter() - t0) / max(1, done_now)
        emit({
            "phase": "trials", "done": finished, "total": total, "running": len(inflight), "failed": failed,
            "elapsed_s": time.perf_counter() - t_start, "remaining_s": rate * (total - finished),
            **_front_stats(scored),
        })

    def tell_duplicate(trial, record: dict, prior: dict) -> None:
        record.update({"state": "COMPLETE", "duplicate_of": prior["number"], "score": prior["score"], "time_total_s": 0.0})
        run.write_trial(trial.number, record)
        trial.set_user_attr("duplicate_of", prior["number"])
        study.tell(trial, [prior["score"], cost.objective(record["costs"])])
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
        while pending() < total and len(inflight) < conc:
            if local_every and since_local >= local_every and scored and not _waiting(study):
                best = max(scored, key=lambda t: (t[0], t[1]))[2]
                for move in local_moves(best, choices, cost, penalty):
                    if _key(move) not in tried:
                        study.enqueue_trial(choice_to_params(move), user_attrs={"origin": "local"})
                        break
            if reseed is not None:
                study.sampler = reseed(asked)
            trial = study.ask()
            asked += 1
            cp = suggest(trial, choices, space)
            fixed, fits = repair(cp, choices, cost, penalty)
            costs = cost.costs(fixed)
            plan = to_plan(fixed, cost)
            key = _key(fixed)
            tried.add(key)
            origin = trial.user_attrs.get("origin", "sampler")
            since_local = since_local + 1 if origin == "sampler" else 0
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
            }
            trial.set_user_attr("plan", plan.to_dict()["layers"])
            trial.set_user_attr("repaired", record["repaired"])
            trial.set_user_attr("summary", record["summary"])
            for m, v in cost.ratios(costs).items():
                trial.set_user_attr(f"{m}_ratio", v)
            trial.set_constraint("budget", cost.violation(costs))
            if key in scored_plans:  # already scored: not run again
                tell_duplicate(trial, record, scored_plans[key])
                finished += 1
                progress()
            elif key in running_plans:  # running now: wait for its result
                record.update({"state": "RUNNING", "duplicate_of": running_plans[key]})
                run.write_trial(trial.number, record)
                deferred.setdefault(running_plans[key], []).append((trial, record))
            else:
                submit(trial, record, key)
        for number, res in executor.wait():
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
                    scored.append((res["score"], -cost.objective(record["costs"]),
                                   {n: (c[0], float(c[1])) for n, c in record["choice"].items()}))
                study.tell(trial, [res["score"], cost.objective(record["costs"])])
            finished += 1
            progress()
            for dup, dup_record in deferred.pop(number, []):
                if record["state"] == "COMPLETE":
                    tell_duplicate(dup, dup_record, record)
                    finished += 1
                    progress()
                else:  # the first run of this plan failed (perhaps its worker did): run it again
                    submit(dup, dup_record, key)
        if inflight and not executor.has_results():
            time.sleep(0.002)


def _front_stats(scored: list) -> dict[str, Any]:
    """Size of the zero-shot front and best score within budget, from the run's own (score, -cost) list
    (``study.best_trials`` deep-copies every trial: 0.3–0.6 s per call at a hundred trials)."""
    if not scored:
        return {"front_size": 0, "best_score": None}
    idx = pareto_indices([-c for _, c, _ in scored], [s for s, _, _ in scored])
    return {"front_size": len(idx), "best_score": max(s for s, _, _ in scored)}
