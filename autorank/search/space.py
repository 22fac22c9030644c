"""Search spaces: which layers the search may decompose, with which methods, over which ρ grid.

A search space is a YAML file (``search_spaces/*.yaml``; the built-in names
``default``, ``cnn`` and ``transformer`` refer to the files shipped there)::

    methods: [none, svd, spatial-svd, tucker2]   # or "all"; `none` keeps a layer dense
    rho: {min: 0.1, max: 0.9, step: 0.1}          # or a list: [0.1, 0.25, 0.5]
    align: null                                   # or 8 / 16: ranks rounded down to multiples
    layers:
      include: []            # regexes on qualified names (re.search); empty: every layer
      exclude: ['^fc$']      # regexes; a match is never decomposed
      types: [Linear, Conv2d, Conv1D]
      min_params: 0          # smaller layers stay dense
      min_flops: 0

Every candidate layer gets the same two parameters, its method and its ρ, so the
space is static (the same distributions in every trial) for samplers that need it.
The methods a layer may take are the space's methods that apply to it, plus
``none``; a layer where none applies is not a search variable.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from autorank import methods as registry
from autorank.errors import AutorankError, UnknownMethodError
from autorank.methods._base import align_rank
from autorank.training.recovery import RECOVERY_KEYS, RecoveryError, RecoveryOptions

__all__ = ["SearchSpace", "SpaceError", "LayerChoice", "builtin_spaces", "SPACES_DIR"]

#: where the built-in spaces live (the repo's search_spaces/, also shipped inside the package)
_REPO_SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
_PKG_SPACES = Path(__file__).resolve().parent / "spaces"
SPACES_DIR = _REPO_SPACES if _REPO_SPACES.is_dir() else _PKG_SPACES

logger = logging.getLogger("autorank")

_TOP_KEYS = {"methods", "rho", "align", "layers", "description", "training"}
_TRAINING_KEYS = {"bn_between_factors", "force_regularization", "fixed_point", *RECOVERY_KEYS}
_LAYER_KEYS = {"include", "exclude", "types", "min_params", "min_flops"}
_TYPES = {"Linear", "Conv2d", "Conv1D"}


class SpaceError(AutorankError, ValueError):
    """A search-space file that cannot be read: names the file, the key and what was expected."""


@dataclass(frozen=True)
class LayerChoice:
    """What the search may choose for one layer."""

    name: str
    methods: tuple[str, ...]  # always starts with "none"
    rhos: tuple[float, ...]
    #: (method, ρ, reason) left out: the method refuses its rank at ρ (BaseMethod.rank_refusal,
    #: e.g. CP-ALS too slow); a method refused at every ρ is not in ``methods`` at all
    refused: tuple[tuple[str, float, str], ...] = ()

    def allows(self, method: str, rho: float) -> bool:
        """Whether (method, ρ) is a choice of this layer (``none`` always is)."""
        if method == "none":
            return True
        return method in self.methods and not any(m == method and abs(r - rho) < 1e-9 for m, r, _ in self.refused)

    def rhos_for(self, method: str) -> tuple[float, ...]:
        """The ρ grid of ``method`` on this layer, less its refused values."""
        return tuple(r for r in self.rhos if self.allows(method, r))

    def snap(self, method: str, rho: float) -> float:
        """``rho`` if (method, ρ) is allowed, else the largest allowed ρ below it (refusals grow with the rank),
        else the smallest allowed; ``rho`` for a method with no grid left (it is not offered then)."""
        if method == "none" or self.allows(method, rho):
            return rho
        grid = self.rhos_for(method)
        below = [r for r in grid if r <= rho]
        return below[-1] if below else (grid[0] if grid else rho)


@dataclass
class SearchSpace:
    methods: tuple[str, ...]
    rhos: tuple[float, ...]
    rho_step: Optional[float] = None  # set when the grid is min..max by step (sampled as an ordered float)
    align: Optional[int] = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    types: tuple[str, ...] = ("Linear", "Conv2d", "Conv1D")
    min_params: int = 0
    min_flops: int = 0
    source: str = "<dict>"
    description: str = ""
    #: training-time options of the fine-tuning stage (see autorank.training)
    training: dict = field(default_factory=dict)
    _compiled: Any = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, spec: Union[str, Path, dict, "SearchSpace", None] = None) -> "SearchSpace":
        """A built-in name (``default``, ``cnn``, ``transformer``), a YAML path, a dict or a SearchSpace."""
        if isinstance(spec, SearchSpace):
            return spec
        if spec is None:
            spec = "default"
        if isinstance(spec, dict):
            return cls.from_dict(spec, "<dict>")
        text = str(spec)
        path = Path(text)
        if not path.suffix and not path.exists():
            path = SPACES_DIR / f"{text}.yaml"
            if not path.exists():
                known = ", ".join(builtin_spaces())
                raise SpaceError(f"search space {text!r}: not a file and not a built-in space ({known})")
        if not path.exists():
            raise SpaceError(f"search space file not found: {path}")
        if path.is_dir():
            raise SpaceError(f"search space {path} is a directory, expected a YAML file")
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            raise SpaceError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SpaceError(f"cannot read search space {path}: {exc}") from None
        if data is None or (isinstance(data, dict) and not set(data) - {"description"}):
            # an empty file (or one holding only comments or a description) is a mistake, not "every method"
            raise SpaceError(f"{path}: the search space is empty; give at least 'methods' "
                             f"(e.g. methods: [svd, tucker2]) — keys: {', '.join(sorted(_TOP_KEYS))}")
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "SearchSpace":
        if not isinstance(data, dict):
            raise SpaceError(f"{source}: expected a mapping with keys {sorted(_TOP_KEYS)}, got {type(data).__name__}")
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise SpaceError(f"{source}: unknown key(s) {sorted(unknown)}; expected some of {sorted(_TOP_KEYS)}")
        methods = _methods(data.get("methods", "all"), source)
        rhos, step = _rhos(data.get("rho", {"min": 0.1, "max": 0.9, "step": 0.1}), source)
        align = data.get("align")
        if align is not None and (isinstance(align, bool) or not isinstance(align, int) or align < 1):
            raise SpaceError(f"{source}: key 'align': expected null or a positive integer such as 8 or 16, got {align!r}")
        layers = data.get("layers") or {}
        if not isinstance(layers, dict):
            raise SpaceError(f"{source}: key 'layers': expected a mapping with keys {sorted(_LAYER_KEYS)}, got {type(layers).__name__}")
        unknown = set(layers) - _LAYER_KEYS
        if unknown:
            raise SpaceError(f"{source}: key 'layers': unknown key(s) {sorted(unknown)}; expected some of {sorted(_LAYER_KEYS)}")
        include = _patterns(layers.get("include", []), source, "layers.include")
        exclude = _patterns(layers.get("exclude", []), source, "layers.exclude")
        types = layers.get("types", ["Linear", "Conv2d", "Conv1D"])
        if isinstance(types, str):
            types = [types]
        if not isinstance(types, list) or not types or any(t not in _TYPES for t in types):
            raise SpaceError(f"{source}: key 'layers.types': expected a non-empty list of {sorted(_TYPES)}, got {types!r}")
        mins = {}
        for key in ("min_params", "min_flops"):
            v = layers.get(key, 0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise SpaceError(f"{source}: key 'layers.{key}': expected a number >= 0, got {v!r}")
            mins[key] = int(v)
        desc = data.get("description", "")
        training = _training(data.get("training") or {}, source)
        return cls(
            methods=methods, rhos=rhos, rho_step=step, align=align, include=tuple(include), exclude=tuple(exclude),
            types=tuple(types), min_params=mins["min_params"], min_flops=mins["min_flops"], source=source,
            description=str(desc or ""), training=training,
        )

    def with_training(self, overrides: Optional[dict], source: str = "training") -> "SearchSpace":
        """The space with ``overrides`` (keys of its ``training:`` block, checked) laid over its own."""
        if not overrides:
            return self
        if not isinstance(overrides, dict):
            raise SpaceError(f"{source}: expected a mapping of training options, got {overrides!r}")
        return dataclasses.replace(self, training=_training({**self.training, **overrides}, source))

    def to_dict(self) -> dict[str, Any]:
        rho: Any = list(self.rhos)
        if self.rho_step is not None:
            rho = {"min": self.rhos[0], "max": self.rhos[-1], "step": self.rho_step}
        out: dict[str, Any] = {"training": dict(self.training)} if self.training else {}
        return out | {
            "methods": list(self.methods),
            "rho": rho,
            "align": self.align,
            "layers": {
                "include": list(self.include), "exclude": list(self.exclude), "types": list(self.types),
                "min_params": self.min_params, "min_flops": self.min_flops,
            },
        }

    # ------------------------------------------------------------------ use
    def layer_reason(self, name: str, lp) -> Optional[str]:
        """Why the space leaves profiled layer ``lp`` dense (None: it is a candidate)."""
        if lp.excluded:
            return lp.excluded
        if lp.type not in self.types:
            return f"type {lp.type} not in the space's layers.types"
        if self.include and not any(re.search(p, name) for p in self.include):
            return "matches no layers.include pattern"
        for p in self.exclude:
            if re.search(p, name):
                return f"excluded by pattern {p!r}"
        if lp.dense.params < self.min_params:
            return f"{lp.dense.params} parameters < layers.min_params {self.min_params}"
        if lp.dense.flops < self.min_flops:
            return f"{lp.dense.flops} FLOPs < layers.min_flops {self.min_flops}"
        return None

    def choices(self, profile) -> dict[str, LayerChoice]:
        """Per profiled layer, the methods (with ``none`` first) and ρ grid the search may use."""
        out: dict[str, LayerChoice] = {}
        for name, lp in profile.layers.items():
            if self.layer_reason(name, lp) is not None:
                continue
            applicable = set(lp.applicable())
            ms: list[str] = []
            refused: list[tuple[str, float, str]] = []
            for m in self.methods:
                if m == "none" or m not in applicable:
                    continue
                out_m = self._refused(lp, m)
                refused += out_m
                if len(out_m) < len(self.rhos):
                    ms.append(m)
                if out_m:
                    logger.info("space: layer %s, method %s: rho %s left out: %s", name, m,
                                ", ".join(f"{r:g}" for _, r, _ in out_m), out_m[0][2])
            if not ms:
                continue
            out[name] = LayerChoice(name, ("none",) + tuple(ms), self.rhos, tuple(refused))
        return out

    def _refused(self, lp, method: str) -> list[tuple[str, float, str]]:
        """(method, ρ, reason) for each ρ of the grid whose rank the method refuses on profiled layer ``lp``."""
        m = registry.get(method)

        def why(rho: float) -> Optional[str]:
            rank = m.rank_for(lp.spec, rho, lp.input_shape)
            if self.align:
                rank = align_rank(rank, self.align, m.max_rank(lp.spec))
            return m.rank_refusal(lp.spec, rank, lp.input_shape)

        if why(self.rhos[-1]) is None:  # refusals are monotone in the rank, hence in ρ
            return []
        out = []
        for rho in self.rhos:
            reason = why(rho)
            if reason is not None:
                out.append((method, rho, reason))
        return out

    def decomposable_methods(self) -> list[str]:
        return [m for m in self.methods if m != "none"]


def builtin_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def _methods(value: Any, source: str) -> tuple[str, ...]:
    if value == "all":
        return ("none",) + tuple(registry.available())
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise SpaceError(f"{source}: key 'methods': expected \"all\" or a non-empty list of method names (and 'none'), got {value!r}")
    out: list[str] = ["none"]
    for v in value:
        if v.strip().lower() == "none":
            continue
        try:
            name = registry.get(v).name
        except UnknownMethodError as exc:
            raise SpaceError(f"{source}: key 'methods': {exc}") from None
        if name not in out:
            out.append(name)
    if len(out) == 1:
        raise SpaceError(f"{source}: key 'methods': lists no decomposition method, only 'none'")
    return tuple(out)


def _rhos(value: Any, source: str) -> tuple[tuple[float, ...], Optional[float]]:
    expected = "a list of fractions in (0, 1] or {min: 0.1, max: 0.9, step: 0.1}"
    if isinstance(value, dict):
        if set(value) != {"min", "max", "step"}:
            raise SpaceError(f"{source}: key 'rho': expected {expected}, got keys {sorted(value)}")
        try:
            lo, hi, step = (float(value[k]) for k in ("min", "max", "step"))
        except (TypeError, ValueError):
            raise SpaceError(f"{source}: key 'rho': min, max and step must be numbers, got {value!r}") from None
        if not (0 < lo <= hi <= 1) or step <= 0:
            raise SpaceError(f"{source}: key 'rho': expected 0 < min <= max <= 1 and step > 0, got {value!r}")
        n = int(math.floor((hi - lo) / step + 1e-9))
        grid = tuple(round(lo + i * step, 10) for i in range(n + 1))
        if abs(grid[-1] - hi) > 1e-9:
            raise SpaceError(f"{source}: key 'rho': (max - min) must be a multiple of step, got {value!r}")
        return grid, step
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise SpaceError(f"{source}: key 'rho': expected {expected}, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < float(v) <= 1:
            raise SpaceError(f"{source}: key 'rho': {v!r} is not a fraction in (0, 1]")
        out.append(float(v))
    return tuple(sorted(set(out))), None


def _training(value: Any, source: str) -> dict[str, Any]:
    """``training: {bn_between_factors: bool, force_regularization: false | {steps, strength}, fixed_point: null | 8}``
    and the recovery options (:data:`autorank.training.recovery.RECOVERY_KEYS`: refit, blockwise, distill,
    early_stopping, finetune_steps, finetune_time, lr)."""
    if not isinstance(value, dict):
        raise SpaceError(f"{source}: key 'training': expected a mapping with keys {sorted(_TRAINING_KEYS)}, got {value!r}")
    unknown = set(value) - _TRAINING_KEYS
    if unknown:
        raise SpaceError(f"{source}: key 'training': unknown key(s) {sorted(unknown)}; expected some of {sorted(_TRAINING_KEYS)}")
    out: dict[str, Any] = {}
    recovery = {k: v for k, v in value.items() if k in RECOVERY_KEYS}
    try:
        RecoveryOptions.from_dict(recovery, source="training" if source == "training" else f"{source}: training")
    except RecoveryError as exc:
        raise SpaceError(str(exc)) from None
    out.update(recovery)  # as given (checked): the defaults stay the recovery module's
    bn = value.get("bn_between_factors", False)
    if not isinstance(bn, bool):
        raise SpaceError(f"{source}: key 'training.bn_between_factors': expected true or false, got {bn!r}")
    if bn:
        out["bn_between_factors"] = True
    fr = value.get("force_regularization", False)
    if fr is True:
        fr = {}
    if fr not in (False, None):
        if not isinstance(fr, dict) or set(fr) - {"steps", "strength"}:
            raise SpaceError(f"{source}: key 'training.force_regularization': expected false, true or {{steps: N, strength: S}}, got {fr!r}")
        steps, strength = fr.get("steps", 50), fr.get("strength", 0.05)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise SpaceError(f"{source}: key 'training.force_regularization.steps': expected a positive integer, got {steps!r}")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise SpaceError(f"{source}: key 'training.force_regularization.strength': expected a number in (0, 1], got {strength!r}")
        out["force_regularization"] = {"steps": steps, "strength": float(strength)}
    fp = value.get("fixed_point")
    if fp is not None:
        if isinstance(fp, bool) or fp not in (4, 8):
            raise SpaceError(f"{source}: key 'training.fixed_point': expected null, 8 or 4 (bits), got {fp!r}")
        out["fixed_point"] = int(fp)
    return out


def _patterns(value: Any, source: str, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpaceError(f"{source}: key '{key}': expected a list of regular expressions, got {value!r}")
    for p in value:
        try:
            re.compile(p)
        except re.error as exc:
            raise SpaceError(f"{source}: key '{key}': {p!r} is not a valid regular expression ({exc})") from None
    return list(value)
