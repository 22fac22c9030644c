"""Spatial SVD: a k_h×k_w convolution as a k_h×1 convolution then a 1×k_w convolution."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from autorank.methods._base import BaseMethod, Factors, LayerStats, Rank, RefitTarget, conv_out_hw, last_factor_target
from autorank.methods._layers import Cost, LayerSpec, conv_flops, make_conv, weight_matrix
from autorank.methods._linalg import balanced_svd, data_aware_svd

__all__ = ["SpatialSVD", "vertical_gram"]


def vertical_gram(gram: torch.Tensor, c: int, kh: int, kw: int) -> torch.Tensor:
    """Gram over vertical patches (c, i) from the Gram over full patches (c, i, j).

    ``Σ_j G[(c,i,j), (c',i',j)]``: the statistics of the k_h×1 convolution's
    inputs at every horizontal offset j.
    """
    g6 = gram.reshape(c, kh, kw, c, kh, kw)
    return torch.einsum("aibcjb->aicj", g6).reshape(c * kh, c * kh)


class SpatialSVD(BaseMethod):
    """Spatial SVD (Jaderberg et al.'s scheme 2; what AIMET calls spatial SVD).

    The weight W (N, C, k_h, k_w) is reshaped to the matrix M[(c, i), (n, j)] of
    shape (C·k_h) × (N·k_w) and truncated to rank r: a ``k_h×1`` convolution
    C → r carrying the vertical stride, padding and dilation, then a ``1×k_w``
    convolution r → N carrying the horizontal ones and the bias. Padding of any
    mode is separable, so the replacement is exact at full rank. Grouped and
    depthwise convolutions are decomposed group by group (r per group).

    With calibration statistics, the rows (c, i) are whitened by the Gram matrix
    of vertical input patches (the full patch Gram summed over horizontal
    offsets): this minimises the output error when the inputs at different
    horizontal offsets are uncorrelated, and is a data-aware approximation
    otherwise.

    References
    ----------
    - M. Jaderberg, A. Vedaldi, A. Zisserman. Speeding up Convolutional Neural
      Networks with Low Rank Expansions. BMVC 2014, arXiv 1405.3866.
    """

    name = "spatial-svd"
    aliases = ("spatialsvd", "jaderberg")
    layer_kinds = ("conv2d",)
    nested = True
    exact_at_max_rank = True
    data_aware = True
    structure = "Conv k_h×1 C→r, Conv 1×k_w r→N"
    reference = "Jaderberg, Vedaldi, Zisserman 2014 (arXiv 1405.3866)"

    def _applies(self, spec: LayerSpec) -> Optional[str]:
        if spec.kernel_size == (1, 1):
            return "1x1 kernel: no spatial extent to separate (use svd)"
        return None

    def max_rank(self, spec: LayerSpec) -> int:
        kh, kw = spec.kernel_size
        return min(spec.in_per_group * kh, spec.out_per_group * kw)

    def rank_help(self) -> str:
        return "int r (per group for grouped convs), or fraction ρ of FLOPs in (0, 1]"

    def truncation_view(self, rank: Rank) -> Optional[tuple[str, Any]]:
        return ("spatial", int(rank))

    def _cost(self, spec: LayerSpec, rank: int, input_shape: tuple[int, ...]) -> Cost:
        r = int(rank)
        b, _, w, oh, ow = conv_out_hw(spec, input_shape)
        g = spec.groups
        kh, kw = spec.kernel_size
        bias = spec.out_channels if spec.bias else 0
        params = g * r * spec.in_per_group * kh + spec.out_channels * r * kw + bias
        # the k_h×1 convolution keeps the input width (kernel 1, stride 1, no padding across it)
        flops = conv_flops(b, g * r, spec.in_per_group, kh, 1, oh, w) + conv_flops(b, spec.out_channels, r, 1, kw, oh, ow)
        return Cost(params, flops)

    options_help = {"data_aware": "use calibration statistics when given (true/false, default true)"}

    def _check_options(self, options: dict) -> None:
        if not isinstance(options.get("data_aware", True), bool):
            raise ValueError(f"option data_aware must be true or false, got {options['data_aware']!r}")

    def options_key(self, options: Optional[dict]) -> dict:
        return {"data_aware": bool((options or {}).get("data_aware", True))}

    def _factorize(self, module, spec: LayerSpec, stats: Optional[LayerStats], rank, options: dict) -> Factors:
        w = weight_matrix(module).to(torch.float64)
        g, cg, ng = spec.groups, spec.in_per_group, spec.out_per_group
        kh, kw = spec.kernel_size
        use_data = stats is not None and options.get("data_aware", True)
        lefts, rights, svals, how = [], [], [], "plain"
        for gi in range(g):
            wg = w[gi * ng:(gi + 1) * ng]  # (ng, cg, kh, kw)
            m = wg.permute(1, 2, 0, 3).reshape(cg * kh, ng * kw)
            if use_data:
                gv = vertical_gram(stats.gram[gi].to(torch.float64), cg, kh, kw)
                left, right, s, how = data_aware_svd(m, gv, side="left")
            else:
                left, right, s = balanced_svd(m)
            lefts.append(left)
            rights.append(right)
            svals.append(s)
        return Factors(
            {"left": torch.stack(lefts), "right": torch.stack(rights), "s": torch.stack(svals)},
            {"init": how},
        )

    def refit_target(self, replacement: nn.Module) -> Union[RefitTarget, str]:
        """The 1×k_w convolution r→N and the bias, by least squares on its inputs (see autorank.training.refit)."""
        return last_factor_target(replacement)

    def _build(self, spec: LayerSpec, factors: Optional[Factors], rank, options, bias, device, dtype) -> list[nn.Module]:
        r = int(rank)
        g, cg, ng = spec.groups, spec.in_per_group, spec.out_per_group
        kh, kw = spec.kernel_size
        w1 = w2 = None
        if factors is not None:
            left = factors.tensors["left"][:, :, :r]  # (g, cg*kh, r)
            right = factors.tensors["right"][:, :r, :]  # (g, r, ng*kw)
            w1 = left.reshape(g, cg, kh, r).permute(0, 3, 1, 2).reshape(g * r, cg, kh, 1)
            w2 = right.reshape(g, r, ng, kw).permute(0, 2, 1, 3).reshape(g * ng, r, 1, kw)
        (sh, sw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
        kw_ = {"device": device, "dtype": dtype}
        first = make_conv(
            spec.in_channels, g * r, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1),
            groups=g, padding_mode=spec.padding_mode, weight=w1, **kw_,
        )
        second = make_conv(
            g * r, spec.out_channels, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw),
            groups=g, padding_mode=spec.padding_mode, weight=w2, bias=bias, has_bias=spec.bias, **kw_,
        )
        return [first, second]
