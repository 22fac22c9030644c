"""Data-aware initialisation: the factors minimise the output error on the calibration inputs.

For a rank-r replacement W' of a layer W and inputs X (rows x, or unfolded patches
for a convolution), min over rank-r W' of ||(W - W') X|| is reached and equals the
tail of the singular values of W X (project W X on its top r left singular
vectors). The data-aware SVD must reach it, robustly, and never do worse than the
plain SVD.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autorank
from autorank import FactorCache


def _decompose(net: nn.Module, rank, calibration=None, method="svd", options=None) -> nn.Module:
    entry = {"method": method, "rank": rank}
    if options is not None:
        entry["options"] = options
    return autorank.decompose(net, {"layers": {"0": entry}}, calibration=calibration, cache=FactorCache())


def _output_error(net: nn.Module, small: nn.Module, x: torch.Tensor) -> float:
    """||layer(x) - replacement(x)|| in float64 (the biases are the same and cancel)."""
    a, b = copy.deepcopy(net).double().eval(), copy.deepcopy(small).double().eval()
    with torch.no_grad():
        return float((a(x.double()) - b(x.double())).norm())


def _rows(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's weight as a matrix W (out x d) and the matrix X (d x rows) it multiplies."""
    layer = net[0]
    x = x.double()
    if isinstance(layer, nn.Linear):
        return layer.weight.double(), x.reshape(-1, layer.in_features).T
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    return layer.weight.double().reshape(layer.out_channels, -1), cols.permute(1, 0, 2).reshape(cols.shape[1], -1)


@torch.no_grad()
def _optimal_error(net: nn.Module, x: torch.Tensor, r: int) -> tuple[float, float]:
    """(min over rank-r W' of ||(W - W') X||, ||W X||)."""
    w, xm = _rows(net, x)
    s = torch.linalg.svdvals(w @ xm)
    return float(s[r:].square().sum().sqrt()), float(s.square().sum().sqrt())


def _params_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _finite(m: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in m.parameters())


def _correlated_features(shape_rows: tuple[int, ...], d: int, sources: int, noise: float, seed: int) -> torch.Tensor:
    """Inputs that live near a `sources`-dimensional subspace, with scales spread over 3 decades."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape_rows, sources, generator=g) * torch.logspace(1, -2, sources)
    mix = torch.randn(sources, d, generator=g)
    return z @ mix + noise * torch.randn(*shape_rows, d, generator=g)


def _smooth_images(batch: int, channels: int, scales: list[float], size: int = 10, seed: int = 2) -> torch.Tensor:
    """Feature maps mixed from a few smooth sources of very different scales: correlated across
    channels and across neighbouring pixels, as in real images."""
    g = torch.Generator().manual_seed(seed)
    k = len(scales)
    src = F.interpolate(torch.randn(batch, k, 4, 4, generator=g), size=(size, size), mode="bilinear", align_corners=True)
    src = src * torch.tensor(scales).view(1, k, 1, 1)
    x = torch.einsum("bshw,sc->bchw", src, torch.randn(k, channels, generator=g))
    return x + 0.01 * torch.randn(batch, channels, size, size, generator=g)


def _linear(d_in=64, d_out=48, seed=3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out))


# ---------------------------------------------------------------------- better than the plain SVD


@pytest.mark.parametrize("rank", [2, 6, 12])
def test_linear_data_aware_reaches_the_optimal_output_error(rank):
    net = _linear()
    x = _correlated_features((16, 25), 64, sources=10, noise=0.01, seed=1)  # (batch, tokens, features)
    plain = _decompose(net, rank)
    aware = _decompose(net, rank, calibration=x)
    e_plain, e_aware = _output_error(net, plain, x), _output_error(net, aware, x)
    optimal, total = _optimal_error(net, x, rank)
    assert e_aware <= optimal * (1 + 1e-4) + 1e-6 * total
    assert e_aware <= 0.5 * e_plain, (e_aware, e_plain)  # a clear margin on such inputs


def test_held_out_inputs_of_the_same_distribution_also_gain():
    """The gain is not overfitting to the calibration rows."""
    net = _linear()
    g = torch.Generator().manual_seed(5)
    mix = torch.randn(6, 64, generator=g)

    def sample(n):
        return (torch.randn(n, 6, generator=g) * torch.logspace(1, -1, 6)) @ mix + 0.01 * torch.randn(n, 64, generator=g)

    fit, held_out = sample(400), sample(400)
    plain, aware = _decompose(net, 4), _decompose(net, 4, calibration=fit)
    assert _output_error(net, aware, held_out) <= 0.5 * _output_error(net, plain, held_out)


@pytest.mark.parametrize("config", [{"padding": 1}, {"padding": 2, "stride": 2, "dilation": 2}], ids=["plain", "strided-dilated"])
@pytest.mark.parametrize("rank", [3, 8])
def test_conv_data_aware_reaches_the_optimal_output_error(rank, config):
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, **config))
    x = _smooth_images(6, 8, [10.0, 1.0, 0.1])
    plain = _decompose(net, rank)
    aware = _decompose(net, rank, calibration=x)
    e_plain, e_aware = _output_error(net, plain, x), _output_error(net, aware, x)
    optimal, total = _optimal_error(net, x, rank)
    assert e_aware <= optimal * (1 + 1e-4) + 1e-6 * total
    assert e_aware <= 0.7 * e_plain, (e_aware, e_plain)  # a clear margin
    assert autorank.plan_of(aware).layers["0"].rank == rank


def test_grouped_conv_data_aware_no_worse_than_plain():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, groups=2))
    x = _smooth_images(4, 8, [5.0, 0.2], size=9, seed=3)
    for rank in (1, 2, 4):
        e_plain = _output_error(net, _decompose(net, rank), x)
        e_aware = _output_error(net, _decompose(net, rank, calibration=x), x)
        assert e_aware <= e_plain * (1 + 1e-6), rank
    assert e_aware <= 0.5 * e_plain


# ---------------------------------------------------------------------- Gram matrix not positive definite


@pytest.mark.parametrize("case", ["3-samples", "1-sample", "duplicated-features", "constant-feature-zero"])
@pytest.mark.parametrize("rank", [1, 2, 8])
def test_singular_gram_gives_finite_near_optimal_factors(case, rank):
    net = _linear()
    g = torch.Generator().manual_seed(9)
    if case == "3-samples":
        x = torch.randn(3, 64, generator=g)
    elif case == "1-sample":
        x = torch.randn(1, 64, generator=g)
    elif case == "duplicated-features":
        half = _correlated_features((200,), 32, sources=32, noise=0.0, seed=4)
        x = torch.cat([half, half], dim=1)  # feature j and j + 32 identical
    else:
        x = torch.randn(100, 64, generator=g)
        x[:, 10:30] = 0.0  # twenty features never active
    aware = _decompose(net, rank, calibration=x)
    assert _finite(aware)
    e_aware = _output_error(net, aware, x)
    e_plain = _output_error(net, _decompose(net, rank), x)
    optimal, total = _optimal_error(net, x, rank)
    assert e_aware <= optimal * (1 + 1e-3) + 1e-5 * total, (e_aware, optimal, total)
    assert e_aware <= e_plain * (1 + 1e-6) + 1e-5 * total
    # the replacement stays sane off the calibration subspace: no exploding weights
    w_eff = (aware[0][1].weight @ aware[0][0].weight).detach().double()
    assert float(w_eff.norm()) < 10 * float(net[0].weight.detach().norm())


# ---------------------------------------------------------------------- inputs that cannot be used


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("bad", ["zeros", "nan"])
def test_unusable_inputs_fall_back_to_the_plain_svd(caplog, kind, bad):
    torch.manual_seed(8)
    if kind == "linear":
        net, x, rank = nn.Sequential(nn.Linear(20, 16)), torch.zeros(30, 20), 4
    else:
        net, x, rank = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)), torch.zeros(2, 4, 6, 6), 3
    if bad == "nan":
        x = torch.randn_like(x)
        x.view(-1)[5] = float("nan")
    plain = _decompose(net, rank)
    with caplog.at_level(logging.WARNING, logger="autorank"):
        fallback = _decompose(net, rank, calibration=x)
    assert _params_equal(fallback, plain)  # the plain SVD itself, never a random layer
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("plain SVD" in m for m in warnings), warnings


def test_data_aware_option_off_gives_the_plain_svd():
    net = _linear()
    x = _correlated_features((100,), 64, sources=5, noise=0.01, seed=2)
    off = _decompose(net, 5, calibration=x, options={"data_aware": False})
    assert _params_equal(off, _decompose(net, 5))
    assert not _params_equal(off, _decompose(net, 5, calibration=x))


# ---------------------------------------------------------------------- determinism and input forms


def test_deterministic_and_independent_of_batching():
    net = _linear()
    x = _correlated_features((120,), 64, sources=8, noise=0.05, seed=6)
    a = _decompose(net, 6, calibration=x)
    b = _decompose(net, 6, calibration=x)
    assert _params_equal(a, b)
    batches = _decompose(net, 6, calibration=[x[:50], x[50:]])
    loader = _decompose(net, 6, calibration=torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=32))
    for other in (batches, loader):
        for (k, p), (_, q) in zip(a.state_dict().items(), other.state_dict().items()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=k)


def test_calibration_on_a_deeper_layer_uses_that_layers_inputs():
    """The Gram matrix is of the inputs the layer sees inside the model, not of the model's inputs."""
    torch.manual_seed(11)
    first = nn.Linear(16, 32)
    net = nn.Sequential(first, nn.ReLU(), nn.Linear(32, 24))
    x = torch.randn(300, 16)
    with torch.no_grad():
        hidden = torch.relu(first(x))
    small = autorank.decompose(net, {"layers": {"2": {"method": "svd", "rank": 4}}}, calibration=x, cache=FactorCache())
    sub = nn.Sequential(net[2])
    e_aware = _output_error(sub, nn.Sequential(small[2]), hidden)
    optimal, total = _optimal_error(sub, hidden, 4)
    assert e_aware <= optimal * (1 + 1e-4) + 1e-6 * total
    assert _params_equal(nn.Sequential(small[0]), nn.Sequential(net[0]))  # the first layer is untouched
