"""Fold a model's batch norms into the convolutions (or linear layers) before them: its inference form.

In eval mode a batch norm is a per-channel scale and shift, which the layer before
it can absorb: ``bn(conv(x)) == conv'(x)``. Every deployment runtime does this
(ONNX Runtime, TensorRT, ``torch.jit.freeze``), and AIMET's compression workflow
starts with it; eager PyTorch does not. Compressing the inference form matters
for latency: an unfolded batch norm is a pass over the activations that no
factorization removes (at batch 32 on a CPU about as costly as the convolution
before it), and it stays in the original's latency and every compressed model's.

:func:`fold_batch_norms` returns a copy of the model in which each batch norm
that directly follows a ``Conv2d``/``Linear`` (and is that layer's only
consumer) is folded into it and replaced by ``nn.Identity`` — same class, same
layer names, so a plan written for the model still applies. The pairs are found
by tracing the model with ``torch.fx``; a model ``torch.fx`` cannot trace falls
back to pairs of adjacent children of an ``nn.Sequential``.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch.fx
from torch import nn

from autorank.factor_layers import fold_batch_norm
from autorank.specs import SPEC_ATTR
from autorank.surgery import set_submodule

logger = logging.getLogger("autorank")

__all__ = ["fold_batch_norms", "foldable_pairs"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_LAYER = (nn.Conv2d, nn.Linear)


def _compatible(layer: nn.Module, bn: nn.Module) -> bool:
    out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    return (
        bn.num_features == out
        and bn.track_running_stats
        and bn.running_mean is not None
        and (isinstance(layer, nn.Conv2d) == isinstance(bn, nn.BatchNorm2d))
    )


def _fx_pairs(model: nn.Module) -> Optional[list[tuple[str, str]]]:
    """(layer, batch norm) names where the traced graph feeds the layer's output only to the batch norm; None if untraceable."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # dynamic control flow, Hugging Face models, ...
        logger.debug("torch.fx cannot trace %s (%s): folding adjacent Sequential children only", type(model).__name__, exc)
        return None
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN) or not node.args:
            continue
        src = node.args[0]
        if (getattr(src, "op", None) == "call_module" and isinstance(modules.get(src.target), _LAYER)
                and len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1):  # a shared module stays
            pairs.append((src.target, node.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            items = list(mod.named_children())
            for (a, layer), (b, bn) in zip(items, items[1:]):
                if isinstance(layer, _LAYER) and isinstance(bn, _BN):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + a, prefix + b))
    return pairs


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """The (layer, batch norm) name pairs :func:`fold_batch_norms` folds, in graph order."""
    pairs = _fx_pairs(model)
    if pairs is None:
        pairs = _sequential_pairs(model)
    modules = dict(model.named_modules())
    seen: set[str] = set()
    out = []
    for layer, bn in pairs:
        if layer in seen or bn in seen or not _compatible(modules[layer], modules[bn]):
            continue
        seen.update((layer, bn))
        out.append((layer, bn))
    return out


def fold_batch_norms(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A copy of ``model`` (in eval mode) with its batch norms folded (see the module docstring).

    Returns the copy and the folded (layer, batch norm) name pairs; ``model`` is untouched. The copy
    forgets the spec it was loaded from (its architecture is no longer what the spec builds).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batch_norms() expects an nn.Module, got {type(model).__name__}")
    pairs = foldable_pairs(model)
    folded = copy.deepcopy(model).eval()
    folded.__dict__.pop(SPEC_ATTR, None)
    for layer, bn in pairs:
        fold_batch_norm(folded.get_submodule(layer), folded.get_submodule(bn))
        set_submodule(folded, bn, nn.Identity())
    return folded, pairs
