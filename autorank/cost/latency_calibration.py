"""Calibrating the per-layer latency estimate against whole decomposed models measured on the target.

The table measures each layer alone, on the same input again and again, so its
weights stay in the cache; inside the model they are evicted by the other
layers' between two calls. On a CPU that makes a memory-bound layer look faster
alone than it is in the model, the dense layer more than its factorization
(whose weights are smaller): measured on the ResNet-50-shaped model at 1x3x112x112,
one thread, the 54 layers took 21.9 ms alone and 30.1 ms inside the model, and
the estimate ``base − Σ dense + Σ replacement`` predicted 1.41-1.48x too small a
change for three different plans at 22-30% of the FLOPs (a 30% error on the
speed-up). The change is off by nearly the same factor whatever the plan, so one
factor per model and target corrects it (the same idea as fitting a lookup
table's predictions to end-to-end measurements in latency-aware NAS, e.g.
nn-Meter, Zhang et al. MobiSys 2021):

    latency(plan) = base + k · (Σ replacement − Σ dense) + c · (operators added)

:func:`calibrate` builds a few decomposed models with random weights (latency
does not depend on the values; no factorization is computed), measures them
end to end beside the original and records ``k`` in the table, with the
original's latency measured beside them as the model's base latency (on a
shared machine the table's own, measured minutes earlier, was 20% lower once);
:func:`autorank.cost.latency.estimate_latency` applies both.
``k`` and ``c`` (the cost of an operator a factorization adds: a kernel launch
on a GPU; ``c >= 0``) are fitted by least squares on 4-8 plans (each layer's
fastest option and each method alone, at the grid's smallest and middle ρ).
What the fit still misses on those plans (the root mean square of the
residuals) is recorded as ``margin``: a latency budget keeps that much in
reserve (:class:`~autorank.cost.cost_model.CostModel`'s ``margins``). On the
model above the fit gave k = 1.60 with residuals within ±5% of the original's
latency; on the shared 2-core machine this was written on, the residuals'
root mean square was 3-8% of the original's latency.

Where the methods differ in how much of their measured-alone saving survives
inside the model, ``k`` becomes one factor per method (``method_scales``, fitted
on the same plans, each method having its own "alone" plan): at batch 32 in
channels-last on ResNet-50, Tucker-2's three convolutions kept about half of it
and SVD's two 87%, which one factor for all could not fit.
"""

from __future__ import annotations

import copy
import logging
from statistics import median
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from autorank import methods as registry
from autorank.cost.latency import device_ranks, normalise_rank
from autorank.cost.latency_table import LatencyTable, count_ops, layer_signature, model_signature, random_fill_, with_batch
from autorank.cost.timing import combine_timings, measure_rounds, paired_ratios
from autorank.methods._base import Rank
from autorank.surgery import set_submodule

logger = logging.getLogger("autorank")

__all__ = ["calibrate", "calibrate_for_search", "calibration_levels", "calibration_plans", "calibration_spec", "random_decomposed", "SCALE_RANGE", "MAX_MARGIN"]

#: a fitted factor outside this range is not trusted (kept at 1): the measurement went wrong, not the cache
SCALE_RANGE = (0.5, 4.0)
#: a factor fitted per method may be lower: a method can keep a quarter of its measured-alone saving in the model
METHOD_SCALE_RANGE = (0.25, 4.0)
#: the reserve a latency budget keeps is at most this share of the original's latency
MAX_MARGIN = 0.10


def random_decomposed(model: nn.Module, plan: Mapping[str, tuple[str, Rank]], device: Any = None) -> nn.Module:
    """A copy of ``model`` with each planned layer replaced by its method's skeleton at ``rank``, random weights."""
    new = copy.deepcopy(model)
    for name, (method, rank) in sorted(plan.items(), key=lambda kv: kv[0].count(".")):
        rep = registry.get(method).build(new.get_submodule(name), None, rank)
        rep.to_empty(device=device if device is not None else "cpu")
        random_fill_(rep)
        set_submodule(new, name, rep)
    return new.eval()


def calibration_plans(profile: Any, table: LatencyTable, levels: Sequence[Mapping[str, Sequence[tuple[str, Rank]]]]
                      ) -> list[dict[str, tuple[str, Rank]]]:
    """Plans to calibrate with, per level: each layer's fastest option, and each method alone.

    ``levels``: e.g. the search grid's options at its smallest and middle ρ,
    ``{layer: [(method, rank), ...]}``. A layer takes an option only when the
    table says it beats the dense layer. Duplicates and plans that decompose
    nothing are left out.
    """
    profile_batch = int(profile.input_shape[0]) if profile.input_shape else 1
    out: list[dict[str, tuple[str, Rank]]] = []
    for level in levels:
        timed_level: dict[str, list[tuple[float, str, Rank]]] = {}
        for name, options in level.items():
            lp = profile.layers[name]
            shape = with_batch(lp.input_shape, table.batch_size, profile_batch)
            sig = layer_signature(lp.spec, shape, type_name=lp.type)
            dense = table.get(sig, shape)
            timed = [(table.get(sig, shape, registry.get(m).name, r), registry.get(m).name, r) for m, r in options]
            timed_level[name] = [t for t in timed if t[0] is not None and dense is not None and t[0] < dense]
        methods = sorted({m for opts in timed_level.values() for _, m, _ in opts})
        fastest = {n: min(opts)[1:] for n, opts in timed_level.items() if opts}
        names = list(fastest)
        candidates = [fastest]
        candidates += [{n: next((m, r) for _, m, r in opts if m == method) for n, opts in timed_level.items()
                        if any(m == method for _, m, _ in opts)} for method in methods]
        # every other layer: plans that change different layers, so that the fit sees more than one composition
        candidates += [{n: fastest[n] for n in names[i::2]} for i in (0, 1)]
        for plan in candidates:
            if plan and plan not in out:
                out.append(plan)
    return out


def calibrate(model: nn.Module, profile: Any, table: LatencyTable, plans: Sequence[Mapping[str, tuple[str, Rank]]],
              inputs: Any, *, rounds: int = 5, save: bool = True, tag: Optional[Mapping[str, Any]] = None
              ) -> Optional[tuple[float, float]]:
    """Fit and record ``(k, c)`` of this model on the table's target (see the module docstring).

    ``inputs``: the model's input at the table's batch size. Measures the
    original and one random-weight model per plan side by side, ``rounds``
    interleaved rounds, with the table's device, threads, clock and statistic;
    a plan's latency is the original's over its speed-up paired by round, as the
    search measures a front member (:func:`autorank.cost.timing.measure_paired`).
    ``tag``: kept in the record as is (the search says which ranks the plans were
    built from). Returns ``(k, c)`` (also kept in the table), or None when the
    plans change too little to fit them or the fit falls outside :data:`SCALE_RANGE`.
    """
    dev = table._check_can_measure()
    msig = model_signature(profile, table.batch_size)
    modules: dict[Any, nn.Module] = {"original": copy.deepcopy(model).eval().to(dev)}
    ests: list[tuple[float, int]] = []
    by_method: list[dict[str, float]] = []
    for i, plan in enumerate(plans):
        modules[i] = random_decomposed(model, plan, dev)
        added = sum(count_ops(modules[i].get_submodule(name)) - 1 for name in plan)
        by_method.append(_estimated_change(profile, table, plan))
        ests.append((sum(by_method[-1].values()), added))
    inputs = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in (inputs if isinstance(inputs, tuple) else (inputs,)))
    stat = table.statistic
    kw = dict(device=dev, threads=table.threads, rounds=rounds, warmup=table.warmup, repeats=max(3, table.repeats // 2),
              min_time=table.min_time, clock=table.clock, max_time=table.max_time, memory_format=table.memory_format)
    per = measure_rounds(modules, inputs, **kw)
    base, points = _points(per, ests, stat)
    fit = _fit(points)
    again = _outliers(points, fit, base)
    if again:  # measured again beside the original, their new rounds pooled with the first ones (see _outliers)
        logger.info("latency calibration: measuring %d of %d plans again (off the fit by %s of the original's latency)",
                    len(again), len(points), ", ".join(f"{100 * abs(_residual(points[i], fit)) / base:.0f}%" for i in again))
        more = measure_rounds({"original": modules["original"], **{i: modules[i] for i in again}}, inputs, **{**kw, "rounds": 2 * rounds})
        for key, timings in more.items():
            per[key] = per[key] + timings
        base, points = _points(per, ests, stat)
        fit = _fit(points)
    # the base latency every estimate starts from is this one, measured beside the plans the fit rests on: the
    # table's own (minutes earlier, between layers) can differ by more than the fit corrects on a shared machine
    table.put_model(msig, combine_timings(per["original"]))
    usable = (fit is not None and SCALE_RANGE[0] <= fit[0] <= SCALE_RANGE[1]
              and max(abs(e) for e, _, _ in points) > 0.02 * base)
    k, c = fit if usable else (1.0, 0.0)
    residuals = [m - (k * e + c * n) for e, n, m in points]
    scales = _fit_per_method(by_method, points, c) if usable else None
    if scales is not None:  # one factor per method, when that fits the measured models better than one for all
        per_method = [m - (sum(scales[meth] * d for meth, d in est.items()) + c * n) for est, (_, n, m) in zip(by_method, points)]
        if sum(r * r for r in per_method) < 0.8 * sum(r * r for r in residuals):
            residuals = per_method
        else:
            scales = None
    # what the estimate typically misses on a plan measured whole (the residuals' root mean square): a latency
    # budget keeps this much in reserve (the largest residual, one noisy plan, reserved up to 10% on a shared machine)
    rms = (sum(r * r for r in residuals) / len(residuals)) ** 0.5 if residuals else 0.0
    margin = min(rms, MAX_MARGIN * base) if usable else 0.0
    record = {"scale": k, "per_op": c, "margin": margin, "fitted": list(fit) if fit else None, "method_scales": scales,
              "changes_by_method": by_method,
              "points": [list(p) for p in points], "residuals": residuals, "base": base, "plans": len(plans), "statistic": stat,
              "rounds": rounds, "measured_again": again, **dict(tag or {})}
    table.models[f"calibration|{msig}"] = record
    table.measurements += len(plans) + 1
    table._dirty = True
    if save:
        table.save()
    logger.info("latency calibration of %s on %s: k = %.3f%s, c = %.3g s per added operator from %d plans%s; residuals %s",
                msig, table.device_name, k, f" (per method {scales})" if scales else "", c, len(plans), "" if usable else " (not used)",
                ", ".join(f"{100 * r / base:+.1f}%" for r in residuals))
    return (k, c) if usable else None


def calibrate_for_search(model: nn.Module, profile: Any, table: LatencyTable, spec: Optional[Mapping[str, Any]], x: tuple,
                         rounds: int = 5) -> None:
    """Fit the model's estimate factor on this target (see the module docstring).

    ``spec``: ``{"grid": {layer: [[method, ρ], ...]}, "align": a fixed multiple or
    None, "snap": bool}``, the search's grid and alignment. The plans calibrated
    are built from the ranks the search builds: with ``snap``, the grid ranks
    moved to the top of their latency step by
    :func:`~autorank.cost.latency.device_ranks`. Those were picked *because*
    their measurement came out no slower than the grid rank's, so their table
    entries lean fast (a winner's curse); a factor fitted on the unmoved grid
    ranks could not see that. A table calibrated once with the same ranks is
    not calibrated again; one calibrated with the other kind, or in fewer
    ``rounds`` than asked for now (as in :func:`calibrate`: the target's, which
    its front is measured in), is.
    """
    if not spec or not spec.get("grid"):
        return
    grid = {str(n): [(str(m), float(r)) for m, r in pairs] for n, pairs in dict(spec["grid"]).items()}
    align = spec.get("align")
    snap = bool(spec.get("snap"))
    kind = "device" if snap else "grid"
    done = table.models.get(f"calibration|{model_signature(profile, table.batch_size)}")
    if done is not None and done.get("ranks", "grid") == kind and int(done.get("rounds", 5)) >= rounds:
        return
    ranks = device_ranks(profile, table, grid, snap=True, align=align) if snap else None
    levels = calibration_levels(profile, grid, align, ranks=ranks)
    parsed = [{n: [(m, normalise_rank(r)) for m, r in opts] for n, opts in level.items()} for level in levels]
    plans = calibration_plans(profile, table, parsed)
    if plans:
        calibrate(model, profile, table, plans, x, rounds=rounds, tag={"ranks": kind})


def calibration_spec(grid: Mapping[str, Sequence[tuple[str, float]]], align: Optional[int], snap: bool) -> dict[str, Any]:
    """What the table job calibrates with (see :func:`calibrate_for_search`): JSON-able."""
    return {"grid": {n: [[m, float(r)] for m, r in pairs] for n, pairs in grid.items()}, "align": align, "snap": bool(snap)}


def calibration_levels(profile: Any, grid: Mapping[str, Sequence[tuple[str, float]]], align: Optional[int] = None,
                       *, ranks: Any = None) -> list[dict[str, list[list]]]:
    """The grid's options at its smallest and middle ρ: ``[{layer: [[method, rank], ...]}, ...]``.

    ``ranks``: a :class:`~autorank.cost.latency.DeviceRanks`; its rank for a
    (layer, method, ρ) replaces the grid's where it has one.
    """
    rhos = sorted({r for pairs in grid.values() for _, r in pairs})
    if not rhos:
        return []
    picks = sorted({rhos[0], rhos[(len(rhos) - 1) // 2]})
    levels = []
    for rho in picks:
        level = {}
        for name, pairs in grid.items():
            opts = []
            for m, r in pairs:
                if abs(r - rho) >= 1e-9:
                    continue
                built = ranks.ranks.get((name, registry.get(m).name, round(r, 6))) if ranks is not None else None
                opts.append([m, built if built is not None else profile.replacement_delta(name, m, r, align)[2]])
            if opts:
                level[name] = [[m, list(r) if isinstance(r, tuple) else r] for m, r in opts]
        levels.append(level)
    return levels


def _points(per: Mapping[Any, Sequence[Any]], ests: Sequence[tuple[float, int]], stat: str
            ) -> tuple[float, list[tuple[float, int, float]]]:
    """The original's latency and each plan's ``(estimated change, added operators, measured change)``.

    A plan's latency is the original's over its speed-up paired by round (the
    median over its rounds), as the search measures a front member.
    """
    base = getattr(combine_timings(per["original"]), stat)
    ratios = paired_ratios(per, "original", stat)
    points = []
    for i, (e, n) in enumerate(ests):
        r = ratios.get(i)
        measured = base / median(r) if r else getattr(combine_timings(per[i]), stat)
        points.append((e, n, measured - base))
    return base, points


def _residual(point: tuple[float, int, float], fit: tuple[float, float]) -> float:
    e, n, m = point
    return m - (fit[0] * e + fit[1] * n)


#: a plan whose measurement is off the fit by more than this many robust standard deviations of the residuals (and
#: by more than OUTLIER_FLOOR of the original's latency) is measured again
OUTLIER_SIGMAS = 3.0
OUTLIER_FLOOR = 0.03


def _outliers(points: Sequence[tuple[float, int, float]], fit: Optional[tuple[float, float]], base: float) -> list[int]:
    """The plans to measure again: each far off the fit of the others (at most a third of them).

    On a shared machine a slow spell can cover most of one plan's rounds; its
    median ratio then misses by far more than the others (measured three times
    on ResNet-50 at batch 1, two threads: each plan's change came out within
    ±2% of the original's latency from pass to pass but for two plans in one
    pass, off by 13% and 16%). One such point moves the factor every estimate
    rests on, and the reserve a latency budget keeps. A plan the fit really
    misses stays where it was when measured again (its rounds are pooled with
    twice as many new ones, not replaced: the median then follows the new rounds
    when the first ones were disturbed, and stays when they were not), so this
    corrects noise, not the model.
    """
    if fit is None or len(points) < 4 or base <= 0:
        return []
    keep, far = list(range(len(points))), []
    while len(far) < len(points) // 3:  # the farthest plan off the fit of the others, one at a time
        f = _fit([points[i] for i in keep]) if far else fit
        if f is None:
            break
        res = {i: _residual(points[i], f) for i in keep}
        mid = median(list(res.values()))
        sigma = 1.4826 * median([abs(r - mid) for r in res.values()])
        worst = max(keep, key=lambda i: abs(res[i] - mid))
        if abs(res[worst] - mid) <= max(OUTLIER_SIGMAS * sigma, OUTLIER_FLOOR * base):
            break
        far.append(worst)
        keep.remove(worst)
    return sorted(far)


def _fit(points: Sequence[tuple[float, int, float]]) -> Optional[tuple[float, float]]:
    """Least squares of ``measured = k · estimated + c · added operators``.

    ``c`` only from 4 plans or more whose two columns are far from collinear,
    and only when it comes out >= 0 (an added operator cannot save time);
    otherwise ``c = 0`` and ``k`` alone.
    """
    see = sum(e * e for e, _, _ in points)
    sen = sum(e * n for e, n, _ in points)
    snn = sum(n * n for _, n, _ in points)
    sem = sum(e * m for e, _, m in points)
    snm = sum(n * m for _, n, m in points)
    det = see * snn - sen * sen
    if len(points) >= 4 and det > 0.05 * see * snn:  # |cos| of the two columns below ~0.97
        k = (sem * snn - snm * sen) / det
        c = (see * snm - sen * sem) / det
        if c >= 0:
            return k, c
    return (sem / see, 0.0) if see > 0 else None


def _fit_per_method(by_method: Sequence[Mapping[str, float]], points: Sequence[tuple[float, int, float]], c: float
                    ) -> Optional[dict[str, float]]:
    """Least squares of ``measured − c · added = Σ_method k_m · (Σ replacement − dense of its layers)``.

    A method's factorized layers can differ in how much of their measured-alone
    saving survives inside the model (at batch 32 in channels-last, Tucker-2's three
    convolutions kept half of it where SVD's kept 87%). None unless every method
    has at least two plans with a change of its own, the fit is well conditioned
    and every factor lies in :data:`METHOD_SCALE_RANGE`.
    """
    methods = sorted({m for est in by_method for m in est})
    if len(methods) < 2 or len(points) < len(methods) + 2:
        return None
    if any(sum(1 for est in by_method if abs(est.get(m, 0.0)) > 0) < 2 for m in methods):
        return None
    a = torch.tensor([[est.get(m, 0.0) for m in methods] for est in by_method], dtype=torch.float64)
    y = torch.tensor([m - c * n for _, n, m in points], dtype=torch.float64)
    sv = torch.linalg.svdvals(a)
    if sv[-1] <= 1e-3 * sv[0]:
        return None
    sol = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1).tolist()
    if not all(METHOD_SCALE_RANGE[0] <= k <= METHOD_SCALE_RANGE[1] for k in sol):
        return None
    return dict(zip(methods, sol))


def _estimated_change(profile: Any, table: LatencyTable, plan: Mapping[str, tuple[str, Rank]]) -> dict[str, float]:
    """Σ replacement − dense of ``plan``'s layers, per method, from the table (uncalibrated)."""
    profile_batch = int(profile.input_shape[0]) if profile.input_shape else 1
    total: dict[str, float] = {}
    for name, (method, rank) in plan.items():
        lp = profile.layers[name]
        shape = with_batch(lp.input_shape, table.batch_size, profile_batch)
        sig = layer_signature(lp.spec, shape, type_name=lp.type)
        mname = registry.get(method).name
        total[mname] = total.get(mname, 0.0) + table.get(sig, shape, mname, rank) - table.get(sig, shape)
    return total
