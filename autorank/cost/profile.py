"""The profile of a model: its decomposable layers, their shapes and costs; analytic plan costs.

:func:`profile_model` runs the model once on an example input (hooks record each
layer's input shape) and counts the whole model with fvcore. From then on,
:meth:`ModelProfile.estimate` gives the exact FLOPs and parameters of any plan
with no tracing: the base counts, minus the replaced layers, plus the methods'
formulas. It equals fvcore's count of the decomposed model (tests check it) and
is memoised per (layer, method, rank), so that a search can check and repair
thousands of plans cheaply.

FLOPs follow fvcore's convention: one multiply-add is one FLOP.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from autorank import methods as registry
from autorank.calibration import record_input_shapes
from autorank.candidates import candidate_layers
from autorank.cost.flops import count_flops, count_params
from autorank.errors import NotApplicableError, RankError, UnknownLayerError
from autorank.methods._base import Rank, align_rank, dense_cost
from autorank.methods._layers import Cost, LayerSpec, layer_spec
from autorank.plan import LayerPlan, Plan

__all__ = ["LayerProfile", "ModelProfile", "profile_model"]


@dataclass
class LayerProfile:
    """One candidate layer: shape, dense cost on its real input, methods that apply (or why not)."""

    name: str
    type: str
    spec: LayerSpec
    input_shape: tuple[int, ...]
    dense: Cost
    reasons: dict[str, Optional[str]]
    excluded: Optional[str] = None
    latency: Optional[float] = None  # seconds, when measured
    #: per method, the largest measured rank whose latency is below the dense layer's (None: none is), when measured
    latency_break_even: dict[str, Optional[Rank]] = field(default_factory=dict)

    def applicable(self) -> list[str]:
        if self.excluded:
            return []
        return [m for m, why in self.reasons.items() if why is None]

    def break_even(self, method: str) -> Optional[Rank]:
        """The largest rank whose replacement costs no more FLOPs than the dense layer (None: never cheaper).

        Its latency counterpart, measured on a device, is ``latency_break_even[method]``
        (see :func:`autorank.cost.latency.device_ranks`): on a CPU it is often far
        below this one, since a factorized layer runs more, smaller kernels.
        """
        m = registry.get(method)
        path = m.rank_path(self.spec)
        if m.cost(self.spec, path[0], self.input_shape).flops > self.dense.flops:
            return None
        return m.rank_for(self.spec, 1.0, self.input_shape)

    def refusal(self, method: str) -> Optional[tuple[Rank, str]]:
        """The smallest rank up to the break-even one (ρ = 1) that ``method`` refuses here, and why; None if none.

        See :meth:`autorank.methods.BaseMethod.rank_refusal` (monotone in the rank: a bisection).
        """
        m = registry.get(method)
        if not self.input_shape:
            return None
        top = m.rank_for(self.spec, 1.0, self.input_shape)
        if m.rank_refusal(self.spec, top, self.input_shape) is None:
            return None
        path = m.rank_path(self.spec)
        lo, hi = 0, path.index(top)  # the first refused index is in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if m.rank_refusal(self.spec, path[mid], self.input_shape) is None:
                lo = mid + 1
            else:
                hi = mid
        return path[lo], m.rank_refusal(self.spec, path[lo], self.input_shape) or ""

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "type": self.type,
            "shape": self.spec.describe(),
            "input_shape": list(self.input_shape),
            "flops": self.dense.flops,
            "params": self.dense.params,
            "latency_s": self.latency,
            "excluded": self.excluded,
            "methods": {},
        }
        for m, why in self.reasons.items():
            if why is None and not self.excluded:
                be = self.break_even(m)
                out["methods"][m] = {"applies": True, "break_even_rank": list(be) if isinstance(be, tuple) else be}
                refused = self.refusal(m)
                if refused is not None:  # ranks from refused_from_rank on are left out of search spaces
                    r0, why = refused
                    out["methods"][m] |= {"refused_from_rank": list(r0) if isinstance(r0, tuple) else r0, "refusal": why}
                if m in self.latency_break_even:
                    lb = self.latency_break_even[m]
                    out["methods"][m]["latency_break_even_rank"] = list(lb) if isinstance(lb, tuple) else lb
            else:
                out["methods"][m] = {"applies": False, "reason": self.excluded or why}
        return out


@dataclass
class ModelProfile:
    """Whole-model counts on one input shape, and the candidate layers."""

    input_shape: tuple[int, ...]
    flops: int
    params: int
    layers: dict[str, LayerProfile]
    latency: Optional[float] = None
    #: the example input the model was profiled on (CPU tensors), to measure the whole model at any batch size
    example_inputs: Optional[tuple] = field(default=None, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def total(self) -> Cost:
        return Cost(self.params, self.flops)

    def replacement_delta(self, name: str, method: str, rank: Any, align: Optional[int] = None) -> tuple[int, int, Rank]:
        """``(Δparams, ΔFLOPs, concrete rank)`` of replacing layer ``name`` by ``method`` at ``rank``.

        ``rank``: the method's own or a fraction ρ of the layer's FLOPs (the
        largest rank within it, then rounded down to a multiple of ``align`` when
        given, as :func:`autorank.decompose` does). The deltas are the
        replacement's exact cost minus the dense layer's, on the layer's profiled
        input shape; memoised. UnknownLayerError / NotApplicableError / RankError
        name the layer.
        """
        key = (name, method, rank if not isinstance(rank, list) else tuple(rank), align)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        lp = self.layers.get(name)
        if lp is None:
            raise UnknownLayerError(f"unknown layer {name!r}: not a decomposable layer of the profiled model")
        if lp.excluded:
            raise NotApplicableError(f"layer {name!r} cannot be decomposed: {lp.excluded}")
        m = registry.get(method)
        why = lp.reasons[m.name] if m.name in lp.reasons else m.applies_spec(lp.spec)
        if why is not None:
            raise NotApplicableError(f"layer {name!r}: method {m.name!r} does not apply: {why}")
        if isinstance(rank, str):
            raise RankError(f"layer {name!r}: rank {rank!r} needs the layer's weights; resolve the plan against the model first")
        if isinstance(rank, float) and 0.0 < rank <= 1.0:
            concrete, c = self._path(name, m).for_fraction(rank, lp.dense.flops)
            if align:
                concrete = align_rank(concrete, align, m.max_rank(lp.spec))
                c = m.cost(lp.spec, concrete, lp.input_shape)
        else:
            concrete = m.resolve_rank(lp.spec, rank, lp.input_shape, name=name)
            c = m.cost(lp.spec, concrete, lp.input_shape)
        out = (c.params - lp.dense.params, c.flops - lp.dense.flops, concrete)
        self._memo[key] = out
        return out

    def _path(self, name: str, method) -> "_RankPath":
        key = ("path", name, method.name)
        path = self._memo.get(key)
        if path is None:
            lp = self.layers[name]
            path = self._memo[key] = _RankPath(method, lp.spec, lp.input_shape)
        return path

    def estimate(self, plan: Union[Plan, dict]) -> Cost:
        """Exact parameters and FLOPs of the model decomposed by ``plan`` (no tracing).

        ``plan``: a Plan, or a plain ``{name: (method, rank)}`` mapping (fastest).
        """
        params, flops = self.params, self.flops
        items = plan.layers.items() if isinstance(plan, Plan) else plan.items()
        for name, entry in items:
            align = None
            if isinstance(entry, LayerPlan):
                method, rank, align = entry.method, entry.rank, entry.options.get("align")
            else:
                method, rank = entry
            if method == "none":
                continue
            dp, df, _ = self.replacement_delta(name, method, rank, align)
            params += dp
            flops += df
        return Cost(params, flops)

    def concrete_rank(self, name: str, method: str, rank: Any) -> Rank:
        return self.replacement_delta(name, method, rank)[2]

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "flops": self.flops,
            "params": self.params,
            "latency_s": self.latency,
            "flops_convention": "fvcore: one multiply-add = one FLOP",
            "layers": [lp.to_dict() for lp in self.layers.values()],
        }


class _RankPath:
    """Costs along one method's rank path for one layer, for O(1) / O(log n) fraction-to-rank.

    Gives the same rank as ``method.rank_for`` (the largest rank within the FLOPs
    fraction, never below the smallest), without re-running its search for every ρ.
    Single ranks whose costs are affine in the rank (every method here; checked
    at both ends) use the closed form; others keep the costs along the path.
    """

    def __init__(self, method, spec: LayerSpec, input_shape: tuple[int, ...]):
        self.method, self.spec, self.shape = method, spec, input_shape
        mx = method.max_rank(spec)
        self.affine = None
        if isinstance(mx, int):
            c1, c2, cn = (method.cost(spec, r, input_shape) for r in (1, min(2, mx), mx))
            fs, ps = c2.flops - c1.flops, c2.params - c1.params
            if mx == 1 or (cn.flops == c1.flops + (mx - 1) * fs and cn.params == c1.params + (mx - 1) * ps and fs > 0):
                self.affine = (c1.flops, fs, c1.params, ps, mx)
        if self.affine is None:
            self.ranks = method.rank_path(spec)
            costs = [method.cost(spec, r, input_shape) for r in self.ranks]
            self.flops = [c.flops for c in costs]
            self.costs = costs

    def for_fraction(self, rho: float, dense_flops: int) -> tuple[Rank, Cost]:
        target = rho * dense_flops
        if self.affine is not None:
            f1, fs, p1, ps, mx = self.affine
            r = 1 if (fs <= 0 or f1 > target) else min(mx, 1 + int((target - f1) // fs))
            while r > 1 and f1 + (r - 1) * fs > target:  # guard against float rounding of the division
                r -= 1
            while r < mx and f1 + r * fs <= target:
                r += 1
            return r, Cost(p1 + (r - 1) * ps, f1 + (r - 1) * fs)
        i = max(0, bisect.bisect_right(self.flops, target) - 1)
        return self.ranks[i], self.costs[i]


def profile_model(model: nn.Module, example_inputs: Any) -> ModelProfile:
    """Profile ``model`` on ``example_inputs`` (a tensor or a tuple of tensors)."""
    cands = candidate_layers(model)
    if not cands:
        raise NotApplicableError(f"{type(model).__name__} has no layer autorank can decompose (Linear, Conv1D, Conv2d)")
    shapes = record_input_shapes(model, example_inputs, list(cands))
    layers: dict[str, LayerProfile] = {}
    for name, (module, reason) in cands.items():
        if name not in shapes:
            reason = reason or "not called in the forward pass on the example input"
        spec = layer_spec(module)
        shape = shapes.get(name) or ()
        dense = dense_cost(spec, shape) if shape else Cost(sum(p.numel() for p in module.parameters(recurse=False)), 0)
        layers[name] = LayerProfile(
            name=name,
            type=type(module).__name__,
            spec=spec,
            input_shape=tuple(shape),
            dense=dense,
            reasons=registry.for_layer(module),
            excluded=reason,
        )
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    return ModelProfile(
        input_shape=tuple(inputs[0].shape),
        flops=count_flops(model, inputs),
        params=count_params(model),
        layers=layers,
        example_inputs=tuple(t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in inputs),
    )
