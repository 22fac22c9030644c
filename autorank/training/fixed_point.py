"""Fixed-point factors (Wang & Cheng 2017): learned with fake quantisation, stored as int8.

Per-output-channel symmetric b-bit weights, fake-quantised with a straight-through
estimator while fine-tuning (:func:`quantize_factors`), then stored as int8
tensors with per-channel float scales (:func:`freeze_fixed_point`;
``options["fixed_point"] = b`` in the plan, so that :func:`autorank.load`
rebuilds them). :func:`~autorank.factor_layers.model_bytes` is the stored size.

References
----------
- P. Wang, J. Cheng. "Fixed-Point Factorized Networks." CVPR 2017.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from autorank.factor_layers import (
    decomposed_modules,
    dequantize,
    factor_layers,
    quantize_per_channel,
    set_in,
    to_fixed_point,
)

__all__ = ["FakeQuantize", "quantize_factors", "freeze_fixed_point"]


class _STEQuant(torch.autograd.Function):
    """Forward: the fake-quantised weight exactly (as the frozen layer computes it); backward: identity."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, bits: int) -> torch.Tensor:
        codes, scale = quantize_per_channel(w, bits)
        return dequantize(codes, scale.to(w.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class FakeQuantize(nn.Module):
    """A weight parametrization: per-channel symmetric ``bits``-bit fake quantisation, straight-through gradient."""

    def __init__(self, bits: int = 8):
        super().__init__()
        quantize_per_channel(torch.ones(1), bits)  # validates bits
        self.bits = int(bits)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _STEQuant.apply(w, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def quantize_factors(model: nn.Module, bits: int = 8) -> int:
    """Fake-quantise every Conv2d/Linear factor of every Decomposed (per-channel, ``bits`` bits, STE); returns how many.

    The float weights stay the trained parameters (``parametrizations.weight.original``);
    the forward pass sees their quantised values, the gradient passes straight through
    (Wang & Cheng's "full-precision weights recovery", with b-bit symmetric codes instead
    of their ternary ones). :func:`freeze_fixed_point` makes it permanent. Tensor-network
    cores (TT/TR on Linear layers) and DCF's fixed basis stay float.
    """
    n = 0
    for _, dec in decomposed_modules(model):
        for _, layer in factor_layers(dec):
            if parametrize.is_parametrized(layer, "weight"):
                continue
            parametrize.register_parametrization(layer, "weight", FakeQuantize(bits))
            n += 1
    return n


def freeze_fixed_point(model: nn.Module, bits: Optional[int] = None) -> int:
    """Replace fake-quantised factors by :class:`FixedPointConv2d`/:class:`FixedPointLinear` (int8 storage).

    Every Decomposed with a fake-quantised factor, or every Decomposed when ``bits``
    is given (post-training quantisation of a model never fine-tuned), has all its
    Conv2d/Linear factors converted, and ``options["fixed_point"] = bits`` recorded
    in its plan entry so that :func:`autorank.load` rebuilds int8 layers. The frozen
    layers compute exactly what the fake-quantised ones did. Returns how many
    layers were converted.
    """
    n = 0
    for _, dec in decomposed_modules(model):
        layers = list(factor_layers(dec))
        found = [m.parametrizations.weight[0].bits for _, m in layers
                 if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], FakeQuantize)]
        b = found[0] if found else bits
        if not b or not layers:
            continue
        for name, layer in layers:
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            set_in(dec, name, to_fixed_point(layer, b))
            n += 1
        dec.options["fixed_point"] = int(b)
    return n
