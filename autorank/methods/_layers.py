"""A normalised view of the layers autorank can decompose, and builders for replacements.

Three layer kinds are understood:

- ``linear``: :class:`torch.nn.Linear`, weight ``(out, in)``.
- ``conv1d``: transformers' GPT-2 ``Conv1D``, a Linear whose weight is stored
  transposed, ``(in, out)``; recognised by class name and shape, so transformers
  need not be installed.
- ``conv2d``: :class:`torch.nn.Conv2d` with any stride, padding (and padding
  mode), dilation, groups and bias.

Cost convention (fvcore's): one multiply-add is one FLOP; biases, additions and
activations are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = [
    "LayerSpec",
    "Cost",
    "layer_spec",
    "layer_kind",
    "weight_matrix",
    "conv_out_size",
    "conv_flops",
    "linear_flops",
    "make_conv",
    "make_linear",
    "nominal_input_shape",
    "Decomposed",
]


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


def layer_kind(module: nn.Module) -> Optional[str]:
    """``"linear"``, ``"conv1d"``, ``"conv2d"`` or None for any other module."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() == 2
        and module.weight.shape[1] == module.nf
    ):
        return "conv1d"
    return None


@dataclass(frozen=True)
class LayerSpec:
    """What a method needs to know of a layer, independent of its class.

    For linear kinds, ``in_channels``/``out_channels`` are the in and out
    features and the convolution fields are the identity values.
    """

    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"
    bias: bool = True

    @property
    def is_conv(self) -> bool:
        return self.kind == "conv2d"

    @property
    def depthwise(self) -> bool:
        return self.is_conv and self.groups > 1 and self.groups == self.in_channels

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    def describe(self) -> str:
        if not self.is_conv:
            return f"{self.in_channels}->{self.out_channels}"
        kh, kw = self.kernel_size
        extra = []
        if self.stride != (1, 1):
            extra.append(f"stride {self.stride[0]}x{self.stride[1]}")
        if self.dilation != (1, 1):
            extra.append(f"dilation {self.dilation[0]}x{self.dilation[1]}")
        if self.groups != 1:
            extra.append(f"groups {self.groups}")
        tail = f" ({', '.join(extra)})" if extra else ""
        return f"{kh}x{kw} {self.in_channels}->{self.out_channels}{tail}"


def layer_spec(module: nn.Module) -> LayerSpec:
    kind = layer_kind(module)
    if kind == "linear":
        return LayerSpec("linear", module.in_features, module.out_features, bias=module.bias is not None)
    if kind == "conv1d":
        n_in, n_out = module.weight.shape
        return LayerSpec("conv1d", int(n_in), int(n_out), bias=getattr(module, "bias", None) is not None)
    if kind == "conv2d":
        if isinstance(module.padding, str):
            padding = _resolve_string_padding(module)
        else:
            padding = _pair(module.padding)
        return LayerSpec(
            "conv2d",
            module.in_channels,
            module.out_channels,
            _pair(module.kernel_size),
            _pair(module.stride),
            padding,
            _pair(module.dilation),
            int(module.groups),
            module.padding_mode,
            module.bias is not None,
        )
    raise TypeError(f"not a decomposable layer type: {type(module).__name__}")


def _resolve_string_padding(module: nn.Conv2d) -> tuple[int, int]:
    """``padding='same'`` or ``'valid'`` as explicit symmetric padding (refused when asymmetric)."""
    if module.padding == "valid":
        return (0, 0)
    out = []
    for k, d in zip(_pair(module.kernel_size), _pair(module.dilation)):
        total = d * (k - 1)
        if total % 2:
            raise ValueError("padding='same' with an even effective kernel pads asymmetrically")
        out.append(total // 2)
    return (out[0], out[1])


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in) for linear kinds, (out, in/groups, kh, kw) for conv2d."""
    kind = layer_kind(module)
    if kind == "conv1d":
        return module.weight.detach().t()
    return module.weight.detach()


def bias_of(module: nn.Module) -> Optional[torch.Tensor]:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach()


@dataclass(frozen=True)
class Cost:
    """Exact parameters and FLOPs (one multiply-add = one FLOP) of a layer or replacement."""

    params: int
    flops: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.params + other.params, self.flops + other.flops)


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv_flops(batch: int, out_ch: int, in_per_group: int, kh: int, kw: int, oh: int, ow: int) -> int:
    """fvcore's count for a convolution: batch * prod(weight shape) * output pixels."""
    return batch * out_ch * in_per_group * kh * kw * oh * ow


def linear_flops(rows: int, n_in: int, n_out: int) -> int:
    return rows * n_in * n_out


def nominal_input_shape(spec: LayerSpec) -> tuple[int, ...]:
    """An input shape to cost a layer whose real input shape is unknown.

    Large enough that the kept fraction of FLOPs is close to its limit for large
    feature maps, so that ranks chosen from it hold for real inputs too.
    """
    if not spec.is_conv:
        return (1, spec.in_channels)
    sh, sw = spec.stride
    return (1, spec.in_channels, 64 * sh, 64 * sw)


def rows_of(input_shape: Sequence[int]) -> int:
    """Number of rows a linear layer sees: product of all but the last dimension."""
    return int(math.prod(input_shape[:-1])) if len(input_shape) > 1 else 1


def make_conv(
    in_ch: int,
    out_ch: int,
    kernel: tuple[int, int],
    *,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    groups: int = 1,
    padding_mode: str = "zeros",
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    has_bias: bool = False,
    device=None,
    dtype=None,
) -> nn.Conv2d:
    """An ``nn.Conv2d`` whose parameters are copies of the given tensors (no random init is spent).

    With ``weight=None`` the parameters stay on the meta device: a skeleton to be
    filled by ``load_state_dict(..., assign=True)``.
    """
    has_bias = has_bias or bias is not None
    conv = nn.Conv2d(
        in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation,
        groups=groups, bias=has_bias, padding_mode=padding_mode, device="meta", dtype=dtype,
    )  # the skeleton in the layer's dtype: autorank.load of a bfloat16 model fills it as bfloat16
    if weight is not None:
        expected = (out_ch, in_ch // groups, kernel[0], kernel[1])
        if tuple(weight.shape) != expected:
            raise RuntimeError(f"internal: conv weight shape {tuple(weight.shape)} != {expected}")
        conv.weight = nn.Parameter(weight.to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True))
        if has_bias:
            b = bias if bias is not None else torch.zeros(out_ch)
            conv.bias = nn.Parameter(b.to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True))
    return conv


def make_linear(
    n_in: int,
    n_out: int,
    *,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    has_bias: bool = False,
    device=None,
    dtype=None,
) -> nn.Linear:
    """An ``nn.Linear`` holding the given (out, in) weight; meta skeleton when ``weight=None``."""
    has_bias = has_bias or bias is not None
    lin = nn.Linear(n_in, n_out, bias=has_bias, device="meta", dtype=dtype)  # skeleton in the layer's dtype (see make_conv)
    if weight is not None:
        if tuple(weight.shape) != (n_out, n_in):
            raise RuntimeError(f"internal: linear weight shape {tuple(weight.shape)} != {(n_out, n_in)}")
        lin.weight = nn.Parameter(weight.to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True))
        if has_bias:
            b = bias if bias is not None else torch.zeros(n_out)
            lin.bias = nn.Parameter(b.to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True))
    return lin


class Decomposed(nn.Sequential):
    """The replacement of one layer: a chain of smaller layers, same input and output.

    Carries which method and rank produced it (``method``, ``rank``) and the
    class of the layer it replaced, so that a decomposed model describes its own
    plan (used by :func:`autorank.save`).
    """

    def __init__(self, *layers: nn.Module, method: str, rank, replaced: str, spec: LayerSpec, options: Optional[dict] = None):
        super().__init__(*layers)
        self.method = method
        self.rank = rank
        self.replaced = replaced
        self.spec = spec
        self.options = dict(options or {})

    def extra_repr(self) -> str:
        return f"method={self.method!r}, rank={self.rank!r}, replaces={self.replaced}"
