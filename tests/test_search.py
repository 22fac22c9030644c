"""The search: space files, repair and allocations, the study, the run directory and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import autorank
from autorank.cost import count_flops, count_params, parse_budget, profile_model
from autorank.cost.budget import BudgetError
from autorank.cost.cost_model import CostModel
from autorank.errors import AutorankError, NotApplicableError
from autorank.search import RunDirError, SearchResult, SearchSpace, SpaceError, search
from autorank.search.allocate import Sensitivity, greedy_plan, lagrangian_plan, repair, to_plan
from autorank.search.rundir import RunDir
from autorank.search.space import builtin_spaces
from autorank.search.warm_start import warm_start_plans
from tests.search_toys import ToyFidelity, toy_cnn, toy_task

REPO = Path(__file__).resolve().parents[1]
FAST = dict(sensitivity_points=2, measure_latency=False)


# ---------------------------------------------------------------------- spaces
def test_builtin_spaces_load_and_are_shipped_in_the_package():
    assert {"default", "cnn", "transformer"} <= set(builtin_spaces())
    for name in ("default", "cnn", "transformer", "all"):
        sp = SearchSpace.load(name)
        assert sp.methods[0] == "none" and len(sp.methods) >= 2
        assert all(0 < r <= 1 for r in sp.rhos)
        # the copy inside the package (for non-editable installs) is identical to search_spaces/
        assert (REPO / "autorank/search/spaces" / f"{name}.yaml").read_text() == (REPO / "search_spaces" / f"{name}.yaml").read_text()


@pytest.mark.parametrize(
    "text, key",
    [
        ("methods: [svd, nosuch]\n", "methods"),
        ("methods: [none]\n", "methods"),
        ("rho: {min: 0.1, max: 0.95, step: 0.1}\n", "rho"),
        ("rho: [0.5, 1.5]\n", "rho"),
        ("align: -8\n", "align"),
        ("layers: {exclude: ['(']}\n", "layers.exclude"),
        ("layers: {types: [Embedding]}\n", "layers.types"),
        ("layers: {min_params: -1}\n", "layers.min_params"),
        ("layers: {colour: red}\n", "layers"),
        ("ranks: [1]\n", "ranks"),
        ("methods: [svd\n", "YAML"),
    ],
)
def test_a_malformed_space_names_the_file_and_the_key(tmp_path, text, key):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(SpaceError) as ei:
        SearchSpace.load(f)
    msg = str(ei.value)
    assert str(f) in msg and key in msg


def test_space_layer_rules_select_layers():
    model = toy_cnn()
    prof = profile_model(model, torch.randn(1, 3, 8, 8))
    all_layers = SearchSpace.load({"methods": ["svd", "tucker2"]}).choices(prof)
    assert set(all_layers) == {"features.0", "features.2", "features.4", "head.2", "head.4"}
    assert all_layers["head.2"].methods == ("none", "svd")  # tucker2 does not apply to Linear
    assert all_layers["features.2"].methods == ("none", "svd", "tucker2")
    only_convs = SearchSpace.load({"methods": ["svd"], "layers": {"types": ["Conv2d"], "exclude": [r"^features\.0$"]}}).choices(prof)
    assert set(only_convs) == {"features.2", "features.4"}
    big = SearchSpace.load({"methods": ["svd"], "layers": {"min_params": 5000}}).choices(prof)
    assert set(big) == {"features.4"}  # 32·32·9 + 32 = 9248; features.2 has 4640
    inc = SearchSpace.load({"methods": ["svd"], "layers": {"include": ["^head"]}}).choices(prof)
    assert set(inc) == {"head.2", "head.4"}


# ---------------------------------------------------------------------- cost, repair, allocations
@pytest.fixture(scope="module")
def toy_setup():
    model = toy_cnn()
    prof = profile_model(model, torch.randn(1, 3, 8, 8))
    space = SearchSpace.load({"methods": ["svd", "spatial-svd", "tucker2"], "rho": {"min": 0.1, "max": 0.9, "step": 0.1}})
    choices = space.choices(prof)
    return model, prof, space, choices


def test_cost_model_equals_fvcore_on_the_built_model(toy_setup):
    model, prof, space, choices = toy_setup
    cost = CostModel(prof, parse_budget("50%flops"))
    cp = {"features.2": ("tucker2", 0.3), "features.4": ("spatial-svd", 0.5), "head.2": ("svd", 0.2), "features.0": ("none", 0.9), "head.4": ("none", 0.9)}
    c = cost.costs(cp)
    built = autorank.decompose(model, to_plan(cp, cost))
    x = torch.randn(1, 3, 8, 8)
    assert c["flops"] == count_flops(built, (x,))
    assert c["params"] == count_params(built)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), pct=st.sampled_from([20, 30, 50, 70]))
def test_repair_always_fits_and_only_shrinks(toy_setup, data, pct):
    _, prof, _, choices = toy_setup
    cost = CostModel(prof, parse_budget(f"{pct}%flops"))
    cp = {n: (data.draw(st.sampled_from(ch.methods)), data.draw(st.sampled_from(ch.rhos))) for n, ch in choices.items()}
    fixed, fits = repair(cp, choices, cost, lambda n, c: 0.0 if c[0] == "none" else 1 - c[1])
    assert fits and cost.fits(cost.costs(fixed))
    for n, (m, r) in fixed.items():
        om, orr = cp[n]
        if om != "none":  # a decomposed layer stays decomposed and never gets more expensive
            assert m != "none"
            assert cost.layer_delta(n, (m, r))["flops"] <= cost.layer_delta(n, (om, orr))["flops"] + 1e-9
    if cost.fits(cost.costs(cp)):
        assert fixed == cp  # a plan within budget is left alone


def test_repair_switches_away_from_a_method_whose_smallest_rank_is_too_expensive(toy_setup):
    _, prof, _, choices = toy_setup
    cost = CostModel(prof, parse_budget("20%flops"))
    # spatial-svd at its smallest ρ everywhere it applies, dense elsewhere: over budget; ρ cannot go lower
    start = {n: (("spatial-svd", ch.rhos[0]) if "spatial-svd" in ch.methods else ("none", ch.rhos[-1])) for n, ch in choices.items()}
    fixed, fits = repair(start, choices, cost, lambda n, c: 0.0 if c[0] == "none" else 1 - c[1])
    assert fits and cost.fits(cost.costs(fixed))


def test_repair_reports_an_unreachable_budget(toy_setup):
    _, prof, _, choices = toy_setup
    cost = CostModel(prof, parse_budget("1%flops"))
    fixed, fits = repair({n: ("none", 0.9) for n in choices}, choices, cost, lambda n, c: 0.0)
    assert not fits


def test_repair_shrinks_where_it_hurts_least(toy_setup):
    _, prof, _, choices = toy_setup
    cost = CostModel(prof, parse_budget("60%flops"))
    start = {n: ("svd", 0.9) for n in choices}
    # features.2 is "sensitive": any shrink there costs a lot, elsewhere nearly nothing
    def pen(n, c):  # any change to features.2 hurts a lot
        if n == "features.2":
            return 0.0 if c == ("svd", 0.9) else 100.0
        return 0.01 * (0.9 - c[1])

    fixed, fits = repair(start, choices, cost, pen)
    assert fits and fixed["features.2"] == ("svd", 0.9)


def test_greedy_and_lagrangian_allocations_fit_and_respect_sensitivity(toy_setup):
    _, prof, _, choices = toy_setup
    cost = CostModel(prof, parse_budget("40%flops"))
    sens = Sensitivity(1.0)
    for n, ch in choices.items():
        for m in ch.methods[1:]:
            hurt = 0.5 if n == "features.4" else 0.01
            sens.scores.setdefault(n, {})[m] = [(r, 1.0 - hurt * (1 - r)) for r in (0.1, 0.5, 0.9)]
    for plan in (greedy_plan(choices, cost, sens), lagrangian_plan(choices, cost, sens)):
        assert plan is not None and cost.fits(cost.costs(plan))
    lag = lagrangian_plan(choices, cost, sens)
    drop = lambda p: sum(sens.drop(n, c) for n, c in p.items())  # noqa: E731
    from autorank.search.allocate import best_uniform

    # the allocation loses less (by the table) than every uniform plan that fits
    for m in ("svd", "spatial-svd", "tucker2"):
        hit = best_uniform(m, choices, cost)
        if hit is not None:
            assert drop(lag) <= drop(hit[1]) + 1e-9
    # and the sensitive layer gets more of its FLOPs than it would in the best uniform plan
    hit = best_uniform("svd", choices, cost)
    assert lag["features.4"][0] == "none" or lag["features.4"][1] >= hit[0]


def test_warm_start_has_a_uniform_plan_per_method_and_all_fit(toy_setup):
    _, prof, _, choices = toy_setup
    cost = CostModel(prof, parse_budget("30%flops"))
    plans = warm_start_plans(choices, cost, None)
    origins = [o for o, _ in plans]
    assert {o.split("@")[0] for o in origins} == {"uniform:svd", "uniform:spatial-svd", "uniform:tucker2"}
    assert all(cost.fits(cost.costs(p)) for _, p in plans)


# ---------------------------------------------------------------------- the study
def _search(tmp_path, name="run", **kw):
    args = dict(budget="30%flops", trials=10, finetune=1, out=tmp_path / name, **FAST)
    args.update(kw)
    return search(toy_cnn(), toy_task(), **args)


def test_search_front_meets_the_budget_on_the_built_models(tmp_path):
    res = _search(tmp_path)
    assert res.front, "empty front"
    x = torch.randn(1, 3, 8, 8)
    base = toy_cnn()
    limit = 0.30 * count_flops(base, (x,))
    costs = [m.cost_ratio for m in res.front]
    assert costs == sorted(costs)
    scores = [m.score for m in res.front]
    assert scores == sorted(scores)  # along a front, more cost buys more score
    for m in res.front:
        model = res.build(m, base)
        assert count_flops(model, (x,)) <= limit  # fvcore on the real model, not the estimate
        assert m.flops == count_flops(model, (x,))
        assert m.weights and res.weights_path(m).exists()
    assert any(m.finetuned for m in res.front) or all(r.get("finetune") is None for r in res.trials)
    # warm-start baselines ran first and their origins are recorded
    origins = [r["origin"] for r in res.trials]
    assert origins[0].startswith("uniform:") and "greedy" in origins
    # the front is never worse than the best enqueued baseline within budget
    best_baseline = max(r["score"] for r in res.trials if r["origin"] != "sampler" and r.get("state") == "COMPLETE")
    assert res.best.score >= best_baseline
    assert res.wasted_fraction == 0.0
    # the run directory holds what it promises
    run = Path(res.run_dir)
    for f in ("settings.json", "study.journal", "front.json", "sensitivity.json", "baseline.json"):
        assert (run / f).exists(), f
    assert len(list((run / "trials").glob("*.json"))) == 10
    st_ = RunDir(run).load_study()  # as optuna-dashboard reads the journal
    assert len(st_.trials) == 10 and st_.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    assert all(t.system_attrs for t in st_.trials)  # the budget constraint is set on each trial


def test_same_seed_same_plans(tmp_path):
    a = _search(tmp_path, "a", trials=12, finetune=0, warm_start=False)
    b = _search(tmp_path, "b", trials=12, finetune=0, warm_start=False)
    c = _search(tmp_path, "c", trials=12, finetune=0, warm_start=False, seed=1)
    pa = [r["choice"] for r in a.trials]
    assert pa == [r["choice"] for r in b.trials]
    assert pa != [r["choice"] for r in c.trials]


def test_resume_continues_without_redoing_and_refuses_another_search(tmp_path):
    first = _search(tmp_path, trials=6, finetune=0)
    recs = {r["number"]: r for r in first.trials}
    second = _search(tmp_path, trials=9, finetune=0)
    assert len(second.trials) == 9
    for n, r in recs.items():  # finished trials are kept as they were, not rerun
        again = next(x for x in second.trials if x["number"] == n)
        assert again["choice"] == r["choice"] and again["score"] == r["score"] and again["time_total_s"] == r["time_total_s"]
    with pytest.raises(RunDirError, match="budget"):
        _search(tmp_path, budget="50%flops", trials=9)
    other = toy_cnn()
    with torch.no_grad():
        other.head[4].weight.add_(0.01)  # same architecture, other weights: another model
    with pytest.raises(RunDirError, match="model"):
        search(other, toy_task(), budget="30%flops", trials=9, out=tmp_path / "run", **FAST)


def test_failed_and_nan_trials_are_recorded_and_the_search_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORANK_TOY_FAIL_METHOD", "tucker2")
    monkeypatch.setenv("AUTORANK_TOY_NAN_METHOD", "spatial-svd")
    res = _search(tmp_path, trials=12, finetune=1)
    states = [r["state"] for r in res.trials]
    assert len(states) == 12 and "FAIL" in states and "COMPLETE" in states
    errors = [r["error"] for r in res.trials if r["state"] == "FAIL"]
    assert any("toy failure for method tucker2" in e for e in errors)
    assert any("not finite" in e for e in errors)
    assert 0 < res.wasted_fraction < 1
    for m in res.front:
        assert m.plan.methods_used().keys() <= {"svd"}


def test_a_budget_no_plan_meets_is_refused_before_any_trial(tmp_path):
    with pytest.raises(BudgetError, match="cannot be met"):
        _search(tmp_path, budget="1%flops")
    assert not (tmp_path / "run" / "trials").exists() or not list((tmp_path / "run" / "trials").iterdir())


def test_a_model_with_nothing_to_decompose_is_refused(tmp_path):
    class NoLayers(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)

    with pytest.raises(NotApplicableError):
        search(NoLayers(), toy_task(), budget="30%flops", trials=2, out=tmp_path / "r", **FAST)


def test_result_reloads_from_the_run_directory_and_picks(tmp_path):
    res = _search(tmp_path)
    again = SearchResult.load(res.run_dir)
    assert [m.trial for m in again.front] == [m.trial for m in res.front]
    assert again.pick("smallest").cost_ratio == min(m.cost_ratio for m in res.front)
    assert again.pick("best").score == max(m.score for m in res.front)
    assert again.pick("knee").trial in {m.trial for m in res.front}
    with pytest.raises(AutorankError, match="nearest"):
        again.pick("best", min_score=2.0)
    with pytest.raises(AutorankError, match="unknown pick"):
        again.pick("fastest")


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    import torch
    torch.set_num_threads(1)
    from autorank.search import search
    from tests.search_toys import toy_cnn, toy_task
    search(toy_cnn(), toy_task(), budget="30%flops", trials={trials}, finetune=0, out={out!r},
           sensitivity_points=2, measure_latency=False, warm_start=False)
    """
)


def test_driver_killed_midway_resumes_with_no_finished_trial_lost_or_repeated(tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO), trials=12, out=str(out)))
    env = dict(os.environ, AUTORANK_TOY_SLEEP="0.15")
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120

    def records():
        recs = {}
        for p in (out / "trials").glob("*.json") if (out / "trials").exists() else []:
            try:
                recs[int(p.stem)] = json.loads(p.read_text())
            except (ValueError, json.JSONDecodeError):
                pass
        return recs

    while time.time() < deadline:
        recs = records()
        # kill while a trial is being evaluated, after 4 have finished
        if sum(r.get("state") == "COMPLETE" for r in recs.values()) >= 4 and any(r.get("state") == "RUNNING" for r in recs.values()):
            break
        if proc.poll() is not None:
            pytest.fail("search ended before it could be killed: " + proc.stdout.read().decode()[-2000:])
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = {n: r for n, r in records().items() if r.get("state") == "COMPLETE"}
    assert 4 <= len(before) < 12
    st_ = RunDir(out).load_study()
    assert any(t.state == optuna.trial.TrialState.RUNNING for t in st_.trials)  # killed mid-trial
    # run the same search again, in this process
    res = search(toy_cnn(), toy_task(), budget="30%flops", trials=12, finetune=0, out=out, warm_start=False, **FAST)
    done = [r for r in res.trials if r.get("state") in ("COMPLETE", "FAIL")]
    assert len(done) == 12
    for n, r in before.items():  # every trial finished before the kill is kept, unchanged
        assert res.trials[[x["number"] for x in res.trials].index(n)]["time_total_s"] == r["time_total_s"]
    st_ = RunDir(out).load_study()
    finished = [t for t in st_.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
                and not t.user_attrs.get("interrupted")]
    assert len(finished) == 12
    interrupted = [t for t in st_.trials if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 1
    assert res.trials[[x["number"] for x in res.trials].index(interrupted[0].number)]["state"] == "INTERRUPTED"
    # the interrupted trial's plan was run again, not lost
    assert any(t.params == interrupted[0].params and t.state == optuna.trial.TrialState.COMPLETE for t in st_.trials)


def test_toy_task_is_a_task():
    from autorank.tasks import Task

    assert isinstance(ToyFidelity(), Task)


def test_autorank_search_stays_the_function_after_the_subpackage_is_imported():
    import importlib

    import autorank.search.study  # noqa: F401

    importlib.import_module("autorank.search.result")
    assert callable(autorank.search) and autorank.search.__name__ == "search"
    _ = autorank.SearchSpace
    assert callable(autorank.search) and not isinstance(autorank.search, type(importlib))


def test_too_few_sensitivity_points_are_refused(tmp_path):
    from autorank.search import SearchError

    with pytest.raises(SearchError, match="sensitivity_points"):
        search(toy_cnn(), toy_task(), budget="30%flops", trials=2, out=tmp_path / "r", sensitivity_points=1)
    assert not (tmp_path / "r").exists()


def test_a_latency_budget_measures_a_table_and_estimates_every_trial(tmp_path):
    """latency<=...: a per-layer latency table is measured first; every trial carries its estimated latency."""
    class TwoConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # b wide enough (128 channels, 9.4 MFLOPs) that its factorizations are clearly faster than it, even on a
            # loaded machine: the latency break-even must leave the search something to choose
            self.a = torch.nn.Conv2d(3, 128, 3, padding=1)
            self.b = torch.nn.Conv2d(128, 128, 3, padding=1)
            self.fc = torch.nn.Linear(128, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))

    torch.manual_seed(0)
    # a generous absolute limit: the test checks the measuring and the plumbing, not this machine's speed
    res = search(TwoConv(), toy_task(), budget="latency<=10s", trials=4, finetune=0, out=tmp_path / "lat", threads=1,
                 space={"methods": ["svd"], "rho": [0.2, 0.4], "layers": {"types": ["Conv2d"]}}, sensitivity_points=2)
    assert res.cost_metric == "latency" and res.original["latency"] > 0
    done = [r for r in res.trials if r["state"] == "COMPLETE"]
    assert done and all(r["costs"]["latency"] > 0 for r in done)
    dense_plans = [r for r in done if not r["plan"]["layers"]]
    for r in dense_plans:  # the dense plan's estimate is the measured base latency itself
        assert r["costs"]["latency"] == pytest.approx(res.original["latency"])
    assert all(m.latency_estimated_s is not None and m.latency_measured_s is not None for m in res.front)
    tables = list((Path(os.environ.get("AUTORANK_CACHE_DIR", Path.home() / ".cache" / "autorank")) / "latency").glob("*.json"))
    assert tables, "no latency table written"
