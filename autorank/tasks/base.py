"""The Task protocol: how autorank scores, fine-tunes and feeds a model.

A task owns the data. The search calls, in this order:

1. ``task.setup(original_model)`` once per process (a fidelity task records the
   original's outputs here; a classification task may do nothing);
2. ``task.example_inputs()`` once, for shapes and FLOPs (a tensor or a tuple of
   tensors, batch of one or more);
3. ``task.calibration_inputs()`` once, for data-aware initialisation (a list of
   model inputs, each a tensor or a tuple of tensors);
4. ``task.evaluate(model)`` for every plan, zero-shot; a float, higher is better;
5. ``task.finetune(model, steps, seed=...)`` for the promising plans, then
   ``evaluate`` again.

``evaluate`` must not change the model's weights; ``finetune`` trains the model in
place and returns it. Both run on ``task.device``. A task that returns something
other than a finite float is reported as an error in that trial, not a crash.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["Task", "BaseTask"]


@runtime_checkable
class Task(Protocol):
    """What a task provides (see the module docstring for the calling order)."""

    #: short name shown in reports ("digits", "fidelity", ...)
    name: str
    #: name of the score ("accuracy", "cosine", "top1-agreement", ...)
    metric: str
    #: where models are evaluated and trained ("cpu", "cuda", "cuda:1")
    device: str

    def setup(self, original: nn.Module) -> None: ...

    def example_inputs(self) -> Any: ...

    def calibration_inputs(self) -> list: ...

    def evaluate(self, model: nn.Module) -> float: ...

    def finetune(self, model: nn.Module, steps: int, *, seed: int = 0) -> nn.Module: ...


class BaseTask:
    """Convenience base: defaults for ``setup``, ``device``, identity; subclasses fill the rest."""

    name: str = "task"
    metric: str = "score"
    device: str = "cpu"

    def setup(self, original: nn.Module) -> None:  # noqa: B027 - optional hook
        pass

    def example_inputs(self) -> Any:
        raise NotImplementedError

    def calibration_inputs(self) -> list:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> float:
        raise NotImplementedError

    def finetune(self, model: nn.Module, steps: int, *, seed: int = 0) -> nn.Module:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What identifies this task in a run directory's settings (resume refuses a different one)."""
        return {"task": type(self).__module__ + "." + type(self).__qualname__, "name": self.name, "metric": self.metric}


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


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


