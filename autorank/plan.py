"""Plans: which layers to decompose, with which method, at which rank.

A plan is JSON::

    {"layers": {"features.3": {"method": "tucker2", "rank": 0.5},
                "classifier.0": {"method": "svd", "rank": 64}}}

A rank is the method's own (an integer, or a list for methods with several
ranks, such as tucker2's ``[r_in, r_out]``) or a float ρ in (0, 1]: keep about
ρ of the layer's FLOPs. ``options`` (optional) are passed to the method.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from torch import nn

from autorank import methods as registry
from autorank.candidates import candidate_layers
from autorank.errors import PlanError, SaveLoadError
from autorank.fileio import atomic_write_text

__all__ = ["Plan", "LayerPlan", "RankValue"]

RankValue = Union[int, float, tuple, str]


def _rank_from_json(value: Any, where: str) -> RankValue:
    if isinstance(value, bool) or value is None:
        raise PlanError(f"{where}: 'rank' must be an integer, a list of integers, a fraction in (0, 1] or a method keyword, got {value!r}")
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise PlanError(f"{where}: 'rank' must be an integer, a list of integers, a fraction in (0, 1] or a method keyword, got {value!r}")


def _rank_to_json(rank: RankValue) -> Any:
    return list(rank) if isinstance(rank, tuple) else rank


@dataclass(frozen=True)
class LayerPlan:
    """The decomposition of one layer: method name, rank and method options."""

    method: str
    rank: RankValue
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"method": self.method, "rank": _rank_to_json(self.rank)}
        if self.options:
            d["options"] = dict(self.options)
        return d


@dataclass
class Plan:
    """``{qualified layer name: LayerPlan}`` plus free-form metadata."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> "Plan":
        """Parse the JSON structure; PlanError names the key at fault."""
        if not isinstance(data, dict):
            raise PlanError(f"{source}: expected a JSON object with a 'layers' key, got {type(data).__name__}")
        unknown = set(data) - {"layers", "meta"}
        if unknown:
            raise PlanError(f"{source}: unknown top-level key(s) {sorted(unknown)}; expected 'layers' (and optionally 'meta')")
        layers = data.get("layers")
        if not isinstance(layers, dict):
            raise PlanError(f"{source}: 'layers' must be an object mapping layer names to {{\"method\": ..., \"rank\": ...}}")
        out: dict[str, LayerPlan] = {}
        for name, entry in layers.items():
            where = f"{source}: layer {name!r}"
            if isinstance(entry, LayerPlan):
                out[name] = entry
                continue
            if not isinstance(entry, dict):
                raise PlanError(f"{where}: expected an object with 'method' and 'rank', got {entry!r}")
            extra = set(entry) - {"method", "rank", "options"}
            if extra:
                raise PlanError(f"{where}: unknown key(s) {sorted(extra)}; expected 'method', 'rank' and optionally 'options'")
            if "method" not in entry or not isinstance(entry["method"], str):
                raise PlanError(f"{where}: 'method' must be a method name (see `autorank methods`)")
            if "rank" not in entry:
                raise PlanError(f"{where}: 'rank' is missing")
            options = entry.get("options", {})
            if not isinstance(options, dict):
                raise PlanError(f"{where}: 'options' must be an object")
            out[name] = LayerPlan(entry["method"], _rank_from_json(entry["rank"], where), dict(options))
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise PlanError(f"{source}: 'meta' must be an object")
        return cls(out, dict(meta))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Plan":
        p = Path(path)
        if not p.exists():
            raise SaveLoadError(f"plan file not found: {p}")
        if p.is_dir():
            raise SaveLoadError(f"plan file is a directory: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise PlanError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SaveLoadError(f"cannot read plan file {p}: {exc}") from None
        return cls.from_dict(data, source=str(p))

    @classmethod
    def coerce(cls, plan: Any) -> "Plan":
        """A Plan from a Plan, a dict (the JSON structure) or a path to a JSON file."""
        if isinstance(plan, Plan):
            return plan
        if isinstance(plan, dict):
            return cls.from_dict(plan)
        if isinstance(plan, (str, os.PathLike)):
            return cls.load(plan)
        raise PlanError(f"a plan must be a Plan, a dict or a path to a JSON file, got {type(plan).__name__}")

    @classmethod
    def uniform(
        cls,
        model: nn.Module,
        method: str,
        rank: RankValue,
        *,
        include: Optional[str] = None,
        exclude: Optional[str] = None,
        options: Optional[dict] = None,
    ) -> "Plan":
        """The same method and rank for every layer it applies to.

        ``include``/``exclude``: regular expressions on qualified names
        (``re.search``). Layers the method does not apply to are skipped.
        """
        m = registry.get(method)
        inc = re.compile(include) if include else None
        exc = re.compile(exclude) if exclude else None
        layers = {}
        for name, (module, reason) in candidate_layers(model).items():
            if reason is not None or m.applies(module) is not None:
                continue
            if inc and not inc.search(name):
                continue
            if exc and exc.search(name):
                continue
            layers[name] = LayerPlan(m.name, rank, dict(options or {}))
        return cls(layers, {"uniform": {"method": m.name, "rank": _rank_to_json(rank)}})

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        d: dict[str, Any] = {"layers": {k: v.to_dict() for k, v in self.layers.items()}}
        if self.meta:
            d["meta"] = self.meta
        return d

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: Union[str, os.PathLike]) -> None:
        atomic_write_text(Path(path), self.to_json() + "\n")

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterable[str]:
        return iter(self.layers)

    def methods_used(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for lp in self.layers.values():
            counts[lp.method] = counts.get(lp.method, 0) + 1
        return counts
