"""The cost of a plan against a budget, in the search's terms: ``{layer: (method, ρ)}``.

:class:`CostModel` gives exact FLOPs and parameters of a choice plan from the
profile's formulas (no tracing), its latency estimated from a per-layer lookup
table when the budget constrains latency, the budget's violation (Optuna's
constraint value) and the cost objective. Every per-layer change is memoised, so
that the search can cost, repair and compare thousands of plans cheaply.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from autorank.cost.budget import Budget
from autorank.cost.latency import estimate_latency
from autorank.cost.profile import ModelProfile

__all__ = ["ChoicePlan", "CostModel"]

#: {layer name: (method, rho)}; method "none" keeps the layer dense
ChoicePlan = dict[str, tuple[str, float]]


class CostModel:
    """Costs of choice plans against one budget.

    ``latency``: ``(table, base_latency_s)`` when the budget constrains latency;
    per-layer latency deltas then come from the table (see
    :func:`autorank.cost.latency.estimate_latency`). ``ranks``: ``{(layer,
    method, ρ): rank}`` that overrides the rank a choice builds (device-aware
    alignment and the latency break-even, :func:`autorank.cost.latency.device_ranks`).
    ``margins``: ``{metric: amount}`` kept in reserve below the budget's limit
    (a latency calibration's largest residual, :mod:`autorank.cost.latency_calibration`).
    """

    def __init__(self, profile: ModelProfile, budget: Budget, align: Optional[int] = None, latency: Optional[tuple[Any, float]] = None,
                 ranks: Optional[Mapping[tuple[str, str, float], Any]] = None, margins: Optional[Mapping[str, float]] = None):
        self.profile = profile
        self.budget = budget
        self.align = align
        self.latency = latency
        self.ranks = {(n, m, round(float(r), 6)): v for (n, m, r), v in (ranks or {}).items()}
        self.original: dict[str, float] = {"flops": float(profile.flops), "params": float(profile.params)}
        if latency is not None:
            self.original["latency"] = float(latency[1])
        self.metrics = ("flops", "params") + (("latency",) if latency is not None else ())
        self.limits = budget.limits(self.original)
        for m, reserve in (margins or {}).items():  # what the estimate may miss (a latency calibration's residual)
            if m in self.limits and reserve > 0:
                self.limits[m] = max(self.limits[m] - reserve, 0.5 * self.limits[m])
        self.objective_metric = budget.metrics[0]
        self._memo: dict[tuple, dict[str, float]] = {}

    def _replacement(self, name: str, method: str, rho: float) -> tuple[int, int, Any]:
        rank = self.ranks.get((name, method, round(float(rho), 6))) if self.ranks else None
        if rank is not None:
            return self.profile.replacement_delta(name, method, rank)
        return self.profile.replacement_delta(name, method, float(rho), self.align)

    def concrete_rank(self, name: str, method: str, rho: float):
        """The method's rank that choice ``(method, rho)`` of layer ``name`` builds (``align`` or ``ranks`` applied)."""
        return self._replacement(name, method, rho)[2]

    def layer_delta(self, name: str, choice: tuple[str, float]) -> dict[str, float]:
        """Change of each metric when layer ``name`` takes ``choice`` instead of staying dense."""
        key = (name, choice)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        method, rho = choice
        if method == "none":
            d = {m: 0.0 for m in self.metrics}
        else:
            dp, df, rank = self._replacement(name, method, rho)
            d = {"flops": float(df), "params": float(dp)}
            if self.latency is not None:
                table, base = self.latency
                d["latency"] = estimate_latency(self.profile, {name: (method, rank)}, table, base_latency=base) - base
        self._memo[key] = d
        return d

    def costs(self, cp: ChoicePlan) -> dict[str, float]:
        out = dict(self.original)
        for name, choice in cp.items():
            for m, v in self.layer_delta(name, choice).items():
                out[m] += v
        return out

    def violation(self, costs: dict[str, float]) -> float:
        """Largest relative excess over a limit; <= 0 when the plan fits (Optuna's constraint value)."""
        return max((costs[m] - lim) / lim if lim > 0 else costs[m] for m, lim in self.limits.items())

    def fits(self, costs: dict[str, float]) -> bool:
        return self.violation(costs) <= 1e-12

    def objective(self, costs: dict[str, float]) -> float:
        """The cost objective: the budget's first metric as a fraction of the original."""
        m = self.objective_metric
        return costs[m] / self.original[m]

    def ratios(self, costs: dict[str, float]) -> dict[str, float]:
        return {m: costs[m] / self.original[m] for m in self.metrics if self.original.get(m)}
