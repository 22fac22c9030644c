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

import dataclasses
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
from autorank.cost.cost_model import CostModel
from autorank.cost.profile import profile_model
from autorank.errors import AutorankError, NotApplicableError, SearchError
from autorank.fileio import DiskFullError, disk_full_error
from autorank.hf import is_hf_spec
from autorank.search.allocate import Sensitivity, cheapest_plan, penalty_fn
from autorank.search.executor_base import BaseExecutor, InProcessExecutor, run_one
from autorank.search.finetune_stage import finetune_stage, materialize_front
from autorank.search.identity import model_identity, task_identity
from autorank.search.latency import (
    ALIGN_MODES,
    LatencyTarget,
    latency_table_for,
    measure_front,
    measured_front,
    write_latency_files,
)
from autorank.search.params import (
    DEFAULT_SAMPLER,
    SAMPLERS,
    distributions,
    make_sampler,
)
from autorank.search.result import build_front
from autorank.search.rundir import RunDir, RunDirError
from autorank.search.sensitivity import SENSITIVITY_MODES
from autorank.search.space import SearchSpace
from autorank.search.trials import recover_interrupted, reseed, run_trials
from autorank.search.warm_start import enqueue_warm_start, measure_sensitivity
from autorank.tasks import load_task
from autorank.training.recovery import parse_duration
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
    finetune_time: Union[str, float, None] = None,
    training: Optional[dict] = None,
    warm_start: bool = True,
    sensitivity_points: int = 4,
    cache_dir: Union[str, Path, None] = None,
    executor: Optional[BaseExecutor] = None,
    progress: Optional[Progress] = None,
    measure_latency: bool = True,
    sensitivity: Union[Sensitivity, str, Path, None] = None,
    local_every: int = 3,
    sensitivity_mode: str = "auto",
    device: Optional[str] = None,
    batch_size: Optional[int] = None,
    threads: Optional[int] = None,
    align: Union[str, int, None] = "auto",
    latency_target: Optional[LatencyTarget] = None,
    memory_format: Optional[str] = None,
    latency_rounds: Optional[int] = None,
):
    """Search per-layer methods and ranks for ``model`` under ``budget``; returns a :class:`SearchResult`.

    ``model``: an ``nn.Module`` or a model spec (``demo``, ``pkg.mod:callable``,
    ``file.py:callable``). ``task``: a Task, a task spec, or None for the built-in
    task of a built-in model. ``budget``: ``"30%flops"`` etc. ``space``: a built-in
    space name, a YAML path, a dict or a SearchSpace (default: ``default``, or ``llm``
    for a ``hf:`` model). ``trials``: zero-shot trials
    in total (warm-start plans included); a run directory that already holds some
    continues up to this number. ``finetune``: how many promising plans to
    recover (re-fit, block-wise reconstruction, fine-tune with distillation and
    early stopping: :mod:`autorank.training.recovery`), in order of promise, each
    within ``finetune_steps`` optimizer steps (default: the space's
    ``training.finetune_steps``, else the task's ``default_finetune_steps`` or 100;
    unbounded when only a time is given) and ``finetune_time`` of wall time
    (``"90s"``, ``"5m"``, seconds; default the space's ``training.finetune_time``).
    ``training``: options laid over the space's ``training:`` block (the recovery
    and training-time options, e.g. ``{"refit": False}``). ``out``: the run directory (default: a new
    temporary directory). ``executor``: where trials run (default: in this
    process; see :mod:`autorank.search.executor` for Ray). ``sensitivity``: a
    per-layer sensitivity table to reuse (a :class:`Sensitivity` or the
    ``sensitivity.json`` of an earlier run of the same model and task) instead of
    measuring it. ``local_every``: after this many sampler trials, one local move
    around the best plan so far (0: none; only with ``warm_start``).
    ``sensitivity_mode``: ``estimate`` (layer output errors from one pass
    over the calibration batches, calibrated by a few evaluations; see
    :mod:`autorank.search.sensitivity`), ``full`` (every probe evaluated) or
    ``auto`` (default: ``full`` where its evaluations would take at most
    ``sensitivity.AUTO_FULL_SECONDS``, judged by the original's evaluation time, else ``estimate``).
    ``device``, ``batch_size``, ``threads``: the target latency is measured on
    (a latency budget's table, the front's re-measurement); default the task's
    device, batch 1 and the target machine's default threads. With a Ray
    executor both measurements run as Ray tasks on a node with that device and
    the executor's ``resources``. ``align``: ``auto`` (ranks snapped to the
    device's latency steps under a latency budget, unless the space fixes a
    multiple), ``device`` (the same under any budget: measures the table),
    ``none``, or a multiple such as 8 (overrides the space's). ``memory_format``:
    ``channels_last`` measures every latency with the models' 4-D weights and
    inputs in NHWC, the layout a CNN deployed on a CPU is fastest in (default
    ``contiguous``, PyTorch's NCHW); deploy the chosen member the same way
    (``model.to(memory_format=torch.channels_last)``). ``latency_rounds``:
    interleaved rounds of the latency calibration and of the front's
    re-measurement (default 5; more make both steadier on a noisy machine, for
    proportionally more time). ``latency_target``: all of these settings at once,
    and more (:class:`~autorank.search.latency.LatencyTarget`: the statistic,
    the clock), instead of the five arguments.
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
    space, align = _apply_align(space, align)

    model_spec = model if isinstance(model, str) else None
    if isinstance(model, str):
        model = load_model(model)
        model_spec = model.__dict__.get(SPEC_ATTR) or model_spec  # normalised (absolute paths): what workers and saved files rebuild from
    if not isinstance(model, nn.Module):
        raise SearchError(f"model must be an nn.Module or a model spec string, got {type(model).__name__}")
    task_spec = task if isinstance(task, str) else None
    task = load_task(task, model_spec or model.__dict__.get(SPEC_ATTR))
    try:
        space = space.with_training(training)
    except AutorankError as exc:
        raise SearchError(str(exc)) from None
    steps, ft_time = _finetune_budget(finetune_steps, finetune_time, space.training, task)
    if latency_target is not None and (device, batch_size, threads, memory_format, latency_rounds) != (None,) * 5:
        raise SearchError("give either latency_target or device / batch_size / threads / memory_format / latency_rounds, not both")
    target = latency_target or LatencyTarget.make(device, batch_size, threads, task, model=model,
                                                  memory_format=memory_format or "contiguous",
                                                  rounds=5 if latency_rounds is None else latency_rounds)
    needs_table = budget.needs_latency or (align == "device" and space.align is None)
    executor = executor or InProcessExecutor()
    if needs_table or measure_latency:  # a device this machine (or the cluster) lacks fails now, not after the trials
        _or_close(executor, executor.check_latency_target, target.device, target.threads)

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
        "finetune_time_s": ft_time,
        "warm_start": bool(warm_start),
        "sensitivity": sensitivity_mode,
        "latency": {**target.to_dict(), "align": align},
        "autorank_version": _version(),
    }
    run.check(settings)  # another search's directory is refused before anything is touched
    lock = run.lock().acquire()
    lock.created_dir = lock.created_dir or out is None  # a temporary directory of our own: removed if refused
    committed = False  # whether the run directory has been written to
    started = False  # whether the executor's workers were started (then the inner finally closes it)
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
        latency = ranks = None
        latency_files: dict = {}
        if needs_table:
            table, base_latency, choices, ranks, latency_files = latency_table_for(
                original, profile, choices, task, space, emit, target=target, executor=executor, run=run, budget=budget, align=align)
            latency = (table, base_latency)
            if not choices:
                raise NotApplicableError(f"{type(original).__name__}: no replacement in search space {space.source} is faster than "
                                         f"its dense layer on {table.device_name} (latency break-even)")
        cost = CostModel(profile, budget, space.align, latency, ranks=ranks.ranks if ranks is not None else None,
                         margins={"latency": ranks.margin} if ranks is not None else None)
        cheapest = cheapest_plan(choices, cost)
        if not cost.fits(cost.costs(cheapest)):
            reached = ", ".join(f"{m} {100 * v:.1f}%" for m, v in cost.ratios(cost.costs(cheapest)).items())
            reserve = ranks.margin / cost.original["latency"] if ranks is not None and "latency" in cost.limits and ranks.margin else 0
            raise BudgetError(
                f"budget {budget.text()!r} cannot be met by any plan of search space {space.source}: "
                f"the cheapest plan reaches {reached} of the original"
                + (f" (estimated; {100 * reserve:.1f}% of the original's latency is kept in reserve for what the estimate "
                   "missed on whole models; `autorank profile --latency` shows the table)" if reserve else "")
            )

        # ---- workers
        calibrate = [n for n in choices if any(registry.get(m).data_aware for m in choices[n].methods if m != "none")]
        cache_dir = str(cache_dir) if cache_dir is not None else str(run.path / "factor-cache")
        executor.start(original, task, calibrate=calibrate, cache_dir=cache_dir, setup=False,
                       model_spec=model_spec, task_spec=task_spec)
        started = True
        guarded = _StopOnFullDisk(executor)
        try:
            saved_base = run.read_json("baseline.json")
            base = _saved_base(run, saved_base) if saved_base is not None else _score_original(guarded)
            # ---- every check has passed: from here on the run directory is written
            resuming = run.prepare(settings)
            committed = True
            logger.info("%s run directory %s", "resuming" if resuming else "new", run.path)
            write_latency_files(run, latency_files)
            if saved_base is None:
                run.write_json("baseline.json", {"score": base["score"], "time_evaluate_s": base.get("time_evaluate_s")})
            eval_s = base.get("time_evaluate_s")
            eval_s = float(eval_s) if isinstance(eval_s, (int, float)) and not isinstance(eval_s, bool) and np.isfinite(eval_s) else None
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
            recover_interrupted(study, run, cost)
            sens = None
            if warm_start:
                if sensitivity is not None and run.read_json("sensitivity.json") is None:
                    run.write_json("sensitivity.json", sensitivity.to_dict())
                sens = measure_sensitivity(run, guarded, choices, cost, base, sensitivity_points, emit,
                                           mode=sensitivity_mode, seed=seed, eval_s=eval_s)
                if not resuming or not study.get_trials(deepcopy=False):
                    enqueue_warm_start(study, choices, cost, sens)
            penalty = penalty_fn(sens)
            run_trials(study, run, guarded, choices, space, cost, penalty, trials, emit, t_start,
                        local_every if warm_start else 0, journal=journal,
                        reseed=lambda st, i: reseed(st, sampler, seed, i, len(choices)))
            finetune_stage(study, run, guarded, finetune, steps, seed, model_spec, emit, t_start, space.training, ft_time)
            result = build_front(run, study, cost, budget, base, layers=set(choices))
            materialize_front(result, run, guarded, model_spec)
            executor.release_workers()  # the target is idle while the front is measured
            if measure_latency and result.front:
                def rebuild(over: set[int]):
                    res = build_front(run, study, cost, budget, base, layers=set(choices), over=over)
                    if any(not m.weights or not (run.path / m.weights).exists() for m in res.front):  # new to the front:
                        # the workers (released for the measurement) start again to save its weights
                        executor.start(original, task, calibrate=calibrate, cache_dir=cache_dir, setup=False,
                                       model_spec=model_spec, task_spec=task_spec)
                        materialize_front(res, run, _StopOnFullDisk(executor), model_spec)
                        executor.release_workers()
                    return res
                result = measured_front(result, rebuild, lambda r, skip: measure_front(
                    r, original, task, target=target, executor=executor, budget=budget,
                    table_info=run.read_json("latency.json"), skip=skip), emit)
        finally:
            executor.close()
        result.files = result.write()
    except Exception as exc:
        full = disk_full_error(exc, run.path / "study.db" if _mentions_database(exc) else run.path)
        if full is not None and full is not exc:
            raise full from None
        raise
    finally:
        if not started:
            executor.close()  # a Ray connection opened for the latency table
        lock.release()
        if not committed:
            _leave_as_found(run, lock)
    emit({"phase": "done", "elapsed_s": time.perf_counter() - t_start, "front_size": len(result.front)})
    result.model = original
    return result


def _finetune_budget(steps: Optional[int], time_s: Union[str, float, None], training: dict, task: Any
                     ) -> tuple[Optional[int], Optional[float]]:
    """(steps, seconds) per recovered plan: the arguments, else the space's ``training:`` block, else the task's steps."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise SearchError(f"finetune_steps must be an integer >= 0, got {steps!r}")
    try:
        seconds = parse_duration(time_s, "finetune_time") if time_s is not None else (
            parse_duration(training["finetune_time"], "training.finetune_time") if training.get("finetune_time") is not None else None)
    except AutorankError as exc:
        raise SearchError(str(exc)) from None
    if steps is None:
        steps = training.get("finetune_steps")
    if steps is None and seconds is None:
        steps = int(getattr(task, "default_finetune_steps", 100))
    return (None if steps is None else int(steps)), seconds


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


def _or_close(ex: BaseExecutor, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
    """``fn(...)``, closing the executor ``ex`` (a Ray connection it opened) if it raises before the trials start."""
    try:
        return fn(*args, **kwargs)
    except BaseException:
        ex.close()
        raise


def _apply_align(space: SearchSpace, align: Union[str, int, None]) -> tuple[SearchSpace, str]:
    """The space with an explicit multiple applied, and the alignment mode (auto, device, none, or fixed)."""
    if align is None or align == "none":
        return dataclasses.replace(space, align=None), "none"
    if isinstance(align, int) and not isinstance(align, bool) and align >= 1:
        return dataclasses.replace(space, align=int(align)), "fixed"
    if align not in ALIGN_MODES:
        raise SearchError(f"align must be auto, device, none or a positive integer such as 8, got {align!r}")
    return space, ("fixed" if space.align else align)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("autorank")
    except Exception:  # pragma: no cover
        return "unknown"


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
