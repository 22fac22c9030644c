"""DCF: each k×k filter as a truncated expansion on a fixed 2-D DCT basis (after Qiu et al.'s DCFNet, 2018)."""

from __future__ import annotations

import functools
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from autorank.errors import RankError
from autorank.methods._base import BaseMethod, Factors, LayerStats, RefitTarget, conv_out_hw, last_factor_target
from autorank.methods._layers import Cost, LayerSpec, conv_flops, make_conv, weight_matrix

__all__ = ["DCF", "dct_basis", "FixedBasisConv2d"]


# ---------------------------------------------------------------------- the basis
def _dct_matrix(k: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix (k × k): row u is the u-th cosine, lowest frequency first."""
    i = torch.arange(k, dtype=torch.float64)
    u = torch.arange(k, dtype=torch.float64)[:, None]
    m = torch.cos(math.pi * (2 * i + 1) * u / (2 * k))
    m[0] *= math.sqrt(1.0 / k)
    m[1:] *= math.sqrt(2.0 / k)
    return m


@functools.lru_cache(maxsize=64)
def _dct_basis_cached(kh: int, kw: int) -> torch.Tensor:
    dh, dw = _dct_matrix(kh), _dct_matrix(kw)
    # lowest frequencies first: by normalised radius (u/kh)² + (v/kw)², then u + v, then u
    order = sorted(
        ((u, v) for u in range(kh) for v in range(kw)),
        key=lambda uv: ((uv[0] / kh) ** 2 + (uv[1] / kw) ** 2, uv[0] + uv[1], uv[0]),
    )
    return torch.stack([torch.outer(dh[u], dw[v]) for u, v in order])


def dct_basis(kh: int, kw: int) -> torch.Tensor:
    """The kh·kw orthonormal 2-D DCT-II filters (kh·kw, kh, kw), float64, lowest frequency first.

    Orthonormal and complete: the projection of a filter onto the first K of
    them is its least-squares fit, and K = kh·kw reproduces it exactly.
    """
    return _dct_basis_cached(int(kh), int(kw)).clone()


class FixedBasisConv2d(nn.Module):
    """Convolve each input channel with the same K fixed k×k filters: C → C·K channels (groups = C).

    The filters are a registered buffer, not a parameter: saved with the model,
    never trained. Output channel ``c·K + m`` is input channel c filtered by
    basis element m. Stride, padding, padding mode and dilation are the layer's.
    """

    def __init__(
        self,
        in_channels: int,
        basis: torch.Tensor,
        *,
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        padding_mode: str = "zeros",
    ):
        super().__init__()
        k, kh, kw = basis.shape
        self.in_channels = int(in_channels)
        self.n_basis = int(k)
        self.kernel_size = (int(kh), int(kw))
        self.stride = tuple(stride)
        self.padding = tuple(padding)
        self.dilation = tuple(dilation)
        self.padding_mode = padding_mode
        weight = basis.reshape(1, k, kh, kw).expand(self.in_channels, k, kh, kw).reshape(self.in_channels * k, 1, kh, kw)
        self.register_buffer("basis", weight.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            return F.conv2d(x, self.basis, None, self.stride, 0, self.dilation, self.in_channels)
        return F.conv2d(x, self.basis, None, self.stride, self.padding, self.dilation, self.in_channels)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.in_channels * self.n_basis}, kernel_size={self.kernel_size}, "
            f"basis={self.n_basis} DCT filters per channel, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, padding_mode={self.padding_mode!r}"
        )


# ---------------------------------------------------------------------- the method
class DCF(BaseMethod):
    """Decomposed convolutional filters: a k×k convolution on a truncated fixed basis.

    Every filter W[n, c] (kh × kw) is written as ``Σ_{m<K} a[n, c, m] ψ_m`` with
    ψ the orthonormal 2-D DCT-II basis ordered from the lowest frequency (DCFNet
    uses Fourier-Bessel functions; the DCT is the separable analogue on a square
    grid). The layer becomes a fixed basis convolution ``C → C·K`` (each input
    channel filtered by the K basis elements, groups = C, the layer's stride,
    padding, padding mode and dilation; a buffer, not trained) then a learnable
    ``1×1 conv C·K → N`` holding the coefficients (and the bias).

    The rank is K, the number of basis elements kept (1..kh·kw). The coefficients
    are the projections of the filters on the basis, the least-squares fit
    because the basis is orthonormal: nested (one factorization, any K is a
    slice) and exact at K = kh·kw. The kept fraction of FLOPs is about
    K/(kh·kw)·(1 + kh·kw/N). Grouped, depthwise and 1×1 convolutions are refused.

    References
    ----------
    - Q. Qiu, X. Cheng, R. Calderbank, G. Sapiro. DCFNet: Deep Neural Network with
      Decomposed Convolutional Filters. ICML 2018, arXiv 1802.04145.
    - N. Ahmed, T. Natarajan, K. R. Rao. Discrete Cosine Transform. IEEE Trans.
      Computers C-23(1):90-93, 1974.
    """

    name = "dcf"
    aliases = ("dcfnet", "dct")
    layer_kinds = ("conv2d",)
    nested = True
    exact_at_max_rank = True
    data_aware = False
    structure = "fixed DCT basis conv C→C·K (groups C, buffer), 1×1 C·K→N (coefficients)"
    reference = "Qiu et al. ICML 2018 (DCFNet, arXiv 1802.04145)"
    rank_format = "K"

    def _applies(self, spec: LayerSpec) -> Optional[str]:
        if spec.groups > 1:
            kind = "depthwise" if spec.depthwise else "grouped"
            return f"{kind} convolution (groups={spec.groups}): dcf expands the filters of a dense (groups=1) kernel"
        if spec.kernel_size == (1, 1):
            return "1x1 kernel: a 1x1 filter has no spatial basis to truncate (use svd)"
        return None

    def max_rank(self, spec: LayerSpec) -> int:
        kh, kw = spec.kernel_size
        return kh * kw

    def rank_help(self) -> str:
        return "int K, the number of DCT basis elements kept, lowest frequencies first (1..kh·kw), or fraction ρ of FLOPs in (0, 1]"

    def _cost(self, spec: LayerSpec, rank, input_shape: tuple[int, ...]) -> Cost:
        k = _as_int(rank)
        b, _, _, oh, ow = conv_out_hw(spec, input_shape)
        kh, kw = spec.kernel_size
        c, n = spec.in_channels, spec.out_channels
        params = n * c * k + (n if spec.bias else 0)  # the basis is a buffer
        flops = conv_flops(b, c * k, 1, kh, kw, oh, ow) + conv_flops(b, n, c * k, 1, 1, oh, ow)
        return Cost(params, flops)

    def _factorize(self, module, spec: LayerSpec, stats: Optional[LayerStats], rank, options: dict) -> Factors:
        w = weight_matrix(module).to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(w).all():
            raise RankError(f"method 'dcf': layer {spec.describe()} has non-finite weights")
        kh, kw = spec.kernel_size
        basis = dct_basis(kh, kw)
        coef = torch.einsum("ncij,mij->ncm", w, basis)  # projections = least squares (orthonormal basis)
        return Factors({"coef": coef.contiguous()}, {"basis": "dct", "kernel": [kh, kw]})

    def refit_target(self, replacement: nn.Module) -> Union[RefitTarget, str]:
        """The 1×1 coefficients C·K→N and the bias, on the fixed basis' outputs (see autorank.training.refit)."""
        return last_factor_target(replacement)

    def _build(self, spec: LayerSpec, factors: Optional[Factors], rank, options, bias, device, dtype) -> list[nn.Module]:
        k = _as_int(rank)
        c, n = spec.in_channels, spec.out_channels
        kh, kw = spec.kernel_size
        coef = None
        if factors is not None:
            full = factors.tensors["coef"]
            if full.shape[-1] < k:
                raise ValueError(f"method 'dcf': factors hold {full.shape[-1]} basis coefficients, asked {k}")
            coef = full[:, :, :k].reshape(n, c * k, 1, 1)
        basis_device = device if device is not None and torch.device(device).type != "meta" else None
        basis = dct_basis(kh, kw)[:k].to(device=basis_device, dtype=dtype)
        fixed = FixedBasisConv2d(c, basis, stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
                                 padding_mode=spec.padding_mode)
        mix = make_conv(c * k, n, (1, 1), weight=coef, bias=bias, has_bias=spec.bias or bias is not None,
                        device=device, dtype=dtype)
        return [fixed, mix]


def _as_int(rank) -> int:
    if isinstance(rank, (list, tuple)):
        (rank,) = rank
    return int(rank)
