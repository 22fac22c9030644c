"""The search: per-layer method and rank, multi-objective, repaired to a budget (see :func:`search`)."""

from __future__ import annotations

from autorank.errors import SearchError
from autorank.search.allocate import Sensitivity
from autorank.search.params import SAMPLERS
from autorank.search.result import FrontMember, PickError, SearchResult
from autorank.search.rundir import RunDir, RunDirError
from autorank.search.space import SearchSpace, SpaceError
from autorank.search.study import search

__all__ = [
    "search", "SearchResult", "FrontMember", "SearchSpace", "SpaceError", "RunDir", "RunDirError", "PickError",
    "SearchError", "Sensitivity", "SAMPLERS",
]
