"""Numbers as people read them (shared by budgets, latency reports and the CLI)."""

from __future__ import annotations

__all__ = ["format_count", "format_seconds"]


def format_count(n: float, spec: str = ".4g") -> str:
    """1234567 -> '1.235M' (powers of 1000: k, M, G, T)."""
    for suffix, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:{spec}}{suffix}"
    return f"{n:{spec}}"


def format_seconds(s: float, spec: str = "g") -> str:
    """0.004 -> '4 ms'; units s, ms, us."""
    if s >= 1:
        return f"{s:{spec}} s"
    if s >= 1e-3:
        return f"{s * 1e3:{spec}} ms"
    return f"{s * 1e6:{spec}} us"
