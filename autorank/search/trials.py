"""The trial loop of a search: ask a batch of plans, repair them to the budget, run them, tell the study.

:func:`run_trials` drives an executor until the run has its trials, keeping the
study's journal, the per-trial records and the zero-shot front in step;
:func:`recover_interrupted` settles trials a killed driver left RUNNING;
:func:`reseed` makes every ask depend only on the run's seed and its position.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from datetime import datetime
from typing import Any, Callable, Iterator, Optional

import numpy as np
import optuna

from autorank.cost.cost_model import ChoicePlan, CostModel
from autorank.search.allocate import describe_plan, local_moves, repair, to_plan
from autorank.search.journal import RunJournal
from autorank.search.params import StaticTPESampler, choice_to_params, distributions, make_sampler, params_choice, suggest
from autorank.search.rundir import RunDir

logger = logging.getLogger("autorank")

__all__ = ["run_trials", "recover_interrupted", "finished_trials", "reseed"]

Progress = Callable[[dict[str, Any]], None]


def reseed(study: optuna.Study, name: str, seed: int, index: int, n_layers: int) -> None:
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


def recover_interrupted(study: optuna.Study, run: RunDir, cost: Optional[CostModel] = None) -> None:
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


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count toward the total: finished (a repeated plan included), not interrupted."""
    S = optuna.trial.TrialState
    return [t for t in study.get_trials(deepcopy=False, states=(S.COMPLETE, S.FAIL)) if not t.user_attrs.get("interrupted")]


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


def run_trials(study, run: RunDir, executor, choices, space, cost: CostModel, penalty, total: int, emit: Progress,
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
    done_before = finished_trials(study)
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
