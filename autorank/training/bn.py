"""Batch norm between the factors of decomposed layers while fine-tuning, folded back for export.

A batch norm after every factor of a decomposed layer but the last, trained with
the factors and folded back into the factor before it for export (Tai et al.
2015). The exported model has the plain decomposed structure again (plus a bias
on the factors that had none, recorded in the plan as
``options["bias_after_fold"]``).

References
----------
- C. Tai, T. Xiao, Y. Zhang, X. Wang, W. E. "Convolutional neural networks with
  low-rank regularization." ICLR 2016, arXiv:1511.06067 (2015).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autorank.batches import call, to_device
from autorank.calibration import as_batches
from autorank.errors import TrainingError
from autorank.factor_layers import (
    FACTOR_BN,
    FactorBatchNorm1d,
    FactorBatchNorm2d,
    decomposed_modules,
    float_weight,
    fold_batch_norm,
    foldable,
    reset_children,
)

__all__ = ["insert_factor_bn", "fold_factor_bn"]


def insert_factor_bn(model: nn.Module, inputs: Any = None, *, eps: float = 1e-5, momentum: float = 0.1) -> int:
    """Insert a batch norm after every factor but the last of each :class:`Decomposed`; returns how many.

    Only after factors a batch norm can be folded back into (``nn.Conv2d`` /
    ``nn.Linear``, so not after DCF's fixed DCT basis); a Decomposed holding a
    single module (TT, TR) gets none. ``BatchNorm2d`` after a convolution,
    :class:`FactorBatchNorm1d` (over the last dimension) after a Linear.

    Each batch norm is, at insertion, an exact identity in eval mode, so that
    evaluating right after insertion gives the same outputs as before:

    - ``inputs=None``: running mean 0, running variance ``1 - eps``, weight 1, bias 0
      (``sqrt(1 - eps + eps) == 1`` exactly in float32);
    - ``inputs`` (model inputs: a tensor or a list of batches, e.g. the task's
      calibration inputs): running mean μ and (biased) variance σ² of the factor's
      output on them, weight ``sqrt(σ² + eps)`` and bias μ — still the identity in eval
      mode (up to float rounding), and now close to it in *train* mode too, where the
      batch statistics replace the running ones. With the plain initialisation, train
      mode starts by whitening every factor's output, which a short fine-tune from a
      good decomposition does not recover from.
    """
    added: list[nn.Module] = []
    for _, dec in decomposed_modules(model):
        children = list(dec)
        if len(children) < 2 or any(isinstance(c, FACTOR_BN) for c in children):
            continue
        out: list[nn.Module] = []
        for i, layer in enumerate(children):
            out.append(layer)
            if i < len(children) - 1 and foldable(layer):
                w = float_weight(layer)
                if isinstance(layer, nn.Conv2d):
                    bn = FactorBatchNorm2d(layer.out_channels, eps=eps, momentum=momentum)
                else:
                    bn = FactorBatchNorm1d(layer.out_features, eps=eps, momentum=momentum)
                bn = bn.to(device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    bn.running_mean.zero_()
                    bn.running_var.fill_(1.0 - eps)
                    bn.weight.fill_(1.0)
                    bn.bias.zero_()
                bn.train(layer.training)
                out.append(bn)
                added.append(bn)
        reset_children(dec, out)
    if inputs is not None and added:
        _init_bn_from_data(model, added, inputs)
    return len(added)


def _init_bn_from_data(model: nn.Module, bns: list[nn.Module], inputs: Any) -> None:
    """Running statistics and affine parameters from the factors' outputs on ``inputs`` (see insert_factor_bn)."""
    sums: dict[int, list] = {id(bn): [0.0, 0.0, 0] for bn in bns}

    def hook(bn, args):
        x = args[0].detach().to(torch.float64)
        if isinstance(bn, FactorBatchNorm2d):
            x = x.transpose(0, 1).reshape(x.shape[1], -1)
        else:
            x = x.reshape(-1, x.shape[-1]).t()
        acc = sums[id(bn)]
        acc[0] = acc[0] + x.sum(1)
        acc[1] = acc[1] + (x * x).sum(1)
        acc[2] += x.shape[1]

    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        with torch.no_grad():
            for batch in as_batches(inputs):
                call(model, to_device(batch, device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for bn in bns:
        s, ss, n = sums[id(bn)]
        if n == 0:
            continue
        mean = s / n
        var = (ss / n - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.weight.copy_((var + bn.eps).sqrt())
            bn.bias.copy_(mean)


def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """``bn(layer(x)) == layer'(x)`` in eval mode: scale the layer's output channels, shift its bias."""
    if not foldable(layer):
        raise TrainingError(
            f"cannot fold a batch norm into a {type(layer).__name__}: fold_factor_bn() must run before freeze_fixed_point()"
        )
    fold_batch_norm(layer, bn)


def fold_factor_bn(model: nn.Module) -> int:
    """Fold every batch norm :func:`insert_factor_bn` inserted into the factor before it and remove it.

    ``w' = w·γ/√(σ²+ε)`` per output channel, ``b' = (b − μ)·γ/√(σ²+ε) + β`` (a bias
    is created where the factor had none, and its index recorded in the layer's
    ``options["bias_after_fold"]`` so that :func:`autorank.load` rebuilds it). The model
    then has the plain Decomposed structure its plan describes; in eval mode its
    outputs are those of the model with batch norms. Works on fake-quantised factors
    too (it scales the float weight; per-channel quantisation commutes with a
    per-channel scale). Returns how many batch norms were folded.
    """
    folded = 0
    for _, dec in decomposed_modules(model):
        children = list(dec)
        if not any(isinstance(c, FACTOR_BN) for c in children):
            continue
        out: list[nn.Module] = []
        bias_idx = set(dec.options.get("bias_after_fold") or [])
        for layer in children:
            if isinstance(layer, FACTOR_BN):
                prev = out[-1]
                had_bias = getattr(prev, "bias", None) is not None
                _fold_into(prev, layer)
                if not had_bias:
                    bias_idx.add(len(out) - 1)
                folded += 1
                continue
            out.append(layer)
        reset_children(dec, out)
        if bias_idx:
            dec.options["bias_after_fold"] = sorted(bias_idx)
    return folded
