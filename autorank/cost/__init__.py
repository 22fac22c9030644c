"""Cost model: FLOPs and parameters (latency and budgets build on this)."""

from __future__ import annotations

from autorank.cost.flops import count_flops, count_flops_torch, count_params

__all__ = ["count_flops", "count_flops_torch", "count_params"]
