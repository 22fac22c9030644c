"""Cost model: FLOPs and parameters (analytic, exact), measured latency, budgets.

FLOPs follow fvcore's convention: one multiply-add is one FLOP.
"""

from __future__ import annotations

from autorank.cost.budget import Budget, BudgetError, check_reachable, parse_budget, smallest_reachable
from autorank.cost.flops import count_flops, count_flops_torch, count_params
from autorank.cost.latency import (
    DeviceError,
    LatencyTable,
    Timing,
    build_table,
    estimate_latency,
    measure,
    profile_latency_job,
)
from autorank.cost.profile import LayerProfile, ModelProfile, profile_model

__all__ = [
    "Budget",
    "BudgetError",
    "DeviceError",
    "LatencyTable",
    "LayerProfile",
    "ModelProfile",
    "Timing",
    "build_table",
    "check_reachable",
    "count_flops",
    "count_flops_torch",
    "count_params",
    "estimate_latency",
    "measure",
    "parse_budget",
    "profile_latency_job",
    "profile_model",
    "smallest_reachable",
]
