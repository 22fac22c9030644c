"""Model inputs: call a model on one batch, move a batch to a device.

A batch is what a model is called with: a tensor (``model(x)``), a tuple of
tensors (``model(*x)``) or a dict (``model(**x)``), as tasks and calibration
inputs give them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["call", "to_device"]


def to_device(inputs: Any, device: str | torch.device) -> Any:
    """Move a tensor, or a tuple/list/dict of tensors, to ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(x, device) for x in inputs)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    return inputs


def call(model: nn.Module, inputs: Any) -> Any:
    """``model(*inputs)`` for a tuple, ``model(**inputs)`` for a dict, else ``model(inputs)``."""
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)
