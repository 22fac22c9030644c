"""Pareto fronts: non-dominated indices, exact 2-D hypervolume, and the run directory's plots."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autorank.report import budget_label, front_table, hypervolume_2d, pareto_indices, plot_front

NAN = float("nan")


# ---------------------------------------------------------------------- pareto_indices


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """a = (cost, score) dominates b: no worse in both, better in one (minimise cost, maximise score)."""
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


@pytest.mark.parametrize(
    "costs, scores, expected",
    [
        ([], [], []),
        ([0.5], [0.7], [0]),
        ([1, 2, 3], [1, 2, 3], [0, 1, 2]),  # every extra cost buys score
        ([1, 2, 3], [3, 2, 1], [0]),  # the cheapest is also the best
        ([3, 1, 2], [3, 1, 2], [1, 2, 0]),  # returned cheapest first
        ([1, 1, 2], [1, 1, 2], [0, 2]),  # equal points: the first is kept
        ([2, 1, 1, 1], [5, 3, 3, 3], [1, 0]),  # three equal: only the first of them
        ([1, 1], [1, 2], [1]),  # same cost: the better score dominates
        ([1, 2], [2, 2], [0]),  # same score: the cheaper dominates
        ([0.3, 0.3, 0.2], [0.8, 0.9, 0.9], [2]),  # (0.2, 0.9) dominates both
        ([NAN, 1, 2, None], [1, NAN, 1, 5], [2]),  # NaN / None are never on the front
        ([1, 2], [-math.inf, -math.inf], [0]),
    ],
)
def test_pareto_indices_hand_cases(costs, scores, expected):
    assert pareto_indices(costs, scores) == expected


def test_pareto_indices_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="2 costs but 1 scores"):
        pareto_indices([1, 2], [1])


coordinate = st.one_of(st.integers(0, 4).map(float), st.floats(0, 4, allow_nan=False))  # small grid: many ties


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(coordinate, coordinate), max_size=25))
def test_pareto_indices_property(points):
    costs, scores = [c for c, _ in points], [s for _, s in points]
    front = pareto_indices(costs, scores)
    assert len(set(front)) == len(front)
    assert [costs[i] for i in front] == sorted(costs[i] for i in front)
    for i in front:  # nothing dominates a front member, and no earlier point equals it
        assert not any(dominates(p, points[i]) for p in points)
        assert not any(points[j] == points[i] for j in range(i))
    for j in set(range(len(points))) - set(front):  # every other point is dominated by or equal to a member
        assert any(dominates(points[i], points[j]) or points[i] == points[j] for i in front)


# ---------------------------------------------------------------------- hypervolume


def test_hypervolume_hand_cases():
    assert hypervolume_2d([], 1.0, 0.0) == 0.0
    assert hypervolume_2d([(0.5, 0.8)], 1.0, 0.0) == pytest.approx(0.4)
    two = [(0.2, 0.5), (0.6, 0.9)]  # (0.6-0.2)*0.5 + (1-0.6)*0.9
    assert hypervolume_2d(two, 1.0, 0.0) == pytest.approx(0.56)
    assert hypervolume_2d(two + [(0.7, 0.4), (0.2, 0.5)], 1.0, 0.0) == pytest.approx(0.56)  # dominated / repeated add nothing
    assert hypervolume_2d(two + [(1.5, 2.0), (0.1, -1.0)], 1.0, 0.0) == pytest.approx(0.56)  # beyond the reference
    assert hypervolume_2d(two, 1.0, 0.4) == pytest.approx(0.4 * 0.1 + 0.4 * 0.5)  # a higher reference score
    assert hypervolume_2d([{"cost": 0.2, "score": 0.5}, {"cost": 0.6, "score": 0.9}], 1.0, 0.0) == pytest.approx(0.56)
    assert hypervolume_2d([(0.5, NAN)], 1.0, 0.0) == 0.0
    assert hypervolume_2d([(1.0, 0.9)], 1.0, 0.0) == 0.0  # on the reference cost: zero width


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=12))
def test_hypervolume_counts_dominated_unit_cells(points):
    """On an integer grid the area is the number of unit cells some point dominates."""
    ref_cost, ref_score = 6, 0
    cells = sum(
        1
        for c in range(ref_cost)
        for s in range(ref_score, 6)
        if any(pc <= c and ps >= s + 1 for pc, ps in points)  # the cell [c, c+1] x [s, s+1]
    )
    assert hypervolume_2d([(float(c), float(s)) for c, s in points], ref_cost, ref_score) == pytest.approx(cells)


# ---------------------------------------------------------------------- plots and table


def _points() -> list[dict]:
    return [
        {"trial": 101, "cost": 0.20, "score": 0.80, "feasible": True, "front": True, "finetuned": True, "label": "svd×3 tucker2×2",
         "latency_ms": 3.25},
        {"trial": 102, "cost": 0.28, "score": 0.86, "feasible": True, "front": True, "finetuned": False, "label": "svd×5",
         "latency_ms": None},
        {"trial": 103, "cost": 0.25, "score": 0.70, "feasible": True, "front": False, "finetuned": False, "label": "cp×2",
         "latency_ms": 2.0},
        {"trial": 104, "cost": 0.55, "score": 0.95, "feasible": False, "front": False, "finetuned": False, "label": "svd×1",
         "latency_ms": 6.0},
        {"trial": 105, "cost": 0.10, "score": 0.60, "feasible": True, "front": True, "finetuned": False, "label": "tucker2×4",
         "latency_ms": 1.5},
    ]


PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def test_plot_front_writes_png_and_offline_html(tmp_path):
    out = tmp_path / "run"  # created on demand
    paths = plot_front(_points(), out, budget=0.3)
    assert paths == {"png": out / "pareto.png", "html": out / "pareto.html"}
    assert sorted(p.name for p in out.iterdir()) == ["pareto.html", "pareto.png"]  # no temporary left
    assert paths["png"].read_bytes()[:8] == PNG_HEADER
    from matplotlib.image import imread

    assert imread(paths["png"]).shape[0] > 200

    page = paths["html"].read_text(encoding="utf-8")
    for trial in (101, 102, 103, 104, 105):
        assert f"trial {trial}" in page
    assert budget_label(0.3) == "budget 30% FLOPs" and "budget 30% FLOPs" in page
    assert "3.25 ms" in page and "fine-tuned: yes" in page and "fine-tuned: no" in page and "tucker2" in page
    assert "infeasible (over budget)" in page and "front, fine-tuned" in page and "front, not fine-tuned" in page
    # self-contained: plotly.js is inline, nothing is fetched from a CDN
    assert "plotly.js v" in page and len(page) > 1_000_000 and "<scriptsrc=" not in page.replace(" ", "")

    # without a budget there is no budget line; rewriting replaces both files
    plot_front(_points(), out, budget=None)
    assert "budget 30%" not in (out / "pareto.html").read_text(encoding="utf-8")


def test_plot_front_with_no_feasible_point_and_with_a_single_point(tmp_path):
    infeasible = [dict(p, feasible=False) for p in _points()]
    paths = plot_front(infeasible, tmp_path / "none", budget=0.05)
    assert paths["png"].read_bytes()[:8] == PNG_HEADER
    page = paths["html"].read_text(encoding="utf-8")
    assert "no feasible trial" in page and "front, fine-tuned" not in page  # infeasible points are never front members
    assert front_table(infeasible) == []

    single = [{"trial": 3, "cost": 0.4, "score": 0.9}]  # no "front" key: computed
    paths = plot_front(single, tmp_path / "one", cost_label="parameters (% of original)", score_label="accuracy")
    assert paths["png"].read_bytes()[:8] == PNG_HEADER
    page = paths["html"].read_text(encoding="utf-8")
    assert "trial 3" in page and "accuracy" in page
    assert front_table(single) == [{"trial": 3, "cost": 0.4, "score": 0.9, "latency_ms": None, "finetuned": False, "label": ""}]
    assert budget_label(0.25, "parameters (% of original)") == "budget 25% parameters"

    assert plot_front([], tmp_path / "empty")["png"].read_bytes()[:8] == PNG_HEADER


def test_front_table_lists_front_members_by_cost():
    rows = front_table(_points())
    assert [r["trial"] for r in rows] == [105, 101, 102]
    assert rows[1] == {"trial": 101, "cost": 0.20, "score": 0.80, "latency_ms": 3.25, "finetuned": True, "label": "svd×3 tucker2×2"}
    # without "front" keys the front is computed from the feasible points only
    bare = [{k: v for k, v in p.items() if k != "front"} for p in _points()]
    assert [r["trial"] for r in front_table(bare)] == [105, 101, 102]
    with pytest.raises(ValueError, match="point 0"):
        front_table([{"trial": 1, "cost": 0.1}])
