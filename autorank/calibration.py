"""Input statistics of layers (Gram matrices), collected with forward hooks.

The data-aware methods minimise ‖WX − W′X‖ on calibration inputs; all they need
of X is its Gram matrix ``Σ x xᵀ`` over the rows the layer sees (tokens for a
Linear, unfolded patches for a convolution), accumulated in float64.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from autorank.errors import CalibrationError
from autorank.methods._base import LayerStats
from autorank.methods._layers import LayerSpec, layer_kind, layer_spec

logger = logging.getLogger("autorank")

__all__ = ["Calibration", "collect", "record_input_shapes", "as_batches"]

#: largest Gram matrix side collected per group (larger layers are skipped with a warning)
MAX_GRAM_SIDE = 16384


@dataclass
class Calibration:
    """Per-layer input statistics: ``stats[name]`` and the input shape each layer saw."""

    stats: dict[str, LayerStats] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.stats

    def get(self, name: str) -> Optional[LayerStats]:
        return self.stats.get(name)


def as_batches(inputs: Any) -> list:
    """Calibration inputs as a list of batches: a tensor, a tuple of tensors, or an iterable of those.

    A DataLoader yielding ``(x, y)`` pairs is read as inputs ``x``.
    """
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, dict):
        return [inputs]
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        # a list of batches of one tensor each, unless the shapes say it is one multi-input batch
        if isinstance(inputs, tuple):
            return [inputs]
        return list(inputs)
    try:
        batches = list(inputs)
    except TypeError:
        raise CalibrationError(
            f"calibration inputs must be a tensor, a list of tensors or an iterable of batches, got {type(inputs).__name__}"
        ) from None
    out = []
    for b in batches:
        if isinstance(b, (list, tuple)) and len(b) == 2 and isinstance(b[0], torch.Tensor) and isinstance(b[1], torch.Tensor) and b[1].dim() <= 1:
            out.append(b[0])  # (inputs, labels)
        else:
            out.append(b)
    if not out:
        raise CalibrationError("calibration inputs are empty")
    return out


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (list, tuple)):
        model(*batch)
    else:
        model(batch)


def _rows(module: nn.Module, spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer multiplies by its weight: (groups, rows, d), float64."""
    if not spec.is_conv:
        return x.detach().reshape(1, -1, spec.in_channels).to(torch.float64)
    x = x.detach()
    padding = spec.padding
    if spec.padding_mode != "zeros":
        ph, pw = spec.padding
        x = F.pad(x, (pw, pw, ph, ph), mode=spec.padding_mode)
        padding = (0, 0)
    cols = F.unfold(x.to(torch.float64), spec.kernel_size, dilation=spec.dilation, padding=padding, stride=spec.stride)
    # cols: (B, C*kh*kw, L), channel-major like the weight's (C/g, kh, kw) flattening
    b, d_all, L = cols.shape
    g = spec.groups
    cols = cols.reshape(b, g, d_all // g, L).permute(1, 0, 3, 2).reshape(g, b * L, d_all // g)
    return cols


def collect(
    model: nn.Module,
    inputs: Any,
    layers: Optional[Sequence[str]] = None,
    *,
    max_batches: Optional[int] = None,
) -> Calibration:
    """Run ``model`` on ``inputs`` and accumulate, per layer, the Gram matrix of its inputs.

    ``layers``: qualified names to collect (default: every Linear, Conv1D and Conv2d).
    The model is run in eval mode under ``torch.no_grad()`` and left as it was.
    """
    batches = as_batches(inputs)
    if max_batches is not None:
        batches = batches[:max_batches]
    named = dict(model.named_modules())
    if layers is None:
        layers = [n for n, m in named.items() if layer_kind(m) is not None]
    cal = Calibration()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    skipped: list[str] = []
    for name in layers:
        module = named.get(name)
        if module is None or layer_kind(module) is None:
            continue
        spec = layer_spec(module)
        d = spec.in_channels if not spec.is_conv else spec.in_per_group * spec.kernel_size[0] * spec.kernel_size[1]
        if d > MAX_GRAM_SIDE:
            skipped.append(name)
            continue

        def hook(mod, args, _out, name=name, spec=spec):
            x = args[0]
            if name not in cal.input_shapes:
                cal.input_shapes[name] = tuple(x.shape)
            rows = _rows(mod, spec, x)
            gram = rows.transpose(1, 2) @ rows
            if name in sums:
                sums[name] += gram
            else:
                sums[name] = gram
            counts[name] = counts.get(name, 0) + rows.shape[1]

        handles.append(module.register_forward_hook(hook))
    if skipped:
        logger.warning("calibration skipped %d layer(s) whose Gram matrix would exceed %d: %s", len(skipped), MAX_GRAM_SIDE, ", ".join(skipped[:5]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                _run(model, batch)
    except Exception as exc:  # the user's inputs do not fit the model
        raise CalibrationError(f"running the model on the calibration inputs failed: {type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, gram in sums.items():
        cal.stats[name] = LayerStats(gram=gram, count=counts[name], input_shape=cal.input_shapes.get(name))
    return cal


def record_input_shapes(model: nn.Module, inputs: Any, layers: Optional[Iterable[str]] = None) -> dict[str, tuple[int, ...]]:
    """The input shape each layer sees on one forward pass of ``inputs`` (no statistics)."""
    batches = as_batches(inputs)[:1]
    named = dict(model.named_modules())
    wanted = set(layers) if layers is not None else {n for n, m in named.items() if layer_kind(m) is not None}
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in wanted:
        module = named.get(name)
        if module is None:
            continue

        def hook(_mod, args, name=name):
            shapes.setdefault(name, tuple(args[0].shape))

        handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                _run(model, batch)
    except Exception as exc:
        raise CalibrationError(f"running the model on the example inputs failed: {type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes


Inputs = Union[torch.Tensor, Sequence[torch.Tensor], Iterable]
