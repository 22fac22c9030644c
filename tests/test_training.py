"""Training-time methods: BN between factors (folded for export), force regularization, fixed-point factors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import autorank
from autorank import training as T
from autorank.search import search
from autorank.search.trial import TrialRunner
from autorank.surgery import plan_of
from tests.search_toys import ToyFidelity, toy_cnn, toy_task

REPO = Path(__file__).resolve().parents[1]

MIXED = {"layers": {
    "features.0": {"method": "spatial-svd", "rank": 4},
    "features.2": {"method": "tucker2", "rank": [6, 6]},
    "features.4": {"method": "cp", "rank": 8},
    "head.2": {"method": "svd", "rank": 6},
}}
SVD = {"layers": {n: {"method": "svd", "rank": 6} for n in ("features.2", "features.4", "head.2")}}


class Tokens(nn.Module):
    """A Linear fed 3-D inputs (batch, tokens, features), to check the feature batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)))


def _train(model, x, steps=5):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        loss = (model(x) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _roundtrip(model, tmp_path, base):
    path = tmp_path / "m.pt"
    autorank.save(model, path)
    return autorank.load(path, model=base)


# ---------------------------------------------------------------------- BN between factors
@pytest.mark.parametrize("data_init", [False, True])
def test_factor_bn_is_identity_when_inserted_and_folds_back_exactly(tmp_path, data_init):
    x = torch.randn(16, 3, 8, 8)
    model = autorank.decompose(toy_cnn().eval(), MIXED).eval()
    y0 = model(x)
    n = T.insert_factor_bn(model, [x] if data_init else None)
    assert n == 1 + 2 + 3 + 1  # a BN after every factor but the last
    bns = [m for m in model.modules() if isinstance(m, T.FactorBatchNorm2d)]
    assert len(bns) == 6
    atol = 1e-5 if data_init else 0.0
    torch.testing.assert_close(model(x), y0, atol=atol, rtol=0)
    _train(model, x)
    assert any(float(bn.running_mean.abs().max()) > 1e-3 for bn in bns)  # statistics moved
    y1 = model(x)
    assert T.fold_factor_bn(model) == 7
    assert not any(isinstance(m, (T.FactorBatchNorm1d, T.FactorBatchNorm2d)) for m in model.modules())
    torch.testing.assert_close(model(x), y1, atol=1e-5, rtol=0)
    plan = plan_of(model)
    assert plan.layers["features.2"].options["bias_after_fold"] == [0, 1]
    assert plan.layers["head.2"].options["bias_after_fold"] == [0]
    loaded = _roundtrip(model, tmp_path, toy_cnn())
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    # the plan stays valid for decompose too (a zero bias where the fold put one)
    assert isinstance(autorank.decompose(toy_cnn(), plan).features[2][0].bias, nn.Parameter)


def test_feature_bn_for_linear_factors_on_3d_inputs(tmp_path):
    x = torch.randn(4, 7, 12)
    model = autorank.decompose(Tokens().eval(), {"layers": {"fc": {"method": "svd", "rank": 4}}}).eval()
    y0 = model(x)
    assert T.insert_factor_bn(model) == 1 and isinstance(model.fc[1], T.FactorBatchNorm1d)
    torch.testing.assert_close(model(x), y0, atol=0, rtol=0)
    _train(model, x)
    y1 = model(x)
    T.fold_factor_bn(model)
    torch.testing.assert_close(model(x), y1, atol=1e-5, rtol=0)
    torch.testing.assert_close(_roundtrip(model, tmp_path, Tokens())(x), y1, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- force regularization
def _tail_error(weight: torch.Tensor, r: int) -> float:
    """Relative error ‖W − W_r‖/‖W‖ of the rank-r truncation of the filter matrix."""
    s = torch.linalg.svdvals(weight.detach().reshape(weight.shape[0], -1).double())
    return float(s[r:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())


def test_force_regularization_pulls_filters_into_the_planned_subspace():
    model, task = toy_cnn().eval(), toy_task()
    task.setup(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    targets = T.force_targets(model, SVD)
    assert targets == {n: T.PullTarget(6, "filters") for n in SVD["layers"]}
    report: dict = {}
    reg = T.force_regularize(model, targets, task, steps=20, strength=0.1, seed=0, report=report)
    assert report["pulls"] == 20
    for name in targets:
        before, after = report["energy_before"][name], report["energy_after"][name]
        assert after > before + 0.2, (name, before, after)
        # decomposing the regularised weight at the planned rank loses less than decomposing the original
        assert _tail_error(reg.get_submodule(name).weight, 6) < 0.5 * _tail_error(model.get_submodule(name).weight, 6)
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, original[k]), k
    # the hook is gone: a later optimizer step on the same weights is not pulled
    w = reg.head[2].weight
    w.grad = torch.zeros_like(w)
    before_w = w.detach().clone()
    torch.optim.SGD([w], lr=0.1).step()
    assert torch.equal(w.detach(), before_w)
    # and the decomposed regularised model is closer to the original's outputs than the decomposed original
    assert task.evaluate(autorank.decompose(reg, SVD)) > task.evaluate(autorank.decompose(model, SVD))


def test_force_targets_follow_each_method():
    model = toy_cnn()
    t = T.force_targets(model, MIXED)
    assert t["features.0"] == T.PullTarget(4, "spatial")
    assert t["features.2"] == T.PullTarget((6, 6), "tucker2")
    assert t["features.4"].view == "filters" and isinstance(t["features.4"].rank, int)  # cp: SVD rank of equal FLOPs
    layer = model.features[2]
    for target in t.values():  # every view is a projection: P(P(W)) = P(W), energy share ≤ 1
        if target.view == "tucker2":
            p = T.project(layer, target)
            torch.testing.assert_close(T.project(layer, target, p.float()), p, atol=1e-5, rtol=1e-4)
            assert 0 < T.energy_share(layer, target) <= 1 + 1e-9


# ---------------------------------------------------------------------- fixed point
@pytest.mark.parametrize("bits", [8, 4])
def test_fake_quantised_factors_take_at_most_2_pow_bits_levels(bits):
    model = autorank.decompose(toy_cnn().eval(), MIXED).eval()
    n = T.quantize_factors(model, bits)
    assert n == 2 + 3 + 4 + 2
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and hasattr(m, "parametrizations"):
            w = m.weight.detach().reshape(m.weight.shape[0], -1)
            assert max(len(torch.unique(row)) for row in w) <= 2 ** bits


def test_frozen_fixed_point_model_stores_int8_and_reloads_in_a_fresh_process(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    model = autorank.decompose(toy_cnn().eval(), SVD).eval()
    float_factor_bytes = sum(
        m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n.count(".") == 2
    )
    bytes_before = T.model_bytes(model)
    T.quantize_factors(model, 8)
    y = model(x)
    assert T.freeze_fixed_point(model) == 6
    torch.testing.assert_close(model(x), y, atol=0, rtol=0)  # the frozen layers compute what was trained
    state = model.state_dict()
    int8 = {k for k, v in state.items() if v.dtype == torch.int8}
    assert len(int8) == 6 and all(k.endswith("qweight") for k in int8)
    # stored size: a quarter of the float factors' bytes, plus one float scale per output channel
    scales = sum(v.numel() * 4 for k, v in state.items() if k.endswith(".scale"))
    assert bytes_before - T.model_bytes(model) == float_factor_bytes - (float_factor_bytes // 4 + scales)
    path = tmp_path / "fp.pt"
    autorank.save(model, path)
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import torch, autorank
        from tests.search_toys import toy_cnn
        m = autorank.load({str(path)!r}, model=toy_cnn())
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        assert any(v.dtype == torch.int8 for v in m.state_dict().values())
        assert torch.equal(m(io["x"]), io["y"]), (m(io["x"]) - io["y"]).abs().max()
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_fine_tuning_with_fake_quantisation_still_trains():
    torch.manual_seed(0)
    x = torch.randn(64, 12)
    target = torch.randn(64, 3)
    model = autorank.decompose(Tokens(), {"layers": {"fc": {"method": "svd", "rank": 6}}})
    T.quantize_factors(model, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    T.freeze_fixed_point(model)
    assert float((model(x) - target).pow(2).mean()) == pytest.approx(losses[-1], rel=0.2)


# ---------------------------------------------------------------------- the search's fine-tuning stage
class Wrecking(ToyFidelity):
    """Fine-tuning that makes things worse: the trial must keep (rebuilt) zero-shot weights."""

    def finetune(self, model, steps, *, seed=0):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        return model.eval()


def test_trial_runner_applies_the_options_and_keeps_zero_shot_when_worse(tmp_path):
    runner = TrialRunner(toy_cnn(), Wrecking())
    training = {"bn_between_factors": True, "fixed_point": 8}
    out = runner.finetune(MIXED, 12, seed=0, save_to=str(tmp_path / "w.pt"), training=training)
    assert "error" not in out, out
    # recovery keeps the best evaluated weights: the wrecked ones never reach the trial, the start does
    assert out["recovery"]["best_step"] == 0 and out["recovery"]["steps"] >= 1  # the rest after block-wise
    assert out["score"] >= out["zero_shot_deployed_score"] - 1e-6  # re-fit and block-wise may win some back
    assert out["training"]["bn_between_factors"] == 7 and out["training"]["fixed_point"]["bits"] == 8
    loaded = autorank.load(tmp_path / "w.pt", model=toy_cnn())
    assert any(v.dtype == torch.int8 for v in loaded.state_dict().values())
    assert out["bytes"] == T.model_bytes(loaded)
    assert runner.evaluate(loaded) == pytest.approx(out["score"], abs=1e-6)

    fr = runner.finetune(SVD, 2, seed=0, training={"force_regularization": {"steps": 4, "strength": 0.2}})
    assert "error" not in fr, fr
    info = fr["training"]["force_regularization"]
    assert info["pulls"] == 0  # Wrecking's loop uses no optimizer: nothing to hook into
    good = TrialRunner(toy_cnn(), toy_task()).finetune(SVD, 3, seed=0, training={"force_regularization": {"steps": 4, "strength": 0.2}})
    assert good["training"]["force_regularization"]["pulls"] == 4
    assert good["training"]["force_regularization"]["energy_share_after"] > good["training"]["force_regularization"]["energy_share_before"]


def test_search_with_training_options_exports_int8_weights(tmp_path):
    space = {"methods": ["svd", "tucker2"], "training": {"bn_between_factors": True, "fixed_point": 8}}
    res = search(toy_cnn(), toy_task(), budget="30%flops", trials=6, finetune=1, space=space, out=tmp_path / "run",
                          sensitivity_points=2, measure_latency=False)
    tuned = [r for r in res.trials if (r.get("finetune") or {}).get("weights")]
    assert tuned, "no trial was fine-tuned"
    ft = tuned[0]["finetune"]
    assert "error" not in ft and ft["training"]["fixed_point"]["bits"] == 8 and ft["bytes"] > 0
    members = [m for m in res.front if m.finetuned] or res.front
    member = next((m for m in members if m.trial == tuned[0]["number"]), None)
    path = res.weights_path(member) if member is not None else Path(res.run_dir) / ft["weights"]
    loaded = autorank.load(path, model=toy_cnn())
    assert any(v.dtype == torch.int8 for v in loaded.state_dict().values())
    x = torch.randn(2, 3, 8, 8)
    if member is not None:
        torch.testing.assert_close(loaded(x), res.build(member)(x), atol=0, rtol=0)
    task = toy_task()
    task.setup(toy_cnn().eval())
    assert task.evaluate(loaded) == pytest.approx(ft["score"], abs=1e-6)
