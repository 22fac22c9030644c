"""Pareto fronts: which trials are non-dominated, how much they dominate, and plots of them.

A search trades cost (a fraction of the original model's FLOPs, parameters or
latency: minimise) against score (task quality: maximise). This module holds
the pure functions the search uses on (cost, score) pairs, :func:`pareto_indices`
and :func:`hypervolume_2d`, and the run directory's pictures of a search,
:func:`plot_front` (``pareto.png`` with matplotlib, ``pareto.html`` with plotly,
self-contained so that it opens offline).

A *point* (one finished trial) is a dict::

    {"trial": 12, "cost": 0.31, "score": 0.952, "feasible": True, "front": True,
     "finetuned": False, "label": "svd×3 tucker2×2", "latency_ms": 4.1}

``cost`` is a fraction of the original (1.0 = the original's cost). Only
``cost`` and ``score`` are required; ``trial`` defaults to the point's position,
``feasible`` to True, ``finetuned`` to False, ``label`` to "" and
``latency_ms`` to None. When some point has no ``front`` key, the front is
computed here from the feasible points. An infeasible point is never drawn or
listed as a front member.

FLOPs follow fvcore's convention: one multiply-add is one FLOP.
"""

from __future__ import annotations

import html
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from autorank.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = ["pareto_indices", "hypervolume_2d", "front_table", "plot_front", "budget_label"]

# colours (colour-blind safe where it matters: front vs the rest)
_GREY = "#b0b0b0"
_LIGHT = "#9ecae1"
_FRONT = "#d62728"
_BUDGET = "#2ca02c"


# ---------------------------------------------------------------------- pure functions
def _is_number(x: Any) -> bool:
    try:
        return not math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def pareto_indices(costs: Sequence[float], scores: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points, minimising cost and maximising score.

    A point is dominated when another has cost <= and score >= with one of them
    strict. Of several equal points only the first (lowest index) is kept. Points
    whose cost or score is NaN or None are never returned (and dominate nothing).
    The indices are returned in order of increasing cost (hence increasing score).
    """
    if len(costs) != len(scores):
        raise ValueError(f"pareto_indices: {len(costs)} costs but {len(scores)} scores")
    valid = [i for i in range(len(costs)) if _is_number(costs[i]) and _is_number(scores[i])]
    # cheapest first; at equal cost the best score first; at equal points the first index first
    order = sorted(valid, key=lambda i: (float(costs[i]), -float(scores[i]), i))
    front: list[int] = []
    best = -math.inf
    for i in order:
        s = float(scores[i])
        # strictly better than every cheaper-or-equal point: not dominated (and not a repeat)
        if s > best or (not front and s == best):
            front.append(i)
            best = s
    return front


def _pairs(points: Iterable[Any]) -> list[tuple[float, float]]:
    out = []
    for p in points:
        if isinstance(p, Mapping):
            out.append((p["cost"], p["score"]))
        else:
            c, s = p
            out.append((c, s))
    return out


def hypervolume_2d(points: Iterable[Any], ref_cost: float, ref_score: float) -> float:
    """The area dominated by ``points`` and bounded by the reference point (exact).

    ``points``: (cost, score) pairs or dicts with ``cost`` and ``score``; cost is
    minimised, score maximised. The area is that of the set of (c, s) with
    ``ref_score <= s <= score`` and ``cost <= c <= ref_cost`` for some point. Points
    not strictly better than the reference in both (and NaN points) add nothing; no
    points gives 0.
    """
    ref_cost, ref_score = float(ref_cost), float(ref_score)
    pairs = [(float(c), float(s)) for c, s in _pairs(points) if _is_number(c) and _is_number(s)]
    pairs = [(c, s) for c, s in pairs if c < ref_cost and s > ref_score]
    if not pairs:
        return 0.0
    front = [pairs[i] for i in pareto_indices([c for c, _ in pairs], [s for _, s in pairs])]
    area = 0.0
    for k, (c, s) in enumerate(front):
        right = front[k + 1][0] if k + 1 < len(front) else ref_cost
        area += (right - c) * (s - ref_score)
    return area


# ---------------------------------------------------------------------- points
@dataclass(frozen=True)
class _Point:
    trial: int
    cost: float
    score: float
    feasible: bool
    front: bool
    finetuned: bool
    label: str
    latency_ms: Optional[float]


def _float(v: Any) -> float:
    return float(v) if _is_number(v) else math.nan


def _normalise(points: Sequence[Mapping[str, Any]]) -> list[_Point]:
    for i, p in enumerate(points):
        if not isinstance(p, Mapping) or "cost" not in p or "score" not in p:
            raise ValueError(f"point {i} must be a dict with 'cost' and 'score', got {p!r}")
    feasible = [bool(p.get("feasible", True)) for p in points]
    if all("front" in p for p in points):
        front = [bool(p["front"]) and f for p, f in zip(points, feasible)]
    else:
        idx = [i for i, f in enumerate(feasible) if f]
        on = pareto_indices([points[i]["cost"] for i in idx], [points[i]["score"] for i in idx])
        chosen = {idx[k] for k in on}
        front = [i in chosen for i in range(len(points))]
    out = []
    for i, p in enumerate(points):
        lat = p.get("latency_ms")
        out.append(
            _Point(
                trial=int(p.get("trial", i)),
                cost=_float(p["cost"]),
                score=_float(p["score"]),
                feasible=feasible[i],
                front=front[i],
                finetuned=bool(p.get("finetuned", False)),
                label=str(p.get("label") or ""),
                latency_ms=float(lat) if _is_number(lat) else None,
            )
        )
    return out


def front_table(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The front members as table rows, cheapest first (then best score, then trial number).

    Each row: ``trial``, ``cost`` (fraction), ``score``, ``latency_ms`` (or None),
    ``finetuned``, ``label``.
    """
    rows = [p for p in _normalise(points) if p.front]
    rows.sort(key=lambda p: (p.cost, -p.score, p.trial))
    return [
        {"trial": p.trial, "cost": p.cost, "score": p.score, "latency_ms": p.latency_ms, "finetuned": p.finetuned, "label": p.label}
        for p in rows
    ]


def budget_label(budget: float, cost_label: str = "FLOPs (% of original)") -> str:
    """``budget 30% FLOPs``: the budget fraction with the cost's name (first word of ``cost_label``)."""
    what = cost_label.split("(")[0].strip() or "cost"
    return f"budget {budget * 100:.4g}% {what}"


def _pct(cost: float) -> float:
    return cost * 100.0


def _hover(p: _Point, score_label: str) -> str:
    lat = f"{p.latency_ms:.4g} ms" if p.latency_ms is not None else "n/a"
    status = "front" if p.front else ("feasible" if p.feasible else "infeasible")
    return "<br>".join(
        [
            f"<b>trial {p.trial}</b> ({status})",
            f"{html.escape(score_label)}: {p.score:.4g}",
            f"cost: {_pct(p.cost):.4g}% of original",
            f"plan: {html.escape(p.label) or 'n/a'}",
            f"latency: {lat}",
            f"fine-tuned: {'yes' if p.finetuned else 'no'}",
        ]
    )


def _default_title(pts: Sequence[_Point]) -> str:
    n_front = sum(p.front for p in pts)
    return f"Pareto front: {len(pts)} trials, {n_front} on the front"


# ---------------------------------------------------------------------- plots
def _png(pts: Sequence[_Point], budget: Optional[float], cost_label: str, score_label: str, title: str) -> bytes:
    # a Figure on an Agg canvas, without pyplot: no display, no global backend switch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(8, 5.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    infeasible = [p for p in pts if not p.feasible]
    rest = [p for p in pts if p.feasible and not p.front]
    front = sorted((p for p in pts if p.front), key=lambda p: (p.cost, -p.score))
    handles = []
    if infeasible:
        ax.scatter([_pct(p.cost) for p in infeasible], [p.score for p in infeasible], marker="x", c=_GREY, s=22, zorder=1)
        handles.append(Line2D([], [], ls="", marker="x", color=_GREY, label="infeasible (over budget)"))
    if rest:
        ax.scatter([_pct(p.cost) for p in rest], [p.score for p in rest], c=_LIGHT, s=24, alpha=0.8, zorder=2)
        handles.append(Line2D([], [], ls="", marker="o", color=_LIGHT, label="feasible"))
    if front:
        xs, ys = [_pct(p.cost) for p in front], [p.score for p in front]
        ax.step(xs, ys, where="post", color=_FRONT, lw=1.4, zorder=3)
        tuned = [p for p in front if p.finetuned]
        raw = [p for p in front if not p.finetuned]
        if tuned:
            ax.scatter([_pct(p.cost) for p in tuned], [p.score for p in tuned], s=60, c=_FRONT, edgecolors=_FRONT, zorder=4)
            handles.append(Line2D([], [], ls="-", marker="o", color=_FRONT, label="front, fine-tuned"))
        if raw:
            ax.scatter([_pct(p.cost) for p in raw], [p.score for p in raw], s=60, facecolors="white", edgecolors=_FRONT,
                       linewidths=1.6, zorder=4)
            handles.append(Line2D([], [], ls="-", marker="o", color=_FRONT, markerfacecolor="white", label="front, not fine-tuned"))
        if len(front) <= 30:
            for p in front:
                ax.annotate(f"#{p.trial}", (_pct(p.cost), p.score), textcoords="offset points", xytext=(5, 4), fontsize=7,
                            color=_FRONT)
    if budget is not None:
        text = budget_label(budget, cost_label)
        ax.axvline(_pct(budget), color=_BUDGET, ls="--", lw=1.2, zorder=0)
        ax.annotate(text, (_pct(budget), 1.0), xycoords=("data", "axes fraction"), xytext=(4, -12),
                    textcoords="offset points", color=_BUDGET, fontsize=8)
        handles.append(Line2D([], [], ls="--", color=_BUDGET, label=text))
    if not pts:
        ax.text(0.5, 0.5, "no finished trials yet", ha="center", va="center", transform=ax.transAxes, color="0.4")
    elif not any(p.feasible for p in pts):
        ax.text(0.5, 0.95, "no feasible trial", ha="center", va="top", transform=ax.transAxes, color="0.4")
    ax.set_xlabel(cost_label)
    ax.set_ylabel(score_label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=8)
    if "flop" in cost_label.lower():
        fig.text(0.01, 0.005, "1 FLOP = 1 multiply-add (fvcore's convention)", fontsize=7, color="0.45")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _html(pts: Sequence[_Point], budget: Optional[float], cost_label: str, score_label: str, title: str) -> str:
    import plotly.graph_objects as go

    fig = go.Figure()

    def scatter(sel: Sequence[_Point], name: str, **kw: Any) -> None:
        fig.add_trace(
            go.Scatter(
                x=[_pct(p.cost) for p in sel],
                y=[p.score for p in sel],
                text=[_hover(p, score_label) for p in sel],
                hovertemplate="%{text}<extra></extra>",
                name=name,
                **kw,
            )
        )

    infeasible = [p for p in pts if not p.feasible]
    rest = [p for p in pts if p.feasible and not p.front]
    front = sorted((p for p in pts if p.front), key=lambda p: (p.cost, -p.score))
    if infeasible:
        scatter(infeasible, "infeasible (over budget)", mode="markers", marker=dict(color=_GREY, symbol="x", size=7))
    if rest:
        scatter(rest, "feasible", mode="markers", marker=dict(color=_LIGHT, size=8, opacity=0.85))
    if front:
        fig.add_trace(
            go.Scatter(x=[_pct(p.cost) for p in front], y=[p.score for p in front], mode="lines", line=dict(color=_FRONT, shape="hv"),
                       name="Pareto front", hoverinfo="skip")
        )
        tuned = [p for p in front if p.finetuned]
        raw = [p for p in front if not p.finetuned]
        if tuned:
            scatter(tuned, "front, fine-tuned", mode="markers", marker=dict(color=_FRONT, size=11, symbol="circle"))
        if raw:
            scatter(raw, "front, not fine-tuned", mode="markers",
                    marker=dict(color=_FRONT, size=11, symbol="circle-open", line=dict(width=2)))
    if budget is not None:
        fig.add_vline(x=_pct(budget), line=dict(color=_BUDGET, dash="dash"), annotation_text=budget_label(budget, cost_label),
                      annotation_position="top right", annotation_font_color=_BUDGET)
    note = "no finished trials yet" if not pts else ("no feasible trial" if not any(p.feasible for p in pts) else None)
    if note:
        fig.add_annotation(text=note, xref="paper", yref="paper", x=0.5, y=0.95, showarrow=False, font=dict(color="#666"))
    x_title = cost_label + ("<br><sup>1 FLOP = 1 multiply-add (fvcore's convention)</sup>" if "flop" in cost_label.lower() else "")
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=score_label, template="plotly_white", hovermode="closest",
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    # plotly.js inline (~4.5 MB): the file must open without network access
    return fig.to_html(include_plotlyjs=True, full_html=True)


def plot_front(
    points: Sequence[Mapping[str, Any]],
    out_dir: Union[str, Path],
    *,
    budget: Optional[float] = None,
    cost_label: str = "FLOPs (% of original)",
    score_label: str = "score",
    title: Optional[str] = None,
) -> dict[str, Path]:
    """Write ``pareto.png`` and ``pareto.html`` (self-contained, works offline) into ``out_dir``.

    Infeasible trials are grey crosses, feasible trials off the front light dots;
    front members are red and joined by the attainment staircase, filled when
    fine-tuned and hollow when not. ``budget`` (a fraction of the original) is drawn
    as a dashed vertical line labelled e.g. ``budget 30% FLOPs``. Costs are shown in
    percent of the original. In the HTML, hovering a point shows its trial, score,
    cost, plan label, latency and whether it was fine-tuned.

    Both files are replaced atomically (a reader never sees half a picture);
    ``out_dir`` is created if needed. Returns ``{"png": path, "html": path}``.
    """
    pts = _normalise(points)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = title or _default_title(pts)
    paths = {"png": out / "pareto.png", "html": out / "pareto.html"}
    atomic_write_bytes(paths["png"], _png(pts, budget, cost_label, score_label, title))
    atomic_write_bytes(paths["html"], _html(pts, budget, cost_label, score_label, title).encode("utf-8"))
    logger.info("wrote %s and %s (%d trials, %d on the front)", paths["png"], paths["html"], len(pts), sum(p.front for p in pts))
    return paths
