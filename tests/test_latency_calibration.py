"""The latency calibration's measurement: plans far off the fit are measured again, their rounds pooled.

The timings are made up (a fake ``measure_rounds``) so that what is checked does not depend on how busy
the machine is: which plans are measured again, that a disturbed first measurement stops moving the
factor, and that a plan the linear model really misses stays where it was measured.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from autorank.cost.latency_table import LatencyTable, layer_signature, model_signature
from autorank.cost.profile import profile_model
from autorank.cost.timing import Timing

lat = importlib.import_module("autorank.cost.latency_calibration")

BASE = 1e-3  # the original's latency in the fake measurements
K = 0.7  # the factor the fake model keeps of the table's estimated change
DENSE, PER_RANK = 2e-4, 4e-6  # the table: a dense layer, and a factorization's latency per unit of rank


def _timing(seconds: float) -> Timing:
    return Timing(median=seconds, p25=seconds, p75=seconds, min=seconds, repeats=5, warmup=1, threads=1, device="cpu: fake",
                  batch_size=1)


def _setup(tmp_path):
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    prof = profile_model(model, torch.randn(1, 64))
    table = LatencyTable(tmp_path / "t", threads=1, batch_size=1)
    sig = layer_signature(model[0], (1, 64))  # the four layers share a signature: one set of entries
    table.put(sig, (1, 64), None, None, DENSE)
    for r in (8, 16, 24):
        table.put(sig, (1, 64), "svd", r, PER_RANK * r)
    plans = [{"0": ("svd", 8)}, {"0": ("svd", 16), "1": ("svd", 16)}, {"1": ("svd", 24), "2": ("svd", 24), "3": ("svd", 24)},
             {str(i): ("svd", 8) for i in range(4)}, {"2": ("svd", 16)}, {"0": ("svd", 24), "3": ("svd", 8)}]
    change = [sum(PER_RANK * r - DENSE for _, r in p.values()) for p in plans]  # the table's estimate of each plan
    return model, prof, table, plans, change


def _fake_rounds(change, first_off: dict, always_off: dict, calls: list):
    """measure_rounds: the original at BASE; plan i at BASE + K·change[i] (+ its offsets), each in every round."""

    def fake(modules, inputs, *, rounds, **kw):
        calls.append((sorted(map(str, modules)), rounds))
        first = len(calls) == 1
        out = {}
        for key in modules:
            t = BASE if key == "original" else BASE + K * change[key] + always_off.get(key, 0.0) + (first_off.get(key, 0.0) if first else 0.0)
            out[key] = [_timing(t) for _ in range(rounds)]
        return out

    return fake


def test_a_plan_disturbed_once_is_measured_again_and_stops_moving_the_factor(tmp_path, monkeypatch):
    model, prof, table, plans, change = _setup(tmp_path)
    calls: list = []
    monkeypatch.setattr(lat, "measure_rounds", _fake_rounds(change, {2: 0.25 * BASE}, {}, calls))
    k, c = lat.calibrate(model, prof, table, plans, (torch.randn(1, 64),), rounds=5, save=False)
    rec = table.models[f"calibration|{model_signature(prof, 1)}"]
    assert rec["measured_again"] == [2] and rec["rounds"] == 5
    assert calls[1] == (["2", "original"], 10)  # only that plan, beside the original, in twice the rounds
    # its 10 new rounds outvote the 5 disturbed ones: the fit is the clean one, nothing is kept in reserve for it
    assert k == pytest.approx(K, rel=1e-6) and c == pytest.approx(0.0, abs=1e-9)
    assert rec["points"][2][2] == pytest.approx(K * change[2]) and rec["margin"] == pytest.approx(0.0, abs=1e-9)


def test_a_plan_the_model_really_misses_stays_missed_when_measured_again(tmp_path, monkeypatch):
    model, prof, table, plans, change = _setup(tmp_path)
    calls: list = []
    monkeypatch.setattr(lat, "measure_rounds", _fake_rounds(change, {}, {4: 0.2 * BASE}, calls))
    lat.calibrate(model, prof, table, plans, (torch.randn(1, 64),), rounds=3, save=False)
    rec = table.models[f"calibration|{model_signature(prof, 1)}"]
    assert rec["measured_again"] == [4] and calls[1] == (["4", "original"], 6)
    assert rec["points"][4][2] == pytest.approx(K * change[4] + 0.2 * BASE)  # the measurement stands
    assert rec["margin"] > 0.03 * BASE  # and the reserve still covers what the estimate misses


def test_a_steady_calibration_measures_nothing_again(tmp_path, monkeypatch):
    model, prof, table, plans, change = _setup(tmp_path)
    calls: list = []
    # every plan within 1% of the original's latency of the fit: noise the reserve covers, not worth a second look
    offsets = {i: (0.01 if i % 2 else -0.01) * BASE for i in range(len(plans))}
    monkeypatch.setattr(lat, "measure_rounds", _fake_rounds(change, {}, offsets, calls))
    lat.calibrate(model, prof, table, plans, (torch.randn(1, 64),), rounds=5, save=False)
    assert len(calls) == 1 and table.models[f"calibration|{model_signature(prof, 1)}"]["measured_again"] == []


def test_a_search_asking_for_more_rounds_calibrates_again(tmp_path, monkeypatch):
    model, prof, table, plans, change = _setup(tmp_path)
    seen = []

    def fake_calibrate(model, profile, table, plans, inputs, rounds=5, tag=None):
        seen.append(rounds)
        table.models[f"calibration|{model_signature(profile, 1)}"] = {"scale": 1.0, "rounds": rounds, **tag}

    monkeypatch.setattr(lat, "calibrate", fake_calibrate)
    grid = {str(i): [("svd", 0.125), ("svd", 0.25)] for i in range(4)}
    spec = lat.calibration_spec(grid, 8, snap=False)
    x = (torch.randn(1, 64),)
    for rounds in (5, 5, 3, 9, 9):
        lat.calibrate_for_search(model, prof, table, spec, x, rounds=rounds)
    assert seen == [5, 9]  # fewer rounds than the table's calibration: kept; more: calibrated again
