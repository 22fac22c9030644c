"""The method base class and the factors container.

A method knows, for the layer kinds it claims:

- :meth:`BaseMethod.applies`: None when it applies, else the reason it does not;
- :meth:`BaseMethod.max_rank` and :meth:`BaseMethod.resolve_rank`: the method's
  own rank (int or tuple) from an explicit rank or a kept fraction ρ of FLOPs;
- :meth:`BaseMethod.factorize`: the expensive part, once per layer (nested
  methods) or once per rank (others), cached by :class:`autorank.cache.FactorCache`;
- :meth:`BaseMethod.build`: the replacement, initialised from the factors, or a
  skeleton on the meta device when ``factors`` is None;
- :meth:`BaseMethod.cost`: exact parameters and FLOPs of the replacement, from a
  formula, equal to fvcore's count of the built module.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
from torch import nn

from autorank.errors import NotApplicableError, PlanError, RankError
from autorank.methods._layers import (
    Cost,
    Decomposed,
    LayerSpec,
    conv_flops,
    conv_out_size,
    layer_kind,
    layer_spec,
    linear_flops,
    nominal_input_shape,
    rows_of,
)

__all__ = ["BaseMethod", "Factors", "Rank", "dense_cost", "LayerStats", "align_rank", "COMMON_OPTIONS", "RefitTarget",
           "last_factor_target"]

Rank = Union[int, tuple[int, ...]]


@dataclass
class Factors:
    """The result of one factorization: named tensors plus JSON-able metadata.

    Nested factorizations hold every rank at once (truncation is a slice);
    others hold one rank, recorded in ``meta["rank"]``.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class LayerStats:
    """Calibration statistics of one layer's input.

    ``gram`` has shape (groups, d, d) in float64, where d is the length of one
    input row (in features, or in_channels/groups * kh * kw patch elements for a
    convolution, in ``F.unfold`` order); ``count`` is the number of rows summed.
    """

    gram: torch.Tensor
    count: int
    input_shape: Optional[tuple[int, ...]] = None

    def digest(self) -> str:
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        h.update(self.gram.detach().cpu().contiguous().numpy().tobytes())
        h.update(str(self.count).encode())
        return h.hexdigest()


def dense_cost(module_or_spec, input_shape: Optional[Sequence[int]] = None) -> Cost:
    """Exact parameters and FLOPs of the original (dense) layer."""
    spec = module_or_spec if isinstance(module_or_spec, LayerSpec) else layer_spec(module_or_spec)
    shape = tuple(input_shape) if input_shape is not None else nominal_input_shape(spec)
    bias = spec.out_channels if spec.bias else 0
    if not spec.is_conv:
        params = spec.in_channels * spec.out_channels + bias
        return Cost(params, linear_flops(rows_of(shape), spec.in_channels, spec.out_channels))
    b, _, h, w = shape
    kh, kw = spec.kernel_size
    oh = conv_out_size(h, kh, spec.stride[0], spec.padding[0], spec.dilation[0])
    ow = conv_out_size(w, kw, spec.stride[1], spec.padding[1], spec.dilation[1])
    params = spec.out_channels * spec.in_per_group * kh * kw + bias
    return Cost(params, conv_flops(b, spec.out_channels, spec.in_per_group, kh, kw, oh, ow))


#: options every method accepts in a plan entry
COMMON_OPTIONS: dict[str, str] = {
    "align": "round a rank given as a fraction ρ down to a multiple of this (8 or 16 suit GPUs), never below it",
    "fixed_point": "bits (2..8): factors stored as int8 codes with per-channel scales (autorank.training)",
    "bias_after_fold": "indices of factors that carry a bias after batch-norm folding (autorank.training)",
    "refit": "false: autorank.training.refit leaves this layer's factors as decomposed (default true)",
}


def _align_one(r: int, multiple: int, mx: Optional[int], mode: str) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise RankError(f"align_rank: a rank must be a positive integer, got {r!r}")
    if mode == "nearest":
        q = (r + multiple // 2) // multiple
    elif mode == "down":
        q = r // multiple
    elif mode == "up":
        q = -(-r // multiple)
    else:
        raise RankError(f"align_rank: mode must be nearest, down or up, got {mode!r}")
    out = max(q, 1) * multiple
    if mx is not None:
        if isinstance(mx, bool) or not isinstance(mx, int) or mx < 1:
            raise RankError(f"align_rank: max_rank must be a positive integer, got {mx!r}")
        if out > mx:
            out = (mx // multiple) * multiple if mx >= multiple else mx
    return out


def align_rank(rank: Rank, multiple: Optional[int], max_rank: Optional[Rank] = None, *, mode: str = "down") -> Rank:
    """``rank`` rounded to a multiple of ``multiple`` (8 or 16 suit GPU tensor cores).

    ``mode``: ``down`` (default, the rule of a plan entry's ``align`` option: a
    FLOPs budget stays met), ``nearest`` (ties round up) or ``up``. The result is
    never below ``multiple`` and never above ``max_rank`` (when given): when the
    two conflict (``max_rank < multiple``) ``max_rank`` wins, since a larger rank
    is invalid. Tuples (Tucker-2's ``(r_in, r_out)``) are aligned per component,
    against a tuple ``max_rank`` or the same integer for every component.
    ``multiple`` None leaves the rank as it is.
    """
    if multiple is None:
        return rank
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise RankError(f"align_rank: multiple must be a positive integer, got {multiple!r}")
    if isinstance(rank, (tuple, list)):
        if isinstance(max_rank, (tuple, list)):
            if len(max_rank) != len(rank):
                raise RankError(f"align_rank: rank {list(rank)} and max_rank {list(max_rank)} differ in length")
            maxes = list(max_rank)
        else:
            maxes = [max_rank] * len(rank)
        return tuple(_align_one(int(r), multiple, m, mode) for r, m in zip(rank, maxes))
    if isinstance(max_rank, (tuple, list)):
        raise RankError(f"align_rank: an integer rank {rank!r} needs an integer max_rank, got {list(max_rank)}")
    return _align_one(rank, multiple, max_rank, mode)


class BaseMethod:
    """Base class of every decomposition method.

    Subclasses set the class attributes and implement :meth:`_applies`,
    :meth:`max_rank`, :meth:`_cost`, :meth:`_factorize` and :meth:`_build`.
    """

    #: normalised lowercase name used in plans and on the command line
    name: ClassVar[str] = ""
    #: layer kinds it claims, among "linear", "conv1d", "conv2d"
    layer_kinds: ClassVar[tuple[str, ...]] = ()
    #: one factorization serves every rank (truncation is a slice)
    nested: ClassVar[bool] = True
    #: at max_rank() the replacement reproduces the layer up to float error
    exact_at_max_rank: ClassVar[bool] = True
    #: uses calibration statistics (input Gram matrices) when given
    data_aware: ClassVar[bool] = False
    #: the structure it produces, in words
    structure: ClassVar[str] = ""
    #: the paper(s), short form for tables; the docstring has the full References block
    reference: ClassVar[str] = ""
    #: bumped when factorize() changes, so that stale disk-cache entries are not reused
    cache_version: ClassVar[int] = 1
    #: the rank's form, short (for tables); every method also takes a fraction ρ in (0, 1]
    rank_format: ClassVar[str] = "r"
    #: options a plan entry may give this method, with their help text
    options_help: ClassVar[dict[str, str]] = {}
    #: other names the registry accepts for this method (normalised like the name)
    aliases: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ applicability
    def applies(self, module: nn.Module) -> Optional[str]:
        """None if this method can decompose ``module``, else the reason it cannot."""
        kind = layer_kind(module)
        if kind is None:
            return f"{type(module).__name__} is not a layer type autorank decomposes"
        try:
            spec = layer_spec(module)
        except ValueError as exc:
            return str(exc)
        return self.applies_spec(spec)

    def applies_spec(self, spec: LayerSpec) -> Optional[str]:
        """Like :meth:`applies`, from the layer's description alone."""
        if spec.kind not in self.layer_kinds:
            return f"{self.name} does not apply to {_KIND_NAMES[spec.kind]} (only {', '.join(_KIND_NAMES[k] for k in self.layer_kinds)})"
        return self._applies(spec)

    def _applies(self, spec: LayerSpec) -> Optional[str]:
        return None

    def check_applies(self, module: nn.Module, name: str = "") -> LayerSpec:
        reason = self.applies(module)
        if reason is not None:
            where = f"layer {name!r}: " if name else ""
            raise NotApplicableError(f"{where}method {self.name!r} does not apply: {reason}")
        return layer_spec(module)

    # ------------------------------------------------------------------ ranks
    def max_rank(self, spec: LayerSpec) -> Rank:
        """The largest valid rank (exact reconstruction where ``exact_at_max_rank``)."""
        raise NotImplementedError

    def rank_arity(self) -> int:
        """How many integers make one rank (1 for int ranks)."""
        return 1

    def normalize_rank(self, spec: LayerSpec, rank: Any, name: str = "") -> Rank:
        """Validate an explicit integer (or tuple) rank; raise RankError naming the culprit."""
        where = f"layer {name!r}, " if name else ""
        arity = self.rank_arity()
        mx = self.max_rank(spec)
        if isinstance(rank, bool):
            raise RankError(f"{where}method {self.name!r}: rank must be a number, got {rank!r}")
        if arity == 1:
            if isinstance(rank, (list, tuple)):
                if len(rank) != 1:
                    raise RankError(f"{where}method {self.name!r} takes one integer rank, got {list(rank)}")
                rank = rank[0]
            if not isinstance(rank, int) or isinstance(rank, bool):
                raise RankError(f"{where}method {self.name!r}: rank must be an integer or a fraction in (0, 1], got {rank!r}")
            if rank < 1 or rank > mx:
                raise RankError(f"{where}method {self.name!r}: rank {rank} is out of range 1..{mx}")
            return int(rank)
        if isinstance(rank, int):
            rank = (rank,) * arity
        if not isinstance(rank, (list, tuple)) or len(rank) != arity or not all(
            isinstance(r, int) and not isinstance(r, bool) for r in rank
        ):
            raise RankError(
                f"{where}method {self.name!r}: rank must be {arity} integers, one integer or a fraction in (0, 1], got {rank!r}"
            )
        for r, m in zip(rank, mx):
            if r < 1 or r > m:
                raise RankError(f"{where}method {self.name!r}: rank {list(rank)} is out of range (1..{list(mx)})")
        return tuple(int(r) for r in rank)

    def resolve_rank(
        self,
        module_or_spec,
        rank: Any,
        input_shape: Optional[Sequence[int]] = None,
        name: str = "",
    ) -> Rank:
        """The method's own rank from an explicit rank, or from a float ρ in (0, 1]."""
        spec = module_or_spec if isinstance(module_or_spec, LayerSpec) else layer_spec(module_or_spec)
        if isinstance(rank, float):
            if not (0.0 < rank <= 1.0) or math.isnan(rank):
                where = f"layer {name!r}, " if name else ""
                raise RankError(
                    f"{where}method {self.name!r}: a fractional rank must be in (0, 1] (kept fraction of FLOPs), got {rank}"
                )
            return self.rank_for(spec, rank, input_shape)
        return self.normalize_rank(spec, rank, name)

    def rank_for(self, module_or_spec, rho: float, input_shape: Optional[Sequence[int]] = None) -> Rank:
        """The largest rank whose replacement keeps at most ``rho`` of the layer's FLOPs.

        Never below the smallest rank (1, or (1, 1)), so a tiny ρ gives the
        smallest replacement rather than an error.
        """
        spec = module_or_spec if isinstance(module_or_spec, LayerSpec) else layer_spec(module_or_spec)
        shape = tuple(input_shape) if input_shape is not None else nominal_input_shape(spec)
        target = rho * dense_cost(spec, shape).flops
        mx = self.max_rank(spec)
        n = mx if isinstance(mx, int) else max(mx)

        def rank_at(i: int) -> Rank:  # the i-th step of rank_path(), without building the path
            return i if isinstance(mx, int) else tuple(max(1, round(m * i / n)) for m in mx)

        def flops(i: int) -> int:
            return self._cost(spec, rank_at(i), shape).flops

        if flops(1) > target:
            return rank_at(1)
        if isinstance(mx, int) and n > 2:
            # a single rank's FLOPs are affine in it for every method here: try the exact solution first
            f1, f2 = flops(1), flops(2)
            if f2 > f1:
                guess = min(n, max(1, 1 + int((target - f1) // (f2 - f1))))
                if flops(guess) <= target and (guess == n or flops(guess + 1) > target):
                    return guess
        lo, hi = 1, n  # FLOPs grow along the path: the last step within the target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if flops(mid) <= target:
                lo = mid
            else:
                hi = mid - 1
        return rank_at(lo)

    def rank_path(self, spec: LayerSpec) -> list[Rank]:
        """Ranks from smallest to largest along which ρ is mapped (cost grows along it)."""
        mx = self.max_rank(spec)
        if isinstance(mx, int):
            return list(range(1, mx + 1))
        # tuples: grow every component in proportion to its maximum
        steps = max(mx)
        path: list[Rank] = []
        for i in range(1, steps + 1):
            r = tuple(max(1, round(m * i / steps)) for m in mx)
            if not path or r != path[-1]:
                path.append(r)
        return path

    # ------------------------------------------------------------------ refusals (search space, profile)
    def rank_refusal(
        self,
        spec: LayerSpec,
        rank: Rank,
        input_shape: Optional[Sequence[int]] = None,
        options: Optional[dict] = None,
    ) -> Optional[str]:
        """None when factorizing ``spec`` at ``rank`` is affordable, else the reason (estimated time or memory).

        From the shapes alone, without the weights. Monotone along
        :meth:`rank_path`: every rank above a refused one is refused too. The
        search space leaves refused (layer, ρ) choices out
        (:meth:`autorank.search.space.SearchSpace.choices`) and the profile
        reports them; :meth:`factorize` raises RankTooLargeError for them.
        """
        return None

    # ------------------------------------------------------------------ cost
    def cost(self, module_or_spec, rank: Rank, input_shape: Optional[Sequence[int]] = None) -> Cost:
        """Exact parameters and FLOPs of the replacement at ``rank`` on ``input_shape``."""
        spec = module_or_spec if isinstance(module_or_spec, LayerSpec) else layer_spec(module_or_spec)
        shape = tuple(input_shape) if input_shape is not None else nominal_input_shape(spec)
        return self._cost(spec, rank, shape)

    def _cost(self, spec: LayerSpec, rank: Rank, input_shape: tuple[int, ...]) -> Cost:
        raise NotImplementedError

    # ------------------------------------------------------------------ factorize / build
    def factorize(
        self,
        module: nn.Module,
        stats: Optional[LayerStats] = None,
        rank: Optional[Rank] = None,
        options: Optional[dict] = None,
    ) -> Factors:
        """Factorize the layer's weight. ``rank`` is used only by non-nested methods."""
        spec = self.check_applies(module)
        options = self.check_options(options)
        if not self.nested and rank is None:
            raise ValueError(f"method {self.name!r} is not nested: factorize() needs a rank")
        return self._factorize(module, spec, stats, rank, options)

    def _factorize(self, module, spec: LayerSpec, stats, rank, options: dict) -> Factors:
        raise NotImplementedError

    def build(self, module: nn.Module, factors: Optional[Factors], rank: Rank, options: Optional[dict] = None) -> Decomposed:
        """The replacement of ``module`` at ``rank``; a meta-device skeleton when ``factors`` is None."""
        spec = layer_spec(module)
        w = module.weight
        layers = self._build(spec, factors, rank, dict(options or {}), bias_tensor(module), w.device, w.dtype)
        return Decomposed(
            *layers, method=self.name, rank=rank, replaced=type(module).__name__, spec=spec, options=options
        )

    def _build(self, spec, factors, rank, options, bias, device, dtype) -> list[nn.Module]:
        raise NotImplementedError

    def check_options(self, options: Optional[dict], name: str = "") -> dict:
        """Validate a plan entry's options; PlanError names the option and the layer."""
        options = dict(options or {})
        where = f"layer {name!r}, " if name else ""
        known = {**COMMON_OPTIONS, **self.options_help}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise PlanError(f"{where}method {self.name!r}: unknown option(s) {unknown}; known options: {', '.join(sorted(known))}")
        align = options.get("align")
        if align is not None and (isinstance(align, bool) or not isinstance(align, int) or align < 1):
            raise PlanError(f"{where}method {self.name!r}: option align must be a positive integer (e.g. 8), got {align!r}")
        bits = options.get("fixed_point")
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8):
            raise PlanError(f"{where}method {self.name!r}: option fixed_point must be a number of bits in 2..8, got {bits!r}")
        if not isinstance(options.get("refit", True), bool):
            raise PlanError(f"{where}method {self.name!r}: option refit must be true or false, got {options['refit']!r}")
        folded = options.get("bias_after_fold")
        if folded is not None and (not isinstance(folded, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in folded)):
            raise PlanError(f"{where}method {self.name!r}: option bias_after_fold must be a list of factor indices, got {folded!r}")
        try:
            self._check_options(options)
        except (TypeError, ValueError) as exc:
            msg = str(exc)
            prefix = f"method {self.name!r}: "
            raise PlanError(f"{where}{prefix}{msg[len(prefix):] if msg.startswith(prefix) else msg}") from None
        return options

    def _check_options(self, options: dict) -> None:
        """Raise ValueError for an option value this method cannot use."""

    def options_key(self, options: Optional[dict]) -> dict:
        """The options that change what factorize() returns (part of the cache key)."""
        return {}

    def is_nested(self, options: Optional[dict]) -> bool:
        """Whether one factorization serves every rank for these options (the factor cache keys on it).

        Default: :attr:`nested`. A method whose options switch to a per-rank
        fit (Tucker-2's HOOI, for instance) overrides it.
        """
        return self.nested

    def truncation_view(self, rank: Rank) -> Optional[tuple[str, Any]]:
        """The low-rank set this method truncates a layer's weight onto at ``rank``, or None.

        Used by force regularization (:func:`autorank.training.force_targets`) to
        pull a weight toward exactly what the decomposition will keep: ``("filters",
        r)`` (rank r of the per-group filter matrix, channel SVD), ``("spatial", r)``
        (the (C·kh)×(N·kw) matrix of spatial SVD) or ``("tucker2", (r_in, r_out))``
        (the two channel unfoldings). None (the default): the structure is not such
        a truncation, and the weight is pulled toward the SVD rank of equal FLOPs.
        """
        return None

    # ------------------------------------------------------------------ re-fitting (autorank.training.refit)
    def refit_target(self, replacement: nn.Module) -> Union["RefitTarget", str]:
        """Which factor of a built ``replacement`` :func:`autorank.training.refit.refit` may re-solve, or why none.

        A replacement's output is linear in its last factor's weight and bias once
        the factors before it are fixed, so least squares on that factor's inputs
        gives the best last factor in closed form. Methods whose last factor is a
        plain ``Linear`` / ``Conv2d`` say so with :func:`last_factor_target`; the
        default is a reason: nothing is re-fitted.
        """
        return f"method {self.name!r} declares no factor that least squares can re-fit"

    def set_low_rank(self, replacement: nn.Module, left: torch.Tensor, right: torch.Tensor) -> None:
        """Write a rank-r product ``left @ right`` per group into the factors (only for ``RefitTarget.low_rank``)."""
        raise NotImplementedError(f"method {self.name!r} has no joint low-rank re-fit")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layers": [_KIND_NAMES[k] for k in self.layer_kinds],
            "structure": self.structure,
            "rank": self.rank_help(),
            "rank_format": self.rank_format,
            "options": {**COMMON_OPTIONS, **self.options_help},
            "nested": self.nested,
            "data_aware": self.data_aware,
            "reference": self.reference,
        }

    def rank_help(self) -> str:
        return "int r, or fraction ρ of FLOPs in (0, 1]"

    def __repr__(self) -> str:
        return f"<method {self.name}>"


@dataclass(frozen=True)
class RefitTarget:
    """What :func:`autorank.training.refit.refit` re-solves in one replacement.

    ``factor``: the index of the factor (a plain ``Linear`` or ``Conv2d``) whose
    weight and bias least squares re-fits on its own inputs. ``low_rank``: instead,
    the whole replacement is one rank-r map (factor 0 carries the layer's geometry,
    factor ``factor`` mixes r channels per group): it is re-solved jointly as the
    best rank-r map on the replacement's inputs and written back with
    :meth:`BaseMethod.set_low_rank` (svd).
    """

    factor: int
    low_rank: bool = False


def last_factor_target(replacement: nn.Module, low_rank: bool = False) -> Union[RefitTarget, str]:
    """``RefitTarget(last factor)`` when the last factor is a plain Linear or Conv2d, else the reason it is not."""
    children = list(replacement.children()) if isinstance(replacement, nn.Sequential) else []
    if not children:
        return "the replacement has no factors"
    last = children[-1]
    if type(last) not in (nn.Linear, nn.Conv2d):
        return f"its last factor is a {type(last).__name__} (fixed-point or training-time layer), not a plain Linear/Conv2d"
    if getattr(last, "parametrizations", None) is not None:
        return "its last factor's weight is parametrized (fake-quantised while training)"
    if low_rank and (len(children) != 2 or any(type(c) not in (nn.Linear, nn.Conv2d) or getattr(c, "parametrizations", None)
                                               is not None for c in children)):
        return RefitTarget(len(children) - 1, False)
    return RefitTarget(len(children) - 1, low_rank)


def dense_kernel_reason(spec: LayerSpec, method: str, what: str) -> Optional[str]:
    """Why a method that needs a dense k×k kernel (k > 1) refuses ``spec``, or None."""
    if spec.groups > 1:
        kind = "depthwise" if spec.depthwise else "grouped"
        return f"{kind} convolution (groups={spec.groups}): {method} {what}, which a grouped kernel does not have"
    if spec.kernel_size == (1, 1):
        return "1x1 kernel: use svd"
    return None


def bias_tensor(module: nn.Module) -> Optional[torch.Tensor]:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach()


_KIND_NAMES = {"linear": "Linear", "conv1d": "Conv1D (GPT-2)", "conv2d": "Conv2d"}


# ---------------------------------------------------------------------- shared cost helpers
def conv_out_hw(spec: LayerSpec, input_shape: Sequence[int]) -> tuple[int, int, int, int, int]:
    """(batch, in_h, in_w, out_h, out_w) of a conv2d layer on ``input_shape``."""
    b, _, h, w = input_shape
    kh, kw = spec.kernel_size
    oh = conv_out_size(h, kh, spec.stride[0], spec.padding[0], spec.dilation[0])
    ow = conv_out_size(w, kw, spec.stride[1], spec.padding[1], spec.dilation[1])
    return b, h, w, oh, ow


__all__ += ["conv_out_hw", "bias_tensor", "dense_kernel_reason", "conv_flops", "linear_flops", "rows_of", "Cost", "LayerSpec"]


#: memory a factorization may use before it is refused (override per call or by environment variable)
DEFAULT_MEMORY_LIMIT = 4 * 1024**3


def memory_limit(options: Optional[dict], method: str, env: str) -> float:
    """options['memory_limit_bytes'], else the environment variable ``env``, else 4 GiB (bytes)."""
    value = (options or {}).get("memory_limit_bytes")
    source = "options['memory_limit_bytes']"
    if value is None:
        value = os.environ.get(env)
        source = env
    if value is None or value == "":
        return float(DEFAULT_MEMORY_LIMIT)
    try:
        limit = float(value)
    except (TypeError, ValueError):
        limit = float("nan")
    if isinstance(value, bool) or not (limit > 0):
        raise ValueError(f"method {method!r}: {source} must be a positive number of bytes, got {value!r}")
    return limit
