"""Supervised classification: top-1 accuracy on a validation loader, fine-tuning on a training loader."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from autorank.errors import TaskError
from autorank.tasks.base import (
    BaseTask,
    OptimizerSpec,
    call,
    check_finite,
    held_out_part,
    make_optimizer,
    make_schedule,
    primary_output,
    seeded,
    slice_batch,
    to_device,
)
from autorank.tasks.distill import FeatureDistiller, FinetuneControl, TermScale, feature_blocks, kd_loss

logger = logging.getLogger("autorank")

__all__ = ["ClassificationTask"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def split_labelled(batch: Any, where: str) -> tuple[Any, torch.Tensor]:
    """``(inputs, labels)`` of a loader's batch.

    Accepted: a pair ``(inputs, labels)`` (inputs a tensor, a tuple of tensors or
    a dict), or a dict holding ``labels`` (or ``label``) beside the model's
    keyword inputs, as Hugging Face datasets give them.
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        for key in ("labels", "label"):
            if isinstance(batch.get(key), torch.Tensor):
                return {k: v for k, v in batch.items() if k != key}, batch[key]
    raise TaskError(
        f"{where}: a batch must be (inputs, labels) or a dict with a 'labels' tensor; got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


@contextlib.contextmanager
def _loader_generator_seeded(loader: Iterable, seed: int) -> Iterator[None]:
    """Reseed a DataLoader's own shuffling generator (if it has one) for the block, then restore it."""
    gen = getattr(loader, "generator", None)
    if not isinstance(gen, torch.Generator):
        yield
        return
    state = gen.get_state()
    gen.manual_seed(int(seed))
    try:
        yield
    finally:
        gen.set_state(state)


class ClassificationTask(BaseTask):
    """Top-1 accuracy of a classifier; fine-tuning with cross-entropy.

    ``train_loader`` and ``val_loader`` are iterables of ``(inputs, labels)``
    batches (a ``torch.utils.data.DataLoader`` typically; see
    :func:`split_labelled` for the accepted batch forms). The model's output is
    read with :func:`~autorank.tasks.base.primary_output` (``logits`` of a
    Hugging Face classifier) and must be ``(batch, classes)``.

    - ``evaluate``: accuracy over the validation loader (its first
      ``max_eval_batches`` batches if given), in eval mode under ``no_grad``; the
      model's weights and train/eval mode are left as they were.
    - ``finetune(model, steps, seed=...)``: ``steps`` optimizer steps, cycling the
      training loader. Shuffling, dropout and augmentations draw from torch's RNG,
      which is seeded with ``seed`` for the call (and restored after), so the same
      seed gives the same weights. Returns the model in eval mode.
    - ``example_inputs``: the first sample of the first validation batch.
    - ``calibration_inputs``: the inputs of the first ``calibration_batches``
      training batches (drawn with seed 0).

    ``optimizer``: ``"adam"`` (default), ``"adamw"``, ``"sgd"`` or a callable
    ``f(params, lr=...)``. ``loss``: ``f(logits, labels) -> scalar`` (default
    cross-entropy). Models and inputs are moved to ``device``.
    """

    metric = "accuracy"

    def __init__(
        self,
        train_loader: Iterable,
        val_loader: Iterable,
        *,
        device: str = "cpu",
        lr: float = 1e-3,
        optimizer: OptimizerSpec = "adam",
        loss: Optional[LossFn] = None,
        max_eval_batches: Optional[int] = None,
        calibration_batches: int = 4,
        name: str = "classification",
    ):
        if max_eval_batches is not None and int(max_eval_batches) < 1:
            raise TaskError(f"max_eval_batches must be a positive integer or None, got {max_eval_batches!r}")
        if int(calibration_batches) < 1:
            raise TaskError(f"calibration_batches must be a positive integer, got {calibration_batches!r}")
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.device = str(device)
        self.lr = float(lr)
        self.optimizer = optimizer
        self.loss: LossFn = loss if loss is not None else F.cross_entropy
        self.max_eval_batches = None if max_eval_batches is None else int(max_eval_batches)
        self.calibration_batches = int(calibration_batches)
        self.name = name
        self._example: Any = None
        self._calibration: Optional[list] = None

    # ------------------------------------------------------------------ inputs
    def example_inputs(self) -> Any:
        """The first sample of the first validation batch (batch of one), on ``device``."""
        if self._example is None:
            for batch in self.val_loader:
                x, _ = split_labelled(batch, f"{self.name}: validation loader")
                self._example = slice_batch(x, 0, 1)
                break
            else:
                raise TaskError(f"{self.name}: the validation loader yields no batches")
        return to_device(self._example, self.device)

    def calibration_inputs(self) -> list:
        """The inputs of the first ``calibration_batches`` training batches (same every call)."""
        if self._calibration is None:
            out = []
            with seeded(0, self.device), _loader_generator_seeded(self.train_loader, 0):
                for batch in self.train_loader:
                    x, _ = split_labelled(batch, f"{self.name}: training loader")
                    out.append(x)
                    if len(out) >= self.calibration_batches:
                        break
            if not out:
                raise TaskError(f"{self.name}: the training loader yields no batches")
            self._calibration = out
        return [to_device(x, self.device) for x in self._calibration]

    def training_inputs(self, max_batches: Optional[int] = None) -> list:
        """The inputs of the first ``max_batches`` training batches (all if None), drawn with seed 0, on ``device``."""
        out = []
        with seeded(0, self.device), _loader_generator_seeded(self.train_loader, 0):
            for batch in self.train_loader:
                if max_batches is not None and len(out) >= int(max_batches):
                    break
                x, _ = split_labelled(batch, f"{self.name}: training loader")
                out.append(to_device(x, self.device))
        if not out:
            raise TaskError(f"{self.name}: the training loader yields no batches")
        return out

    # ------------------------------------------------------------------ scoring
    def _logits(self, model: nn.Module, x: Any, labels: torch.Tensor, where: str) -> torch.Tensor:
        logits = primary_output(call(model, x), where=f"{self.name}: {where}: model output")
        if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
            raise TaskError(
                f"{self.name}: {where}: classification needs outputs of shape (batch, classes) matching "
                f"{labels.shape[0]} labels; got {tuple(logits.shape)}"
            )
        return logits

    def evaluate(self, model: nn.Module, *, fraction: float = 1.0) -> float:
        """Top-1 accuracy on the validation loader; weights and train/eval mode unchanged.

        ``fraction``: on the first ``ceil(fraction · n)`` of its ``n`` batches (a loader
        without a length is scored whole)."""
        limit = self.max_eval_batches
        if fraction != 1.0:
            try:
                n = len(self.val_loader)  # type: ignore[arg-type]
            except TypeError:
                n = None
            if n:
                n = n if limit is None else min(n, limit)
                limit = held_out_part(n, fraction, f"{self.name}: evaluate")
        model.to(self.device)
        was_training = model.training
        model.eval()
        correct = total = 0
        try:
            with torch.no_grad():
                for i, batch in enumerate(self.val_loader):
                    if limit is not None and i >= limit:
                        break
                    x, y = split_labelled(batch, f"{self.name}: validation loader")
                    x, y = to_device(x, self.device), y.to(self.device)
                    logits = self._logits(model, x, y, f"validation batch {i}")
                    check_finite(logits, f"{self.name}: model output on validation batch {i}")
                    correct += int((logits.argmax(dim=1) == y).sum())
                    total += int(y.shape[0])
        finally:
            model.train(was_training)
        if total == 0:
            raise TaskError(f"{self.name}: the validation loader yields no samples")
        return correct / total

    # ------------------------------------------------------------------ training
    def finetune(self, model: nn.Module, steps: int, *, seed: int = 0,
                 control: Optional[FinetuneControl] = None) -> nn.Module:
        """``steps`` optimizer steps on the training loader (seeded), then the model in eval mode.

        ``control`` (:class:`~autorank.tasks.distill.FinetuneControl`, used by
        :mod:`autorank.training.recovery`): with ``control.teacher`` (the original model), the
        loss adds to the cross-entropy the distillation of the teacher's logits
        (weight ``control.output``, temperature 2) and of its block outputs (weight
        ``control.features``), each term divided by its first value; plus trainable
        parameters, a wall-time budget and a per-step callback.
        """
        model.to(self.device)
        steps = int(steps)
        if steps <= 0:
            return model.eval()
        teacher = control.teacher if control is not None else None
        distiller: Optional[FeatureDistiller] = None
        scales = (TermScale(), TermScale())
        if control is None:
            opt, sched = make_schedule(self.optimizer, model, self.lr, steps)
        else:
            if control.features > 0:
                if teacher is None:
                    raise TaskError(f"{self.name}: feature distillation needs the original model as control.teacher")
                distiller = FeatureDistiller(model, teacher, feature_blocks(model, control.modules))
            if teacher is not None:
                teacher.to(self.device).eval()
            # last: it freezes the parameters not trained until control.finish()
            opt = control.begin(lambda params, lr: make_optimizer(self.optimizer, params, lr), model, self.lr, distiller)
            sched = None
        use_teacher = teacher is not None and (distiller is not None or control.output > 0)
        done = 0
        model.train()
        try:
            with seeded(seed, self.device), _loader_generator_seeded(self.train_loader, seed):
                while done < steps:
                    epoch_batches = 0
                    stop = False
                    for batch in self.train_loader:
                        epoch_batches += 1
                        x, y = split_labelled(batch, f"{self.name}: training loader")
                        x, y = to_device(x, self.device), y.to(self.device)
                        if control is not None:
                            control.set_lr(opt, done, steps)
                        teacher_logits = teacher_features = None
                        if use_teacher:
                            with torch.no_grad():
                                teacher_logits = primary_output(call(teacher, x), where=f"{self.name}: teacher output")
                            if distiller is not None:
                                teacher_features = distiller.take_teacher()
                        logits = self._logits(model, x, y, f"training step {done}")
                        loss = self.loss(logits, y)
                        if control is not None:
                            loss = scales[0](loss)
                            if teacher_logits is not None and control.output > 0:
                                loss = loss + control.output * scales[1](kd_loss(logits, teacher_logits.detach()))
                            if distiller is not None:
                                loss = loss + control.features * distiller.loss(teacher_features)
                        if not bool(torch.isfinite(loss)):
                            raise TaskError(f"{self.name}: the training loss became {float(loss.detach())} at step {done} of {steps}")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        if sched is not None:
                            sched.step()
                        done += 1
                        if control is not None and control.after_step(done):
                            stop = True
                            break
                        if done >= steps:
                            break
                    if epoch_batches == 0:
                        raise TaskError(f"{self.name}: the training loader yields no batches")
                    if stop:
                        break
        finally:
            model.eval()
            if distiller is not None:
                distiller.close()
            if control is not None:
                control.finish(steps)
        logger.debug("%s: fine-tuned %d steps (seed %d)", self.name, done, seed)
        return model
