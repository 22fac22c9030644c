"""Closed-form re-fitting of a decomposed model, layer by layer, on its own inputs.

After a plan is decomposed, every replacement was fitted to the *original*
model's inputs (data-aware methods) or to the weights alone. Once the layers
before it are compressed, a layer sees different inputs. :func:`refit` walks the
decomposed layers in the order the forward pass calls them and, for each one,
re-solves by least squares the factor its output is linear in, so that the
replacement's output on the inputs that now reach it (through the compressed
layers before it, already re-fitted) is as close as possible to the original
layer's output on the original model's inputs:

    min over (W, b) of  Σ_rows ‖ t − (W z + b) ‖²

with ``t`` the original layer's output and ``z`` the rows the re-fitted factor
multiplies (its inputs, unfolded into patches for a convolution, per group). Only
the normal equations are accumulated, in float64: the Gram matrix of ``[z; 1]``
(d+1 square, d = the factor's input row length) and the cross term ``t [z; 1]ᵀ``
(out × d+1), one pass over the calibration batches per layer (layers that read
the same input tensor, e.g. the query, key and value projections of an attention
block, share one pass; the original's layer outputs are computed once and kept).
The solve adds a ridge that pulls toward the current weights (``ridge`` times the
mean diagonal of the Gram matrix; directions of the input space the calibration
rows barely cover keep their current weights instead of being fitted to noise),
and the new factor is kept only when its error on the calibration rows is lower
than the old one's, so that re-fitting never makes a layer's output error worse on
the calibration batches.

What is re-solved, per method (each method says it with ``refit_target``):

- ``svd``: both factors jointly, as the best rank-r map on the replacement's
  inputs (the truncated SVD of the least-squares solution in the metric of the
  inputs' Gram matrix; Zhang et al.'s asymmetric reconstruction without the
  non-linearity);
- ``spatial-svd``: the 1×k_w convolution; ``tucker2``, ``btd``, ``cp``: the last
  1×1 convolution; ``dcf``: the 1×1 coefficients on the fixed basis;
- ``tt``, ``tr``: not re-fitted (every core is contracted inside one module);
  reported as skipped with the reason.

References
----------
- X. Zhang, J. Zou, K. He, J. Sun. Accelerating Very Deep Convolutional Networks
  for Classification and Detection. TPAMI 2016 (asymmetric reconstruction: the
  approximated layer fitted on the inputs of the already-approximated layers).
- Y. He, X. Zhang, J. Sun. Channel Pruning for Accelerating Very Deep Neural
  Networks. ICCV 2017 (least-squares reconstruction of a layer's outputs).
- X. Wang, Y. Zheng, Z. Wan, M. Zhang. SVD-LLM: Truncation-aware Singular Value
  Decomposition for Large Language Model Compression. arXiv 2403.07378, 2024
  (whitened truncation, then a parameter update of the compressed weights).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from autorank import methods as registry
from autorank.batches import to_device
from autorank.calibration import _rows, as_batches, run_batch
from autorank.errors import CalibrationError, UnknownLayerError
from autorank.methods._base import RefitTarget
from autorank.methods._layers import Decomposed, layer_spec
from autorank.surgery import has_submodule

logger = logging.getLogger("autorank")

__all__ = ["refit", "RefitReport", "LayerRefit", "DEFAULT_RIDGE", "decomposed_layers"]

#: the pull toward the current weights, relative to the Gram matrix's mean diagonal (chosen on MiniLM at
#: 50% FLOPs: 0.03-0.1 best, 1e-4 overfits the calibration rows: 0.865 held-out against 0.884 at 0.1)
DEFAULT_RIDGE = 0.1
#: a new factor replaces the old one only if it lowers the error by more than this fraction
_MIN_GAIN = 1e-6
#: the smallest relative ridge used (asked 0 included): it bounds the solution's norm, so that weights
#: solved in float64 and run in float32 do what the statistics say (an ill-conditioned Gram matrix,
#: e.g. the inputs of a rank-1 layer, otherwise gives huge weights whose float32 rounding dominates)
RIDGE_FLOOR = 1e-8
#: bytes of the original's layer outputs kept across the passes (beyond: recomputed per pass)
DEFAULT_CACHE_BYTES = 1 << 30


@dataclass
class LayerRefit:
    """What re-fitting did to one decomposed layer.

    ``status``: ``"refit"`` (the new factor lowered the error and was kept),
    ``"kept"`` (it did not; the old factor stays), ``"skipped"`` (nothing was
    solved; ``reason`` says why). ``error_before`` / ``error_after``: the layer's
    relative output error ``Σ‖t − y‖² / Σ‖t‖²`` on the calibration rows, with the
    old and the kept factor, on the inputs that reach it at that point of the walk.
    """

    name: str
    method: str
    status: str
    what: str = ""
    reason: Optional[str] = None
    error_before: Optional[float] = None
    error_after: Optional[float] = None
    rows: int = 0


@dataclass
class RefitReport:
    """Per-layer results of :func:`refit` (in forward order), its time and number of passes."""

    layers: list[LayerRefit] = field(default_factory=list)
    seconds: float = 0.0
    passes: int = 0

    @property
    def refitted(self) -> list[str]:
        return [lr.name for lr in self.layers if lr.status == "refit"]

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "passes": self.passes, "refitted": len(self.refitted),
                "layers": [asdict(lr) for lr in self.layers]}


class _Stop(Exception):
    """Raised from a hook to end a forward pass once every layer of interest has run."""


def decomposed_layers(model: nn.Module) -> dict[str, Decomposed]:
    """The Decomposed replacements of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Decomposed)}


def _run(model: nn.Module, batch: Any) -> None:
    try:
        run_batch(model, batch)
    except _Stop:
        pass


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _acc_device(device: torch.device) -> torch.device:
    """Where float64 statistics are accumulated (MPS has no float64)."""
    return torch.device("cpu") if device.type == "mps" else device


# ---------------------------------------------------------------------- one layer's statistics
class _Stats:
    """Normal equations of one layer: Σ z̃ z̃ᵀ, Σ t z̃ᵀ and Σ ‖t‖² per group, z̃ = [z; 1] (bias) or z."""

    def __init__(self, groups: int, bias: bool):
        self.groups = groups
        self.bias = bias
        self.gram: Optional[torch.Tensor] = None
        self.cross: Optional[torch.Tensor] = None
        self.tt: Optional[torch.Tensor] = None
        self.rows = 0

    def add(self, z: torch.Tensor, t: torch.Tensor) -> None:
        """``z`` (groups, rows, d) and ``t`` (groups, rows, out/groups), float64."""
        if self.bias:
            z = torch.cat([z, torch.ones_like(z[..., :1])], dim=-1)
        g = z.transpose(1, 2) @ z
        c = t.transpose(1, 2) @ z
        tt = t.square().sum(dim=(1, 2))
        if self.gram is None:
            self.gram, self.cross, self.tt = g, c, tt
        else:
            self.gram += g
            self.cross += c
            self.tt += tt
        self.rows += int(z.shape[1])

    def sse(self, w: torch.Tensor) -> torch.Tensor:
        """Σ‖t − w̃ z̃‖² for w̃ (groups, out/groups, d[+1]), from the statistics alone."""
        fit = (w * self.cross).sum(dim=(1, 2))
        quad = ((w @ self.gram) * w).sum(dim=(1, 2))
        return (self.tt - 2 * fit + quad).sum()


def _target_rows(t: torch.Tensor, groups: int) -> torch.Tensor:
    """A layer output as (groups, rows, out/groups) rows, in the row order of ``calibration._rows``."""
    t = t.detach()
    if t.dim() == 4:  # conv (B, N, oh, ow) -> (B·oh·ow, N)
        n = t.shape[1]
        t = t.permute(0, 2, 3, 1).reshape(-1, n)
    else:
        t = t.reshape(-1, t.shape[-1])
    n = t.shape[1]
    return t.to(torch.float64).reshape(-1, groups, n // groups).permute(1, 0, 2)


def _weight_rows(layer: nn.Module, groups: int) -> torch.Tensor:
    """The factor's weight as (groups, out/groups, d), d in the order of ``calibration._rows``."""
    w = layer.weight.detach().to(torch.float64)
    return w.reshape(groups, w.shape[0] // groups, -1)


def _augmented(layer: nn.Module, groups: int, bias: bool) -> torch.Tensor:
    w = _weight_rows(layer, groups)
    if not bias:
        return w
    b = layer.bias.detach().to(torch.float64).reshape(groups, -1, 1)
    return torch.cat([w, b], dim=-1)


def _ridge(gram: torch.Tensor, cross: torch.Tensor, old: torch.Tensor, ridge: float, bias: bool
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The normal equations of ``‖t − w̃ z̃‖² + λ‖w − w_old‖²``: (G + λI, C + λ w_old), per group.

    λ is ``ridge`` (at least :data:`RIDGE_FLOOR`) times the Gram matrix's mean
    diagonal; the bias is not penalised. Pulling toward the current weights rather than toward zero keeps
    them in the directions of the input space the calibration rows do not cover.
    """
    d = gram.shape[-1] - (1 if bias else 0)
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)[..., :d]
    lam = max(float(ridge), RIDGE_FLOOR) * diag.mean(dim=-1).clamp(min=1e-30)
    idx = torch.arange(d, device=gram.device)
    a = gram.clone()
    a[:, idx, idx] += lam[:, None]
    c = cross.clone()
    c[..., :d] += lam[:, None, None] * old[..., :d]
    return a, c


def _solve_last(stats: _Stats, ridge: float, old: torch.Tensor) -> torch.Tensor:
    """Least squares w̃ = (C + λ w_old)(G + λI)⁻¹, per group (Cholesky, else a pseudo-inverse)."""
    a, c = _ridge(stats.gram, stats.cross, old, ridge, stats.bias)
    try:
        chol = torch.linalg.cholesky(a)
        return torch.cholesky_solve(c.transpose(1, 2), chol).transpose(1, 2)
    except RuntimeError:  # singular even with the ridge (e.g. all-zero inputs)
        return c @ torch.linalg.pinv(a, hermitian=True)


def _solve_low_rank(stats: _Stats, ridge: float, rank: int, old: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The best rank-``rank`` map on the inputs: (left (g, out, r), right (g, r, d), bias (g, out) or None).

    With the bias, the statistics are centred (the bias absorbs the means). With
    G = L Lᵀ (ridged, centred Gram) and C the centred cross term (plus λ times the
    current map ``old`` (g, out, d), see :func:`_ridge`), the error is
    ‖(W − C G⁻¹) L‖² + const, minimised over rank r by the truncated SVD of
    C L⁻ᵀ: W = [C L⁻ᵀ]_r L⁻¹.
    """
    gram, cross = stats.gram, stats.cross
    if stats.bias:
        n = gram[:, -1, -1].clamp(min=1.0)
        mz = gram[:, :-1, -1] / n[:, None]  # (g, d)
        mt = cross[:, :, -1] / n[:, None]  # (g, out)
        gram = gram[:, :-1, :-1] - n[:, None, None] * mz[:, :, None] * mz[:, None, :]
        cross = cross[:, :, :-1] - n[:, None, None] * mt[:, :, None] * mz[:, None, :]
    gram = 0.5 * (gram + gram.transpose(1, 2))
    a, cross = _ridge(gram, cross, old, ridge, False)
    lefts, rights = [], []
    for gi in range(a.shape[0]):
        try:
            chol = torch.linalg.cholesky(a[gi])
        except RuntimeError:
            vals, vecs = torch.linalg.eigh(a[gi])
            chol = vecs * vals.clamp(min=float(vals.max()) * 1e-12 + 1e-300).sqrt()
            q, rr = torch.linalg.qr(chol.T)  # chol = Rᵀ Qᵀ: a lower factor L = Rᵀ with the same L Lᵀ
            chol = rr.T
        m = torch.linalg.solve_triangular(chol, cross[gi].T, upper=False).T  # C L⁻ᵀ
        u, s, vh = _top_svd(m, rank)
        r = s.shape[0]
        sq = s.sqrt()
        left = u * sq
        right_w = sq[:, None] * vh  # (r, d) in the whitened space
        right = torch.linalg.solve_triangular(chol.T, right_w.T, upper=True).T  # right_w L⁻¹
        if r < rank:  # inputs of lower rank than r: pad with zero directions
            left = torch.cat([left, left.new_zeros(left.shape[0], rank - r)], dim=1)
            right = torch.cat([right, right.new_zeros(rank - r, right.shape[1])], dim=0)
        lefts.append(left)
        rights.append(right)
    left, right = torch.stack(lefts), torch.stack(rights)
    bias = None
    if stats.bias:
        bias = mt - ((left @ right) @ mz[:, :, None]).squeeze(-1)
    return left, right, bias


def _top_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``rank`` singular triples of ``m`` (float64), from the eigen-decomposition of its smaller Gram.

    Several times faster than a full SVD for the rectangular matrices here; the
    leading triples lose nothing in float64 (singular values below ~1e-7 of the
    largest, the only ones squaring hurts, are dropped as zero).
    """
    tall = m.shape[0] >= m.shape[1]
    gram = m.T @ m if tall else m @ m.T
    vals, vecs = torch.linalg.eigh(0.5 * (gram + gram.T))
    vals, vecs = vals.flip(0), vecs.flip(1)
    keep = vals > vals[0].clamp(min=0) * 1e-14
    r = max(1, min(rank, int(keep.sum())))
    s = vals[:r].clamp(min=0).sqrt()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    if tall:  # gram = V S² Vᵀ: U = M V S⁻¹
        v = vecs[:, :r]
        return (m @ v) * inv, s, v.T
    u = vecs[:, :r]
    return u, s, inv[:, None] * (u.T @ m)


# ---------------------------------------------------------------------- the walk
@dataclass
class _Member:
    name: str
    dec: Decomposed
    original: nn.Module
    method: Any
    target: RefitTarget
    stats: _Stats
    layer: nn.Module  # the module whose input rows are collected
    groups: int
    bias: bool
    cached: Optional[list] = None  # the original's outputs, per batch a list by call (None: recomputed per pass)
    pending: list = field(default_factory=list)  # the original's outputs of the current batch, by call


def _plan_member(name: str, dec: Decomposed, original: nn.Module, low_rank: bool) -> tuple[Optional[_Member], LayerRefit]:
    try:
        method = registry.get(dec.method)
    except Exception as exc:  # an unregistered method: nothing to ask
        return None, LayerRefit(name, str(dec.method), "skipped", reason=str(exc))
    try:
        orig = original.get_submodule(name)
    except AttributeError:
        return None, LayerRefit(name, method.name, "skipped", reason="the original model has no module by that name")
    if (getattr(dec, "options", None) or {}).get("refit") is False:
        return None, LayerRefit(name, method.name, "skipped", reason="the plan says refit: false for this layer")
    target = method.refit_target(dec)
    if isinstance(target, str):
        return None, LayerRefit(name, method.name, "skipped", reason=target)
    if target.low_rank and not low_rank:
        target = RefitTarget(target.factor)
    factors = list(dec.children())
    last = factors[target.factor]
    bias = last.bias is not None
    if target.low_rank:
        layer = factors[0]
        what = "all factors (joint rank-r least squares)"
    else:
        layer = last
        what = f"factor {target.factor} ({type(last).__name__}) by least squares"
    groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
    member = _Member(name, dec, orig, method, target, _Stats(groups, bias), layer, groups, bias)
    return member, LayerRefit(name, method.name, "skipped", what=what)


def _forward_order(model: nn.Module, batch: Any, names: list[str]) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """Call order of the named modules on one batch, calls per module, and an id of each one's first input."""
    order: list[str] = []
    calls: dict[str, int] = {}
    input_key: dict[str, int] = {}
    keep: list[Any] = []  # inputs kept alive during the pass, so that ids are not reused
    handles = []
    modules = dict(model.named_modules())
    for name in names:
        def hook(_m, args, name=name):
            if name not in calls:
                order.append(name)
                x = args[0] if args else None
                keep.append(x)
                input_key[name] = id(x)
            calls[name] = calls.get(name, 0) + 1
        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order, calls, input_key


def refit(
    original: nn.Module,
    compressed: nn.Module,
    calibration_inputs: Any,
    *,
    layers: Optional[Iterable[str]] = None,
    ridge: float = DEFAULT_RIDGE,
    low_rank: bool = True,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> RefitReport:
    """Re-fit the decomposed layers of ``compressed`` in place, in forward order; a :class:`RefitReport`.

    ``original``: the model ``compressed`` was decomposed from (left untouched).
    ``calibration_inputs``: model inputs (a tensor, a list of batches, a
    DataLoader of ``(x, y)``; see :func:`autorank.calibration.as_batches`), moved
    to each model's device. ``layers``: qualified names of the decomposed layers
    to re-fit (default: all). ``ridge``: strength of the pull toward the current
    weights, relative to the Gram matrix's mean diagonal. ``low_rank``: re-solve
    svd's two factors jointly (``False``: only its last factor, like the other
    methods). ``cache_bytes``: the original's layer outputs are computed in one
    pass and kept up to this many bytes (beyond it, recomputed in each layer's
    pass). Both models are run in eval mode under ``no_grad`` and left in the
    mode they were in.
    """
    t0 = time.perf_counter()
    batches = as_batches(calibration_inputs)
    device = device_of(compressed)
    acc = _acc_device(device)
    original_device = device_of(original)
    decs = decomposed_layers(compressed)
    wanted = list(decs) if layers is None else list(layers)
    for name in wanted:
        if name not in decs:
            kind = "no module" if not has_submodule(compressed, name) else "no decomposed layer"
            raise UnknownLayerError(f"refit: layer {name!r}: the compressed model has {kind} by that name")
    report = RefitReport()
    members: dict[str, _Member] = {}
    entries: dict[str, LayerRefit] = {}
    for name in wanted:
        member, entry = _plan_member(name, decs[name], original, low_rank)
        entries[name] = entry
        if member is not None:
            members[name] = member
    order: list[str] = []
    was = (original.training, compressed.training)
    original.eval()
    compressed.eval()
    try:
        with torch.no_grad():
            if members:
                try:
                    order, calls, input_key = _forward_order(compressed, to_device(batches[0], device), list(members))
                except Exception as exc:
                    raise CalibrationError(f"refit: running the compressed model on the calibration inputs failed: "
                                           f"{type(exc).__name__}: {exc}") from exc
                report.passes += 1
                for name in members:
                    if name not in calls:
                        entries[name].reason = "not called by the forward pass on the calibration inputs"
                _cache_targets([members[n] for n in order], original, batches, original_device, cache_bytes)
                report.passes += 1
                # layers reading the same input tensor do not depend on each other: one pass for all of them
                groups: list[list[str]] = []
                by_key: dict[int, list[str]] = {}
                for name in order:
                    if input_key[name] in by_key:
                        by_key[input_key[name]].append(name)
                    else:
                        by_key[input_key[name]] = [name]
                        groups.append(by_key[input_key[name]])
                for group in groups:
                    _refit_group([members[n] for n in group], entries, original, compressed, batches, device,
                                 original_device, acc, calls, ridge)
                    report.passes += 1
    finally:
        original.train(was[0])
        compressed.train(was[1])
    report.layers = [entries[n] for n in _ordered(wanted, order)]
    report.seconds = time.perf_counter() - t0
    logger.info("refit: %d of %d decomposed layers re-fitted in %.2f s (%d passes)", len(report.refitted), len(wanted),
                report.seconds, report.passes)
    return report


def _ordered(wanted: Sequence[str], order: Sequence[str]) -> list[str]:
    seen = [n for n in order if n in wanted]
    return seen + [n for n in wanted if n not in seen]


def _cache_targets(members: list[_Member], original: nn.Module, batches: list, original_device: torch.device,
                   cache_bytes: int) -> None:
    """One pass of the original: each member's outputs per batch, kept while they fit in ``cache_bytes``."""
    if cache_bytes <= 0 or not members:
        return
    used = 0
    full: set[str] = set()
    for m in members:
        m.cached = [[] for _ in batches]
    handles = []
    current = [0]

    def hook(_mod, _args, out, m: _Member):
        nonlocal used
        if m.name in full:
            return
        t = out.detach()  # cloned below: a later in-place op (ReLU(inplace=True)) must not change it
        size = t.numel() * t.element_size()
        if used + size > cache_bytes:
            full.add(m.name)
            m.cached = None
            return
        used += size
        m.cached[current[0]].append(t.clone())

    for m in members:
        handles.append(m.original.register_forward_hook(lambda mod, a, o, m=m: hook(mod, a, o, m)))
    try:
        for bi, batch in enumerate(batches):
            current[0] = bi
            run_batch(original, to_device(batch, original_device))
            if len(full) == len(members):
                break
    finally:
        for h in handles:
            h.remove()


def _refit_group(group: list[_Member], entries: dict[str, LayerRefit], original: nn.Module, compressed: nn.Module,
                 batches: list, device: torch.device, original_device: torch.device, acc: torch.device,
                 calls: dict[str, int], ridge: float) -> None:
    """One pass over the calibration batches collecting the statistics of ``group``, then the solves.

    Each batch: the original's outputs of the group's layers (cached, or from a
    forward of the original stopped after them), then a forward of the compressed
    model stopped once every layer of the group has run, whose hooks pair each
    layer's input rows with the original's outputs and accumulate the statistics.
    """
    stop_early = all(calls.get(m.name) == 1 for m in group)
    uncached = [m for m in group if m.cached is None]
    for m in group:
        m.stats = _Stats(m.groups, m.bias)
    done = {m.name: 0 for m in group}

    def original_hook(_mod, _args, out, m: _Member):
        m.pending.append(out.detach().clone())
        if stop_early and all(len(other.pending) >= 1 for other in uncached):
            raise _Stop

    def compressed_hook(mod, args, m: _Member):
        if m.pending:
            z = _rows(mod, layer_spec(mod), args[0]).to(acc)
            t = _target_rows(m.pending.pop(0), m.groups).to(acc)
            m.stats.add(z, t)
        done[m.name] += 1
        if stop_early and all(v >= 1 for v in done.values()):
            raise _Stop

    for bi, batch in enumerate(batches):
        for m in group:
            m.pending = list(m.cached[bi]) if m.cached is not None else []
            done[m.name] = 0
        if uncached:
            handles = [m.original.register_forward_hook(lambda mod, a, o, m=m: original_hook(mod, a, o, m)) for m in uncached]
            try:
                _run(original, to_device(batch, original_device))
            finally:
                for h in handles:
                    h.remove()
        handles = [m.layer.register_forward_pre_hook(lambda mod, a, m=m: compressed_hook(mod, a, m)) for m in group]
        try:
            _run(compressed, to_device(batch, device))
        finally:
            for h in handles:
                h.remove()
    for m in group:
        m.pending = []
        _solve_member(m, entries[m.name], ridge)


def _solve_member(m: _Member, entry: LayerRefit, ridge: float) -> None:
    stats = m.stats
    if stats.gram is None or stats.rows == 0:
        entry.reason = entry.reason or "no calibration rows reached the layer"
        return
    entry.rows = stats.rows
    total = float(stats.tt.sum())
    last = m.dec[m.target.factor]
    if m.target.low_rank:
        first = m.dec[0]
        old_left = _weight_rows(last, m.groups)  # (g, out_g, r)
        old_right = _weight_rows(first, m.groups)  # (g, r, d)
        old = (old_left @ old_right).to(stats.gram.device)
        rank = old_left.shape[-1]
        left, right, bias = _solve_low_rank(stats, ridge, rank, old)
        if m.bias:
            old = torch.cat([old, last.bias.detach().to(stats.gram.device, torch.float64).reshape(m.groups, -1, 1)], dim=-1)
        new = left @ right
        if m.bias:
            new = torch.cat([new, bias[:, :, None]], dim=-1)
    else:
        old = _augmented(last, m.groups, m.bias).to(stats.gram.device)
        new = _solve_last(stats, ridge, old)
    before = float(stats.sse(old))
    after = float(stats.sse(new))
    scale = total if total > 0 else 1.0
    entry.error_before = max(before, 0.0) / scale
    if not math.isfinite(after) or after >= before - _MIN_GAIN * max(abs(before), 1e-300):
        entry.status = "kept"
        entry.error_after = entry.error_before
        entry.reason = "the least-squares factor did not lower the error" if math.isfinite(after) else "non-finite solution"
        return
    with torch.no_grad():
        if m.target.low_rank:
            m.method.set_low_rank(m.dec, left.to(last.weight.device), right.to(last.weight.device))
            if m.bias:
                last.bias.copy_(bias.reshape(-1).to(last.bias.device, last.bias.dtype))
        else:
            w = new[..., :-1] if m.bias else new
            last.weight.copy_(w.reshape(last.weight.shape).to(last.weight.device, last.weight.dtype))
            if m.bias:
                last.bias.copy_(new[..., -1].reshape(-1).to(last.bias.device, last.bias.dtype))
    entry.status = "refit"
    entry.error_after = max(after, 0.0) / scale
