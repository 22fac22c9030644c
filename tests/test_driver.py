"""The driver for many workers: the study's journal, batched asks, the static-space TPE, repair and fill by heap."""

from __future__ import annotations

import dataclasses
import importlib
import json
import random

import numpy as np
import optuna
import pytest
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from autorank.cost import parse_budget, profile_model
from autorank.cost.cost_model import CostModel
from autorank.search import search
from autorank.search.executor_base import BaseExecutor
from autorank.search.journal import RunJournal, journal_storage
from autorank.search.params import StaticTPESampler, _Table
from autorank.search.rundir import RunDir
from autorank.search.space import SearchSpace
from tests.search_toys import toy_cnn, toy_task

allocate = importlib.import_module("autorank.search.allocate")
FAST = dict(sensitivity_points=2, measure_latency=False)


# ---------------------------------------------------------------------- the journal
def test_journal_is_optunas_file_format_and_batches_its_writes(tmp_path):
    path = tmp_path / "study.journal"
    storage, backend = journal_storage(path)
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize", "minimize"])
    writes = backend.writes
    size = path.stat().st_size
    with backend.batch():
        for i in range(5):
            t = study.ask()
            t.suggest_float("x", 0, 1)
            t.suggest_categorical("m", ["a", "b"])
            study.tell(t, [float(i), 1.0 - i / 10])
        assert path.stat().st_size == size  # nothing written inside the batch
    assert backend.writes == writes + 1  # one write for the whole batch
    # read back as optuna-dashboard reads it: Optuna's own file backend
    again = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))
    assert [t.params for t in again.trials] == [t.params for t in study.trials]
    assert [t.values for t in again.trials] == [t.values for t in study.trials]


def test_a_torn_last_write_is_cut_off_and_the_study_goes_on(tmp_path):
    path = tmp_path / "study.journal"
    storage, _ = journal_storage(path)
    study = optuna.create_study(storage=storage, study_name="s")
    t = study.ask()
    t.suggest_float("x", 0, 1)
    study.tell(t, 0.5)
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"op_code": 4, "worker_id": "x", "trial_')  # killed in mid-write
    storage2, backend2 = journal_storage(path)
    assert path.read_bytes() == good and len(backend2) == good.count(b"\n")
    study2 = optuna.load_study(study_name="s", storage=storage2)
    t2 = study2.ask()
    t2.suggest_float("x", 0, 1)
    study2.tell(t2, 0.25)
    again = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))
    assert [tr.value for tr in again.trials] == [0.5, 0.25]


# ---------------------------------------------------------------------- the sampler
def _study_with_history(n: int, seed: int = 0):
    dists = {f"m{i}": optuna.distributions.CategoricalDistribution(["none", "svd", "tucker2"]) for i in range(6)}
    dists.update({f"r{i}": optuna.distributions.FloatDistribution(0.1, 0.9, step=0.1) for i in range(6)})
    rnd = random.Random(seed)
    sampler = StaticTPESampler(dists, seed=seed, multivariate=True, n_startup_trials=5, constant_liar=True)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for _ in range(n):
        params = {k: (rnd.choice(d.choices) if hasattr(d, "choices") else round(rnd.randint(1, 9) / 10, 1)) for k, d in dists.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, values=[rnd.random(), rnd.random()],
                                                  system_attrs={"constraints:budget": rnd.uniform(-1, 0.2)}))
    return study, sampler, dists


def test_tabulated_densities_equal_optunas_parzen_estimators():
    study, sampler, dists = _study_with_history(60)
    trials = study.get_trials(deepcopy=False)
    mpe = sampler._build_parzen_estimator(study, sampler._static, trials[:40], handle_below=False)
    table = _Table(mpe)
    samples = mpe.sample(np.random.RandomState(0), 200)
    assert np.allclose(table.log_pdf(samples), mpe.log_pdf(samples), atol=1e-9)
    # draws from the table follow the same mixture: empirical log-likelihood matches its expectation
    draws = table.sample(np.random.RandomState(1), 4000)
    assert abs(float(np.mean(mpe.log_pdf(draws))) - float(np.mean(mpe.log_pdf(mpe.sample(np.random.RandomState(2), 4000))))) < 0.1
    for k, d in dists.items():  # every draw is a valid value of its parameter
        assert all(d._contains(d.to_internal_repr(v if not hasattr(d, "choices") else d.choices[int(v)])) for v in draws[k][:50])


def test_static_tpe_reuses_its_fit_between_refits_and_samples_valid_plans():
    study, sampler, dists = _study_with_history(200)
    params = sampler.sample_params(study)
    assert set(params) == set(dists) and all(dists[k]._contains(dists[k].to_internal_repr(v)) for k, v in params.items())
    fit = sampler._fit
    point = sampler._refit_points(200)
    assert fit.n_finished == point <= 200
    sampler.sample_params(study)
    assert sampler._fit is fit  # no new result: the same fit, new candidates
    nxt = next(n for n in range(201, 400) if sampler._refit_points(n) > point)
    assert 1 <= nxt - point <= max(1, int(0.02 * nxt))  # refits when the finished trials grew by 2% (at least one)
    for _ in range(200, nxt - 1):
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, values=[0.5, 0.5]))
    sampler.sample_params(study)
    assert sampler._fit is fit  # still short of the next point of the schedule
    study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, values=[0.5, 0.5]))
    sampler.sample_params(study)
    assert sampler._fit is not fit and sampler._fit.n_finished == nxt


def test_static_tpe_resumed_between_refits_samples_what_the_uninterrupted_one_does():
    study, sampler, dists = _study_with_history(200)
    nxt = next(n for n in range(201, 400) if sampler._refit_points(n) > sampler._refit_points(200))
    for i in range(200, nxt + 1):  # past the next refit point, then between two points
        sampler.reseed(i)
        p = sampler.sample_params(study)
        study.add_trial(optuna.trial.create_trial(params=p, distributions=dists, values=[0.3 + i % 7 / 10, 0.5]))
    fresh = StaticTPESampler(dists, seed=0, multivariate=True, n_startup_trials=5, constant_liar=True)  # a resumed driver
    for s_ in (sampler, fresh):
        s_.reseed(12345)
    assert fresh.sample_params(study) == sampler.sample_params(study)
    assert fresh._fit.n_finished == sampler._fit.n_finished == nxt


# ---------------------------------------------------------------------- repair and fill by heap
def _break_even(choices: dict) -> dict:
    """Choices whose upper ρ are refused, as the latency break-even refuses them (slower than the dense layer)."""
    out = {}
    for i, (n, ch) in enumerate(choices.items()):
        top = ch.rhos[len(ch.rhos) // 2 + i % 3:]
        refused = tuple((m, r, "not faster than the dense layer") for m in ch.methods if m != "none" for r in top)
        out[n] = dataclasses.replace(ch, refused=ch.refused + refused)
    return out


@pytest.mark.parametrize("pct,refuse", [("20%flops", False), ("45%flops", False), ("30%params", False),
                                        ("20%flops", True), ("45%flops", True)])
def test_repair_and_fill_by_heap_make_the_same_moves_as_the_scan(pct, refuse):
    model = toy_cnn()
    prof = profile_model(model, torch.randn(1, 3, 8, 8))
    choices = SearchSpace.load("default").choices(prof)
    if refuse:  # the heap once proposed refused ρ (a dense layer's only move, to the top of the grid): repairs failed
        choices = _break_even(choices)
    cost = CostModel(prof, parse_budget(pct))
    rnd = random.Random(1)
    sens = allocate.Sensitivity(1.0, {n: {m: [(r, 1 - rnd.random() * 0.05 * (1 - r)) for r in (0.1, 0.5, 0.9)]
                                          for m in ch.methods if m != "none"} for n, ch in choices.items()})
    options = {n: allocate._options(ch) for n, ch in choices.items()}
    for _ in range(25):
        cp = {}
        for n, ch in choices.items():  # a sampled plan, snapped to the layer's allowed grid as params.suggest does
            m = rnd.choice(ch.methods)
            cp[n] = (m, rnd.choice(ch.rhos_for(m)) if m != "none" else rnd.choice(ch.rhos))
        fast = allocate.repair(cp, choices, cost, sens.drop)
        fast_fill = allocate.fill(fast[0], options, cost, sens.drop)
        one = dict(cost.limits)
        metric = next(iter(one))
        other = "params" if metric == "flops" else "flops"
        cost.limits = {**one, other: 1e30}  # a second, never binding limit: the scan
        try:
            slow = allocate.repair(cp, choices, cost, sens.drop)
            slow_fill = allocate.fill(slow[0], options, cost, sens.drop)
        finally:
            cost.limits = one
        assert fast == slow
        assert fast_fill == slow_fill
        assert all(choices[n].allows(*c) for n, c in fast[0].items())  # never a refused (method, ρ)


# ---------------------------------------------------------------------- the driver
class InstantWorkers(BaseExecutor):
    """``concurrency`` simulated workers that return at once, scoring a plan by its kept ranks."""

    name = "instant"

    def __init__(self, n: int):
        self.concurrency = n
        self.done: list = []
        self.batches: list[int] = []
        self._pending_batch = 0

    def start(self, model, task, **kw):
        pass

    def submit(self, ticket, kind, payload):
        self._pending_batch += 1
        if kind != "zero_shot":
            self.done.append((ticket, {"error": "simulated workers score plans only"}))
            return
        layers = payload["plan"]["layers"]
        score = 1.0 - 0.01 * sum(1.0 / (1 + (lp["rank"] if isinstance(lp["rank"], int) else sum(lp["rank"]))) for lp in layers.values())
        self.done.append((ticket, {"score": score}))

    def wait(self):
        if self._pending_batch:
            self.batches.append(self._pending_batch)
            self._pending_batch = 0
        out, self.done = self.done, []
        return out

    def has_results(self):
        return bool(self.done)

    def running(self):
        return len(self.done)

    def close(self):
        pass


def test_many_workers_get_their_plans_in_batches_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    ex = InstantWorkers(16)
    res = search(toy_cnn(), toy_task(), budget="30%flops", trials=60, finetune=0, out=out, executor=ex, **FAST)
    assert len(res.trials) == 60 and all(r["state"] == "COMPLETE" for r in res.trials)
    assert max(ex.batches) == 16  # every idle worker got a plan in the same batch
    run = RunDir(out)
    study = run.load_study()  # the journal, read as optuna-dashboard reads it
    by_number = {t.number: t for t in study.trials}
    for r in res.trials:  # records and study agree, trial by trial
        t = by_number[r["number"]]
        assert t.state == optuna.trial.TrialState.COMPLETE and t.values[0] == r["score"]
        assert t.user_attrs["plan"] == r["plan"]["layers"]
        assert any(k.startswith("constraints") for k in t.system_attrs)
    assert run.dashboard_command() == f"optuna-dashboard {out / 'study.journal'}"
    driver = json.loads((out / "driver.json").read_text())["driver_s"]
    assert len(driver) == 60 and all(v > 0 for v in driver.values())
    # resume: more trials, the finished ones kept as they were
    again = search(toy_cnn(), toy_task(), budget="30%flops", trials=75, finetune=0, out=out, executor=InstantWorkers(16), **FAST)
    assert len(again.trials) == 75
    old = {r["number"]: r["choice"] for r in res.trials}
    assert all(again.trials[i]["choice"] == old[again.trials[i]["number"]] for i in range(75) if again.trials[i]["number"] in old)


def test_a_run_directory_with_a_sqlite_study_resumes_on_it(tmp_path):
    out = tmp_path / "old"
    search(toy_cnn(), toy_task(), budget="30%flops", trials=6, finetune=0, out=out, **FAST)
    # make it look like a run of an earlier autorank: the study in study.db, no journal
    journal = out / "study.journal"
    optuna.copy_study(from_study_name="autorank", from_storage=JournalStorage(JournalFileBackend(str(journal))),
                      to_storage=f"sqlite:///{out / 'study.db'}")
    journal.unlink()
    res = search(toy_cnn(), toy_task(), budget="30%flops", trials=9, finetune=0, out=out, **FAST)
    assert len(res.trials) == 9 and not journal.exists()
    st_ = RunDir(out).load_study()
    assert len([t for t in st_.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 9
    assert RunDir(out).dashboard_command().startswith("optuna-dashboard sqlite:///")


def test_run_journal_reopened_reads_what_was_written(tmp_path):
    path = tmp_path / "j"
    b = RunJournal(path)
    b.append_logs([{"op_code": 0, "a": 1}])
    with b.batch():
        b.append_logs([{"op_code": 1, "b": [1, 2]}])
        b.append_logs([{"op_code": 2}])
    assert list(RunJournal(path).read_logs(0)) == [{"op_code": 0, "a": 1}, {"op_code": 1, "b": [1, 2]}, {"op_code": 2}]
    assert list(RunJournal(path).read_logs(2)) == [{"op_code": 2}]
