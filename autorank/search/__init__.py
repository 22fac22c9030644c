"""The search: per-layer method and rank, multi-objective, repaired to a budget (see :func:`search`)."""

from __future__ import annotations

from autorank.search.allocate import CostModel, Sensitivity
from autorank.search.result import FrontMember, PickError, SearchResult
from autorank.search.rundir import RunDir, RunDirError
from autorank.search.space import SearchSpace, SpaceError
from autorank.search.study import SAMPLERS, SearchError, search

__all__ = [
    "search", "SearchResult", "FrontMember", "SearchSpace", "SpaceError", "RunDir", "RunDirError", "PickError",
    "SearchError", "CostModel", "Sensitivity", "SAMPLERS",
]
