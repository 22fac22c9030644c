"""Plans in the search's own terms — ``{layer: (method, ρ)}`` — their repair and allocations.

Costs come from :class:`autorank.cost.cost_model.CostModel`.

- :func:`repair`: shrink an over-budget plan until it fits, one ρ step at a time
  where it hurts least (per the sensitivity table when there is one).
- Allocations used as warm starts and as the baselines autorank is measured
  against: :func:`uniform_plan` (one method, one ρ everywhere — SVD-LLM's rule),
  :func:`greedy_plan` (AIMET's rule: per-layer scores, one score threshold found
  by bisection), :func:`lagrangian_plan` (least total score drop for the budget,
  a multiple-choice knapsack solved by Lagrangian relaxation).
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from autorank import methods as registry
from autorank.cost.cost_model import ChoicePlan, CostModel
from autorank.plan import LayerPlan, Plan
from autorank.search.space import LayerChoice

logger = logging.getLogger("autorank")

__all__ = [
    "Sensitivity", "repair", "local_moves", "fill", "to_plan", "uniform_plan", "greedy_plan",
    "lagrangian_plan", "describe_plan",
]


def describe_plan(cp: ChoicePlan) -> str:
    """Short summary such as ``svd×3 tucker2×2 (1 dense)``."""
    counts: dict[str, int] = {}
    for m, _ in cp.values():
        counts[m] = counts.get(m, 0) + 1
    dense = counts.pop("none", 0)
    text = " ".join(f"{m}×{k}" for m, k in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "dense"
    return text + (f" ({dense} dense)" if dense and counts else "")


# ---------------------------------------------------------------------- sensitivity
@dataclass
class Sensitivity:
    """Zero-shot score of the model with one layer decomposed at a time.

    ``scores[layer][method]`` = sorted list of ``(rho, score)``; ``base`` = the
    original model's score. :meth:`drop` interpolates linearly in ρ between probes
    (clamped below the smallest probe; reaching 0 at ρ = 1).
    """

    base: float
    scores: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def drop(self, name: str, choice: tuple[str, float]) -> float:
        """The interpolated score drop of ``choice`` for layer ``name`` (memoised: repair asks it millions of times)."""
        key = (name, choice)
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = self._drop(name, choice)
        return hit

    def _drop(self, name: str, choice: tuple[str, float]) -> float:
        method, rho = choice
        if method == "none":
            return 0.0
        pts = self.scores.get(name, {}).get(method)
        if not pts:
            return max(0.0, -math.log(max(rho, 1e-6))) * 1e-3  # unprobed: a small, ρ-ordered guess
        drops = [(r, max(0.0, self.base - s)) for r, s in pts]
        if rho <= drops[0][0]:
            return drops[0][1]
        for (r0, d0), (r1, d1) in zip(drops, drops[1:]):
            if rho <= r1:
                return d0 + (d1 - d0) * (rho - r0) / (r1 - r0)
        r0, d0 = drops[-1]
        return d0 * (1.0 - rho) / (1.0 - r0) if r0 < 1.0 else d0

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "scores": {n: {m: [list(p) for p in pts] for m, pts in ms.items()} for n, ms in self.scores.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "Sensitivity":
        return cls(float(data["base"]), {n: {m: [tuple(p) for p in pts] for m, pts in ms.items()} for n, ms in data["scores"].items()})


def probe_rhos(grid: tuple[float, ...], n: int = 4) -> list[float]:
    """``n`` values spread over the grid, its ends included."""
    if len(grid) <= n:
        return list(grid)
    idx = sorted({round(i * (len(grid) - 1) / (n - 1)) for i in range(n)})
    return [grid[i] for i in idx]


def penalty_fn(sensitivity: Optional[Sensitivity]) -> Callable[[str, tuple[str, float]], float]:
    if sensitivity is not None:
        return sensitivity.drop
    return lambda _name, choice: 0.0 if choice[0] == "none" else -math.log(max(choice[1], 1e-6))


# ---------------------------------------------------------------------- repair
def repair(
    cp: ChoicePlan,
    choices: dict[str, LayerChoice],
    cost: CostModel,
    penalty: Callable[[str, tuple[str, float]], float],
    frozen: frozenset = frozenset(),
) -> tuple[ChoicePlan, bool]:
    """Shrink ``cp`` until it fits the budget; returns ``(plan, fits)``.

    Each step takes the move with the least added penalty per unit of budget
    excess removed: one ρ step down for a decomposed layer, another of its
    methods (at the same ρ, or the smallest once its own ρ is at the bottom), or
    decomposing a dense layer at its largest ρ with any of its methods. Stops when the plan fits
    or no move reduces the excess (then ``fits`` is False).
    """
    if len(cost.limits) == 1:
        return _repair_one_limit(cp, choices, cost, penalty, frozen)
    cur = dict(cp)
    costs = cost.costs(cur)
    viol = cost.violation(costs)
    steps = 0
    while viol > 1e-12:
        best = None
        for name, ch in choices.items():
            if name in frozen:
                continue
            method, rho = cur[name]
            if method == "none":
                moves = [(m, ch.snap(m, ch.rhos[-1])) for m in ch.methods if m != "none"]
            else:
                i = _index(ch.rhos, rho)
                moves = [(method, ch.rhos[i - 1])] if i > 0 and ch.allows(method, ch.rhos[i - 1]) else []
                # another method at the same ρ, or at the smallest once this one has none left: a method
                # whose smallest rank still costs a lot (tensor train on a Linear) must not block the repair
                moves += [(m, ch.snap(m, ch.rhos[i] if i > 0 else ch.rhos[0])) for m in ch.methods if m not in ("none", method)]
            old_d = cost.layer_delta(name, cur[name])
            old_p = penalty(name, cur[name])
            for mv in moves:
                new_d = cost.layer_delta(name, mv)
                trial = {m: costs[m] - old_d[m] + new_d[m] for m in costs}
                gain = viol - cost.violation(trial)
                if gain <= 1e-15:
                    continue
                ratio = max(penalty(name, mv) - old_p, 0.0) / gain
                if best is None or ratio < best[0] - 1e-15:
                    best = (ratio, name, mv, trial)
        if best is None:
            return cur, False
        _, name, mv, costs = best
        cur[name] = mv
        viol = cost.violation(costs)
        steps += 1
    return cur, True


def _moves(name: str, ch: LayerChoice, current: tuple[str, float]) -> list[tuple[str, float]]:
    """The repair's moves for one layer, in the order the full scan tries them."""
    method, rho = current
    if method == "none":
        return [(m, ch.snap(m, ch.rhos[-1])) for m in ch.methods if m != "none"]
    i = _index(ch.rhos, rho)
    moves = [(method, ch.rhos[i - 1])] if i > 0 and ch.allows(method, ch.rhos[i - 1]) else []
    return moves + [(m, ch.snap(m, ch.rhos[i] if i > 0 else ch.rhos[0])) for m in ch.methods if m not in ("none", method)]


def _repair_one_limit(cp: ChoicePlan, choices: dict[str, LayerChoice], cost: CostModel,
                      penalty: Callable[[str, tuple[str, float]], float], frozen: frozenset) -> tuple[ChoicePlan, bool]:
    """:func:`repair` for a budget with one limit, with a heap instead of a scan per step.

    With one limit, a move's gain (its change of the relative excess) does not
    depend on the other layers, so its ratio changes only when its own layer
    moves: each step pops the best move and re-ranks that layer's moves alone —
    the same sequence of moves as the scan (ties broken by layer order, then move
    order), in O(log n) per step instead of O(layers × moves).
    """
    (metric, lim), = cost.limits.items()
    scale = 1.0 / lim if lim > 0 else 1.0
    cur = dict(cp)
    costs = cost.costs(cur)
    viol = cost.violation(costs)
    order = {n: i for i, n in enumerate(choices)}
    version = {n: 0 for n in choices}
    heap: list = []

    def push(name: str) -> None:
        old_d = cost.layer_delta(name, cur[name])[metric]
        old_p = penalty(name, cur[name])
        for j, mv in enumerate(_moves(name, choices[name], cur[name])):
            gain = (old_d - cost.layer_delta(name, mv)[metric]) * scale
            if gain <= 1e-15:
                continue
            heapq.heappush(heap, (max(penalty(name, mv) - old_p, 0.0) / gain, order[name], j, version[name], name, mv))

    for name in choices:
        if name not in frozen:
            push(name)
    while viol > 1e-12:
        while heap and heap[0][3] != version[heap[0][4]]:
            heapq.heappop(heap)
        if not heap:
            return cur, False
        _, _, _, _, name, mv = heapq.heappop(heap)
        old_d, new_d = cost.layer_delta(name, cur[name]), cost.layer_delta(name, mv)
        costs = {m: costs[m] - old_d[m] + new_d[m] for m in costs}
        viol = cost.violation(costs)
        cur[name] = mv
        version[name] += 1
        push(name)
    return cur, True


def local_moves(
    best: ChoicePlan,
    choices: dict[str, LayerChoice],
    cost: CostModel,
    penalty: Callable[[str, tuple[str, float]], float],
) -> Iterator[ChoicePlan]:
    """Neighbours of a good plan, most promising first: one layer gets one more ρ step (or stays
    dense, or switches method at the same ρ), the others pay for it where it hurts least
    (:func:`repair` with that layer frozen), and budget left over is spent (:func:`fill`).
    Made one at a time, as they are asked for (the search takes the first one not tried yet)."""
    options = {n: _options(ch) for n, ch in choices.items()}
    for name in sorted(best, key=lambda n: -penalty(n, best[n])):
        method, rho = best[name]
        if method == "none":
            continue
        ch = choices[name]
        i = _index(ch.rhos, rho)
        ups = [(method, ch.rhos[i + 1])] if i + 1 < len(ch.rhos) and ch.allows(method, ch.rhos[i + 1]) else [("none", ch.rhos[-1])]
        ups += [(m, rho) for m in ch.methods if m not in ("none", method) and ch.allows(m, rho)]
        for up in ups:
            cand = dict(best)
            cand[name] = up
            fixed, fits = repair(cand, choices, cost, penalty, frozen=frozenset({name}))
            if fits:
                yield fill(fixed, options, cost, penalty)


def cheapest_plan(choices: dict[str, LayerChoice], cost: CostModel) -> ChoicePlan:
    """Per layer, the option (dense included) that costs least over the budget's metrics, relative to their limits."""
    return {n: min(_options(ch), key=lambda o, n=n: sum(v / cost.limits[m] for m, v in cost.layer_delta(n, o).items() if m in cost.limits))
            for n, ch in choices.items()}


def _options(ch: LayerChoice) -> list[tuple[str, float]]:
    """Every choice of a layer: dense, and each method at each grid ρ."""
    return [("none", ch.rhos[-1])] + [(m, r) for m in ch.methods if m != "none" for r in ch.rhos_for(m)]


def _index(grid: tuple[float, ...], rho: float) -> int:
    return min(range(len(grid)), key=lambda i: abs(grid[i] - rho))


# ---------------------------------------------------------------------- allocations
def uniform_plan(method: str, rho: float, choices: dict[str, LayerChoice]) -> ChoicePlan:
    return {n: ((method, ch.snap(method, rho)) if method in ch.methods else ("none", ch.rhos[-1])) for n, ch in choices.items()}


def best_uniform(method: str, choices: dict[str, LayerChoice], cost: CostModel) -> Optional[tuple[float, ChoicePlan]]:
    """The uniform plan of ``method`` at the largest grid ρ that fits the budget (None: none fits)."""
    grid = sorted({r for ch in choices.values() for r in ch.rhos}, reverse=True)
    for rho in grid:
        cp = uniform_plan(method, rho, choices)
        if cost.fits(cost.costs(cp)):
            return rho, cp
    return None


def greedy_plan(choices: dict[str, LayerChoice], cost: CostModel, sens: Sensitivity) -> Optional[ChoicePlan]:
    """AIMET's greedy selection: one score threshold t for all layers, found by bisection.

    Each layer takes its cheapest probed option whose own zero-shot score is at
    least t (dense always qualifies); the largest t whose plan fits wins.
    Only probed (method, ρ) points are used, as AIMET does.
    """
    per_layer: dict[str, list[tuple[float, tuple[str, float]]]] = {}
    thresholds = {sens.base}
    for name, ch in choices.items():
        opts: list[tuple[float, tuple[str, float]]] = [(sens.base, ("none", ch.rhos[-1]))]
        for m, pts in sens.scores.get(name, {}).items():
            if m not in ch.methods:
                continue
            for r, s in pts:
                if any(abs(r - g) < 1e-9 for g in ch.rhos):
                    opts.append((s, (m, min(ch.rhos, key=lambda g: abs(g - r)))))
                    thresholds.add(s)
        per_layer[name] = opts

    def plan_at(t: float) -> ChoicePlan:
        cp = {}
        for name, opts in per_layer.items():
            ok = [c for s, c in opts if s >= t - 1e-12 or c[0] == "none"]  # staying dense always qualifies
            cp[name] = min(ok, key=lambda c: cost.objective(cost.costs({name: c})))
        return cp

    ts = sorted(thresholds, reverse=True)  # high threshold = cautious = expensive
    lo, hi = 0, len(ts) - 1
    if not cost.fits(cost.costs(plan_at(ts[hi]))):
        return None
    while lo < hi:  # first (highest) threshold whose plan fits
        mid = (lo + hi) // 2
        if cost.fits(cost.costs(plan_at(ts[mid]))):
            hi = mid
        else:
            lo = mid + 1
    return plan_at(ts[lo])


def lagrangian_plan(choices: dict[str, LayerChoice], cost: CostModel, sens: Sensitivity) -> Optional[ChoicePlan]:
    """Least total (interpolated) score drop within the budget: per layer argmin drop + λ·cost, λ by bisection."""
    metric = cost.objective_metric
    orig = cost.original[metric]
    table = {
        name: [(c, sens.drop(name, c), cost.layer_delta(name, c)[metric] / orig) for c in _options(ch)]
        for name, ch in choices.items()
    }

    def plan_at(lam: float) -> ChoicePlan:
        return {name: min(opts, key=lambda o: (o[1] + lam * o[2], o[2]))[0] for name, opts in table.items()}

    lo, hi = 0.0, 1.0
    while not cost.fits(cost.costs(plan_at(hi))):
        hi *= 4
        if hi > 1e12:
            return None
    if cost.fits(cost.costs(plan_at(lo))):
        return plan_at(lo)
    for _ in range(60):
        mid = (lo + hi) / 2
        if cost.fits(cost.costs(plan_at(mid))):
            hi = mid
        else:
            lo = mid
    return fill(plan_at(hi), {n: [o[0] for o in opts] for n, opts in table.items()}, cost, sens.drop)


def fill(cp: ChoicePlan, options: dict[str, list[tuple[str, float]]], cost: CostModel,
         penalty: Callable[[str, tuple[str, float]], float]) -> ChoicePlan:
    """Spend the budget a plan leaves unused: repeatedly take the change that removes the most
    penalty per unit of added cost and still fits (closes the Lagrangian relaxation's duality gap)."""
    if len(cost.limits) == 1:
        return _fill_one_limit(cp, options, cost, penalty)
    cur = dict(cp)
    metric = cost.objective_metric
    costs = cost.costs(cur)
    while True:
        best = None
        for name, opts in options.items():
            old_p = penalty(name, cur[name])
            old_d = cost.layer_delta(name, cur[name])
            for o in opts:
                gain = old_p - penalty(name, o)
                if gain <= 1e-15:
                    continue
                new_d = cost.layer_delta(name, o)
                trial = {m: costs[m] - old_d[m] + new_d[m] for m in costs}
                if not cost.fits(trial):
                    continue
                extra = max(trial[metric] - costs[metric], 0.0) / cost.original[metric]
                ratio = gain / (extra + 1e-12)
                if best is None or ratio > best[0]:
                    best = (ratio, name, o, trial)
        if best is None:
            return cur
        _, name, o, costs = best
        cur[name] = o


def _fill_one_limit(cp: ChoicePlan, options: dict[str, list[tuple[str, float]]], cost: CostModel,
                    penalty: Callable[[str, tuple[str, float]], float]) -> ChoicePlan:
    """:func:`fill` for a budget with one limit, with a heap: a change's ratio depends only on its own
    layer; a change that does not fit waits until a change frees room. The same sequence of
    changes as the scan, each step O(log n) instead of O(layers × options)."""
    cur = dict(cp)
    metric = cost.objective_metric
    costs = cost.costs(cur)
    order = {n: i for i, n in enumerate(options)}
    version = {n: 0 for n in options}
    heap: list = []

    def push(name: str) -> None:
        old_p = penalty(name, cur[name])
        old_d = cost.layer_delta(name, cur[name])
        for j, o in enumerate(options[name]):
            gain = old_p - penalty(name, o)
            if gain <= 1e-15:
                continue
            extra = max(cost.layer_delta(name, o)[metric] - old_d[metric], 0.0) / cost.original[metric]
            heapq.heappush(heap, (-gain / (extra + 1e-12), order[name], j, version[name], name, o))

    for name in options:
        push(name)
    parked: list = []  # changes that did not fit: they may once a change frees room
    while heap:
        item = heapq.heappop(heap)
        _, _, _, ver, name, o = item
        if ver != version[name]:
            continue
        old_d, new_d = cost.layer_delta(name, cur[name]), cost.layer_delta(name, o)
        trial = {m: costs[m] - old_d[m] + new_d[m] for m in costs}
        if not cost.fits(trial):
            parked.append(item)
            continue
        freed = any(trial[m] < costs[m] for m in cost.limits)
        costs = trial
        cur[name] = o
        version[name] += 1
        push(name)
        if freed:
            for it in parked:
                heapq.heappush(heap, it)
            parked = []
    return cur


def to_plan(cp: ChoicePlan, cost: CostModel, meta: Optional[dict] = None) -> Plan:
    """The concrete :class:`~autorank.plan.Plan` (method ranks, no fractions) of a choice plan."""
    layers = {}
    for name, (method, rho) in cp.items():
        if method == "none":
            continue
        rank = cost.concrete_rank(name, method, rho)
        layers[name] = LayerPlan(registry.get(method).name, rank, {})
    m = {"rho": {n: r for n, (mm, r) in cp.items() if mm != "none"}}
    if meta:
        m.update(meta)
    return Plan(layers, m)
