"""The layer structures that training-time options leave in a decomposed model, and how to rebuild them.

A decomposed layer (:class:`~autorank.methods.Decomposed`) may carry, besides
what its method built:

- :class:`FactorBatchNorm2d` / :class:`FactorBatchNorm1d`: batch norms between
  factors while fine-tuning (inserted and folded away by :mod:`autorank.training.bn`);
  folding can leave a bias on factors that had none (``options["bias_after_fold"]``);
- :class:`FixedPointConv2d` / :class:`FixedPointLinear`: factors stored as int8
  codes with per-channel scales (``options["fixed_point"] = bits``, see
  :mod:`autorank.training.fixed_point`).

:func:`restore_structure` applies a plan entry's options to a freshly built
Decomposed, so that :func:`autorank.decompose` and :func:`autorank.load` rebuild
exactly what was saved. :func:`model_bytes` is a model's stored size.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from autorank.errors import TrainingError
from autorank.methods._layers import Decomposed

__all__ = [
    "FactorBatchNorm2d",
    "FactorBatchNorm1d",
    "FACTOR_BN",
    "FixedPointConv2d",
    "FixedPointLinear",
    "quantize_per_channel",
    "dequantize",
    "decomposed_modules",
    "factor_layers",
    "foldable",
    "fold_batch_norm",
    "float_weight",
    "reset_children",
    "set_in",
    "to_fixed_point",
    "restore_structure",
    "model_bytes",
]


def decomposed_modules(model: nn.Module) -> list[tuple[str, Decomposed]]:
    """Every Decomposed module of ``model``, with its qualified name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Decomposed)]


def reset_children(seq: nn.Sequential, layers: list[nn.Module]) -> None:
    """Give ``seq`` exactly ``layers``, keyed 0..n-1 (the keys the state dict uses)."""
    for key in list(seq._modules):
        del seq._modules[key]
    for i, layer in enumerate(layers):
        seq.add_module(str(i), layer)


def float_weight(layer: nn.Module) -> torch.Tensor:
    """The trainable float weight of a Conv2d/Linear factor, behind a fake-quant parametrization if any."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


# ---------------------------------------------------------------------- batch norm between factors
class FactorBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d inserted between two factors by :func:`insert_factor_bn` (folded away for export)."""


class FactorBatchNorm1d(nn.BatchNorm1d):
    """Batch norm over the last (feature) dimension of a Linear factor's output, for 2-D and N-D inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return super().forward(x)
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)


FACTOR_BN = (FactorBatchNorm2d, FactorBatchNorm1d)


def foldable(layer: nn.Module) -> bool:
    """Whether a batch norm after ``layer`` can be folded into it (a plain Conv2d or Linear)."""
    return isinstance(layer, (nn.Conv2d, nn.Linear))


def fold_batch_norm(layer: nn.Module, bn: nn.Module) -> None:
    """``bn(layer(x)) == layer'(x)`` in eval mode: scale ``layer``'s output channels, shift its bias (in place).

    ``layer`` must be :func:`foldable`; a layer without a bias gets one. Computed in float64.
    """
    if not foldable(layer):
        raise TrainingError(f"cannot fold a batch norm into a {type(layer).__name__} (only a Conv2d or Linear)")
    w = float_weight(layer)
    with torch.no_grad():
        gamma = bn.weight.to(torch.float64) if bn.weight is not None else 1.0  # affine=False: scale 1, shift 0
        beta = bn.bias.to(torch.float64) if bn.bias is not None else 0.0
        scale = gamma / (bn.running_var.to(torch.float64) + bn.eps).sqrt()
        shift = beta - bn.running_mean.to(torch.float64) * scale
        w.copy_((w.to(torch.float64) * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(shift.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
        else:
            layer.bias.copy_((layer.bias.to(torch.float64) * scale + shift).to(layer.bias.dtype))


# ---------------------------------------------------------------------- fixed-point factors
def quantize_per_channel(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel (dim 0) quantisation: int8 codes in ±(2^(bits−1)−1) and float scales.

    ``w ≈ codes · scale[:, None, …]``; ``2^bits − 1`` levels per channel; an all-zero
    channel gets scale 1 and codes 0.
    """
    bits = int(bits)
    if not 2 <= bits <= 8:
        raise TrainingError(f"fixed point: bits must be in 2..8 (stored as int8), got {bits}")
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        flat = w.detach().reshape(w.shape[0], -1)
        scale = flat.abs().amax(dim=1) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.clamp(torch.round(flat / scale[:, None]), -qmax, qmax)
    return codes.to(torch.int8).reshape(w.shape), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes · scale`` per output channel (dim 0)."""
    return codes.to(scale.dtype) * scale.reshape(-1, *([1] * (codes.dim() - 1)))


def _codes_and_scale(layer: nn.Module, bits: int, qshape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    w = layer.weight
    if w.device.type == "meta":  # skeleton for autorank.load: real (empty) storage, filled by load_state_dict
        return torch.empty(qshape, dtype=torch.int8), torch.empty(qshape[0], dtype=w.dtype)
    codes, scale = quantize_per_channel(w.detach(), bits)
    return codes, scale.to(w.dtype)


class _FixedPointStorage(nn.Module):
    """int8 codes (``qweight``) and per-output-channel float ``scale`` as buffers; the weight is their product."""

    def _store(self, layer: nn.Module, bits: int) -> None:
        self.bits = int(bits)
        codes, scale = _codes_and_scale(layer, bits, tuple(layer.weight.shape))
        self.register_buffer("qweight", codes)
        self.register_buffer("scale", scale)
        if layer.bias is not None:
            self.bias = layer.bias
        else:
            self.register_parameter("bias", None)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale)


class FixedPointConv2d(_FixedPointStorage):
    """A Conv2d whose weight is stored as int8 codes (``qweight``) and per-output-channel float ``scale``.

    Computes with the dequantised weight ``qweight · scale`` (exactly the weight
    :class:`FakeQuantize` trained with). Bias, if any, stays a float parameter.
    """

    def __init__(self, conv: nn.Conv2d, bits: int = 8):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups, self.padding_mode = conv.dilation, conv.groups, conv.padding_mode
        self._reversed_padding_repeated_twice = list(conv._reversed_padding_repeated_twice)
        self._store(conv, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bits={self.bits}, bias={self.bias is not None}")


class FixedPointLinear(_FixedPointStorage):
    """A Linear whose weight is stored as int8 codes and per-output-channel float scales (see FixedPointConv2d)."""

    def __init__(self, linear: nn.Linear, bits: int = 8):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._store(linear, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, bias={self.bias is not None}"


def factor_layers(dec: Decomposed) -> Iterator[tuple[str, nn.Module]]:
    """The Conv2d / Linear modules inside a Decomposed (also nested, e.g. in a tensor-network conv)."""
    for name, m in list(dec.named_modules()):
        if name and isinstance(m, (nn.Conv2d, nn.Linear)):
            yield name, m


def set_in(parent: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule of ``parent`` at qualified ``name``."""
    owner_name, _, child = name.rpartition(".")
    owner = parent.get_submodule(owner_name) if owner_name else parent
    setattr(owner, child, new)


def to_fixed_point(layer: nn.Module, bits: int) -> nn.Module:
    """The int8 fixed-point version of a Conv2d or Linear factor."""
    if isinstance(layer, nn.Conv2d):
        return FixedPointConv2d(layer, bits)
    return FixedPointLinear(layer, bits)



# ---------------------------------------------------------------------- rebuilding
def restore_structure(dec: Decomposed, options: Optional[dict]) -> Decomposed:
    """Apply a plan entry's training-time options to a freshly built Decomposed (real or meta skeleton).

    ``bias_after_fold``: indices of factors that carry a bias after batch-norm
    folding (zero bias when built from factors; a skeleton parameter otherwise);
    ``fixed_point``: convert its Conv2d/Linear factors to int8 fixed-point layers
    (quantising the factors' weights when real). Used by :func:`autorank.decompose`
    and by :func:`autorank.load` (via ``apply_skeleton``).
    """
    options = dict(options or {})
    children = list(dec)
    for i in options.get("bias_after_fold") or []:
        if not 0 <= int(i) < len(children):
            raise TrainingError(f"option bias_after_fold: factor index {i} out of range (the layer has {len(children)})")
        layer = children[int(i)]
        if getattr(layer, "bias", "missing") is None and foldable(layer):
            w = layer.weight
            n_out = w.shape[0]
            layer.bias = nn.Parameter(torch.zeros(n_out, device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
    bits = options.get("fixed_point")
    if bits:
        for name, layer in list(factor_layers(dec)):
            set_in(dec, name, to_fixed_point(layer, int(bits)))
    return dec


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers as stored (int8 codes count 1 byte each); shared tensors once."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
