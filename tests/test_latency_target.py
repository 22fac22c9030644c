"""Latency on the target, end to end: device-aware ranks, the latency break-even, the run directory's table,
the front's re-measurement (speed-up, budget breach, picks), `autorank profile --latency`, and the demo's speed-up.

The Ray side (the table and the front measured on the node with the target's resources) is in test_ray_latency.py.
Timing floors are the benchmark's business (benchmarks/bench_speedup.py); these tests check behaviour, with
measurements only where the outcome does not depend on how busy the machine is (a replacement that is 5x slower
than its dense layer, a demo model 2x faster than the original, asserted above 1.1x).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from autorank import Plan
from autorank.cost.latency import device_ranks, grid_candidates, probe_ranks
from autorank.cost.latency_table import LatencyTable, layer_signature, model_signature
from autorank.cost.profile import profile_model
from autorank.cost.timing import DeviceError, LatencyError, default_threads, measure, measure_paired, measure_side_by_side
from autorank.search import search
from autorank.search.latency import FRONT_ROUNDS, LatencyTableMismatch, LatencyTarget, latency_job, measured_front
from autorank.search.result import FrontMember, PickError, SearchResult
from autorank.search.space import LayerChoice
from tests.latency_toys import FAST_LAYERS, INPUT_SHAPE, SLOW_LAYERS, mlp_task, wide_mlp

REPO = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MLP_SPACE = {"methods": ["svd"], "rho": [0.1, 0.2, 0.4]}
QUICK = dict(trials=5, finetune=0, sensitivity_points=2)


@pytest.fixture(autouse=True)
def _cache(request, tmp_path, monkeypatch):
    """A latency table directory of the test's own (the demo tests keep the session's: the demo is trained once)."""
    if "demo" not in request.node.name:
        monkeypatch.setenv("AUTORANK_CACHE_DIR", str(tmp_path / "cache"))


def run_cli(*args, cwd, env=None, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE", **(env or {}))
    return subprocess.run([sys.executable, "-m", "autorank.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------- device-aware ranks, on a table whose steps we know
def _stepped_table(tmp_path, layer: nn.Module, shape, latency, dense: float, ranks) -> LatencyTable:
    table = LatencyTable(tmp_path / "t", threads=1, batch_size=shape[0])
    sig = layer_signature(layer, shape)
    table.put(sig, shape, None, None, dense)
    for r in ranks:
        table.put(sig, shape, "svd", r, latency(r))
    return table


def test_ranks_move_up_to_the_top_of_their_latency_step(tmp_path):
    model = nn.Sequential(nn.Linear(256, 256))
    prof = profile_model(model, torch.randn(1, 256))
    grid = {"0": [("svd", 0.1), ("svd", 0.2), ("svd", 0.3)]}  # ρ·128: ranks 12, 25, 38
    cands = grid_candidates(prof, grid, probe=True)
    ranks = [r for _, r in cands["0"]]
    assert {12, 25, 38} <= set(ranks) and {8, 16, 24, 32, 40, 48, 64} <= set(ranks)
    # a device whose kernels tile the rank by 16: flat within a tile, a jump at each edge
    stepped = _stepped_table(tmp_path, model[0], (1, 256), lambda r: 1e-5 * -(-r // 16), 1.0, ranks)
    dr = device_ranks(prof, stepped, grid, snap=True)
    assert [dr.ranks[("0", "svd", rho)] for rho in (0.1, 0.2, 0.3)] == [16, 32, 48]
    assert dr.moved == 3
    # without alignment, and on a device where time grows with every rank, nothing moves
    assert [device_ranks(prof, stepped, grid, snap=False).ranks[("0", "svd", rho)] for rho in (0.1, 0.2, 0.3)] == [12, 25, 38]
    smooth = _stepped_table(tmp_path / "s", model[0], (1, 256), lambda r: 1e-6 * r, 1.0, ranks)
    assert device_ranks(prof, smooth, grid, snap=True).moved == 0


def test_the_calibration_measures_the_ranks_the_search_builds(tmp_path, monkeypatch):
    """With device alignment the calibrated plans hold the moved ranks (picked for measuring fast), not the grid's."""
    lat = importlib.import_module("autorank.cost.latency_calibration")
    model = nn.Sequential(nn.Linear(256, 256))
    prof = profile_model(model, torch.randn(1, 256))
    grid = {"0": [("svd", 0.1), ("svd", 0.2), ("svd", 0.3)]}  # ranks 12, 25, 38; steps of 16 move them to 16, 32, 48
    ranks = [r for _, r in grid_candidates(prof, grid, probe=True)["0"]]
    table = _stepped_table(tmp_path, model[0], (1, 256), lambda r: 1e-5 * -(-r // 16), 1.0, ranks)
    seen = []

    def fake_calibrate(model, profile, table, plans, inputs, rounds=5, tag=None):
        seen.append(([dict(p) for p in plans], tag))
        table.models[f"calibration|{model_signature(profile, 1)}"] = {"scale": 1.0, **tag}

    monkeypatch.setattr(lat, "calibrate", fake_calibrate)
    x = (torch.randn(1, 256),)
    lat.calibrate_for_search(model, prof, table, lat.calibration_spec(grid, None, snap=True), x)
    (plans, tag), = seen
    assert tag == {"ranks": "device"} and {p["0"] for p in plans} == {("svd", 16), ("svd", 32)}  # smallest and middle ρ
    lat.calibrate_for_search(model, prof, table, lat.calibration_spec(grid, None, snap=True), x)
    assert len(seen) == 1  # calibrated once for these ranks
    # a search with a fixed multiple builds the grid's ranks: the table is calibrated again, on those
    lat.calibrate_for_search(model, prof, table, lat.calibration_spec(grid, 4, snap=False), x)
    (plans, tag) = seen[-1]
    assert tag == {"ranks": "grid"} and {p["0"] for p in plans} == {("svd", 12), ("svd", 24)}


def test_latency_break_even_refuses_slower_choices_and_drops_methods_never_faster(tmp_path):
    model = nn.Sequential(nn.Linear(256, 256))
    prof = profile_model(model, torch.randn(1, 256))
    grid = {"0": [("svd", 0.1), ("svd", 0.2), ("svd", 0.3)]}
    ranks = [r for _, r in grid_candidates(prof, grid)["0"]]
    table = _stepped_table(tmp_path, model[0], (1, 256), lambda r: 1e-5 * -(-r // 16), 2.5e-5, ranks)
    dr = device_ranks(prof, table, grid, snap=True, break_even=True)
    # 16 and 32 (10 and 20 µs) are faster than the dense layer (25 µs); 48 (30 µs) is not: ρ = 0.3 is refused
    assert [dr.ranks[("0", "svd", rho)] for rho in (0.1, 0.2, 0.3)] == [16, 32, 48]
    assert dr.refused == {"0": [("svd", 0.3)]} and dr.break_even["0"]["svd"] == 32 and not dr.dropped
    # the search's choice for the layer then runs a sampled ρ = 0.3 at 0.2: rank 32, never 48
    choice = LayerChoice("0", ("none", "svd"), (0.1, 0.2, 0.3), tuple((m, r, "slower") for m, r in dr.refused["0"]))
    assert choice.snap("svd", 0.3) == 0.2 and choice.rhos_for("svd") == (0.1, 0.2)
    slow = _stepped_table(tmp_path / "slow", model[0], (1, 256), lambda r: 1e-3, 1e-4, ranks)
    dr = device_ranks(prof, slow, grid, snap=True, break_even=True)
    assert dr.dropped == {"0": ["svd"]} and dr.break_even["0"]["svd"] is None and dr.n_refused == 3
    assert not device_ranks(prof, slow, grid, snap=True).refused  # FLOPs and parameter budgets refuse nothing


def test_probe_ranks_are_valid_multiples_around_the_rank():
    from autorank.methods._layers import layer_spec

    spec = layer_spec(nn.Conv2d(64, 128, 3))
    assert probe_ranks("svd", spec, 17) == [16, 17, 24, 32]  # floors and ceilings of 8, 16 and 32
    tucker = probe_ranks("tucker2", spec, (13, 26))
    assert (13, 26) in tucker and (16, 32) in tucker and (8, 24) in tucker and all(r[0] <= 64 and r[1] <= 128 for r in tucker)
    assert probe_ranks("svd", layer_spec(nn.Linear(8, 8)), 3) == [3, 8]  # capped at the full rank


def test_calibration_fit_recovers_the_factor_and_the_cost_of_an_added_operator():
    from autorank.cost.latency_calibration import _fit

    points = [(e, n, 1.5 * e + 2e-5 * n) for e, n in ((-0.01, 10), (-0.02, 40), (-0.005, 30), (-0.015, 5))]
    k, c = _fit(points)
    assert k == pytest.approx(1.5) and c == pytest.approx(2e-5)
    k, c = _fit([(e, n, 1.2 * e - 1e-4 * n) for e, n, _ in points])  # an operator cannot save time: c >= 0
    assert c == 0.0 and k > 0


def test_calibration_fits_one_factor_per_method_when_the_methods_differ():
    """Tucker-2 keeping half of its measured-alone saving in the model, SVD 90%: one factor each, recovered."""
    from autorank.cost.latency_calibration import _fit_per_method

    changes = [{"svd": -0.02}, {"tucker2": -0.03}, {"svd": -0.01, "tucker2": -0.01}, {"svd": -0.03, "tucker2": -0.005},
               {"svd": -0.005, "tucker2": -0.02}]
    points = [(sum(ch.values()), 10, 0.9 * ch.get("svd", 0) + 0.5 * ch.get("tucker2", 0) + 1e-5 * 10) for ch in changes]
    scales = _fit_per_method(changes, points, 1e-5)
    assert scales == {"svd": pytest.approx(0.9), "tucker2": pytest.approx(0.5)}
    assert _fit_per_method(changes[:3], points[:3], 1e-5) is None  # fewer plans than methods + 2: one factor for all
    assert _fit_per_method([{"svd": -0.02}, {"svd": -0.01}] * 3, points[:6], 0.0) is None  # one method only
    lopsided = [{"svd": -0.02, "tucker2": -0.02}, {"svd": -0.01, "tucker2": -0.01}, {"svd": -0.03, "tucker2": -0.03},
                {"svd": -0.04, "tucker2": -0.04}]  # the two always change together: not separable
    assert _fit_per_method(lopsided, [(-0.04, 1, -0.03)] * 4, 0.0) is None


def test_a_calibrated_table_scales_the_estimate_and_keeps_a_reserve_below_a_latency_budget(tmp_path):
    from autorank.cost.budget import parse_budget
    from autorank.cost.cost_model import CostModel
    from autorank.cost.latency import estimate_latency
    from autorank.cost.latency_table import model_signature

    model = nn.Sequential(nn.Linear(256, 256))
    prof = profile_model(model, torch.randn(1, 256))
    table = _stepped_table(tmp_path, model[0], (1, 256), lambda r: 1e-6 * r, 1e-4, [16, 32])
    table.put_model(model_signature(prof, 1), 1e-3)
    assert estimate_latency(prof, {"0": ("svd", 16)}, table) == pytest.approx(1e-3 - 1e-4 + 16e-6)
    table.models[f"calibration|{model_signature(prof, 1)}"] = {"scale": 1.5, "per_op": 1e-5, "margin": 5e-5}
    # k · (16 µs − 100 µs) + c · (one operator added: two linears instead of one)
    assert estimate_latency(prof, {"0": ("svd", 16)}, table) == pytest.approx(1e-3 + 1.5 * (16e-6 - 1e-4) + 1e-5)
    table.models[f"calibration|{model_signature(prof, 1)}"]["method_scales"] = {"svd": 0.75, "tucker2": 2.0}
    assert estimate_latency(prof, {"0": ("svd", 16)}, table) == pytest.approx(1e-3 + 0.75 * (16e-6 - 1e-4) + 1e-5)
    table.models[f"calibration|{model_signature(prof, 1)}"]["method_scales"] = None
    cost = CostModel(prof, parse_budget("50%latency"), latency=(table, 1e-3), margins={"latency": table.get_margin(model_signature(prof, 1))})
    assert cost.limits["latency"] == pytest.approx(0.5e-3 - 5e-5)


# ---------------------------------------------------------------------- measured on this CPU
def test_break_even_excludes_a_replacement_slower_than_its_dense_layer_on_this_cpu(tmp_path):
    """Under a latency budget, a factorization of a tiny linear (two calls instead of one) is never offered."""
    res = search(wide_mlp(), mlp_task(), budget="90%latency", out=tmp_path / "run", space=MLP_SPACE, threads=1, **QUICK)
    info = json.loads((Path(res.run_dir) / "latency.json").read_text())
    assert info["break_even"] and info["target"]["threads"] == 1 and info["validity"]["threads"] == 1
    assert set(info["dropped"]) == set(SLOW_LAYERS) and all(v == ["svd"] for v in info["dropped"].values())
    table = LatencyTable.from_dict(json.loads((Path(res.run_dir) / "latency-table.json").read_text()), statistic="min")
    model = wide_mlp()
    dense = table.get(model[6], (1, 8))
    assert all(table.get(model[6], (1, 8), "svd", r) >= dense for r in (1, 2, 4, 8) if table.get(model[6], (1, 8), "svd", r))
    for r in res.trials:  # no plan ever ran a factorization of the slow layers
        assert not set(r["plan"]["layers"]) & set(SLOW_LAYERS), r["plan"]
    assert any(set(r["plan"]["layers"]) & set(FAST_LAYERS) for r in res.trials)
    # every member was re-measured on the target, next to the original, and keeps the budget or says it does not
    assert res.front and res.original_latency_s > 0
    for m in res.front:  # each over the original measured beside it (members that left the front: measured in later rounds)
        assert m.latency_measured_s > 0 and m.speedup == pytest.approx(m.latency_original_s / m.latency_measured_s)
        assert m.latency_breach == (m.latency_measured_s > 0.9 * m.latency_original_s)
        assert m.latency_estimated_s > 0
    assert not {o["trial"] for o in res.over_budget} & {m.trial for m in res.front}
    calib = info["calibration"]  # fitted on decomposed models measured whole, beside the original
    assert calib["plans"] >= 2 and len(calib["points"]) == calib["plans"] and 0.5 <= calib["scale"] <= 4.0
    assert info["margin_s"] == calib["margin"] >= 0.0
    saved = json.loads((Path(res.run_dir) / "front.json").read_text())
    assert saved["latency"]["device"] == "cpu" and saved["latency"]["threads_used"] == 1 and saved["latency"]["batch_size"] == 1
    assert saved["latency"]["measured_on"]["pid"] == os.getpid()  # in-process executor: this process is the target
    assert 0.0 < saved["latency"]["cpu_share"] <= 1.0 and 0.0 < info["cpu_share"] <= 1.0  # how busy the machine was
    assert all("speedup" in m and "latency_breach" in m for m in saved["front"])


def test_run_directory_refuses_a_table_from_another_device_or_configuration(tmp_path):
    out = tmp_path / "run"
    first = search(wide_mlp(), mlp_task(), budget="90%latency", out=out, space=MLP_SPACE, threads=1, **QUICK)
    # the same target resumes, reading the run's table: nothing measured again
    again = search(wide_mlp(), mlp_task(), budget="90%latency", out=out, space=MLP_SPACE, threads=1, **{**QUICK, "trials": 6})
    assert json.loads((out / "latency.json").read_text())["new_measurements"] == 0 and len(again.trials) == 6
    records = {p.name: p.read_bytes() for p in (out / "trials").glob("*.json")}  # what the refused runs below must not touch
    # another thread count is another configuration
    with pytest.raises(LatencyTableMismatch, match=r"run directory .*run.*threads 1 there, 2 here"):
        search(wide_mlp(), mlp_task(), budget="90%latency", out=out, space=MLP_SPACE, threads=2, **{**QUICK, "trials": 7})
    # a table measured on another machine (its validity names another device) is refused, naming both
    saved = json.loads((out / "latency-table.json").read_text())
    saved["validity"]["device_name"] = "cuda: NVIDIA H100 80GB HBM3"
    (out / "latency-table.json").write_text(json.dumps(saved))
    with pytest.raises(LatencyTableMismatch, match=r"measured on 'cuda: NVIDIA H100 80GB HBM3'.*use another --out"):
        search(wide_mlp(), mlp_task(), budget="90%latency", out=out, space=MLP_SPACE, threads=1, **{**QUICK, "trials": 7})
    assert len(list((out / "trials").glob("*.json"))) == 6  # nothing ran
    assert first.trials and all((out / "trials" / n).read_bytes() == b for n, b in records.items())


@no_cuda
def test_a_latency_budget_on_cuda_without_cuda_fails_before_the_first_trial(tmp_path):
    p = run_cli("search", "--model", "tests.latency_toys:wide_mlp", "--task", "tests.latency_toys:mlp_task",
                "--budget", "50%latency", "--device", "cuda", "--trials", "3", "--out", str(tmp_path / "run"), "-q", cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "'cuda'" in lines[0] and "CUDA" in lines[0], p.stderr
    assert not (tmp_path / "run" / "trials").exists() or not list((tmp_path / "run" / "trials").glob("*.json"))
    with pytest.raises(DeviceError, match="cuda"):  # the same from Python, and for a FLOPs budget's front measurement
        search(wide_mlp(), mlp_task(), budget="30%flops", out=tmp_path / "py", space=MLP_SPACE, device="cuda", **QUICK)
    assert not list((tmp_path / "py").glob("trials/*.json"))


def test_profile_latency_and_the_search_share_one_table(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("methods: [svd]\nrho: [0.1, 0.2, 0.4]\n")
    p = run_cli("profile", "--model", "tests.latency_toys:wide_mlp", "--input", "1x512", "--latency", "--space", str(space),
                "--threads", "1", "--json", cwd=tmp_path, env={"AUTORANK_CACHE_DIR": os.environ["AUTORANK_CACHE_DIR"]})
    assert p.returncode == 0, p.stderr[-2000:]
    data = json.loads(p.stdout)
    assert data["latency_table"]["new_measurements"] > 20 and data["threads"] == 1
    layers = {lp["name"]: lp for lp in data["layers"]}
    for name in SLOW_LAYERS:  # cheaper in FLOPs at low ranks, never faster: the latency break-even says so
        svd = layers[name]["methods"]["svd"]
        assert svd["break_even_rank"] >= 1 and svd["latency_break_even_rank"] is None
    for name in FAST_LAYERS:
        assert layers[name]["methods"]["svd"]["latency_break_even_rank"] >= 40
    res = search("tests.latency_toys:wide_mlp", "tests.latency_toys:mlp_task", budget="90%latency", out=tmp_path / "run",
                 space=str(space), threads=1, **QUICK)
    info = json.loads((Path(res.run_dir) / "latency.json").read_text())
    assert info["new_measurements"] == 0, "the search measured again what `autorank profile --latency` had measured"
    assert info["entries"] == data["latency_table"]["entries"]


# ---------------------------------------------------------------------- the front: speed-up, breach, picks
def _fake_result(tmp_path, trials):
    front = [_member(t, 0.9 + t / 100, 0.3 + t / 100, 1.0, None) for t in trials]
    for m in front:
        m.latency_measured_s = m.speedup = None
    return SearchResult(run_dir=tmp_path, budget="50%latency", cost_metric="latency", base_score=1.0,
                        original={"flops": 1.0, "params": 1.0, "latency": 1e-3}, front=front, trials=[], wasted_fraction=0.0)


def test_a_member_measured_over_the_latency_budget_leaves_the_front_and_the_trials_it_dominated_are_measured(tmp_path):
    """Round 1 measures 1, 2, 3 and finds 2 over; the front rebuilt without 2 promotes 4, the only one measured in round 2."""
    latencies = {1: 4e-4, 2: 5.1e-4, 3: 4.9e-4, 4: 4.5e-4}
    fronts = {frozenset(): [1, 2, 3], frozenset({2}): [1, 3, 4]}
    calls, rebuilt = [], []

    def measure(result, skip):
        todo = [m for m in result.front if m.trial not in skip]
        calls.append(sorted(m.trial for m in todo))
        for m in todo:
            m.latency_measured_s, m.latency_original_s = latencies[m.trial], 1e-3
            m.speedup, m.latency_breach = 1e-3 / latencies[m.trial], latencies[m.trial] > 5e-4
        if result.original_latency_s is None:
            result.original_latency_s, result.latency = 1e-3, {"limit_s": 5e-4}
        return todo

    def rebuild(over):
        rebuilt.append(set(over))
        return _fake_result(tmp_path, fronts[frozenset(over)])

    res = measured_front(_fake_result(tmp_path, fronts[frozenset()]), rebuild, measure)
    assert calls == [[1, 2, 3], [4]] and rebuilt == [{2}]  # measured once each, nothing measured twice
    assert [m.trial for m in res.front] == [1, 3, 4] and not any(m.latency_breach for m in res.front)
    assert all(m.latency_measured_s == latencies[m.trial] for m in res.front)  # carried over from round 1
    assert res.original_latency_s == 1e-3 and res.latency == {"limit_s": 5e-4}
    assert [o["trial"] for o in res.over_budget] == [2] and res.over_budget[0]["latency_measured_s"] == 5.1e-4
    assert res.best.trial == 4
    saved = SearchResult(**{**res.__dict__, "front": [FrontMember.from_dict(m.to_dict()) for m in res.front]}).to_dict()
    assert saved["over_budget"][0]["trial"] == 2 and saved["front"][0]["latency_original_s"] == 1e-3


def test_members_still_over_the_budget_after_the_last_round_stay_on_the_front_marked(tmp_path):
    """Every promoted member is over too: after FRONT_ROUNDS rounds the last ones stay, marked, and are never picked."""
    nxt = iter(range(10, 100))

    def measure(result, skip):
        todo = [m for m in result.front if m.trial not in skip]
        for m in todo:
            m.latency_measured_s, m.latency_original_s, m.speedup, m.latency_breach = 6e-4, 1e-3, 1e-3 / 6e-4, True
        result.original_latency_s = result.original_latency_s or 1e-3
        return todo

    res = measured_front(_fake_result(tmp_path, [1]), lambda over: _fake_result(tmp_path, [next(nxt)]), measure)
    assert len(res.over_budget) == FRONT_ROUNDS - 1 and [m.trial for m in res.front] == [10 + FRONT_ROUNDS - 2]
    assert res.front[0].latency_breach and res.best is None
    with pytest.raises(PickError, match="breaks the budget"):
        res.pick("best")


def test_search_leaves_out_a_member_measured_over_the_latency_budget(tmp_path, monkeypatch):
    """The in-process search: the first front's measurements are made to break the budget; its members leave the front,
    which is rebuilt from the trials they dominated, whose weights are saved and measured; the CLI's `front` says so."""
    base = importlib.import_module("autorank.search.executor_base")  # (autorank.search is also the search function)
    real, slowed, rounds = base.latency_job, [], []

    def job(kind, model, payload, progress=None):
        res = real(kind, model, payload, progress)
        if kind == "front":
            rounds.append(sorted(int(m["trial"]) for m in payload["members"]))
        if kind == "front" and not slowed:  # the first round: every member measured 3x slower than the original
            res["original"] = {k: 2 * v if k in ("min", "median", "p25", "p75") else v for k, v in res["original"].items()}
            for trial, t in res["members"].items():
                res["members"][trial] = {**t, "min": 3 * res["original"]["min"]}
                res["speedups"][trial] = 1 / 3
                slowed.append(int(trial))
        return res

    monkeypatch.setattr(base, "latency_job", job)  # what the in-process executor runs
    res = search(wide_mlp(), mlp_task(), budget="90%latency", out=tmp_path / "run", space=MLP_SPACE, threads=1,
                 **{**QUICK, "trials": 8})
    over = [o["trial"] for o in res.over_budget]  # (a member this busy machine really measured over the budget may join them)
    assert slowed and set(slowed) <= set(over) and not set(over) & {m.trial for m in res.front}, (slowed, res.over_budget)
    assert res.front or set(over) > set(slowed), res.over_budget  # empty only when a promoted trial really broke the budget
    measured = [t for r in rounds for t in r]
    assert len(rounds) >= 2 and rounds[1] and len(measured) == len(set(measured)), rounds  # promoted trials, each measured once
    for m in res.front:  # every member measured, with weights on disk
        assert m.latency_measured_s > 0 and (Path(res.run_dir) / m.weights).exists()
    back = SearchResult.load(res.run_dir)
    assert [o["trial"] for o in back.over_budget] == over
    assert not any(p["feasible"] for p in back.points() if p["trial"] in slowed)
    p = run_cli("front", str(res.run_dir), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"trial {slowed[0]} left the front" in " ".join(p.stdout.split())
    # the original measured 2x slower at the front than beside the calibration's plans (it is the first round's):
    # recorded, and `front` says the machine's speed changed
    assert json.loads((Path(res.run_dir) / "latency.json").read_text())["calibration"]["base"] > 0
    assert back.latency["drift"] > 0.2, back.latency["drift"]  # about +1 (2x the original); the toy MLP's µs move a lot
    assert "slower here than when the latency estimate was calibrated" in " ".join(p.stdout.split())


def _member(trial: int, score: float, cost: float, latency: float, breach) -> FrontMember:
    return FrontMember(trial=trial, plan=Plan({}), score=score, zero_shot_score=score, finetuned=False, flops=1.0, params=1.0,
                       flops_ratio=cost, params_ratio=cost, cost_ratio=cost, latency_measured_s=latency,
                       speedup=1e-3 / latency, latency_breach=breach)


def test_pick_never_picks_a_member_whose_remeasured_latency_breaks_the_budget(tmp_path):
    front = [_member(1, 0.90, 0.30, 4e-4, False), _member(2, 0.99, 0.49, 6e-4, True), _member(3, 0.95, 0.45, 4.9e-4, False)]
    res = SearchResult(run_dir=tmp_path, budget="50%latency", cost_metric="latency", base_score=1.0,
                       original={"flops": 1.0, "params": 1.0, "latency": 1e-3}, front=front, trials=[], wasted_fraction=0.0,
                       original_latency_s=1e-3, latency={"device": "cpu", "device_name": "cpu: x", "batch_size": 1})
    assert res.pick("best").trial == 3 and res.best.trial == 3
    assert res.pick("smallest").trial == 1 and res.pick("knee").trial in (1, 3)
    assert res.pick(trial=2).trial == 2  # asked for by number: the user's call
    with pytest.raises(PickError, match=r"trial 2: re-measured latency 0.6 ms breaks the budget 50%latency"):
        res.pick("best", min_score=0.98)
    back = SearchResult(**{**res.__dict__, "front": [FrontMember.from_dict(m.to_dict()) for m in front]})
    assert [(m.speedup, m.latency_breach) for m in back.front] == [(m.speedup, m.latency_breach) for m in front]


def test_side_by_side_measurement_interleaves_and_reports_every_module():
    big, small = nn.Linear(256, 256), nn.Linear(256, 8)
    t = measure_side_by_side({"big": big, "small": small}, torch.randn(1, 256), threads=1, rounds=3, repeats=3, min_time=0.0)
    assert set(t) == {"big", "small"} and all(v.repeats >= 9 and v.min <= v.median for v in t.values())
    assert LatencyTarget.make(None, None, None).threads is None and default_threads() >= 1


class _Drifting(nn.Module):
    """A call sleeps ``cost`` seconds, 3x longer during a slow spell of the machine: the first ``spell`` calls of all
    the modules sharing ``calls``."""

    def __init__(self, cost: float, calls: list, spell: int):
        super().__init__()
        self.cost, self.calls, self.spell = cost, calls, spell

    def forward(self, x):
        self.calls[0] += 1
        time.sleep(self.cost * (3.0 if self.calls[0] <= self.spell else 1.0))
        return x


def test_paired_speedups_cancel_a_slow_spell_that_ends_mid_round():
    """Each module takes 5 calls a round (1 warm-up, 1 to size a sample, 3 samples). The machine is 3x slower for the
    first 25 calls: rounds 1 and 2 of both modules and the reference's part of round 3. The two modules' medians over
    the rounds then read the reference 6x slower (12 ms against 2 ms); paired by round, the ratios are 2, 2, 6, 2, 2
    and their median the true 2x."""
    calls = [0]
    modules = {"ref": _Drifting(0.004, calls, 25), "half": _Drifting(0.002, calls, 25)}
    kw = dict(threads=1, rounds=5, warmup=1, repeats=3, min_time=0.0)
    timings, speedups = measure_paired(modules, torch.zeros(1), reference="ref", statistic="median", **kw)
    assert calls[0] == 50 and set(timings) == {"ref", "half"} and set(speedups) == {"half"}
    assert 1.6 < speedups["half"] < 2.5, speedups
    assert timings["ref"].median / timings["half"].median > 4  # unpaired, the spell decides
    with pytest.raises(LatencyError, match="reference 'nope'"):
        measure_paired(modules, torch.zeros(1), reference="nope", **kw)


def test_a_model_or_task_declares_the_threads_it_is_deployed_with():
    """The demo declares one deployment thread at batch 1: a latency target measures it so unless --threads says otherwise."""
    from autorank.models import DigitsCNN

    demo = DigitsCNN()
    assert LatencyTarget.make(None, None, None, model=demo).threads == 1
    assert LatencyTarget.make(None, None, 2, model=demo).threads == 2  # --threads overrides
    assert LatencyTarget.make("cuda", None, None, model=demo).threads is None  # a CPU setting only

    class Task:
        device, latency_threads = "cpu", 3

    assert LatencyTarget.make(None, None, None, Task(), model=demo).threads == 3  # the task's word first
    Task.latency_threads = 0
    with pytest.raises(LatencyError, match="latency_threads"):
        LatencyTarget.make(None, None, None, Task())
    with pytest.raises(Exception, match="batch size"):
        LatencyTarget.make("cpu", 0, None)


@needs_cuda
def test_latency_jobs_on_cuda(tmp_path):
    """The table and the front, measured on a GPU (CI has none: this runs where one is lent)."""
    model, x = wide_mlp(), torch.randn(*INPUT_SHAPE)
    payload = {**LatencyTarget.make("cuda", 4, None).to_dict(), "example": (x,), "candidates": {"2": [["svd", 64]]},
               "table_dir": str(tmp_path / "lat")}
    out = latency_job("table", model, payload)
    assert out["device_name"].startswith("cuda:") and out["new_measurements"] >= 3
    table = LatencyTable.from_dict(out["table"])
    assert table.get(model[2], (4, 1024), "svd", 64) > 0


# ---------------------------------------------------------------------- the demo: compressed models are faster
@pytest.mark.slow
def test_demo_front_is_faster_than_the_original_at_30pct_flops(tmp_path):
    res = search("demo", budget="30%flops", trials=6, finetune=0, sensitivity_points=2, out=tmp_path / "run", threads=1)
    best = res.best
    assert best is not None and best.flops_ratio <= 0.30
    assert best.speedup > 1.1, [(m.trial, m.summary, m.speedup) for m in res.front]  # about 2x on an idle 2-core CPU


@pytest.mark.slow
def test_demo_search_under_a_latency_budget_from_the_command_line(tmp_path):
    # one thread: on a machine shared with other jobs a second thread waits for a core at every parallel region
    p = run_cli("search", "--budget", "50%latency", "--device", "cpu", "--threads", "1", "--trials", "6", "--finetune", "0",
                "--sensitivity-points", "2", "-q", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "speed-up" in p.stdout and "1 thread," in p.stdout and "batch 1" in p.stdout
    data = json.loads((tmp_path / "runs" / "demo-50latency" / "front.json").read_text())
    assert data["latency"]["device"] == "cpu" and data["latency"]["threads"] == 1
    within = [m for m in data["front"] if not m["latency_breach"]]
    assert within, data["front"]
    best = max(within, key=lambda m: m["score"])
    assert best["speedup"] > 1.1, data["front"]
    settings = json.loads((tmp_path / "runs" / "demo-50latency" / "settings.json").read_text())
    assert settings["latency"] == {"device": "cpu", "batch_size": 1, "threads": 1, "statistic": "min", "clock": "wall",
                                   "align": "auto"}


# ---------------------------------------------------------------------- channels-last: measured (and deployed) in NHWC
def test_measure_in_channels_last_times_nhwc_and_gives_the_module_back_as_it_was():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    seen = []
    conv.register_forward_pre_hook(lambda m, args: seen.append((args[0].is_contiguous(memory_format=torch.channels_last),
                                                                 m.weight.is_contiguous(memory_format=torch.channels_last))))
    x = torch.randn(2, 8, 12, 12)
    t = measure(conv, x, threads=1, repeats=3, warmup=1, memory_format="channels-last")
    assert t.median > 0 and seen and all(a and w for a, w in seen)
    assert conv.weight.is_contiguous() and x.is_contiguous()  # converted back / never touched
    seen.clear()
    measure(conv, x, threads=1, repeats=3, warmup=1)
    assert seen and not any(a for a, _ in seen)
    with pytest.raises(LatencyError, match="memory format must be contiguous or channels-last, got 'nhwc'"):
        measure(conv, x, memory_format="nhwc")


def test_a_channels_last_table_is_another_configuration(tmp_path):
    nchw = LatencyTable(tmp_path, threads=1)
    nhwc = LatencyTable(tmp_path, threads=1, memory_format="channels_last")
    assert "memory_format" not in nchw.validity and nhwc.validity["memory_format"] == "channels_last"
    assert nhwc.key != nchw.key and nhwc.path.name.endswith(f"-nhwc-{nhwc.key}.json")
    conv = nn.Conv2d(8, 16, 3, padding=1)
    nhwc.measure_layer(conv, (1, 8, 12, 12))
    back = LatencyTable.from_dict(nhwc.to_dict(), tmp_path)
    assert back.memory_format == "channels_last" and back.key == nhwc.key and len(back) == 1
    assert LatencyTarget.make("cpu", 1, 1).to_dict() == {"device": "cpu", "batch_size": 1, "threads": 1, "statistic": "min",
                                                          "clock": "wall"}  # unchanged for the default: old runs resume
    assert "channels-last" in LatencyTarget.make("cpu", 1, 1, memory_format="channels-last").describe()


def test_search_in_channels_last_measures_table_and_front_in_nhwc_from_the_command_line(tmp_path):
    out, space = tmp_path / "run", tmp_path / "space.yaml"
    space.write_text("methods: [svd]\nrho: [0.1, 0.25]\n")
    args = ("search", "--model", "tests.latency_toys:wide_cnn", "--task", "tests.latency_toys:cnn_task", "--budget", "80%latency",
            "--threads", "1", "--trials", "4", "--finetune", "0", "--sensitivity-points", "2", "--space", str(space),
            "--out", str(out))
    p = run_cli(*args, "--channels-last", cwd=tmp_path, env={"AUTORANK_CACHE_DIR": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "channels-last" in " ".join(p.stdout.split())
    info = json.loads((out / "latency.json").read_text())
    assert info["validity"]["memory_format"] == "channels_last" and info["target"]["memory_format"] == "channels_last"
    front = json.loads((out / "front.json").read_text())
    assert front["latency"]["memory_format"] == "channels_last" and front["front"]
    assert json.loads((out / "settings.json").read_text())["latency"]["memory_format"] == "channels_last"
    p = run_cli("export", str(out), "--pick", "best", "-o", str(tmp_path / "m.pt"), "--model", "tests.latency_toys:wide_cnn",
                cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "measured in channels-last: serve it so" in " ".join(p.stdout.split())
    sidecar = json.loads(next(tmp_path.glob("m.pt*.json")).read_text())
    assert sidecar["metadata"]["latency_measured_as"]["memory_format"] == "channels_last", sidecar
    # the same run directory with the default layout is another search: refused in one line, nothing touched
    before = sorted(p.name for p in (out / "trials").glob("*.json"))
    p = run_cli(*args, "-q", cwd=tmp_path, env={"AUTORANK_CACHE_DIR": str(tmp_path / "cache")})
    assert p.returncode == 2 and len([ln for ln in p.stderr.splitlines() if ln.strip()]) == 1, p.stderr[-2000:]
    assert "memory_format 'channels_last' there, None here" in p.stderr and "--channels-last" in p.stderr
    assert sorted(p.name for p in (out / "trials").glob("*.json")) == before


def test_side_by_side_in_channels_last_lays_the_weights_out_once_for_every_round():
    """A fresh NHWC copy of the weights per round would put oneDNN's weight reordering in each round's first call (at
    batch 32, one call per round: ResNet-50's speed-up read 1.63x instead of 1.89x)."""
    convs = {"a": nn.Conv2d(8, 16, 3, padding=1), "b": nn.Conv2d(8, 4, 1)}
    seen = {k: [] for k in convs}
    for k, c in convs.items():
        c.register_forward_pre_hook(lambda m, args, k=k: seen[k].append(
            (m.weight.data_ptr(), args[0].is_contiguous(memory_format=torch.channels_last))))
    t = measure_side_by_side(convs, torch.randn(2, 8, 10, 10), threads=1, rounds=3, repeats=2, warmup=1, min_time=0.0,
                             memory_format="channels_last")
    assert set(t) == {"a", "b"}
    for k, calls in seen.items():
        assert calls and all(nhwc for _, nhwc in calls) and len({p for p, _ in calls}) == 1, k
        assert convs[k].weight.is_contiguous()


def test_profile_channels_last_measures_its_own_table(tmp_path):
    p = run_cli("profile", "--model", "tests.latency_toys:wide_cnn", "--input", "1x3x16x16", "--channels-last", "--threads", "1",
                "--json", cwd=tmp_path, env={"AUTORANK_CACHE_DIR": os.environ["AUTORANK_CACHE_DIR"]})
    assert p.returncode == 0, p.stderr[-2000:]
    table = json.loads(p.stdout)["latency_table"]
    assert table["memory_format"] == "channels_last" and "-nhwc-" in Path(table["path"]).name
    p = run_cli("profile", "--model", "tests.latency_toys:wide_cnn", "--input", "1x3x16x16", "--channels-last", "--threads", "1",
                cwd=tmp_path, env={"AUTORANK_CACHE_DIR": os.environ["AUTORANK_CACHE_DIR"]})
    assert p.returncode == 0 and "batch 1, channels-last; table" in " ".join(p.stdout.split()), p.stdout[-2000:]
