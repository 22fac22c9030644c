"""Tests specific to the tensor-network and structured methods: tt, tr, btd, dcf.

The shared contract (tests/test_contract.py) already checks shapes, cost against
fvcore, exactness and save/load for every registered method on small layers;
these check what is particular to each of the four methods, on layers big
enough for the particular structure to show (several channel factors, several
blocks).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import autorank
from autorank import methods
from autorank.errors import NotApplicableError, RankError
from autorank.methods import layer_spec
from autorank.methods._tensor_network import (
    balanced_factors,
    network_full,
    train_layout,
    tt_svd_full,
    tt_truncate,
)
from autorank.methods.btd import btd_fit, default_blocks
from autorank.methods.dcf import FixedBasisConv2d, dct_basis
from autorank.methods.tr import ring_error, tr_svd
from tests.conftest import fvcore_flops, n_params


def _build(name: str, layer: nn.Module, rank):
    m = methods.get(name)
    factors = m.factorize(layer, None, None if m.nested else rank)
    return m.build(layer, factors, rank)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.shapes.append(tuple(t.shape))
        return out


# ---------------------------------------------------------------------- tt: layouts
def test_balanced_factors_split_dimensions_evenly():
    assert balanced_factors(768, 3) == (8, 8, 12)
    assert balanced_factors(3072, 3) == (12, 16, 16)
    assert balanced_factors(64, 2) == (8, 8)
    assert balanced_factors(13, 2) == (1, 13)
    for n in (1, 7, 96, 1000, 4096):
        for d in (1, 2, 3, 4):
            f = balanced_factors(n, d)
            assert len(f) == d and math.prod(f) == n and list(f) == sorted(f)


def test_tt_matrix_layout_of_bert_shapes():
    lay = train_layout(layer_spec(nn.Linear(768, 3072)))
    assert lay.in_factors == (8, 8, 12) and lay.out_factors == (16, 16, 12)
    assert lay.modes == (128, 128, 144)
    lay = train_layout(layer_spec(nn.Linear(3072, 768)))
    assert lay.in_factors == (12, 16, 16) and lay.out_factors == (12, 8, 8)
    conv = train_layout(layer_spec(nn.Conv2d(64, 128, 3)))
    assert conv.in_factors == (8, 8) and conv.out_factors == (8, 16) and conv.modes == (8, 8, 9, 8, 16)
    assert conv.bounds == (8, 64, 128, 16)


@pytest.mark.parametrize("name", ["tt", "tr"])
def test_tensor_network_refuses_prime_and_tiny_dimensions_with_a_reason(name):
    m = methods.get(name)
    reason = m.applies(nn.Linear(1031, 64))
    assert reason is not None and "1031" in reason and "prime" in reason
    reason = m.applies(nn.Linear(96, 1031))
    assert reason is not None and "out_features=1031" in reason
    assert "too small" in m.applies(nn.Linear(1, 5))
    assert "depthwise" in m.applies(nn.Conv2d(8, 8, 3, groups=8))
    assert "1x1" in m.applies(nn.Conv2d(8, 8, 1))
    assert m.applies(nn.Linear(13, 9)) is None  # small primes are fine: a factor of 1 on one side
    model = nn.Sequential(nn.Linear(1031, 4))
    with pytest.raises(NotApplicableError, match="1031"):
        autorank.decompose(model, {"layers": {"0": {"method": name, "rank": 0.5}}})


# ---------------------------------------------------------------------- tt: the mathematics
def _direct_tt_svd(a: torch.Tensor, ranks: list[int]) -> list[torch.Tensor]:
    """Oseledets' TT-SVD, left to right with truncation at every step (the reference)."""
    dims, cores, r, cur = a.shape, [], 1, a
    for k in range(len(dims) - 1):
        u, s, vh = torch.linalg.svd(cur.reshape(r * dims[k], -1), full_matrices=False)
        t = ranks[k]
        cores.append(u[:, :t].reshape(r, dims[k], t))
        cur, r = s[:t, None] * vh[:t], t
    cores.append(cur.reshape(r, dims[-1], 1))
    return cores


def test_tt_truncation_of_the_full_train_is_the_truncated_tt_svd():
    a = torch.randn(4, 6, 5, 3, dtype=torch.float64)
    full = tt_svd_full(a)
    assert torch.allclose(network_full(full), a, atol=1e-10)
    assert [c.shape[2] for c in full[:-1]] == [4, 15, 3]  # the bounds min(left, right)
    for ranks in ([2, 3, 2], [4, 10, 3], [1, 1, 1]):
        cut = network_full(tt_truncate(full, ranks))
        ref = network_full(_direct_tt_svd(a, ranks))
        assert torch.allclose(cut, ref, atol=1e-9), ranks


def test_tt_nested_error_never_grows_on_a_multi_factor_conv():
    layer = nn.Conv2d(32, 48, 3, padding=1)
    m = methods.get("tt")
    spec = layer_spec(layer)
    assert len(train_layout(spec).in_factors) == 2 and len(train_layout(spec).out_factors) == 2
    factors = m.factorize(layer)
    x = torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        y = layer(x)
        errs = [_rel(m.build(layer, factors, r)(x), y) for r in (1, 2, 4, 8, 16, 32, 48)]
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-5 and m.max_rank(spec) == 48


def test_tt_linear_forward_never_materialises_the_weight():
    layer = nn.Linear(768, 3072)
    rep = _build("tt", layer, 8)
    x = torch.randn(1, 768)
    mode = _LargestOutput()
    with torch.no_grad(), mode:
        rep(x)
    assert mode.largest < 768 * 3072 // 20, mode.largest
    assert (3072, 768) not in mode.shapes and (768, 3072) not in mode.shapes
    cost = methods.get("tt").cost(layer, 8, (1, 768))
    assert n_params(rep) == cost.params < 768 * 3072 // 20
    assert cost.flops == fvcore_flops(rep, x)


@pytest.mark.parametrize("name,rank", [("tt", 6), ("tr", 3)])
def test_tensor_network_conv_never_materialises_the_kernel(name, rank):
    layer = nn.Conv2d(64, 64, 3, padding=1)
    rep = _build(name, layer, rank)
    assert not any(isinstance(mod, nn.Conv2d) and mod.weight.shape[0] * mod.weight.shape[1] >= 64 * 64
                   for mod in rep.modules())
    x = torch.randn(1, 64, 2, 2)
    mode = _LargestOutput()
    with torch.no_grad(), mode:
        rep(x)
    assert (64, 64, 3, 3) not in mode.shapes and mode.largest < 64 * 64 * 9 // 4
    cost = methods.get(name).cost(layer, rank, tuple(x.shape))
    assert cost.flops == fvcore_flops(rep, x) and cost.params == n_params(rep)


@pytest.mark.parametrize("name", ["tt", "tr"])
def test_tensor_network_output_equals_the_dense_layer_of_its_cores(name):
    """The chain of small ops computes exactly the layer its cores describe (ring closed correctly)."""
    m = methods.get(name)
    for layer, x in ((nn.Linear(48, 40), torch.randn(3, 48)), (nn.Conv2d(24, 20, (3, 2), stride=(2, 1), padding=1),
                                                             torch.randn(2, 24, 7, 6))):
        spec = layer_spec(layer)
        lay = train_layout(spec)
        rank = 3
        factors = m.factorize(layer, None, rank)
        rep = m.build(layer, factors, rank)
        cores = [factors.tensors[f"core{k}"] for k in range(lay.n_cores)] if name == "tr" else tt_truncate(
            [factors.tensors[f"core{k}"] for k in range(lay.n_cores)], [min(rank, b) for b in lay.bounds])
        full = network_full(cores).float()
        if lay.kind == "matrix":
            d = len(lay.in_factors)
            w = full.reshape([f for k in range(d) for f in (lay.out_factors[k], lay.in_factors[k])])
            w = w.permute(list(range(0, 2 * d, 2)) + list(range(1, 2 * d, 2))).reshape(40, 48)
            ref = F.linear(x, w, layer.bias)
        else:
            w = full.reshape(24, 3, 2, 20).permute(3, 0, 1, 2)
            ref = F.conv2d(x, w, layer.bias, stride=(2, 1), padding=1)
        with torch.no_grad():
            assert torch.allclose(rep(x), ref, atol=1e-5), name


def test_tt_rank_tuple_sets_each_bond():
    layer = nn.Linear(768, 768)
    m = methods.get("tt")
    spec = layer_spec(layer)
    assert train_layout(spec).bounds == (96, 96)
    rank = m.resolve_rank(layer, [4, 9])
    assert rank == (4, 9)
    rep = m.build(layer, m.factorize(layer), rank)
    assert rep[0].ranks == (1, 4, 9, 1)
    with pytest.raises(RankError, match="2 integers"):
        m.resolve_rank(layer, [4, 9, 2], name="x")
    with pytest.raises(RankError, match="out of range"):
        m.resolve_rank(layer, [97, 4], name="x")


# ---------------------------------------------------------------------- tr
def test_tr_svd_of_a_matrix_is_exact_when_the_ring_holds_its_rank():
    a = torch.randn(6, 10, dtype=torch.float64)
    cores = tr_svd(a, (2, 3, 2))  # R·r1 = 6 = rank
    assert torch.allclose(network_full(cores), a, atol=1e-10)
    # ring_error works from the normal equations (‖A‖² − 2⟨A, R⟩ + ‖R‖²), which resolve a relative
    # error only down to about sqrt(float64 eps) ≈ 1.5e-8; 1e-10 passed or failed with the BLAS build
    assert ring_error(a, cores) < 1e-7


def test_tr_is_never_worse_than_tt_of_the_same_inner_ranks():
    torch.manual_seed(3)
    layer = nn.Conv2d(16, 24, 3, padding=1)
    x = torch.randn(4, 16, 6, 6)
    with torch.no_grad():
        y = layer(x)
        for r in (2, 4, 8):
            err_tt = _rel(_build("tt", layer, r)(x), y)
            err_tr = _rel(_build("tr", layer, r)(x), y)
            assert err_tr <= err_tt + 1e-4, (r, err_tr, err_tt)


def test_tr_ring_bond_multiplies_the_cost_and_factors_record_the_init():
    layer = nn.Linear(64, 64)
    tt, tr = methods.get("tt"), methods.get("tr")
    spec = layer_spec(layer)
    assert tr.cost(spec, (1, 8), (1, 64)) == tt.cost(spec, 8, (1, 64))  # a ring of bond 1 is a train
    assert tr.cost(spec, (4, 8), (1, 64)).params > tt.cost(spec, 8, (1, 64)).params
    f = tr.factorize(layer, None, 4)
    assert f.meta["init"] in ("tt-svd", "tr-svd") and f.meta["ranks"] == [4, 4, 4]
    assert not tr.nested and tr.is_nested(None) is False


# ---------------------------------------------------------------------- btd
def test_btd_with_one_block_equals_tucker2():
    layer = nn.Conv2d(12, 10, 3, padding=1)
    x = torch.randn(2, 12, 7, 7)
    with torch.no_grad():
        for r1, r2 in ((3, 4), (6, 2), (12, 10)):
            a = _build("btd", layer, (1, r1, r2))(x)
            b = _build("tucker2", layer, (r1, r2))(x)
            assert torch.allclose(a, b, atol=1e-5), (r1, r2)


def test_btd_structure_is_one_grouped_conv_between_two_pointwise():
    layer = nn.Conv2d(16, 24, 3, stride=2, padding=1)
    rep = _build("btd", layer, (4, 3, 5))
    first, core, last = rep
    assert first.kernel_size == (1, 1) and first.out_channels == 12
    assert core.groups == 4 and core.in_channels == 12 and core.out_channels == 20 and core.stride == (2, 2)
    assert last.in_channels == 20 and last.out_channels == 24 and last.bias is not None


def test_btd_more_blocks_and_sweeps_lower_the_error():
    torch.manual_seed(1)
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64)
    errs = [btd_fit(w, g, 2, 2, sweeps=0)[3] for g in (1, 2, 4)]
    assert errs[0] > errs[1] > errs[2]
    greedy = btd_fit(w, 4, 2, 2, sweeps=0)[3]
    swept = btd_fit(w, 4, 2, 2, sweeps=3)[3]
    assert swept <= greedy + 1e-12
    # the blocks sum to the layer: reconstruct from the factors
    u_in, core, u_out, rel, _ = btd_fit(w, 4, 4, 4, sweeps=1)
    recon = torch.einsum("gbahw,gnb,gca->nchw", core, u_out, u_in)
    assert abs(float((recon - w).norm() / w.norm()) - rel) < 1e-9


def test_btd_ranks_path_and_refusals():
    m = methods.get("btd")
    layer = nn.Conv2d(16, 24, 3, padding=1)
    spec = layer_spec(layer)
    assert default_blocks(spec) == 4
    path = m.rank_path(spec)
    assert path[0] == (4, 1, 1) and path[-1] == m.max_rank(spec) == (1, 16, 24)
    costs = [m.cost(spec, r, (2, 16, 9, 9)).flops for r in path]
    assert costs == sorted(costs)
    assert m.resolve_rank(layer, (2, 5)) == (2, 5, 5)
    assert m.resolve_rank(layer, 3) == (4, 3, 3)
    with pytest.raises(RankError, match="g·r1 <= 16"):
        m.resolve_rank(layer, (4, 5, 5), name="conv")
    for rho in (0.1, 0.3, 0.6):
        r = m.resolve_rank(layer, rho, (1, 16, 32, 32))
        assert m.cost(spec, r, (1, 16, 32, 32)).flops <= rho * methods.dense_cost(spec, (1, 16, 32, 32)).flops
    reason = m.applies(nn.Linear(8, 8))
    assert "Linear" in reason and "not implemented" in reason
    assert "1x1" in m.applies(nn.Conv2d(8, 8, 1))


# ---------------------------------------------------------------------- dcf
def test_dct_basis_is_orthonormal_and_lowest_frequency_first():
    b = dct_basis(3, 3).reshape(9, 9)
    assert torch.allclose(b @ b.T, torch.eye(9, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(dct_basis(3, 3)[0], torch.full((3, 3), 1 / 3, dtype=torch.float64))
    # a constant filter needs one element, a horizontal ramp the second or third
    sizes = [float(dct_basis(5, 5)[k].diff(dim=0).abs().sum() + dct_basis(5, 5)[k].diff(dim=1).abs().sum()) for k in range(25)]
    assert sizes[0] == 0 and sizes[1] < sizes[-1]


def test_dcf_exact_at_full_basis_and_error_decreases_with_k():
    layer = nn.Conv2d(6, 10, 3, stride=2, padding=1, padding_mode="reflect")
    m = methods.get("dcf")
    factors = m.factorize(layer)
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        y = layer(x)
        errs = [_rel(m.build(layer, factors, k)(x), y) for k in range(1, 10)]
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-5 and errs[0] > 0.1


def test_dcf_coefficients_are_the_least_squares_fit():
    layer = nn.Conv2d(4, 5, 3)
    m = methods.get("dcf")
    coef = m.factorize(layer).tensors["coef"]
    basis = dct_basis(3, 3)[:4].reshape(4, 9).T  # (9, K)
    w = layer.weight.detach().double().reshape(20, 9).T
    lstsq = torch.linalg.lstsq(basis, w).solution.T.reshape(5, 4, 4)
    assert torch.allclose(coef[:, :, :4], lstsq, atol=1e-10)


def test_dcf_basis_is_a_buffer_and_coefficients_are_parameters():
    layer = nn.Conv2d(8, 16, 3, padding=1)
    rep = _build("dcf", layer, 4)
    fixed, mix = rep
    assert isinstance(fixed, FixedBasisConv2d)
    assert list(fixed.parameters()) == [] and "basis" in dict(fixed.named_buffers())
    assert fixed.basis.shape == (8 * 4, 1, 3, 3) and not fixed.basis.requires_grad
    assert "0.basis" in rep.state_dict()
    assert mix.weight.requires_grad and mix.weight.shape == (16, 32, 1, 1)
    assert n_params(rep) == 16 * 8 * 4 + 16 == methods.get("dcf").cost(layer, 4).params
    # training moves the coefficients, never the basis
    before = fixed.basis.clone()
    opt = torch.optim.SGD(rep.parameters(), lr=0.1)
    rep(torch.randn(2, 8, 5, 5)).square().mean().backward()
    opt.step()
    assert torch.equal(fixed.basis, before)
    # the skeleton keeps a real basis and meta coefficients
    skel = methods.get("dcf").build(layer, None, 4)
    assert skel[0].basis.device.type == "cpu" and skel[1].weight.device.type == "meta"


def test_dcf_refusals_and_rank_for():
    m = methods.get("dcf")
    assert "1x1" in m.applies(nn.Conv2d(8, 8, 1))
    assert "depthwise" in m.applies(nn.Conv2d(8, 8, 3, groups=8))
    assert "grouped" in m.applies(nn.Conv2d(8, 8, 3, groups=2))
    layer = nn.Conv2d(64, 64, 3, padding=1)
    assert m.max_rank(layer_spec(layer)) == 9
    # kept fraction K·(1/9 + 1/64): K = 3 keeps 0.38, K = 4 would keep 0.507
    assert m.resolve_rank(layer, 0.5) == 3 and m.resolve_rank(layer, 0.51) == 4
    with pytest.raises(RankError):
        m.resolve_rank(layer, 10, name="x")
