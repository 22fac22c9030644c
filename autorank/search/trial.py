"""One trial: plan → decompose (factor cache) → (fine-tune) → evaluate.

:class:`TrialRunner` holds what is expensive and shared by every trial of a
process — the model, the task and its data, the calibration statistics and the
factor cache — and is built once per process (the driver's, or each Ray worker's).
Its methods take and return JSON-able dicts, so that the same code runs in the
driver and on a remote worker.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import traceback
from typing import Any, Optional

import torch
from torch import nn

from autorank.cache import FactorCache
from autorank.calibration import Calibration, collect
from autorank.errors import AutorankError
from autorank.factor_layers import model_bytes
from autorank.plan import Plan
from autorank.saving import save
from autorank.search.sensitivity import collect_statistics, layer_errors
from autorank.surgery import decompose
from autorank.tasks.base import supports_fraction
from autorank.training.recovery import RECOVERY_KEYS, RecoveryOptions, supports_control
from autorank.training.stage import apply_training, deployed_zero_shot

logger = logging.getLogger("autorank")

__all__ = ["TrialRunner", "TrialError", "where"]


class TrialError(AutorankError, RuntimeError):
    """A trial that could not produce a score (the search records it as failed and goes on)."""


def where() -> dict[str, Any]:
    """Where this code runs: host, pid, and the Ray node when inside a Ray worker."""
    out: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    try:  # only when Ray is already imported and initialised in this process
        import sys

        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ctx = ray.get_runtime_context()
                out["node_id"] = ctx.get_node_id()
                out["node_ip"] = ray.util.get_node_ip_address()
    except Exception:  # pragma: no cover - informational only
        pass
    return out


def _finite_score(value: Any, what: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrialError(f"the task's {what} returned {type(value).__name__}, expected a float (higher is better)")
    value = float(value)
    if not math.isfinite(value):
        raise TrialError(f"the task's {what} returned {value} (not finite)")
    return value


class TrialRunner:
    """Model, task, calibration and factor cache, loaded once; trials run against them.

    ``calibrate``: layer names whose input statistics data-aware methods need
    (None: every decomposable layer). ``cache_dir``: on-disk factor cache shared
    by the processes of a node (None: memory only).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Any,
        *,
        calibrate: Optional[list[str]] = None,
        cache_dir: Optional[str] = None,
        setup: bool = True,
    ):
        t0 = time.perf_counter()
        self.task = task
        self.device = torch.device(getattr(task, "device", "cpu") or "cpu")
        self.model = model.to(self.device).eval()
        if setup:
            task.setup(self.model)
        self.calibration: Optional[Calibration] = None
        inputs = task.calibration_inputs()
        if inputs is not None and (calibrate is None or calibrate):
            self.calibration = collect(self.model, inputs, calibrate)
        # memory bound as for the process-wide cache ($AUTORANK_CACHE_MAX_BYTES, default 2 GiB); misses go to disk
        self.cache = FactorCache(directory=cache_dir, max_bytes=int(os.environ.get("AUTORANK_CACHE_MAX_BYTES", 2 << 30)))
        self.setup_s = time.perf_counter() - t0
        self.trials_run = 0
        self._estimate_stats: Optional[dict] = None  # the sensitivity estimate's statistics, built on first use

    # ------------------------------------------------------------------ building
    def build(self, plan: Plan, *, share: bool = True) -> nn.Module:
        """The plan's model. ``share``: it shares every untouched parameter with ``self.model``
        (no copy: memory for the replaced layers only); only the task's ``evaluate`` (which must
        not change weights) and a fine-tune that trains only the factors may use it."""
        model = decompose(self.model, plan, self.calibration, cache=self.cache, share=share)
        return model.to(self.device).eval()

    def _finetune_shares(self, training: Optional[dict]) -> bool:
        """Whether fine-tuning leaves parameters outside the decomposed layers alone, so that the plan's
        model may share them with the original: the task's ``finetune`` says so
        (``task.finetune_preserves_original``) and the recovery options train the decomposed layers only;
        otherwise fine-tuning gets an independent copy."""
        if not getattr(self.task, "finetune_preserves_original", False):
            return False
        opts = RecoveryOptions.from_dict({k: v for k, v in (training or {}).items() if k in RECOVERY_KEYS})
        return opts.trains_only_decomposed(supports_control(self.task))

    def evaluate(self, model: nn.Module, fraction: float = 1.0) -> float:
        """The task's score of ``model``; ``fraction`` < 1: on that part of its held-out split (a task whose
        ``evaluate`` takes no ``fraction`` is scored whole)."""
        with torch.no_grad():
            if fraction != 1.0 and supports_fraction(self.task):
                return _finite_score(self.task.evaluate(model, fraction=fraction), "evaluate()")
            return _finite_score(self.task.evaluate(model), "evaluate()")

    # ------------------------------------------------------------------ jobs
    def run(self, kind: str, payload: dict) -> dict[str, Any]:
        """Run one job by name: ``zero_shot``, ``finetune``, ``save`` or ``estimate`` (the executors' single entry point)."""
        if kind == "zero_shot":
            return self.zero_shot(payload["plan"], fraction=float(payload.get("fraction", 1.0)))
        if kind == "estimate":
            return self.estimate(payload["layers"], all_layers=payload.get("all_layers"), weighting=payload.get("weighting", True),
                                 seed=payload.get("seed", 0))
        if kind == "save":
            return self.materialize(payload["plan"], payload["save_to"], spec=payload.get("spec"), metadata=payload.get("metadata"))
        if kind == "finetune":
            return self.finetune(payload["plan"], payload["steps"], seed=payload["seed"], save_to=payload.get("save_to"),
                                 spec=payload.get("spec"), metadata=payload.get("metadata"), training=payload.get("training"),
                                 time_s=payload.get("time_s"))
        raise ValueError(f"unknown job kind {kind!r}")

    def zero_shot(self, plan_dict: dict, fraction: float = 1.0) -> dict[str, Any]:
        """Score a plan without training (``fraction``: on that part of the held-out split, see
        :meth:`evaluate`). Never raises: failures come back with ``error``."""
        out: dict[str, Any] = {"where": where()}
        t0 = time.perf_counter()
        try:
            plan = Plan.from_dict(plan_dict)
            model = self.build(plan)
            t1 = time.perf_counter()
            out["score"] = self.evaluate(model, fraction)
            t2 = time.perf_counter()
            out["time_decompose_s"] = t1 - t0
            out["time_evaluate_s"] = t2 - t1
        except Exception as exc:  # recorded as a failed trial; the search goes on
            out.update(_error(exc))
        out["time_total_s"] = time.perf_counter() - t0
        self.trials_run += 1
        return out

    def finetune(self, plan_dict: dict, steps: Optional[int], *, seed: int = 0, save_to: Optional[str] = None,
                 spec: Optional[str] = None, metadata: Optional[dict] = None, training: Optional[dict] = None,
                 time_s: Optional[float] = None) -> dict[str, Any]:
        """Decompose, recover (re-fit, block-wise, fine-tune) within ``steps`` steps and ``time_s`` seconds,
        evaluate; optionally save the weights (autorank.save format).

        ``training``: the search space's training-time options (``bn_between_factors``,
        ``force_regularization``, ``fixed_point`` and the recovery options; see
        :mod:`autorank.training` and :mod:`autorank.training.recovery`).
        """
        out: dict[str, Any] = {"where": where(), "steps": None if steps is None else int(steps), "time_s": time_s}
        t0 = time.perf_counter()
        try:
            plan = Plan.from_dict(plan_dict)
            model = self.build(plan, share=self._finetune_shares(training))
            zero_shot = out["zero_shot_score"] = self.evaluate(model)
            t1 = time.perf_counter()
            torch.manual_seed(seed)
            model, applied = apply_training(self.model, plan, self.task, training, steps=None if steps is None else int(steps),
                                            seed=seed, calibration=self.calibration, cache=self.cache, decomposed=model,
                                            time_s=time_s, zero_shot_score=zero_shot)
            model = model.to(self.device).eval()
            t2 = time.perf_counter()
            out["finetuned_score"] = score = self.evaluate(model)
            out["time_finetune_s"] = t2 - t1
            out["recovery"] = applied.pop("recovery", None)
            if applied:
                out["training"] = applied
            # the zero-shot model in the form the options deliver (fixed point: quantised without training)
            baseline, fallback = zero_shot, deployed_zero_shot(lambda: self.build(plan), training)
            if fallback is not None:
                baseline = out["zero_shot_deployed_score"] = self.evaluate(fallback)
            if score < baseline:  # fine-tuning made it worse: keep the zero-shot weights (rebuilt: the structures differ)
                model = fallback if fallback is not None else self.build(plan)
                score = baseline
                out["kept_zero_shot"] = True
            out["score"] = score
            out["bytes"] = model_bytes(model)
            if save_to is not None:
                save(model, save_to, spec=spec, metadata=metadata)  # tensors go to the CPU one by one
                out["weights"] = str(save_to)
        except Exception as exc:
            out.update(_error(exc))
        out["time_total_s"] = time.perf_counter() - t0
        return out

    def estimate(self, layers: list[dict], *, all_layers: Optional[list[str]] = None, weighting: bool = True,
                 seed: int = 0) -> dict[str, Any]:
        """The sensitivity estimate's layer errors (:mod:`autorank.search.sensitivity`). Never raises.

        ``layers``: ``[{"name": ..., "methods": {method: [[rho, rank], ...]}}]``. The
        statistics (one pass over the calibration batches, for ``all_layers``) are
        collected on the first call and kept. Returns ``{"errors": {name: {method:
        [[rho, error or None], ...]}}}``.
        """
        out: dict[str, Any] = {"where": where()}
        t0 = time.perf_counter()
        try:
            names = [d["name"] for d in layers]
            if self._estimate_stats is None or any(n not in self._estimate_stats for n in names):
                wanted = sorted(set(all_layers or []) | set(names))
                stats = collect_statistics(self.model, self.task.calibration_inputs(), wanted, calibration=self.calibration,
                                           weighting=weighting, seed=seed)
                self._estimate_stats = {**(self._estimate_stats or {}), **stats}
            t1 = time.perf_counter()
            modules = dict(self.model.named_modules())
            errors: dict[str, dict[str, list]] = {}
            for d in layers:
                name = d["name"]
                st = self._estimate_stats.get(name)
                for method, pts in d["methods"].items():
                    if st is None:
                        errs = [None] * len(pts)
                    else:
                        method_stats = self.calibration.get(name) if self.calibration is not None else None
                        errs = layer_errors(modules[name], method, [p[1] for p in pts], st, cache=self.cache, method_stats=method_stats)
                    errors.setdefault(name, {})[method] = [[p[0], e] for p, e in zip(pts, errs)]
            out["errors"] = errors
            out["time_statistics_s"] = t1 - t0
        except Exception as exc:
            out.update(_error(exc))
        out["time_total_s"] = time.perf_counter() - t0
        return out

    def materialize(self, plan_dict: dict, save_to: str, *, spec: Optional[str] = None, metadata: Optional[dict] = None) -> dict[str, Any]:
        """Build a plan zero-shot and save it (autorank.save format), for front members not fine-tuned."""
        out: dict[str, Any] = {"where": where()}
        try:
            save(self.build(Plan.from_dict(plan_dict)), save_to, spec=spec, metadata=metadata)
            out["weights"] = str(save_to)
        except Exception as exc:
            out.update(_error(exc))
        return out

    def base_score(self) -> float:
        return self.evaluate(self.model)


def _error(exc: BaseException) -> dict[str, Any]:
    kind = type(exc).__name__
    if isinstance(exc, torch.cuda.OutOfMemoryError) or isinstance(exc, MemoryError):
        kind = "OutOfMemory"
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else kind
    logger.debug("trial failed: %s", "".join(traceback.format_exception(exc)))
    return {"error": f"{kind}: {msg}"[:500], "error_type": kind}
