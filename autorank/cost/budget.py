"""Budgets as users type them: ``30%flops``, ``flops<=1.2G``, ``latency<=4ms``, combinations.

Forms (case-insensitive, spaces ignored, comma-separated to combine; all must hold):

- ``P%flops``, ``P%params``, ``P%latency``: at most P percent of the original model's;
- ``flops<=N``, ``params<=N`` with an optional suffix k, M, G, T (powers of 1000);
- ``latency<=T`` with a unit us, ms or s.

FLOPs follow fvcore's convention: one multiply-add is one FLOP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from autorank import methods as registry
from autorank._format import format_count, format_seconds
from autorank.errors import AutorankError

__all__ = ["Budget", "Constraint", "BudgetError", "parse_budget"]

METRICS = ("flops", "params", "latency")
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_TIME = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}

EXPECTED = (
    "expected forms like 30%flops, 50%params, 60%latency, flops<=1.2G, params<=5M or latency<=4ms "
    "(comma-separated to combine)"
)


class BudgetError(AutorankError, ValueError):
    """A budget that cannot be parsed, or that no plan can meet."""


@dataclass(frozen=True)
class Constraint:
    """``metric`` at most ``value``: a fraction of the original (relative) or an absolute amount.

    Absolute latency is in seconds; absolute FLOPs and params are counts.
    """

    metric: str
    value: float
    relative: bool

    def limit(self, original: float) -> float:
        """The absolute limit, given the original model's value of the metric."""
        return self.value * original if self.relative else self.value

    def describe(self) -> str:
        what = {"flops": "FLOPs", "params": "parameters", "latency": "latency"}[self.metric]
        if self.relative:
            return f"at most {self.value * 100:g}% of the original model's {what}"
        if self.metric == "latency":
            return f"a latency of at most {format_seconds(self.value)}"
        return f"at most {format_count(self.value)} {what}"

    def text(self) -> str:
        if self.relative:
            return f"{self.value * 100:g}%{self.metric}"
        if self.metric == "latency":
            return f"latency<={format_seconds(self.value).replace(' ', '')}"
        return f"{self.metric}<={format_count(self.value)}"


@dataclass(frozen=True)
class Budget:
    """All constraints must hold."""

    constraints: tuple[Constraint, ...]

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.metric for c in self.constraints))

    @property
    def needs_latency(self) -> bool:
        return "latency" in self.metrics

    def describe(self) -> str:
        """In words, so that no one misreads ``30%flops`` as "remove 30%"."""
        parts = [c.describe() for c in self.constraints]
        text = "the compressed model may use " + " and ".join(parts)
        if "flops" in self.metrics:
            text += " (FLOPs: fvcore convention, one multiply-add = one FLOP)"
        return text

    def limits(self, original: dict[str, float]) -> dict[str, float]:
        """Absolute limit per metric (the tightest when a metric appears twice)."""
        out: dict[str, float] = {}
        for c in self.constraints:
            if c.metric not in original or original[c.metric] is None:
                raise BudgetError(f"budget {c.text()!r} needs the original model's {c.metric}, which is unknown")
            lim = c.limit(float(original[c.metric]))
            out[c.metric] = min(out.get(c.metric, float("inf")), lim)
        return out

    def satisfied(self, cost: dict[str, float], original: dict[str, float]) -> bool:
        return all(cost[m] <= lim for m, lim in self.limits(original).items())

    def violation(self, cost: dict[str, float], original: dict[str, float]) -> float:
        """Largest relative excess over a limit (<= 0 when the budget holds): Optuna's constraint value."""
        return max((cost[m] - lim) / lim if lim > 0 else cost[m] for m, lim in self.limits(original).items())

    def text(self) -> str:
        return ",".join(c.text() for c in self.constraints)

    def __str__(self) -> str:
        return self.text()


_REL = re.compile(r"^(?P<num>\d+(?:\.\d*)?|\.\d+)%(?P<metric>[a-z]+)$")
_ABS = re.compile(r"^(?P<metric>[a-z]+)<=?(?P<num>\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+)(?P<unit>[a-zµ]*)$")


def _parse_one(part: str, full: str) -> Constraint:
    p = part.strip().lower().replace(" ", "")
    m = _REL.match(p)
    if m:
        metric = m["metric"]
        if metric not in METRICS:
            raise BudgetError(f"budget {full!r}: unknown metric {metric!r} in {part.strip()!r}; {EXPECTED}")
        pct = float(m["num"])
        if not 0 < pct <= 100:
            raise BudgetError(f"budget {full!r}: {part.strip()!r} must be a percentage in (0, 100]")
        return Constraint(metric, pct / 100.0, True)
    m = _ABS.match(p)
    if m:
        metric, num, unit = m["metric"], float(m["num"]), m["unit"]
        if metric not in METRICS:
            raise BudgetError(f"budget {full!r}: unknown metric {metric!r} in {part.strip()!r}; {EXPECTED}")
        if num <= 0:
            raise BudgetError(f"budget {full!r}: {part.strip()!r} must be positive")
        if metric == "latency":
            if unit not in _TIME:
                raise BudgetError(f"budget {full!r}: latency needs a unit (us, ms or s), got {part.strip()!r}")
            return Constraint("latency", num * _TIME[unit], False)
        if unit not in _SUFFIX:
            raise BudgetError(f"budget {full!r}: unknown suffix {unit!r} in {part.strip()!r} (use k, M, G or T)")
        return Constraint(metric, num * _SUFFIX[unit], False)
    raise BudgetError(f"budget {full!r}: cannot read {part.strip()!r}; {EXPECTED}")


def parse_budget(text: Optional[str]) -> Budget:
    """Parse a budget string; BudgetError says what was expected."""
    if text is None or not str(text).strip():
        raise BudgetError(f"empty budget; {EXPECTED}")
    parts = [p for p in str(text).split(",")]
    if any(not p.strip() for p in parts):
        raise BudgetError(f"budget {text!r}: empty part between commas; {EXPECTED}")
    return Budget(tuple(_parse_one(p, str(text)) for p in parts))


def smallest_reachable(profile, methods: Optional[list[str]] = None) -> dict[str, int]:
    """The smallest FLOPs and parameters any plan can reach: each layer at its cheapest option.

    ``methods``: the methods the search may use (default: all registered); a
    layer may also stay dense. Per metric, independently (a lower bound for both).
    """
    allowed = set(registry.available() if methods is None else [registry.normalize_name(m) for m in methods])
    flops, params = profile.flops, profile.params
    for lp in profile.layers.values():
        best_f, best_p = 0, 0
        for name in lp.applicable():
            if name not in allowed:
                continue
            m = registry.get(name)
            smallest = m.rank_path(lp.spec)[0]
            c = m.cost(lp.spec, smallest, lp.input_shape)
            best_f = min(best_f, c.flops - lp.dense.flops)
            best_p = min(best_p, c.params - lp.dense.params)
        flops += best_f
        params += best_p
    return {"flops": flops, "params": params}


def check_reachable(budget: Budget, profile, methods: Optional[list[str]] = None, latency: Optional[float] = None) -> None:
    """Refuse, before any search, a FLOPs or params budget that no plan can meet.

    Latency budgets are checked by the search against measured tables; here only
    their original value is needed (``latency``) to turn a percentage into seconds.
    """
    original = {"flops": profile.flops, "params": profile.params, "latency": latency}
    reach = smallest_reachable(profile, methods)
    for c in budget.constraints:
        if c.metric not in ("flops", "params"):
            continue
        limit = c.limit(float(original[c.metric]))
        if reach[c.metric] > limit:
            pct = 100.0 * reach[c.metric] / original[c.metric]
            what = "FLOPs" if c.metric == "flops" else "parameters"
            raise BudgetError(
                f"budget {c.text()!r} cannot be met: the smallest plan reaches {format_count(reach[c.metric])} {what} "
                f"({pct:.1f}% of the original {format_count(original[c.metric])}); layers that no method applies to, "
                f"and everything that is not a layer, keep their cost"
            )
