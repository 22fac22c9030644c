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
place and returns it. A task may also accept ``evaluate(model, fraction=f)``: the
score on the first ``ceil(f · n)`` of its ``n`` held-out batches (the built-in tasks
do; the sensitivity estimate's calibration probes use it, :func:`supports_fraction`). Both run on ``task.device``. A task that returns something
other than a finite float is reported as an error in that trial, not a crash.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional, Protocol, Union, runtime_checkable

import torch
from torch import nn

from autorank.batches import call, to_device  # noqa: F401 - the tasks' batch helpers, imported from here by user tasks
from autorank.errors import TaskError

__all__ = ["Task", "BaseTask", "supports_fraction", "held_out_part"]

#: the methods every task provides (``load_task`` names the missing ones)
TASK_METHODS = ("setup", "example_inputs", "calibration_inputs", "evaluate", "finetune")
#: the attributes every task provides
TASK_ATTRIBUTES = ("name", "metric", "device")


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


def supports_fraction(task: Any) -> bool:
    """Whether ``task.evaluate`` takes ``fraction`` (a score on part of the held-out split)."""
    try:
        return "fraction" in inspect.signature(task.evaluate).parameters
    except (TypeError, ValueError):
        return False


def held_out_part(n: int, fraction: float, what: str = "evaluate") -> int:
    """How many of ``n`` held-out batches ``fraction`` scores: ``ceil(fraction · n)``, at least 1."""
    f = float(fraction)
    if not 0.0 < f <= 1.0:
        raise TaskError(f"{what}: fraction must be in (0, 1], got {fraction!r}")
    return max(1, min(n, math.ceil(f * n - 1e-9)))


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# ---------------------------------------------------------------------- helpers shared by the tasks
def primary_output(output: Any, *, where: str = "model output") -> torch.Tensor:
    """The tensor a task scores, out of whatever the model returned.

    The rule: a tensor is itself; a tuple or list gives its first element; a
    mapping (a dict, or a Hugging Face ``ModelOutput``) gives ``last_hidden_state``
    if present, else ``logits`` if present, else its first tensor value. Anything
    else raises :class:`~autorank.errors.TaskError` naming the type found.
    """
    seen = output
    for _ in range(8):  # nested containers, bounded
        if isinstance(seen, torch.Tensor):
            return seen
        if isinstance(seen, (tuple, list)):
            if not seen:
                break
            seen = seen[0]
        elif isinstance(seen, Mapping):
            if isinstance(seen.get("last_hidden_state"), torch.Tensor):
                return seen["last_hidden_state"]
            if isinstance(seen.get("logits"), torch.Tensor):
                return seen["logits"]
            tensors = [v for v in seen.values() if isinstance(v, torch.Tensor)]
            if not tensors:
                break
            return tensors[0]
        else:
            break
    raise TaskError(
        f"{where}: expected a tensor, a tuple whose first element is a tensor, or a dict/ModelOutput "
        f"holding tensors; got {type(output).__name__}"
    )


def batch_length(inputs: Any) -> int:
    """Number of samples in a batch (the first dimension of its first tensor)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    if isinstance(inputs, (tuple, list)):
        for x in inputs:
            if isinstance(x, (torch.Tensor, tuple, list, Mapping)):
                return batch_length(x)
    if isinstance(inputs, Mapping):
        for x in inputs.values():
            if isinstance(x, (torch.Tensor, tuple, list, Mapping)):
                return batch_length(x)
    raise TaskError(f"cannot tell the batch size of inputs of type {type(inputs).__name__}: expected tensors")


def slice_batch(inputs: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a batch (tensor, tuple/list of tensors, or dict of tensors).

    Non-tensor members (flags, ``None``) are kept as they are.
    """
    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop] if inputs.dim() else inputs
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(slice_batch(x, start, stop) for x in inputs)
    if isinstance(inputs, Mapping):
        return {k: slice_batch(v, start, stop) for k, v in inputs.items()}
    return inputs


def split_batches(batches: list, batch_size: Optional[int]) -> list:
    """Each batch cut into pieces of at most ``batch_size`` samples (``None``: as given)."""
    if batch_size is None:
        return list(batches)
    if int(batch_size) < 1:
        raise TaskError(f"batch_size must be a positive integer, got {batch_size!r}")
    out = []
    for b in batches:
        n = batch_length(b)
        out.extend(slice_batch(b, i, i + int(batch_size)) for i in range(0, n, int(batch_size)))
    return out


OptimizerSpec = Union[str, Callable[..., torch.optim.Optimizer]]


def make_optimizer(spec: OptimizerSpec, params: list, lr: float) -> torch.optim.Optimizer:
    """An optimizer for ``params``: ``"adam"``, ``"adamw"``, ``"sgd"`` (momentum 0.9), or a
    callable ``f(params, lr=lr)`` (a ``torch.optim`` class works as is)."""
    if not params:
        raise TaskError("the model has no trainable parameters (all have requires_grad=False)")
    if callable(spec):
        return spec(params, lr=lr)
    name = str(spec).strip().lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise TaskError(f"unknown optimizer {spec!r}: use 'adam', 'adamw', 'sgd' or a callable f(params, lr=...)")


def make_schedule(spec: OptimizerSpec, model: nn.Module, lr: float, steps: int):
    """The optimizer for ``model``'s trainable parameters and a cosine decay of its rate to zero over ``steps``.

    Short fine-tunes of a decomposed model keep what the data-aware initialisation got right
    with the decay (measured on the digits demo: a constant rate of 1e-3 took a 98.1% plan down
    to 88.9% in 100 steps, the cosine schedule up to 98.3%).
    """
    opt = make_optimizer(spec, [p for p in model.parameters() if p.requires_grad], lr)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(steps)))


@contextlib.contextmanager
def seeded(seed: int, device: Union[str, torch.device] = "cpu") -> Iterator[None]:
    """Run the block with torch's RNG seeded with ``seed``; the caller's RNG state is restored after.

    Seeds what a loader's shuffling (a ``RandomSampler`` without its own generator),
    dropout and random augmentations draw from.
    """
    devices: list[int] = []
    if torch.device(device).type == "cuda" and torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def check_finite(t: torch.Tensor, where: str) -> None:
    """Raise TaskError if ``t`` holds NaN or infinity."""
    if t.is_floating_point() or t.is_complex():
        if not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "infinite values"
            raise TaskError(f"{where} contains {bad}")
