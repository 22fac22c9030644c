"""The contract every registered method honours, on every layer kind it claims.

Parametrised from the registry at collection time: a new method registered by
``autorank.methods.register`` is covered without editing this file (see
``test_a_method_registered_later_is_checked_by_the_same_contract``).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import autorank
from autorank import methods
from autorank.cost.flops import count_flops, count_flops_torch
from autorank.errors import NotApplicableError, RankError
from autorank.methods import layer_spec
from autorank.methods._layers import layer_kind
from tests.conftest import LAYER_CASES, LayerCase, fvcore_flops, gpt2_conv1d_class, n_params


def contract_cases() -> list[tuple[str, LayerCase]]:
    out = []
    for name in methods.available():
        m = methods.get(name)
        for case in LAYER_CASES:
            if m.applies(case.make()) is None:
                out.append((name, case))
    return out


def refusal_cases() -> list[tuple[str, LayerCase]]:
    out = []
    for name in methods.available():
        m = methods.get(name)
        for case in LAYER_CASES:
            if m.applies(case.make()) is not None:
                out.append((name, case))
    return out


def _ids(cases):
    return [f"{m}-{c.id}" for m, c in cases]


def sample_ranks(method, spec, n: int = 4) -> list:
    """Ranks spread along the method's rank path, smallest to largest."""
    path = method.rank_path(spec)
    if len(path) <= n:
        return path
    idx = sorted({round(i * (len(path) - 1) / (n - 1)) for i in range(n)})
    return [path[i] for i in idx]


def build(method, layer, rank, calibration=None):
    factors = method.factorize(layer, None, None if method.nested else rank)
    return method.build(layer, factors, rank)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# ---------------------------------------------------------------------- the contract, one check each
def check_shape(method, case):
    layer, x = case.build()
    spec = layer_spec(layer)
    for rank in sample_ranks(method, spec, 3):
        out = build(method, layer, rank)(x)
        assert out.shape == layer(x).shape, (rank, out.shape)


def check_exact_at_max_rank(method, case):
    layer, x = case.build()
    spec = layer_spec(layer)
    rank = method.max_rank(spec)
    with torch.no_grad():
        y, y2 = layer(x), build(method, layer, rank)(x)
    if method.exact_at_max_rank:
        assert torch.allclose(y2, y, atol=1e-4 * max(1.0, float(y.abs().max())), rtol=1e-4), float((y2 - y).abs().max())
    else:
        assert rel_err(y2, y) < 0.5  # an approximate method still approximates at its largest rank


def check_error_does_not_grow(method, case):
    layer, _ = case.build()
    spec = layer_spec(layer)
    # many input rows, so the output error tracks the weight error
    shape = list(case.input_shape)
    shape[0] = 64
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = layer(x)
        errs = [rel_err(build(method, layer, r)(x), y) for r in sample_ranks(method, spec, 4)]
    if method.nested:
        for a, b in zip(errs, errs[1:]):
            assert b <= a * (1 + 1e-3) + 1e-6, errs
    else:
        assert errs[-1] <= errs[0] + 1e-6, errs
    assert errs[0] > 0 or method.max_rank(spec) in (1, (1, 1))


def check_cost_matches_fvcore_and_numel(method, case):
    layer, x = case.build()
    spec = layer_spec(layer)
    for rank in sample_ranks(method, spec, 3):
        rep = build(method, layer, rank)
        cost = method.cost(layer, rank, tuple(x.shape))
        assert cost.flops == fvcore_flops(rep, x), (rank, cost)
        assert cost.params == n_params(rep), (rank, cost)
    # and the dense formula matches fvcore on the original layer (with the handle autorank
    # adds for padding='same', which plain fvcore counts as zero)
    dense = methods.dense_cost(layer, tuple(x.shape))
    assert dense.flops == count_flops(layer, x) == count_flops_torch(layer, x)
    assert dense.params == n_params(layer)


def check_rank_for_keeps_flops_fraction(method, case):
    layer, x = case.build()
    shape = tuple(x.shape)
    dense = methods.dense_cost(layer, shape).flops
    smallest = method.rank_path(layer_spec(layer))[0]
    previous = None
    for rho in (0.05, 0.2, 0.5, 0.8, 1.0):
        rank = method.resolve_rank(layer, rho, shape)
        flops = method.cost(layer, rank, shape).flops
        assert flops <= rho * dense or rank == smallest, (rho, rank, flops, dense)
        if previous is not None:
            assert flops >= previous  # more kept FLOPs never gives a smaller replacement
        previous = flops


def check_gradients_flow(method, case):
    layer, x = case.build()
    rank = method.rank_path(layer_spec(layer))[len(method.rank_path(layer_spec(layer))) // 2]
    rep = build(method, layer, rank)
    x = x.clone().requires_grad_(True)
    rep(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in rep.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def check_skeleton_is_meta_with_same_shapes(method, case):
    layer, _ = case.build()
    rank = method.rank_path(layer_spec(layer))[0]
    real = build(method, layer, rank)
    skel = method.build(layer, None, rank)
    assert all(p.device.type == "meta" for p in skel.parameters())
    assert {k: tuple(v.shape) for k, v in skel.state_dict().items()} == {k: tuple(v.shape) for k, v in real.state_dict().items()}


class Holder(nn.Module):
    """A user model with no special attribute or base class: the layer behind an activation."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.body = nn.ModuleDict({"layer": layer})
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(self.body["layer"](x))


def check_save_load_round_trip(method, case, tmp_path):
    layer, x = case.build()
    model = Holder(layer)
    rank = method.rank_path(layer_spec(layer))[0]
    small = autorank.decompose(model, {"layers": {"body.layer": {"method": method.name, "rank": rank if not isinstance(rank, tuple) else list(rank)}}})
    assert isinstance(small.body["layer"], methods.Decomposed)
    assert model.body["layer"] is layer  # the input model is untouched
    path = tmp_path / f"{method.name}.pt"
    autorank.save(small, path)
    torch.load(path, weights_only=True)  # no pickled code
    loaded = autorank.load(path, model=Holder(case.make()))
    small.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


CHECKS = [
    check_shape,
    check_exact_at_max_rank,
    check_error_does_not_grow,
    check_cost_matches_fvcore_and_numel,
    check_rank_for_keeps_flops_fraction,
    check_gradients_flow,
    check_skeleton_is_meta_with_same_shapes,
]

CASES = contract_cases()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__[6:])
@pytest.mark.parametrize("method_name,case", CASES, ids=_ids(CASES))
def test_contract(method_name, case, check):
    check(methods.get(method_name), case)


@pytest.mark.parametrize("method_name,case", CASES, ids=_ids(CASES))
def test_contract_save_load(method_name, case, tmp_path):
    check_save_load_round_trip(methods.get(method_name), case, tmp_path)


REFUSALS = refusal_cases()


@pytest.mark.parametrize("method_name,case", REFUSALS, ids=_ids(REFUSALS))
def test_refusal_has_a_reason_and_raises_naming_the_layer(method_name, case):
    method = methods.get(method_name)
    layer, _ = case.build()
    reason = method.applies(layer)
    assert isinstance(reason, str) and len(reason) > 5
    model = Holder(layer)
    with pytest.raises(NotApplicableError, match="body.layer"):
        autorank.decompose(model, {"layers": {"body.layer": {"method": method_name, "rank": 0.5}}})


@pytest.mark.parametrize("method_name", methods.available())
def test_every_claimed_layer_kind_is_exercised(method_name):
    """The catalogue covers each layer kind a method claims (so the contract cannot silently skip one)."""
    method = methods.get(method_name)
    covered = {layer_kind(c.make()) for m, c in CASES if m == method_name}
    assert set(method.layer_kinds) <= covered, (method.layer_kinds, covered)
    assert method.reference and "References" in (type(method).__doc__ or "")


@pytest.mark.parametrize("method_name,case", CASES[:1] + [c for c in CASES if c[1].id.startswith("conv-3x3")],
                         ids=lambda v: str(v) if isinstance(v, str) else v.id)
def test_rank_out_of_range_is_refused(method_name, case):
    method = methods.get(method_name)
    layer, _ = case.build()
    spec = layer_spec(layer)
    mx = method.max_rank(spec)
    too_big = tuple(m + 1 for m in mx) if isinstance(mx, tuple) else mx + 1
    for bad in (0, -3, too_big, 1.5, 0.0, True, "many"):
        with pytest.raises(RankError):
            method.resolve_rank(layer, bad, name="x")


# ---------------------------------------------------------------------- a new method joins the contract
class RowSubspace(methods.BaseMethod):
    """Projection onto the leading right singular vectors, kept as one Linear then the original weight.

    A real, deliberately different method (``W ≈ (W V_r) V_rᵀ``) used only to show
    that registering a method is enough for the contract to cover it.

    References
    ----------
    - Test-only method, after Denton et al. 2014.
    """

    name = "row-subspace"
    layer_kinds = ("linear",)
    nested = True
    structure = "Linear in→r (V_rᵀ), Linear r→out (W V_r)"
    reference = "test only"

    def max_rank(self, spec):
        return min(spec.in_channels, spec.out_channels)

    def _cost(self, spec, rank, input_shape):
        rows = math.prod(input_shape[:-1])
        bias = spec.out_channels if spec.bias else 0
        return methods.Cost(rank * (spec.in_channels + spec.out_channels) + bias, rows * rank * (spec.in_channels + spec.out_channels))

    def _factorize(self, module, spec, stats, rank, options):
        w = module.weight.detach().double()
        _, _, vh = torch.linalg.svd(w, full_matrices=False)
        return methods.Factors({"v": vh.T, "wv": w @ vh.T})

    def _build(self, spec, factors, rank, options, bias, device, dtype):
        from autorank.methods._layers import make_linear

        v = None if factors is None else factors.tensors["v"][:, :rank].T
        wv = None if factors is None else factors.tensors["wv"][:, :rank]
        return [
            make_linear(spec.in_channels, rank, weight=v, device=device, dtype=dtype),
            make_linear(rank, spec.out_channels, weight=wv, bias=bias, has_bias=spec.bias, device=device, dtype=dtype),
        ]


def test_a_method_registered_later_is_checked_by_the_same_contract(tmp_path):
    methods.register(RowSubspace)
    try:
        assert "row-subspace" in methods.available()
        mine = [(m, c) for m, c in contract_cases() if m == "row-subspace"]
        assert {c.id for _, c in mine} == {"linear-13x9-3d-input", "linear-nobias-9x20"}
        for _, case in mine:
            for check in CHECKS:
                check(methods.get("row-subspace"), case)
            check_save_load_round_trip(methods.get("row-subspace"), case, tmp_path)
    finally:
        methods.unregister("row-subspace")
    assert "row-subspace" not in methods.available()


def test_a_broken_method_fails_the_contract():
    """The contract bites: a method whose cost formula forgets a factor is caught."""

    class Broken(RowSubspace):
        name = "broken"

        def _cost(self, spec, rank, input_shape):
            c = super()._cost(spec, rank, input_shape)
            return methods.Cost(c.params, c.flops - 1)

    case = LAYER_CASES[0]
    with pytest.raises(AssertionError):
        check_cost_matches_fvcore_and_numel(Broken(), case)


# ---------------------------------------------------------------------- properties over random shapes and ranks
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_in=st.integers(1, 40),
    n_out=st.integers(1, 40),
    rows=st.integers(1, 6),
    bias=st.booleans(),
    conv1d=st.booleans(),
    data=st.data(),
)
def test_property_svd_linear(n_in, n_out, rows, bias, conv1d, data):
    layer = gpt2_conv1d_class()(n_out, n_in) if conv1d else nn.Linear(n_in, n_out, bias=bias)
    method = methods.get("svd")
    spec = layer_spec(layer)
    rank = data.draw(st.integers(1, method.max_rank(spec)), label="rank")
    x = torch.randn(rows, 3, n_in)
    rep = build(method, layer, rank)
    with torch.no_grad():
        y, y2 = layer(x), rep(x)
    assert y2.shape == y.shape
    assert method.cost(layer, rank, tuple(x.shape)).flops == fvcore_flops(rep, x)
    assert method.cost(layer, rank, tuple(x.shape)).params == n_params(rep)
    if rank == method.max_rank(spec):
        assert torch.allclose(y2, y, atol=1e-4, rtol=1e-4)


@st.composite
def conv_layers(draw):
    groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
    c = groups * draw(st.integers(1, 5))
    n = groups * draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    h = draw(st.integers(dh * (kh - 1) + 1 + 2, 14))
    w = draw(st.integers(dw * (kw - 1) + 1 + 2, 14))
    if mode == "reflect":  # reflect padding needs pad < size
        ph, pw = min(ph, h - 1), min(pw, w - 1)
    layer = nn.Conv2d(c, n, (kh, kw), stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), groups=groups,
                      bias=draw(st.booleans()), padding_mode=mode)
    return layer, (draw(st.integers(1, 2)), c, h, w)


@pytest.mark.parametrize("method_name", [m for m in methods.available() if "conv2d" in methods.get(m).layer_kinds])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(layer_shape=conv_layers(), data=st.data())
def test_property_conv(method_name, layer_shape, data):
    layer, shape = layer_shape
    method = methods.get(method_name)
    if method.applies(layer) is not None:
        with pytest.raises(NotApplicableError):
            method.check_applies(layer)
        return
    spec = layer_spec(layer)
    path = method.rank_path(spec)
    if not method.nested:
        path = path[: min(len(path), 12)]  # CP-ALS per rank: keep examples quick
    rank = data.draw(st.sampled_from(path), label="rank")
    x = torch.randn(shape)
    rep = build(method, layer, rank)
    with torch.no_grad():
        y, y2 = layer(x), rep(x)
    assert y2.shape == y.shape
    cost = method.cost(layer, rank, shape)
    assert cost.flops == fvcore_flops(rep, x)
    assert cost.params == n_params(rep)
    if method.exact_at_max_rank and rank == method.max_rank(spec):
        assert torch.allclose(y2, y, atol=1e-4, rtol=1e-4)
    # ρ maps to a rank whose cost stays within the fraction (or the smallest rank)
    rho = data.draw(st.floats(0.01, 1.0), label="rho")
    r = method.resolve_rank(layer, rho, shape)
    assert method.cost(layer, r, shape).flops <= rho * methods.dense_cost(layer, shape).flops or r == path[0]
