"""Recovery after compression: closed-form re-fitting, block-wise reconstruction, then a budgeted fine-tune.

One entry point per plan, :func:`recover`, which the search calls on the plans it
fine-tunes. Three stages, each kept only if the held-out score does not drop:

1. **Re-fit** (:func:`autorank.training.refit.refit`): each decomposed layer's re-fittable
   factors re-solved by least squares on the inputs that reach it through the
   compressed layers before it, in forward order; no labels, no gradient step,
   one pass over the inputs per layer.
2. **Block-wise reconstruction** (:func:`autorank.training.blockwise.reconstruct_blocks`):
   each block holding decomposed layers trained alone, on its recorded inputs, to
   reproduce the original block's outputs; a ``share`` of the budget.
3. **End-to-end fine-tune** with the rest of the budget (steps and/or wall time):
   for the built-in tasks with feature distillation (the outputs of the blocks
   holding decomposed layers matched to the original's besides the final output)
   and a choice of trainable parameters
   (:class:`~autorank.tasks.distill.FinetuneControl`); for any task, early stopping
   on the held-out split (``task.evaluate`` every ``every`` steps, stop after
   ``patience`` evaluations without improvement) that restores the best weights, so
   the result is never worse on the held-out split than the weights the fine-tune
   started from. A user task (``finetune(model, steps, *, seed=0)`` only) is
   fine-tuned in chunks of ``every`` steps with an evaluation between chunks (each
   chunk restarts that task's own optimizer and schedule).

The inputs of stages 1 and 2 are the task's fine-tuning inputs
(``task.training_inputs(batches)`` of the built-in tasks; a task without it gives
its ``calibration_inputs()``). A task that can make more of them
(``task.augmented_inputs``: a fidelity task with an augmentation, such as the
``minilm`` task's token replacement, :mod:`autorank.tasks.augment`) adds ``augment.batches``
new ones to stages 2 and 3: a few hundred sentences leave the compressed model fitted
to their words only.

Options take the form of the search space's ``training:`` block
(:meth:`RecoveryOptions.from_dict`; every key optional, the defaults shown)::

    training:
      refit: {ridge: 0.1, low_rank: true, batches: 16}          # false: skip
      blockwise: {share: 0.9, lr: 1.0e-3, trainable: null, batches: 16}   # false: skip; trainable null: as distill's
      distill: {features: 2.0, output: 1.0, trainable: all, modules: null}   # false: the output only
      augment: {batches: 256, fraction: 0.4}   # false: the task's own inputs only
      early_stopping: {every: 25, patience: 5, after: 0.5}     # false: no evaluations in between
      finetune_steps: null             # a step budget per plan (null: the search's)
      finetune_time: null              # a wall-time budget per plan: "90s", "5m", "1h" or seconds
      lr: null                         # overrides the task's learning rate (built-in tasks)

References
----------
- X. Zhang, J. Zou, K. He, J. Sun. Accelerating Very Deep Convolutional Networks
  for Classification and Detection. TPAMI 2016 (asymmetric reconstruction).
- Y. Li et al. BRECQ: Pushing the Limit of Post-Training Quantization by Block
  Reconstruction. ICLR 2021.
- A. Romero et al. FitNets: Hints for Thin Deep Nets. ICLR 2015; X. Jiao et al.
  TinyBERT. Findings of EMNLP 2020 (intermediate-feature distillation).
- L. Prechelt. Early Stopping — But When? In Neural Networks: Tricks of the Trade,
  Springer 1998 (stop after a number of evaluations without improvement, keep the best).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from autorank.errors import TaskError
from autorank.tasks.distill import FinetuneControl
from autorank.training.blockwise import reconstruct_blocks
from autorank.training.recovery_options import (
    RECOVERY_KEYS,
    AugmentOptions,
    BlockwiseOptions,
    DistillOptions,
    EarlyStopping,
    RecoveryError,
    RecoveryOptions,
    RefitOptions,
    parse_duration,
)
from autorank.training.refit import refit

logger = logging.getLogger("autorank")

__all__ = [
    "RecoveryError",
    "RefitOptions",
    "BlockwiseOptions",
    "DistillOptions",
    "AugmentOptions",
    "EarlyStopping",
    "RecoveryOptions",
    "RecoveryReport",
    "RECOVERY_KEYS",
    "parse_duration",
    "recover",
    "supports_control",
]

# ---------------------------------------------------------------------- report
@dataclass
class RecoveryReport:
    """What :func:`recover` did (JSON-able with :meth:`to_dict`; the search keeps it in the trial record).

    ``zero_shot``: the held-out score before recovery. ``refit``: the per-layer
    report, the score after it and whether it was kept. ``blockwise``: per block the
    loss before and after, steps and seconds, the score after it and whether it was
    kept. ``augment``: the augmented batches the block-wise stage and the fine-tune distilled on
    besides the task's own (``batches``, ``fraction``, ``seconds`` to make them), None when there
    were none. ``finetune``: steps taken,
    seconds, the step whose weights were kept (``best_step``, 0 = the starting
    weights), whether early stopping ended it, why it stopped (``steps``, ``time``,
    ``patience``, ``diverged``: a non-finite loss, weights or outputs), the
    evaluations ``[[step, score], ...]`` (score None where it diverged). ``score``: the final
    held-out score; ``seconds``: the whole recovery.
    """

    zero_shot: float
    score: float = float("nan")
    seconds: float = 0.0
    refit: Optional[dict[str, Any]] = None
    blockwise: Optional[dict[str, Any]] = None
    finetune: Optional[dict[str, Any]] = None
    augment: Optional[dict[str, Any]] = None

    def to_dict(self) -> dict[str, Any]:
        return {"zero_shot": self.zero_shot, "score": self.score, "seconds": self.seconds,
                "refit": self.refit, "blockwise": self.blockwise, "finetune": self.finetune, "augment": self.augment}


# ---------------------------------------------------------------------- recover
def supports_control(task: Any) -> bool:
    """Whether ``task.finetune`` takes a ``control`` (a built-in task, or one written like them)."""
    try:
        return "control" in inspect.signature(task.finetune).parameters
    except (TypeError, ValueError):
        return False


def _augmented(task: Any, opts: Optional[AugmentOptions], seed: int) -> list:
    """The task's augmented distillation batches (``task.augmented_inputs``), or none when it has no augmentation."""
    fn = getattr(task, "augmented_inputs", None)
    if opts is None or not callable(fn):
        return []
    return list(fn(opts.batches, fraction=opts.fraction, seed=seed))


def _refit_inputs(task: Any, batches: int) -> Any:
    """``task.training_inputs(batches)`` when the task has it, else ``task.calibration_inputs()``."""
    fn = getattr(task, "training_inputs", None)
    return fn(batches) if callable(fn) else task.calibration_inputs()


def _state(model: nn.Module, shared: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s weights, less the tensors it shares with the original (``shared``: their
    storage addresses), which recovery never trains (see :meth:`RecoveryOptions.trains_only_decomposed`):
    a trial that shares an LLM's parameters keeps a copy of its factors only. Restore with
    ``load_state_dict(state, strict=False)``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.data_ptr() not in shared}


def _shared(original: nn.Module, compressed: nn.Module) -> frozenset:
    """The storage addresses of the tensors ``compressed`` shares with ``original`` (none after a copy)."""
    mine = {v.data_ptr() for v in compressed.state_dict().values()}
    return frozenset(p for p in (v.data_ptr() for v in original.state_dict().values()) if p in mine and p != 0)


def _score(task: Any, model: nn.Module) -> float:
    with torch.no_grad():
        value = task.evaluate(model)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise RecoveryError(f"the task's evaluate() returned {value!r}, expected a finite float")
    return float(value)


class _Tracker:
    """Evaluations on the held-out split during a fine-tune: the best weights, patience, the time budget."""

    def __init__(self, task: Any, model: nn.Module, start_score: float, early: Optional[EarlyStopping],
                 deadline: Optional[float], horizon: Optional[int] = None, shared: frozenset = frozenset()):
        self.task, self.model, self.early, self.deadline, self.horizon = task, model, early, deadline, horizon
        self.shared = shared
        self.t0 = time.perf_counter()
        self.best_score, self.best_step = start_score, 0
        self.best_state = _state(model, shared)
        self.evaluations: list[list] = [[0, start_score]]
        self.bad = 0
        self.stopped_by = ""
        self.last_evaluated = 0

    def evaluate(self, step: int) -> None:
        try:
            if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
                raise TaskError("non-finite weights")
            score = _score(self.task, self.model)
        except TaskError as exc:  # it scored the starting weights: the fine-tune broke the model (NaN outputs...)
            logger.info("fine-tune diverged at step %d (%s): the best weights so far are kept", step, exc)
            self.evaluations.append([step, None])  # no score (JSON-able); never the best
            self.last_evaluated = step
            self.stopped_by = "diverged"
            return
        self.evaluations.append([step, score])
        self.last_evaluated = step
        if score > self.best_score:
            self.best_score, self.best_step, self.bad = score, step, 0
            self.best_state = _state(self.model, self.shared)
        else:
            self.bad += 1

    def progress(self, step: int) -> float:
        """The share of the budget spent: the larger of the shares of steps and of time."""
        done = step / self.horizon if self.horizon else 0.0
        if self.deadline is not None:
            done = max(done, (time.perf_counter() - self.t0) / max(1e-9, self.deadline - self.t0))
        return done

    def __call__(self, step: int) -> bool:
        """After optimizer step ``step``: evaluate on schedule; True to stop."""
        if self.early is not None and step % self.early.every == 0:
            self.evaluate(step)
            if self.stopped_by == "diverged":
                return True
            if self.bad >= self.early.patience and self.progress(step) >= self.early.after:
                self.stopped_by = "patience"
                return True
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            self.stopped_by = "time"
            return True
        return False


def recover(
    original: nn.Module,
    compressed: nn.Module,
    task: Any,
    options: Union[RecoveryOptions, Mapping, None] = None,
    *,
    steps: Optional[int] = None,
    time_s: Optional[float] = None,
    seed: int = 0,
    calibration: Any = None,
    zero_shot_score: Optional[float] = None,
) -> tuple[nn.Module, RecoveryReport]:
    """Re-fit then fine-tune ``compressed`` (in place) with ``options``; the model and a :class:`RecoveryReport`.

    ``original``: the model ``compressed`` was decomposed from (the re-fit targets
    and the distillation teacher; its weights are not changed). ``task``: any task
    (``setup(original)`` already called, as the search does). ``steps`` /
    ``time_s``: the fine-tuning budget per plan, overriding
    ``options.finetune_steps`` / ``options.finetune_time``; with neither, the task's
    ``default_finetune_steps`` or 100; with only a time, steps are unbounded and the
    time (re-fit included) ends the fine-tune. ``calibration``: inputs for the
    re-fit and the block-wise stage (default: ``task.training_inputs(batches)``,
    else ``task.calibration_inputs()``). ``zero_shot_score``: the
    held-out score of ``compressed`` if already known (saves one evaluation). The
    result is never worse on the held-out split than ``compressed`` was: a re-fit
    that lowers the score is undone, and the fine-tune keeps its best evaluated
    weights (the starting ones included).
    """
    opts = RecoveryOptions.from_dict(options)
    device = torch.device(getattr(task, "device", "cpu") or "cpu")
    compressed.to(device).eval()
    zero = float(zero_shot_score) if zero_shot_score is not None else _score(task, compressed)
    t0 = time.perf_counter()  # the budget counts from here
    report = RecoveryReport(zero_shot=zero, score=zero)
    time_budget = time_s if time_s is not None else opts.finetune_time
    if time_budget is not None and not (float(time_budget) > 0):
        raise RecoveryError(f"recover: time_s must be a positive number of seconds, got {time_budget!r}")
    if steps is None:
        steps = opts.finetune_steps
    if steps is None:
        steps = None if time_budget is not None else int(getattr(task, "default_finetune_steps", 100))
    elif isinstance(steps, bool) or int(steps) < 0:
        raise RecoveryError(f"recover: steps must be an integer >= 0, got {steps!r}")
    deadline = t0 + float(time_budget) if time_budget is not None else None
    current = zero
    shared = _shared(original, compressed)
    if shared and not opts.trains_only_decomposed(supports_control(task)):
        raise RecoveryError("recover: the compressed model shares parameters with the original, and these options train "
                            "more than the decomposed layers (distill.trainable / blockwise.trainable: all); decompose a copy "
                            "(share=False) or train the decomposed layers only")

    # ---- 1. re-fit
    if opts.refit is not None:
        inputs = calibration if calibration is not None else _refit_inputs(task, opts.refit.batches)
        before = _state(compressed, shared)
        rep = refit(original, compressed, inputs, ridge=opts.refit.ridge, low_rank=opts.refit.low_rank)
        score = _score(task, compressed)
        current, kept = _keep_or_undo(compressed, before, current, score, "refit")
        report.refit = {**rep.to_dict(), "score": score, "kept": kept}

    t_aug = time.perf_counter()
    extra = _augmented(task, opts.augment, seed)
    if extra:
        report.augment = {"batches": len(extra), "fraction": opts.augment.fraction, "seconds": time.perf_counter() - t_aug}

    # ---- 2. block-wise reconstruction, a share of the budget
    bw = opts.blockwise
    if bw is not None and (steps is None or steps > 0) and (deadline is None or time.perf_counter() < deadline):
        block_steps = max(1, round(bw.share * steps)) if steps is not None else 10**9
        block_time = None if deadline is None else bw.share * (deadline - time.perf_counter())
        inputs = calibration if calibration is not None else list(_refit_inputs(task, bw.batches)) + extra
        before = _state(compressed, shared)
        rep_b = reconstruct_blocks(original, compressed, inputs, steps=block_steps, lr=bw.lr, trainable=opts.blockwise_trainable(),
                                   time_s=block_time, seed=seed,
                                   max_time_s=None if deadline is None else min(deadline - time.perf_counter(), 1.25 * block_time))
        score = _score(task, compressed) if rep_b.blocks else current
        current, kept = _keep_or_undo(compressed, before, current, score, "block-wise reconstruction")
        report.blockwise = {**rep_b.to_dict(), "score": score, "kept": kept}
        if steps is not None:
            steps = max(0, steps - block_steps)

    # ---- 3. fine-tune end to end
    if (steps is None or steps > 0) and (deadline is None or time.perf_counter() < deadline):
        report.finetune = _finetune(original, compressed, task, opts, steps, deadline, seed, current, shared, extra)
        current = report.finetune["score"]
    report.score = current
    report.seconds = time.perf_counter() - t0
    compressed.eval()
    return compressed, report


def _keep_or_undo(model: nn.Module, before: dict, current: float, score: float, stage: str) -> tuple[float, bool]:
    """A stage is kept when the held-out score did not drop, else its weights are put back: (score now, kept)."""
    if score >= current:
        return score, True
    model.load_state_dict(before, strict=False)
    logger.info("%s lowered the held-out score (%.4f -> %.4f): undone", stage, current, score)
    return current, False


def _diverged(model: nn.Module, exc: Exception) -> bool:
    """A fine-tune that blew up: non-finite weights, or the tasks' non-finite loss error."""
    return "became" in str(exc) or not all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _finetune(original: nn.Module, model: nn.Module, task: Any, opts: RecoveryOptions, steps: Optional[int],
              deadline: Optional[float], seed: int, start_score: float, shared: frozenset = frozenset(),
              extra: Optional[list] = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    horizon = int(steps) if steps is not None else 10**9
    tracker = _Tracker(task, model, start_score, opts.early_stopping, deadline, None if steps is None else horizon, shared)
    distill = opts.distill or DistillOptions(features=0.0)
    out: dict[str, Any] = {"budget_steps": steps, "budget_time_s": None if deadline is None else deadline - t0}
    torch.manual_seed(seed)
    if supports_control(task):
        control = FinetuneControl(
            features=distill.features, output=distill.output, modules=distill.modules, teacher=original,
            trainable=distill.trainable, lr=opts.lr, callback=tracker,
            time_s=None if deadline is None else max(1e-3, deadline - time.perf_counter()),
            extra_inputs=extra or None,
        )
        try:
            task.finetune(model, horizon, seed=seed, control=control)
        except TaskError as exc:
            if not _diverged(model, exc):
                raise
            tracker.stopped_by = "diverged"
        done = control.steps_done
        stopped = tracker.stopped_by or control.stopped_by
        out["distill"] = asdict(distill)
    else:
        if opts.distill not in (None, DistillOptions()) or opts.lr is not None:  # the user asked for them
            logger.warning("task %s: its finetune() takes no control: feature distillation, trainable and lr options "
                           "are not applied (early stopping and the budget are)", getattr(task, "name", type(task).__name__))
        chunk = opts.early_stopping.every if opts.early_stopping is not None else horizon
        done, k, stopped = 0, 0, ""
        while done < horizon:
            n = min(chunk, horizon - done)
            if deadline is not None and steps is None and opts.early_stopping is None:
                n = min(n, 25)  # a time budget without early stopping still checks the clock
            try:
                task.finetune(model, n, seed=seed + k)
            except TaskError as exc:
                if not _diverged(model, exc):
                    raise
                stopped, done = "diverged", done + n
                break
            done, k = done + n, k + 1
            if opts.early_stopping is not None and tracker(done):
                stopped = tracker.stopped_by
                break
            if deadline is not None and time.perf_counter() >= deadline:
                stopped = "time"
                break
        stopped = stopped or "steps"
        out["distill"] = None
    if tracker.last_evaluated != done and done > 0 and stopped != "diverged":
        tracker.evaluate(done)
    if tracker.best_step != done:
        model.load_state_dict(tracker.best_state, strict=False)
    model.eval()
    out.update({
        "steps": int(done),
        "seconds": time.perf_counter() - t0,
        "best_step": int(tracker.best_step),
        "early_stopped": stopped == "patience",
        "stopped_by": stopped,
        "evaluations": tracker.evaluations,
        "score": tracker.best_score,
        "start_score": start_score,
    })
    return out
