"""Truncated SVD: Linear and GPT-2 Conv1D as two Linears; Conv2d as channel decomposition."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from autorank.methods._base import BaseMethod, Factors, LayerStats, Rank, RefitTarget, conv_out_hw, last_factor_target
from autorank.methods._layers import (
    Cost,
    LayerSpec,
    conv_flops,
    linear_flops,
    make_conv,
    make_linear,
    rows_of,
    weight_matrix,
)
from autorank.methods._linalg import balanced_svd, data_aware_svd

__all__ = ["SVD"]


class SVD(BaseMethod):
    """Truncated SVD of the weight matrix, optionally data-aware.

    - Linear (out × in), and transformers' GPT-2 ``Conv1D`` whose weight is stored
      transposed (in × out): ``Linear(in → r)`` then ``Linear(r → out)`` with the bias.
    - Conv2d k×k, C → N: channel decomposition, ``k×k conv C → r`` (with the layer's
      stride, padding, padding mode and dilation) then ``1×1 conv r → N`` with the bias.
      Grouped convolutions are decomposed group by group (both factors grouped,
      ``r`` per group); depthwise ones are refused, a single-channel filter has no
      channel rank to reduce.

    With calibration statistics (the Gram matrix of the layer's inputs), the
    factors are the closed-form minimiser of ‖WX − W′X‖ instead of ‖W − W′‖:
    whitening by the Cholesky factor of the Gram matrix (see ``_linalg``).

    References
    ----------
    - X. Zhang, J. Zou, K. He, J. Sun. Accelerating Very Deep Convolutional Networks
      for Classification and Detection. TPAMI 2016 (channel decomposition).
    - E. Denton, W. Zaremba, J. Bruna, Y. LeCun, R. Fergus. Exploiting Linear
      Structure Within Convolutional Networks for Efficient Evaluation. NeurIPS 2014.
    - M. Masana, J. van de Weijer, L. Herranz, A. Bagdanov, J. Alvarez. Domain-adaptive
      deep network compression. ICCV 2017 (data-aware closed form).
    - X. Wang, Y. Zheng, Z. Wan, M. Zhang. SVD-LLM: Truncation-aware Singular Value
      Decomposition for Large Language Model Compression. arXiv 2403.07378, 2024.
    """

    name = "svd"
    aliases = ("channel-svd", "lowrank")
    layer_kinds = ("linear", "conv1d", "conv2d")
    nested = True
    exact_at_max_rank = True
    data_aware = True
    structure = "Linear in→r, Linear r→out | Conv k×k C→r, 1×1 r→N"
    reference = "Zhang et al. TPAMI 2016; Denton et al. 2014; data-aware: Masana et al. 2017, SVD-LLM 2024"

    def _applies(self, spec: LayerSpec) -> Optional[str]:
        if spec.depthwise:
            return "depthwise convolution: a single-channel filter has no channel rank to reduce (use spatial-svd)"
        return None

    # ------------------------------------------------------------------ ranks and cost
    def max_rank(self, spec: LayerSpec) -> int:
        if not spec.is_conv:
            return min(spec.in_channels, spec.out_channels)
        kh, kw = spec.kernel_size
        return min(spec.out_per_group, spec.in_per_group * kh * kw)

    def rank_help(self) -> str:
        return "int r (per group for grouped convs), or fraction ρ of FLOPs in (0, 1]"

    def truncation_view(self, rank: Rank) -> Optional[tuple[str, Any]]:
        return ("filters", int(rank))

    def _cost(self, spec: LayerSpec, rank: int, input_shape: tuple[int, ...]) -> Cost:
        r = int(rank)
        bias = spec.out_channels if spec.bias else 0
        if not spec.is_conv:
            n_in, n_out = spec.in_channels, spec.out_channels
            rows = rows_of(input_shape)
            return Cost(r * n_in + r * n_out + bias, linear_flops(rows, n_in, r) + linear_flops(rows, r, n_out))
        b, _, _, oh, ow = conv_out_hw(spec, input_shape)
        g = spec.groups
        kh, kw = spec.kernel_size
        params = g * r * spec.in_per_group * kh * kw + spec.out_channels * r + bias
        flops = conv_flops(b, g * r, spec.in_per_group, kh, kw, oh, ow) + conv_flops(b, spec.out_channels, r, 1, 1, oh, ow)
        return Cost(params, flops)

    # ------------------------------------------------------------------ factorize / build
    options_help = {"data_aware": "use calibration statistics when given (true/false, default true)"}

    def _check_options(self, options: dict) -> None:
        if not isinstance(options.get("data_aware", True), bool):
            raise ValueError(f"option data_aware must be true or false, got {options['data_aware']!r}")

    def options_key(self, options: Optional[dict]) -> dict:
        return {"data_aware": bool((options or {}).get("data_aware", True))}

    def _matrices(self, module: nn.Module, spec: LayerSpec) -> torch.Tensor:
        """The weight as (groups, out/groups, d), d = in features or in/groups·kh·kw."""
        w = weight_matrix(module).to(torch.float64)
        g = spec.groups
        return w.reshape(g, spec.out_per_group, -1)

    def _factorize(self, module, spec: LayerSpec, stats: Optional[LayerStats], rank, options: dict) -> Factors:
        mats = self._matrices(module, spec)
        use_data = stats is not None and options.get("data_aware", True)
        lefts, rights, svals, how = [], [], [], "plain"
        for gi in range(mats.shape[0]):
            if use_data:
                left, right, s, how = data_aware_svd(mats[gi], stats.gram[gi], side="right")
            else:
                left, right, s = balanced_svd(mats[gi])
            lefts.append(left)
            rights.append(right)
            svals.append(s)
        return Factors(
            {"left": torch.stack(lefts), "right": torch.stack(rights), "s": torch.stack(svals)},
            {"init": how},
        )

    def refit_target(self, replacement: nn.Module) -> Union[RefitTarget, str]:
        """Both factors, re-solved jointly: the best rank-r map on the replacement's inputs (see autorank.training.refit)."""
        return last_factor_target(replacement, low_rank=True)

    def set_low_rank(self, replacement: nn.Module, left: torch.Tensor, right: torch.Tensor) -> None:
        """``left`` (groups, out/groups, r) into the second factor, ``right`` (groups, r, d) into the first."""
        first, second = replacement[0], replacement[1]
        with torch.no_grad():
            first.weight.copy_(right.reshape(first.weight.shape).to(first.weight.dtype))
            second.weight.copy_(left.reshape(second.weight.shape).to(second.weight.dtype))

    def _build(self, spec: LayerSpec, factors: Optional[Factors], rank, options, bias, device, dtype) -> list[nn.Module]:
        r = int(rank)
        kw_ = {"device": device, "dtype": dtype}
        left = right = None
        if factors is not None:
            left = factors.tensors["left"][:, :, :r]  # (g, out/g, r)
            right = factors.tensors["right"][:, :r, :]  # (g, r, d)
        if not spec.is_conv:
            first = make_linear(spec.in_channels, r, weight=None if right is None else right[0], **kw_)
            second = make_linear(
                r, spec.out_channels, weight=None if left is None else left[0], bias=bias, has_bias=spec.bias, **kw_
            )
            return [first, second]
        g = spec.groups
        kh, kw = spec.kernel_size
        w1 = None if right is None else right.reshape(g * r, spec.in_per_group, kh, kw)
        w2 = None if left is None else left.reshape(spec.out_channels, r, 1, 1)
        first = make_conv(
            spec.in_channels, g * r, spec.kernel_size, stride=spec.stride, padding=spec.padding,
            dilation=spec.dilation, groups=g, padding_mode=spec.padding_mode, weight=w1, **kw_,
        )
        second = make_conv(g * r, spec.out_channels, (1, 1), groups=g, weight=w2, bias=bias, has_bias=spec.bias, **kw_)
        return [first, second]
