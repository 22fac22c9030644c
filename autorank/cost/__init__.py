"""Cost model: FLOPs and parameters (analytic, exact), measured latency, budgets.

FLOPs follow fvcore's convention: one multiply-add is one FLOP.
"""

from __future__ import annotations

from autorank.cost.budget import Budget, BudgetError, check_reachable, parse_budget, smallest_reachable
from autorank.cost.cost_model import ChoicePlan, CostModel
from autorank.cost.flops import count_flops, count_flops_torch, count_params
from autorank.cost.latency import build_table, estimate_latency
from autorank.cost.latency_table import LatencyTable
from autorank.cost.profile import LayerProfile, ModelProfile, profile_model
from autorank.cost.timing import DeviceError, Timing, measure

__all__ = [
    "Budget",
    "BudgetError",
    "ChoicePlan",
    "CostModel",
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
    "profile_model",
    "smallest_reachable",
]
