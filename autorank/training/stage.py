"""The search's fine-tuning stage: decompose a plan and fine-tune it with the training-time options."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from autorank.cache import FactorCache
from autorank.surgery import decompose
from autorank.training.bn import fold_factor_bn, insert_factor_bn
from autorank.training.fixed_point import freeze_fixed_point, quantize_factors
from autorank.training.force import force_regularize, force_targets
from autorank.training.recovery import RECOVERY_KEYS, RecoveryOptions, RecoveryReport, recover

logger = logging.getLogger("autorank")

__all__ = ["apply_training", "deployed_zero_shot", "recovery_summary"]


def deployed_zero_shot(build: Any, training: Optional[dict]) -> Optional[nn.Module]:
    """The zero-shot model (``build()``, called only when needed) in the form the options deliver, or None.

    None means the plain zero-shot model is that form already.

    What a fine-tune with these options is compared with: with ``fixed_point`` the
    deliverable is an int8 model, so the fallback is the decomposition quantised
    without training; batch norms fold to nothing and force regularization changes
    only the starting point, so they need no other fallback than ``model``.
    """
    bits = (training or {}).get("fixed_point")
    if not bits:
        return None
    model = build()
    freeze_fixed_point(model, bits=int(bits))
    return model


def apply_training(
    dense: nn.Module,
    plan: Any,
    task: Any,
    training: Optional[dict],
    *,
    steps: Optional[int],
    seed: int = 0,
    calibration: Any = None,
    cache: Any = None,
    decomposed: Optional[nn.Module] = None,
    time_s: Optional[float] = None,
    zero_shot_score: Optional[float] = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Decompose ``dense`` by ``plan`` and fine-tune it with the training-time options; (model, what was applied).

    ``training`` (the search space's ``training`` mapping, any subset):

    1. ``force_regularization: {steps, strength}``: a copy of ``dense`` is trained by
       :func:`force_regularize` toward the plan's ranks (:func:`force_targets`), then
       decomposed instead of ``dense`` (same calibration statistics; a private factor
       cache, since its weights are never seen again);
    2. ``bn_between_factors``: :func:`insert_factor_bn` (initialised from the task's
       calibration inputs when it has them) before fine-tuning, :func:`fold_factor_bn`
       after;
    3. ``fixed_point: bits``: :func:`quantize_factors` before fine-tuning,
       :func:`freeze_fixed_point` after.

    Then recovery (:func:`autorank.training.recovery.recover`, with the
    ``training`` keys of :data:`~autorank.training.recovery.RECOVERY_KEYS`): the
    closed-form re-fit, block-wise reconstruction and the task's fine-tune with
    feature distillation and early stopping, within ``steps`` optimizer steps
    (None: unbounded when ``time_s`` is given) and ``time_s`` seconds.
    ``decomposed``: ``dense`` already decomposed by ``plan`` (reused unless force
    regularization asks for another starting point); ``zero_shot_score``: its
    held-out score, if known. The returned model is in eval mode with the plain
    Decomposed structure (what :func:`autorank.save` / :func:`autorank.load`
    handle). The dict says which options were applied, with counts, and
    ``recovery``: how the plan was recovered (:func:`recovery_summary`).
    """
    training = dict(training or {})
    applied: dict[str, Any] = {}
    device = next((p.device for p in dense.parameters()), torch.device("cpu"))
    fr = training.get("force_regularization")
    if fr:
        fr = {"steps": 50, "strength": 0.05, **(fr if isinstance(fr, dict) else {})}
        shapes = dict(getattr(calibration, "input_shapes", None) or {}) or None
        targets = force_targets(dense, plan, shapes)
        report: dict[str, Any] = {}
        reg = force_regularize(dense, targets, task, steps=int(fr["steps"]), strength=float(fr["strength"]), seed=seed, report=report)
        model = decompose(reg, plan, calibration, cache=FactorCache())
        before, after = report["energy_before"], report["energy_after"]
        applied["force_regularization"] = {
            "steps": int(fr["steps"]), "strength": float(fr["strength"]), "layers": len(targets), "pulls": report["pulls"],
            "energy_share_before": sum(before.values()) / max(1, len(before)),
            "energy_share_after": sum(after.values()) / max(1, len(after)),
        }
    elif decomposed is not None:
        model = decomposed
    else:
        model = decompose(dense, plan, calibration, cache=cache)
    model = model.to(device).eval()
    bn = bool(training.get("bn_between_factors"))
    if bn:
        inputs = None
        try:
            inputs = task.calibration_inputs()
        except Exception as exc:  # a task without calibration inputs: identity initialisation
            logger.debug("no calibration inputs for the batch-norm initialisation: %s", exc)
        applied["bn_between_factors"] = insert_factor_bn(model, inputs)
    bits = training.get("fixed_point")
    if bits:
        applied["fixed_point"] = {"bits": int(bits), "layers": quantize_factors(model, int(bits))}
    torch.manual_seed(seed)
    recovery = RecoveryOptions.from_dict({k: v for k, v in training.items() if k in RECOVERY_KEYS})
    model, report = recover(dense, model, task, recovery, steps=steps, time_s=time_s, seed=seed,
                            zero_shot_score=None if (bn or bits) else zero_shot_score)
    applied["recovery"] = {"options": recovery.summary(), **recovery_summary(report)}
    if bn:
        fold_factor_bn(model)
    if bits:
        freeze_fixed_point(model)
    return model.eval(), applied


def recovery_summary(report: RecoveryReport) -> dict[str, Any]:
    """What the front shows of a recovery: scores after each stage, steps and seconds, why it stopped,
    the augmented batches distilled on besides the task's own."""
    ft = report.finetune or {}
    out: dict[str, Any] = {"zero_shot": report.zero_shot, "score": report.score, "seconds": report.seconds,
                           "steps": ft.get("steps", 0), "best_step": ft.get("best_step"), "stopped_by": ft.get("stopped_by")}
    for stage in ("refit", "blockwise"):
        rep = getattr(report, stage)
        if rep is not None:
            out[stage] = {"score": rep.get("score"), "kept": rep.get("kept")}
    if report.refit is not None:
        out["refit"]["layers"] = report.refit.get("refitted", 0)
    if report.augment is not None:
        out["augmented_batches"] = report.augment["batches"]
    return out
