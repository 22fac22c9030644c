"""Closed-form re-fitting (autorank.training.refit): never worse per layer on the calibration batches, exact where it should be."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import autorank
from autorank.errors import UnknownLayerError
from autorank.methods._layers import Decomposed
from autorank.surgery import set_submodule
from autorank.training.refit import decomposed_layers, refit
from tests.conftest import gpt2_conv1d_class


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True),  # in-place ReLU after a decomposed conv
        nn.Conv2d(16, 24, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(24, 24, 3), nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1, bias=False), nn.Flatten(),
        nn.Linear(24 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    ).eval()


def _batches(shape=(8, 3, 6, 6), n=3, seed=1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _layer_sse(original: nn.Module, compressed: nn.Module, name: str, batches) -> tuple[float, float]:
    """Σ‖t − y‖² and Σ‖t‖² of one layer: t the original layer's output on the original's inputs,
    y the compressed layer's output on the compressed model's inputs (float64)."""
    outs: dict[str, list] = {"t": [], "y": []}
    h1 = original.get_submodule(name).register_forward_hook(lambda m, a, o: outs["t"].append(o.detach().double().clone()))
    h2 = compressed.get_submodule(name).register_forward_hook(lambda m, a, o: outs["y"].append(o.detach().double().clone()))
    try:
        with torch.no_grad():
            for b in batches:
                original(b)
                compressed(b)
    finally:
        h1.remove()
        h2.remove()
    sse = sum(float((t - y).square().sum()) for t, y in zip(outs["t"], outs["y"]))
    return sse, sum(float(t.square().sum()) for t in outs["t"])


def _check_never_worse(original, compressed, plan_layers, batches, **kw):
    """Re-fit a copy; for every layer, the re-fitted factor's error on its inputs <= the old factor's on the same inputs."""
    fitted = copy.deepcopy(compressed)
    report = refit(original, fitted, batches, **kw)
    by_name = {lr.name: lr for lr in report.layers}
    assert set(by_name) == set(plan_layers)
    for name in plan_layers:
        after, total = _layer_sse(original, fitted, name, batches)
        # the same model with only this layer's old factors back: same inputs reach it (they come before it)
        mixed = copy.deepcopy(fitted)
        set_submodule(mixed, name, copy.deepcopy(compressed.get_submodule(name)))
        before, _ = _layer_sse(original, mixed, name, batches)
        lr = by_name[name]
        assert after <= before * (1 + 1e-6) + 1e-9, (name, before, after)
        if lr.status in ("refit", "kept"):  # the report's errors are the measured ones
            assert lr.error_before == pytest.approx(before / total, rel=1e-3, abs=1e-9)
            assert lr.error_after == pytest.approx(after / total, rel=1e-3, abs=1e-9)
    return fitted, report


@pytest.mark.parametrize("method, layers, rank", [
    ("svd", ["0", "2", "4", "6", "8", "10"], 0.3),
    ("spatial-svd", ["0", "2", "4", "6"], 0.3),
    ("tucker2", ["4", "6"], 0.3),
    ("btd", ["4", "6"], 0.4),
    ("dcf", ["0", "4", "6"], 0.4),
    ("cp", ["4"], 0.3),
])
def test_refit_never_increases_a_layers_output_error(method, layers, rank):
    model = _conv_net()
    batches = _batches()
    plan = {"layers": {n: {"method": method, "rank": rank} for n in layers}}
    compressed = autorank.decompose(model, plan, calibration=batches)
    fitted, report = _check_never_worse(model, compressed, layers, batches)
    assert report.refitted, "no layer was re-fitted"
    # and the whole model is closer to the original on the calibration inputs
    with torch.no_grad():
        x = torch.cat(batches)
        ref = model(x)
        assert (fitted(x) - ref).norm() < (compressed(x) - ref).norm()


def test_refit_last_factor_only_for_svd_is_never_worse_either():
    model = _conv_net()
    batches = _batches()
    layers = ["2", "4", "8"]
    compressed = autorank.decompose(model, {"layers": {n: {"method": "svd", "rank": 0.3} for n in layers}}, calibration=batches)
    _, report = _check_never_worse(model, compressed, layers, batches, low_rank=False)
    assert all("factor 1" in lr.what for lr in report.layers)


@pytest.mark.parametrize("method", ["tt", "tr"])
def test_methods_without_a_refittable_factor_say_so(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)).eval()
    batches = [torch.randn(4, 16)]
    compressed = autorank.decompose(model, {"layers": {"0": {"method": method, "rank": 0.5}}})
    before = {k: v.clone() for k, v in compressed.state_dict().items()}
    report = refit(model, compressed, batches)
    (lr,) = report.layers
    assert lr.status == "skipped" and "not re-fitted" in lr.reason
    assert all(torch.equal(v, compressed.state_dict()[k]) for k, v in before.items())


def test_joint_svd_refit_reaches_the_data_aware_optimum_from_a_plain_svd():
    """One bias-free Linear, its inputs the original's: with no ridge the joint re-fit is the best rank-r map,
    i.e. what data-aware SVD computes; starting from plain SVD it must reach that error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 12, bias=False)).eval()
    mix = torch.randn(20, 20)
    batches = [torch.randn(64, 20) @ mix for _ in range(2)]  # correlated inputs: plain SVD is not optimal
    plain = autorank.decompose(model, {"layers": {"0": {"method": "svd", "rank": 4, "options": {"data_aware": False}}}})
    aware = autorank.decompose(model, {"layers": {"0": {"method": "svd", "rank": 4}}}, calibration=batches)
    e_plain, total = _layer_sse(model, plain, "0", batches)
    e_aware, _ = _layer_sse(model, aware, "0", batches)
    assert e_aware < 0.9 * e_plain
    refit(model, plain, batches, ridge=0.0)
    e_refit, _ = _layer_sse(model, plain, "0", batches)
    assert e_refit == pytest.approx(e_aware, rel=1e-6, abs=1e-9 * total)


def test_full_rank_refit_with_bias_reproduces_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6)).eval()
    batches = [torch.randn(50, 10) + 3.0]  # offset inputs: the bias must be solved with the weights
    compressed = autorank.decompose(model, {"layers": {"0": {"method": "svd", "rank": 6}}})
    with torch.no_grad():  # spoil the factors and the bias
        for p in compressed.parameters():
            p.add_(0.3 * torch.randn_like(p))
    report = refit(model, compressed, batches, ridge=0.0)
    assert report.layers[0].status == "refit"
    assert report.layers[0].error_after < 1e-10
    with torch.no_grad():
        assert torch.allclose(compressed(batches[0]), model(batches[0]), atol=1e-4)


@settings(max_examples=12, deadline=None)
@given(
    widths=st.lists(st.integers(4, 24), min_size=3, max_size=4),
    rho=st.floats(0.15, 0.8),
    bias=st.booleans(),
    low_rank=st.booleans(),
    ridge=st.sampled_from([0.0, 1e-4, 0.1, 1.0]),
)
def test_refit_is_never_worse_on_random_linear_stacks(widths, rho, bias, low_rank, ridge):
    torch.manual_seed(sum(widths))
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b, bias=bias), nn.Tanh()]
    model = nn.Sequential(*layers).eval()
    names = [str(i) for i in range(0, len(layers), 2)]
    batches = [torch.randn(16, widths[0]) for _ in range(2)]
    compressed = autorank.decompose(model, {"layers": {n: {"method": "svd", "rank": rho} for n in names}}, calibration=batches)
    _check_never_worse(model, compressed, names, batches, low_rank=low_rank, ridge=ridge)


def test_refit_gpt2_conv1d_and_a_layer_called_twice():
    Conv1D = gpt2_conv1d_class()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Conv1D(24, 8)  # GPT-2 layout: (in, out) weight
            self.proj = nn.Linear(24, 8)

        def forward(self, x):
            h = torch.tanh(self.attn(x))
            x = x + self.proj(h)
            return self.proj(torch.tanh(self.attn(x)))  # both layers called twice per forward

    torch.manual_seed(0)
    model = Net().eval()
    batches = [torch.randn(4, 5, 8) for _ in range(2)]
    names = ["attn", "proj"]
    compressed = autorank.decompose(model, {"layers": {n: {"method": "svd", "rank": 3} for n in names}}, calibration=batches)
    _, report = _check_never_worse(model, compressed, names, batches)
    assert report.refitted
    assert all(lr.rows == 2 * 2 * 4 * 5 for lr in report.layers)  # two calls per batch, 20 rows each


def test_refit_groups_layers_that_read_the_same_input():
    """q, k, v read one tensor: one pass for the three (a probe, the original's cache pass, then one per group)."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), dim=-1)
            return self.o(a @ self.v(x))

    torch.manual_seed(0)
    model = Attn().eval()
    batches = [torch.randn(2, 6, 16)]
    compressed = autorank.decompose(model, {"layers": {n: {"method": "svd", "rank": 4} for n in "qkvo"}}, calibration=batches)
    report = refit(model, compressed, batches)
    assert report.passes == 2 + 2
    assert [lr.name for lr in report.layers] == ["q", "k", "v", "o"]


def test_refit_names_an_unknown_layer():
    model = _conv_net()
    compressed = autorank.decompose(model, {"layers": {"4": {"method": "svd", "rank": 0.3}}})
    with pytest.raises(UnknownLayerError, match="'nope'"):
        refit(model, compressed, _batches(), layers=["nope"])
    with pytest.raises(UnknownLayerError, match="'2'.*no decomposed layer"):
        refit(model, compressed, _batches(), layers=["2"])


def test_refit_only_the_layers_asked_and_original_untouched():
    model = _conv_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    compressed = autorank.decompose(model, {"layers": {n: {"method": "svd", "rank": 0.3} for n in ("2", "4")}})
    old4 = {k: v.clone() for k, v in compressed.get_submodule("4").state_dict().items()}
    report = refit(model, compressed, _batches(), layers=["2"])
    assert [lr.name for lr in report.layers] == ["2"]
    assert all(torch.equal(v, compressed.get_submodule("4").state_dict()[k]) for k, v in old4.items())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert isinstance(decomposed_layers(compressed)["2"], Decomposed)


def test_a_plan_entry_can_opt_out_of_refit():
    model = _conv_net()
    plan = {"layers": {"2": {"method": "svd", "rank": 0.3, "options": {"refit": False}}, "4": {"method": "svd", "rank": 0.3}}}
    compressed = autorank.decompose(model, plan)
    old = {k: v.clone() for k, v in compressed.get_submodule("2").state_dict().items()}
    report = refit(model, compressed, _batches())
    by = {lr.name: lr for lr in report.layers}
    assert by["2"].status == "skipped" and "refit: false" in by["2"].reason and by["4"].status == "refit"
    assert all(torch.equal(v, compressed.get_submodule("2").state_dict()[k]) for k, v in old.items())
    with pytest.raises(autorank.AutorankError, match="option refit"):
        autorank.decompose(model, {"layers": {"2": {"method": "svd", "rank": 3, "options": {"refit": "no"}}}})


def test_refit_small_cache_gives_the_same_result():
    model = _conv_net()
    batches = _batches()
    plan = {"layers": {n: {"method": "svd", "rank": 0.3} for n in ("2", "4", "8")}}
    a = autorank.decompose(model, plan, calibration=batches)
    b = copy.deepcopy(a)
    refit(model, a, batches)
    refit(model, b, batches, cache_bytes=0)  # every target recomputed in its layer's pass
    for (ka, va), (_kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(va, vb, atol=1e-6), ka


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_refit_on_cuda():
    model = _conv_net().cuda()
    batches = [b.cuda() for b in _batches()]
    compressed = autorank.decompose(model, {"layers": {n: {"method": "svd", "rank": 0.3} for n in ("2", "4")}},
                                    calibration=batches).cuda()
    _, report = _check_never_worse(model, compressed, ["2", "4"], batches)
    assert report.refitted
