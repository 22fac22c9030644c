"""Block term decomposition: a k×k convolution as 1×1 → grouped k×k → 1×1 (Wang & Cheng 2016; Peng et al. 2018)."""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from autorank.errors import RankError, RankTooLargeError
from autorank.methods._base import (
    BaseMethod,
    Factors,
    LayerStats,
    Rank,
    RefitTarget,
    conv_out_hw,
    dense_cost,
    dense_kernel_reason,
    last_factor_target,
    memory_limit,
)
from autorank.methods._layers import Cost, LayerSpec, conv_flops, layer_spec, make_conv, nominal_input_shape, weight_matrix
from autorank.methods.tucker2 import tucker_core

__all__ = ["BTD", "btd_fit", "default_blocks", "DEFAULT_BLOCKS", "DEFAULT_SWEEPS"]

logger = logging.getLogger("autorank")

#: the number of blocks a fraction ρ uses: the largest divisor of gcd(C, N) up to this
DEFAULT_BLOCKS = 4
#: alternating sweeps over the blocks after the greedy fit
DEFAULT_SWEEPS = 2
#: environment variable overriding :data:`DEFAULT_MEMORY_LIMIT` (bytes)
MEMORY_LIMIT_ENV = "AUTORANK_BTD_MEMORY_LIMIT"


# ---------------------------------------------------------------------- the mathematics
def _top_subspace(m: torch.Tensor, r: int) -> torch.Tensor:
    """An orthonormal basis (rows × r) of the leading r left singular vectors of ``m`` (eigh of m mᵀ).

    Signs fixed (largest-magnitude entry of each column positive) for determinism.
    """
    gram = m @ m.T
    _, vecs = torch.linalg.eigh(0.5 * (gram + gram.T))
    u = vecs.flip(1)[:, :r]
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1])])
    signs[signs == 0] = 1.0
    return u * signs


def _fit_block(t: torch.Tensor, r1: int, r2: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated HOSVD (Tucker-2) of ``t`` (N, C, kh, kw) at (r1 input, r2 output): (u_in, core, u_out, reconstruction)."""
    n, c = t.shape[:2]
    u_out = _top_subspace(t.reshape(n, -1), r2)
    u_in = _top_subspace(t.transpose(0, 1).reshape(c, -1), r1)
    core = tucker_core(t, u_out, u_in)  # (r2, r1, kh, kw)
    recon = torch.einsum("bahw,nb,ca->nchw", core, u_out, u_in)
    return u_in, core, u_out, recon


def btd_fit(
    w: torch.Tensor,
    blocks: int,
    r1: int,
    r2: int,
    sweeps: int = DEFAULT_SWEEPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, int]:
    """Block term decomposition of a conv kernel: ``W ≈ Σ_b core_b ×0 U_out,b ×1 U_in,b``.

    Greedy: each block is the truncated HOSVD (Tucker-2) of the residual left by
    the blocks before it. Then ``sweeps`` alternating passes refit each block to
    the residual of all the others, keeping a refit only when it lowers the
    error (so the error never grows). With one block this is Tucker-2's HOSVD.

    Returns ``(u_in (g, C, r1), core (g, r2, r1, kh, kw), u_out (g, N, r2), rel_error, sweeps_run)``, float64.
    """
    w = w.detach().to(device="cpu", dtype=torch.float64)
    norm = float(w.norm())
    residual = w.clone()
    u_ins, cores, u_outs, recons = [], [], [], []
    for _ in range(blocks):
        u_in, core, u_out, recon = _fit_block(residual, r1, r2)
        residual -= recon
        u_ins.append(u_in), cores.append(core), u_outs.append(u_out), recons.append(recon)
    done = 0
    if blocks > 1:
        for done in range(1, sweeps + 1):  # noqa: B007 - the sweep count is reported after the loop
            before = float(residual.norm())
            for b in range(blocks):
                target = residual + recons[b]
                u_in, core, u_out, recon = _fit_block(target, r1, r2)
                new_residual = target - recon
                if float(new_residual.norm()) < float(residual.norm()):
                    residual = new_residual
                    u_ins[b], cores[b], u_outs[b], recons[b] = u_in, core, u_out, recon
            if before - float(residual.norm()) <= 1e-6 * max(before, 1e-300):
                break
    rel = float(residual.norm()) / norm if norm > 0 else 0.0
    return torch.stack(u_ins), torch.stack(cores), torch.stack(u_outs), rel, done


def default_blocks(spec: LayerSpec) -> int:
    """The number of blocks a fraction ρ uses: the largest divisor of gcd(C, N) that is <= DEFAULT_BLOCKS."""
    g = math.gcd(spec.in_channels, spec.out_channels)
    return max(d for d in range(1, DEFAULT_BLOCKS + 1) if g % d == 0)


# ---------------------------------------------------------------------- the method
class BTD(BaseMethod):
    """Block term decomposition (BTD) of a convolution kernel: a sum of g Tucker-2 blocks.

    ``W ≈ Σ_{b=1..g} core_b ×0 U_out,b ×1 U_in,b`` with blocks of multilinear
    rank (r1, r2). A k×k convolution C → N becomes ``1×1 conv C → g·r1`` (at the
    input resolution), ``grouped k×k conv g·r1 → g·r2`` (g groups; the layer's
    stride, padding, padding mode and dilation), ``1×1 conv g·r2 → N`` (with the
    bias). One block is Tucker-2; g = C = N blocks of rank 1 approach a
    depthwise-separable convolution.

    The rank is (g, r1, r2) or (g, r) for r1 = r2 = r, with g·r1 ≤ C and
    g·r2 ≤ N; an int r means (default blocks, r, r). A fraction ρ walks a path of
    growing cost: first the default number of blocks (the largest divisor of
    gcd(C, N) up to 4) with growing r, then fewer, wider blocks down to one
    block of full rank (C, N), which is exact (:meth:`max_rank`).

    Factorization, per rank (not nested): greedy block-wise fitting, each block
    the truncated HOSVD of the residual, then alternating sweeps refitting each
    block to the residual of the others (kept only where the error drops).

    Linear layers are not implemented (a block-diagonal low rank; use svd).
    Grouped, depthwise and 1×1 convolutions are refused.

    Options
    -------
    sweeps : alternating sweeps over the blocks after the greedy fit (default 2).
    memory_limit_bytes : refuse layers whose fit needs more memory (default 4 GiB,
        or ``AUTORANK_BTD_MEMORY_LIMIT``).

    References
    ----------
    - P. Wang, J. Cheng. Accelerating Convolutional Neural Networks for Mobile
      Applications. ACM Multimedia 2016 (block term decomposition of conv layers).
    - B. Peng, W. Tan, Z. Li, S. Zhang, D. Xie, S. Pu. Extreme Network Compression
      via Filter Group Approximation. ECCV 2018, arXiv 1807.11254.
    - L. De Lathauwer. Decompositions of a Higher-Order Tensor in Block Terms — Part II:
      Definitions and Uniqueness. SIAM J. Matrix Anal. Appl. 30(3), 2008.
    """

    name = "btd"
    aliases = ("block-term", "block-term-decomposition")
    layer_kinds = ("conv2d",)
    nested = False
    exact_at_max_rank = True
    data_aware = False
    structure = "Conv 1×1 C→g·r1, grouped k×k g·r1→g·r2 (g groups), 1×1 g·r2→N"
    reference = "Wang & Cheng ACM MM 2016; Peng et al. ECCV 2018"
    rank_format = "[g, r1, r2] | [g, r] | r"
    options_help = {
        "sweeps": f"alternating sweeps over the blocks after the greedy fit (default {DEFAULT_SWEEPS})",
        "memory_limit_bytes": f"refuse layers whose fit needs more memory (default 4 GiB or ${MEMORY_LIMIT_ENV})",
    }

    # ------------------------------------------------------------------ applicability
    def applies_spec(self, spec: LayerSpec) -> Optional[str]:
        if not spec.is_conv:
            return (
                "btd decomposes k×k convolution kernels only; Linear and Conv1D (a block-diagonal low rank) "
                "are not implemented: use svd"
            )
        return dense_kernel_reason(spec, "btd", "splits the channel modes of a dense kernel into blocks")

    # ------------------------------------------------------------------ ranks
    def rank_arity(self) -> int:
        return 3

    def max_rank(self, spec: LayerSpec) -> tuple[int, int, int]:
        return (1, spec.in_channels, spec.out_channels)

    def rank_help(self) -> str:
        return (
            "[g, r1, r2] (g blocks of rank r1 in, r2 out; g·r1 <= in_channels, g·r2 <= out_channels), "
            "[g, r] for r1 = r2 = r, int r for the default blocks, or fraction ρ of FLOPs in (0, 1]"
        )

    def normalize_rank(self, spec: LayerSpec, rank: Any, name: str = "") -> Rank:
        where = f"layer {name!r}, " if name else ""
        c, n = spec.in_channels, spec.out_channels
        if isinstance(rank, bool):
            raise RankError(f"{where}method 'btd': rank must be numbers, got {rank!r}")
        if isinstance(rank, int):
            rank = (default_blocks(spec), rank, rank)
        if isinstance(rank, (list, tuple)) and len(rank) == 2:
            rank = (rank[0], rank[1], rank[1])
        if not isinstance(rank, (list, tuple)) or len(rank) != 3 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in rank
        ):
            raise RankError(
                f"{where}method 'btd': rank must be [g, r1, r2], [g, r], an integer r or a fraction in (0, 1], got {rank!r}"
            )
        g, r1, r2 = (int(v) for v in rank)
        if g < 1 or r1 < 1 or r2 < 1 or g * r1 > c or g * r2 > n:
            raise RankError(
                f"{where}method 'btd': rank {[g, r1, r2]} is out of range for {spec.describe()}: need g, r1, r2 >= 1, "
                f"g·r1 <= {c} and g·r2 <= {n}"
            )
        return (g, r1, r2)

    def rank_path(self, spec: LayerSpec) -> list[Rank]:
        """Default blocks g0 with r growing to (g0, C/g0, N/g0), then fewer blocks down to (1, C, N).

        Along it the widths g·r1, g·r2 and the core size g·r1·r2 never shrink, so
        the cost grows for every input shape.
        """
        c, n = spec.in_channels, spec.out_channels
        g0 = default_blocks(spec)
        path: list[Rank] = []
        for r in range(1, max(c, n) // g0 + 1):
            step = (g0, min(r, c // g0), min(r, n // g0))
            if not path or step != path[-1]:
                path.append(step)
        common = math.gcd(c, n)
        for g in range(g0 - 1, 0, -1):
            if common % g == 0:
                path.append((g, c // g, n // g))
        return path

    def rank_for(self, module_or_spec, rho: float, input_shape: Optional[Sequence[int]] = None) -> Rank:
        """The last rank of :meth:`rank_path` whose replacement keeps at most ``rho`` of the FLOPs."""
        spec = module_or_spec if isinstance(module_or_spec, LayerSpec) else layer_spec(module_or_spec)
        shape = tuple(input_shape) if input_shape is not None else nominal_input_shape(spec)
        target = rho * dense_cost(spec, shape).flops
        path = self.rank_path(spec)
        lo, hi = 0, len(path) - 1
        if self._cost(spec, path[0], shape).flops > target:
            return path[0]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._cost(spec, path[mid], shape).flops <= target:
                lo = mid
            else:
                hi = mid - 1
        return path[lo]

    # ------------------------------------------------------------------ cost
    def _cost(self, spec: LayerSpec, rank: Rank, input_shape: tuple[int, ...]) -> Cost:
        g, r1, r2 = _as_triple(spec, rank)
        b, h, w, oh, ow = conv_out_hw(spec, input_shape)
        kh, kw = spec.kernel_size
        c, n = spec.in_channels, spec.out_channels
        params = c * g * r1 + g * r2 * r1 * kh * kw + n * g * r2 + (n if spec.bias else 0)
        flops = (
            conv_flops(b, g * r1, c, 1, 1, h, w)  # input resolution
            + conv_flops(b, g * r2, r1, kh, kw, oh, ow)
            + conv_flops(b, n, g * r2, 1, 1, oh, ow)
        )
        return Cost(params, flops)

    # ------------------------------------------------------------------ factorize / build
    def is_nested(self, options: Optional[dict]) -> bool:
        """Never: each rank is its own greedy fit."""
        return False

    def _check_options(self, options: dict) -> None:
        _sweeps(options)
        memory_limit(options, "btd", MEMORY_LIMIT_ENV)

    def options_key(self, options: Optional[dict]) -> dict:
        return {"sweeps": _sweeps(options)}

    def _factorize(self, module, spec: LayerSpec, stats: Optional[LayerStats], rank, options: dict) -> Factors:
        g, r1, r2 = self.normalize_rank(spec, rank)
        c, n = spec.in_channels, spec.out_channels
        kh, kw = spec.kernel_size
        numel = n * c * kh * kw
        need = 8 * (6 * numel + n * n + c * c + n * c * kh * kw)
        limit = memory_limit(options, "btd", MEMORY_LIMIT_ENV)
        if need > limit:
            raise RankTooLargeError(
                f"method 'btd': layer {spec.describe()}: the block fit would need about {need / 1e9:.3g} GB, over the "
                f"limit of {limit / 1e9:.3g} GB (options['memory_limit_bytes'] or {MEMORY_LIMIT_ENV})"
            )
        w = weight_matrix(module).to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(w).all():
            raise RankError(f"method 'btd': layer {spec.describe()} has non-finite weights")
        u_in, core, u_out, rel, done = btd_fit(w, g, r1, r2, _sweeps(options))
        logger.debug("btd: %s rank %s, %d sweeps, relative error %.3g", spec.describe(), (g, r1, r2), done, rel)
        return Factors(
            {"u_in": u_in, "core": core, "u_out": u_out},
            {"rank": [g, r1, r2], "rel_error": rel, "sweeps": done},
        )

    def refit_target(self, replacement: nn.Module) -> Union[RefitTarget, str]:
        """The last 1×1 convolution g·r2→N and the bias (the other factors stay; see autorank.training.refit)."""
        return last_factor_target(replacement)

    def _build(self, spec: LayerSpec, factors: Optional[Factors], rank, options, bias, device, dtype) -> list[nn.Module]:
        g, r1, r2 = _as_triple(spec, rank)
        c, n = spec.in_channels, spec.out_channels
        kh, kw = spec.kernel_size
        w1 = w2 = w3 = None
        if factors is not None:
            stored = factors.meta.get("rank")
            if stored is not None and tuple(stored) != (g, r1, r2):
                raise ValueError(f"method 'btd': factors were computed for rank {list(stored)}, not {[g, r1, r2]}")
            t = factors.tensors
            w1 = t["u_in"].transpose(1, 2).reshape(g * r1, c, 1, 1)  # block-major rows
            w2 = t["core"].reshape(g * r2, r1, kh, kw)
            w3 = t["u_out"].permute(1, 0, 2).reshape(n, g * r2, 1, 1)
        kw_ = {"device": device, "dtype": dtype}
        return [
            make_conv(c, g * r1, (1, 1), weight=w1, **kw_),
            make_conv(g * r1, g * r2, (kh, kw), stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
                      groups=g, padding_mode=spec.padding_mode, weight=w2, **kw_),
            make_conv(g * r2, n, (1, 1), weight=w3, bias=bias, has_bias=spec.bias or bias is not None, **kw_),
        ]


def _as_triple(spec: LayerSpec, rank: Rank) -> tuple[int, int, int]:
    """(g, r1, r2) from an int r (default blocks), a pair (g, r) or a triple."""
    if isinstance(rank, int):
        return (default_blocks(spec), int(rank), int(rank))
    if len(rank) == 2:
        return (int(rank[0]), int(rank[1]), int(rank[1]))
    g, r1, r2 = rank
    return (int(g), int(r1), int(r2))


def _sweeps(options: Optional[dict]) -> int:
    v = (options or {}).get("sweeps", DEFAULT_SWEEPS)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"method 'btd': sweeps must be an integer >= 0, got {v!r}")
    return int(v)


