"""Whole-model FLOPs and parameters.

Convention (fvcore's, used everywhere in autorank): one multiply-add is one
FLOP. ``torch.utils.flop_counter`` counts two per multiply-add;
:func:`count_flops_torch` converts to our convention.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["count_flops", "count_flops_torch", "count_params"]


def _as_tuple(inputs: Any) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _convolution_mode_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle for ``aten::_convolution_mode`` (Conv2d with ``padding='same'/'valid'``).

    fvcore has no handle for it and would count such convolutions as zero.
    """
    from fvcore.nn.jit_handles import conv_flop_count, get_shape

    return conv_flop_count(get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0]), transposed=False)


def count_flops(model: nn.Module, inputs: Any) -> int:
    """FLOPs of one forward pass counted by fvcore (1 multiply-add = 1 FLOP).

    Adds the one handle fvcore lacks for layers autorank decomposes:
    convolutions with string padding (``aten::_convolution_mode``).
    """
    from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("fvcore").setLevel(logging.ERROR)
            analysis = FlopCountAnalysis(model, _as_tuple(inputs))
            analysis.set_op_handle("aten::_convolution_mode", _convolution_mode_flop_jit)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            with torch.no_grad():
                return int(analysis.total())
    finally:
        model.train(was_training)


def count_flops_torch(model: nn.Module, inputs: Any) -> int:
    """FLOPs counted by ``torch.utils.flop_counter``, halved to 1 multiply-add = 1 FLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(*_as_tuple(inputs))
        return int(counter.get_total_flops()) // 2
    finally:
        model.train(was_training)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
