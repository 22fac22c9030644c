"""Label-free fidelity: how closely a compressed model reproduces the original's outputs.

No labels are needed, only inputs: the original model's outputs on held-out
inputs are the reference, and fine-tuning is distillation from the original.

Which output is compared follows :func:`~autorank.tasks.base.primary_output`: a
tensor as is, the first element of a tuple, ``last_hidden_state`` (else
``logits``, else the first tensor) of a dict or Hugging Face ``ModelOutput``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
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
    split_batches,
    to_device,
)
from autorank.tasks.distill import FeatureDistiller, FinetuneControl, TermScale, feature_blocks

logger = logging.getLogger("autorank")

__all__ = ["FidelityTask"]

#: teacher block outputs kept in memory across the steps of one feature-distillation fine-tune (bytes)
FEATURE_CACHE_BYTES = 1 << 30

_METRICS = {"auto", "cosine", "top1"}
#: the score's name as reported, per metric
METRIC_NAMES = {"cosine": "cosine", "top1": "top1-agreement"}


def _is_batch(b: Any) -> bool:
    if isinstance(b, torch.Tensor):
        return True
    if isinstance(b, tuple):
        return bool(b) and all(isinstance(x, torch.Tensor) or x is None for x in b)
    if isinstance(b, Mapping):
        return bool(b) and any(isinstance(x, torch.Tensor) for x in b.values())
    return False


def _as_batch_list(inputs: Any, what: str) -> list:
    """A list of batches: one batch (tensor, tuple of tensors, dict) is a list of one."""
    if _is_batch(inputs):
        return [inputs]
    if isinstance(inputs, torch.utils.data.Dataset) and not isinstance(inputs, torch.utils.data.IterableDataset):
        raise TaskError(f"{what}: pass a list of batches (wrap the dataset in a DataLoader and list() it), not a Dataset")
    try:
        batches = list(inputs)
    except TypeError:
        raise TaskError(f"{what}: expected a list of batches (tensors, tuples of tensors or dicts), got {type(inputs).__name__}") from None
    for i, b in enumerate(batches):
        if isinstance(b, list) and b and all(isinstance(x, torch.Tensor) for x in b):
            batches[i] = b = tuple(b)  # a DataLoader yields lists for multi-input batches
        if not _is_batch(b):
            raise TaskError(f"{what}: batch {i} is a {type(b).__name__}; expected a tensor, a tuple of tensors or a dict of tensors")
    return batches


class FidelityTask(BaseTask):
    """Agreement with the original model's outputs on held-out inputs (no labels).

    ``inputs``: a list of batches, each a tensor, a tuple of tensors (positional
    inputs) or a dict of tensors (keyword inputs, e.g. a Hugging Face tokenizer's
    output). ``held_out``: the batches scored by ``evaluate``; when ``None``, the
    last fifth of ``inputs`` (at least one batch) is held out and the rest is used
    for distillation (a single batch is used for both, with a warning).
    ``batch_size``: if given, every batch is cut into pieces of at most that many
    samples (bounds memory; the scores do not change).

    ``metric``:

    - ``"cosine"``: mean over held-out samples of the cosine similarity between
      the flattened per-sample outputs of the model and of the original; the
      original scores 1.0. Distillation minimises the mean squared error.
    - ``"top1"`` (reported as ``top1-agreement``): the fraction of positions
      (samples, or tokens for ``(batch, tokens, classes)`` outputs) where the
      model's arg-max class equals the original's. Distillation minimises the KL
      divergence of temperature-softened logits (``temperature``, default 2).
    - ``"auto"`` (default): ``top1`` when the original returns a dict or
      ``ModelOutput`` whose scored output is its ``logits`` (a Hugging Face
      classifier), otherwise ``cosine``. A plain tensor is never taken for logits:
      ask for ``"top1"`` explicitly for a classifier returning a tensor.

    ``augmentation``: a callable ``(batch, fraction, generator) -> batch`` making new
    distillation inputs from the given ones (the teacher labels them):
    :class:`~autorank.tasks.augment.TokenReplacement` for token ids. Recovery asks for
    such batches (:meth:`augmented_inputs`, the ``augment:`` option) when it is set.

    ``setup(original)`` records the original's outputs and keeps a frozen copy of
    it as the distillation teacher; it must be called before ``evaluate`` or
    ``finetune``. ``evaluate`` raises :class:`~autorank.errors.TaskError` when the
    model's outputs are not tensors, change shape, or hold NaN/infinity.
    """

    def __init__(
        self,
        inputs: Any,
        *,
        held_out: Any = None,
        device: str = "cpu",
        metric: str = "auto",
        lr: float = 1e-4,
        optimizer: OptimizerSpec = "adam",
        temperature: float = 2.0,
        batch_size: Optional[int] = None,
        calibration: Any = None,
        calibration_batches: int = 4,
        augmentation: Optional[Callable[[Any, float, torch.Generator], Any]] = None,
        name: str = "fidelity",
    ):
        metric = str(metric).strip().lower().replace("-", "")
        if metric == "top1agreement":
            metric = "top1"
        if metric not in _METRICS:
            raise TaskError(f"fidelity metric {metric!r}: use 'auto', 'cosine' or 'top1'")
        if int(calibration_batches) < 1:
            raise TaskError(f"calibration_batches must be a positive integer, got {calibration_batches!r}")
        batches = _as_batch_list(inputs, f"{name}: inputs")
        if held_out is None:
            if not batches:
                raise TaskError(f"{name}: no input batches given")
            if len(batches) == 1:
                logger.warning("%s: one input batch only: it is used both to score and to distil", name)
                train, held = batches, batches
            else:
                n_held = max(1, len(batches) // 5)
                train, held = batches[:-n_held], batches[-n_held:]
        else:
            train, held = batches, _as_batch_list(held_out, f"{name}: held_out")
        if not held:
            raise TaskError(f"{name}: no held-out batches to score on")
        if not train:
            raise TaskError(f"{name}: no input batches to distil on")
        self.train_batches = split_batches(train, batch_size)
        self.held_out = split_batches(held, batch_size)
        self.calibration = None if calibration is None else _as_batch_list(calibration, f"{name}: calibration")
        self.calibration_batches = int(calibration_batches)
        self.device = str(device)
        self.requested_metric = metric
        self.lr = float(lr)
        self.optimizer = optimizer
        self.temperature = float(temperature)
        self.batch_size = batch_size
        if augmentation is not None and not callable(augmentation):
            raise TaskError(f"{name}: augmentation must be a callable (batch, fraction, generator) -> batch, got {augmentation!r}")
        self.augmentation = augmentation
        self.name = name
        self._metric: Optional[str] = None if metric == "auto" else metric
        self._reference: Optional[list[torch.Tensor]] = None
        self._teacher: Optional[nn.Module] = None
        self._targets: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ metric
    @property
    def metric(self) -> str:  # type: ignore[override]
        """``cosine`` or ``top1-agreement`` (``auto`` until ``setup`` has decided)."""
        return METRIC_NAMES[self._metric] if self._metric else "auto"

    def fingerprint(self) -> dict:
        return {
            **super().fingerprint(),
            "metric": self.requested_metric,
            "held_out_batches": len(self.held_out),
            "train_batches": len(self.train_batches),
        }

    # ------------------------------------------------------------------ inputs
    def example_inputs(self) -> Any:
        """The first sample of the first held-out batch (batch of one), on ``device``."""
        return to_device(slice_batch(self.held_out[0], 0, 1), self.device)

    def training_inputs(self, max_batches: Optional[int] = None) -> list:
        """The distillation batches (inputs only), the first ``max_batches`` of them if given, on ``device``."""
        batches = self.train_batches if max_batches is None else self.train_batches[: int(max_batches)]
        return [to_device(b, self.device) for b in batches]

    def augmented_inputs(self, n_batches: int, *, fraction: float, seed: int = 0) -> list:
        """``n_batches`` new distillation batches made by ``augmentation`` from the distillation batches in turn
        (seeded; on ``device``), or none when the task has no ``augmentation``
        (:class:`~autorank.tasks.augment.TokenReplacement` for token inputs)."""
        if self.augmentation is None or n_batches <= 0:
            return []
        gen = torch.Generator().manual_seed(int(seed))
        n = len(self.train_batches)
        return [to_device(self.augmentation(self.train_batches[i % n], fraction, gen), self.device) for i in range(int(n_batches))]

    def calibration_inputs(self) -> list:
        """The ``calibration`` batches given, else the first ``calibration_batches`` distillation batches."""
        batches = self.calibration if self.calibration is not None else self.train_batches[: self.calibration_batches]
        return [to_device(b, self.device) for b in batches]

    # ------------------------------------------------------------------ setup
    def _outputs(self, model: nn.Module, batch: Any, where: str) -> tuple[torch.Tensor, Any]:
        raw = call(model, to_device(batch, self.device))
        return primary_output(raw, where=f"{self.name}: {where}"), raw

    def setup(self, original: nn.Module) -> None:
        """Record the original's outputs on the held-out batches; keep a frozen copy to distil from."""
        original.to(self.device)
        was_training = original.training
        original.eval()
        reference = []
        try:
            with torch.no_grad():
                for i, batch in enumerate(self.held_out):
                    out, raw = self._outputs(original, batch, f"original model output on held-out batch {i}")
                    check_finite(out, f"{self.name}: the original model's output on held-out batch {i}")
                    reference.append(out.detach().float())
                    if i == 0 and self.requested_metric == "auto":
                        is_logits = (
                            isinstance(raw, Mapping)
                            and isinstance(raw.get("logits"), torch.Tensor)
                            and out is raw["logits"]
                        )
                        self._metric = "top1" if is_logits else "cosine"
        finally:
            original.train(was_training)
        if self._metric == "top1" and (reference[0].dim() < 2 or reference[0].shape[-1] < 2):
            raise TaskError(
                f"{self.name}: top1 agreement needs logits with a class dimension; "
                f"the original's output has shape {tuple(reference[0].shape)} (use metric='cosine')"
            )
        self._reference = reference
        self._targets = {}
        try:
            teacher = copy.deepcopy(original)
        except Exception as exc:  # a module that cannot be copied: precompute every target instead
            logger.warning("%s: cannot copy the original model (%s); computing all distillation targets now", self.name, exc)
            self._teacher = original
            for i in range(len(self.train_batches)):
                self._target(i)
            self._teacher = None
        else:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            self._teacher = teacher
        logger.debug("%s: recorded %d held-out batches, metric %s", self.name, len(reference), self.metric)

    def _require_setup(self) -> list[torch.Tensor]:
        if self._reference is None:
            raise TaskError(f"{self.name}: call setup(original_model) before evaluate or finetune")
        return self._reference

    # ------------------------------------------------------------------ scoring
    def evaluate(self, model: nn.Module, *, fraction: float = 1.0) -> float:
        """Mean cosine similarity (or top-1 agreement) with the original's held-out outputs
        (``fraction``: on the first ``ceil(fraction · n)`` of the ``n`` held-out batches)."""
        reference = self._require_setup()
        if fraction != 1.0:
            reference = reference[: held_out_part(len(reference), fraction, f"{self.name}: evaluate")]
        model.to(self.device)
        was_training = model.training
        model.eval()
        total = 0.0
        count = 0
        try:
            with torch.no_grad():
                for i, (batch, ref) in enumerate(zip(self.held_out, reference)):
                    out, _ = self._outputs(model, batch, f"model output on held-out batch {i}")
                    if tuple(out.shape) != tuple(ref.shape):
                        raise TaskError(
                            f"{self.name}: model output on held-out batch {i} has shape {tuple(out.shape)}, "
                            f"the original's has {tuple(ref.shape)}"
                        )
                    if not (out.is_floating_point() or out.is_complex()):
                        raise TaskError(f"{self.name}: model output on held-out batch {i} is {out.dtype}, not floating point")
                    check_finite(out, f"{self.name}: model output on held-out batch {i}")
                    out = out.float()
                    if self._metric == "top1":
                        agree = out.argmax(dim=-1) == ref.argmax(dim=-1)
                        total += float(agree.sum())
                        count += agree.numel()
                    else:
                        n = out.shape[0] if out.dim() else 1
                        cos = F.cosine_similarity(out.reshape(n, -1), ref.reshape(n, -1), dim=1, eps=1e-8)
                        total += float(cos.clamp(-1.0, 1.0).sum(dtype=torch.float64))
                        count += n
        finally:
            model.train(was_training)
        return total / count

    # ------------------------------------------------------------------ distillation
    def _target(self, i: int) -> torch.Tensor:
        return self._cached_target(self._targets, i, self.train_batches[i], f"original model output on training batch {i}")

    def _cached_target(self, cache: dict[int, torch.Tensor], i: int, batch: Any, where: str) -> torch.Tensor:
        """The teacher's output on ``batch``, kept in ``cache`` under ``i`` (the task's own batches: across
        fine-tunes; augmented ones: for one fine-tune)."""
        hit = cache.get(i)
        if hit is None:
            if self._teacher is None:
                raise TaskError(f"{self.name}: call setup(original_model) before finetune")
            with torch.no_grad():
                out, _ = self._outputs(self._teacher, batch, where)
            hit = cache[i] = out.detach().float()
        return hit

    def _loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = out.float()
        if self._metric == "top1":
            t = self.temperature
            log_p = F.log_softmax(out.reshape(-1, out.shape[-1]) / t, dim=-1)
            log_q = F.log_softmax(target.reshape(-1, target.shape[-1]) / t, dim=-1)
            return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (t * t)
        return F.mse_loss(out, target)

    def finetune(self, model: nn.Module, steps: int, *, seed: int = 0,
                 control: Optional[FinetuneControl] = None) -> nn.Module:
        """Distil from the original for ``steps`` optimizer steps (seeded), then the model in eval mode.

        ``control`` (:class:`~autorank.tasks.distill.FinetuneControl`, used by
        :mod:`autorank.training.recovery`): feature distillation (the teacher's block outputs
        are computed once per distillation batch and kept, up to 1 GiB), trainable
        parameters, a wall-time budget with a cosine decay over it, a per-step
        callback. Without it, the plain recipe: the task's optimizer with a cosine
        decay over ``steps``.
        """
        self._require_setup()
        model.to(self.device)
        steps = int(steps)
        if steps <= 0:
            return model.eval()
        distiller: Optional[FeatureDistiller] = None
        teacher: Optional[nn.Module] = None
        scale_out = TermScale()
        features: dict[int, dict[str, torch.Tensor]] = {}
        cached_bytes = 0
        if control is None:
            opt, sched = make_schedule(self.optimizer, model, self.lr, steps)
        else:
            if control.features > 0:
                teacher = control.teacher if control.teacher is not None else self._teacher
                if teacher is None:
                    raise TaskError(f"{self.name}: feature distillation needs a teacher (the original could not be copied; "
                                    "pass control.teacher)")
                teacher.to(self.device)
                distiller = FeatureDistiller(model, teacher, feature_blocks(model, control.modules))
            # last: it freezes the parameters not trained until control.finish()
            opt = control.begin(lambda params, lr: make_optimizer(self.optimizer, params, lr), model, self.lr, distiller)
            sched = None
        gen = torch.Generator().manual_seed(int(seed))
        extra = list(control.extra_inputs or ()) if control is not None else []
        batches = self.train_batches + extra
        extra_targets: dict[int, torch.Tensor] = {}  # the teacher's outputs on the extra batches, this call only
        n = len(batches)
        order: list[int] = []
        model.train()
        try:
            with seeded(seed, self.device):
                for step in range(steps):
                    if not order:
                        order = torch.randperm(n, generator=gen).tolist()
                    i = order.pop()
                    target = (self._target(i) if i < len(self.train_batches) else
                              self._cached_target(extra_targets, i, batches[i], f"original model output on augmented batch {i}"))
                    teacher_features = None
                    if distiller is not None:
                        teacher_features = features.get(i)
                        if teacher_features is None:
                            with torch.no_grad():
                                call(teacher, to_device(batches[i], self.device))
                            teacher_features = distiller.take_teacher()
                            size = sum(t.numel() * t.element_size() for t in teacher_features.values())
                            if cached_bytes + size <= FEATURE_CACHE_BYTES:
                                features[i] = teacher_features
                                cached_bytes += size
                    if control is not None:
                        control.set_lr(opt, step, steps)
                    out, _ = self._outputs(model, batches[i], f"model output on training batch {i}")
                    if tuple(out.shape) != tuple(target.shape):
                        raise TaskError(
                            f"{self.name}: model output on training batch {i} has shape {tuple(out.shape)}, "
                            f"the original's has {tuple(target.shape)}"
                        )
                    loss = self._loss(out, target)
                    if control is not None:
                        loss = scale_out(loss)
                        if distiller is not None:
                            loss = loss + control.features * distiller.loss(teacher_features)
                    if not bool(torch.isfinite(loss)):
                        raise TaskError(f"{self.name}: the distillation loss became {float(loss.detach())} at step {step} of {steps}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if sched is not None:
                        sched.step()
                    if control is not None and control.after_step(step + 1):
                        break
        finally:
            model.eval()
            if distiller is not None:
                distiller.close()
            if control is not None:
                control.finish(steps)
        logger.debug("%s: distilled %d steps (seed %d)", self.name, control.steps_done if control else steps, seed)
        return model
