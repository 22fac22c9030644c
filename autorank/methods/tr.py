"""Tensor ring: a Linear (TR-matrix) or a Conv2d as a ring of small cores (Wang et al. CVPR 2018)."""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch
from torch import nn

from autorank.errors import RankError, RankTooLargeError
from autorank.methods._base import Factors, LayerStats, memory_limit
from autorank.methods._layers import LayerSpec
from autorank.methods._linalg import thin_svd
from autorank.methods._tensor_network import (
    MEMORY_LIMIT_ENV,
    NetworkMethod,
    bond_ranks,
    network_modules,
    train_layout,
    tt_svd_full,
    tt_svd_memory_bytes,
    tt_truncate,
    weight_tensor,
)

__all__ = ["TR", "tr_svd", "tr_als", "ring_error", "DEFAULT_SWEEPS", "ALS_MAX_FLOPS"]

logger = logging.getLogger("autorank")

#: ALS sweeps (every core updated once per sweep) after the SVD initialisation
DEFAULT_SWEEPS = 3
#: ALS is skipped (the SVD initialisation is kept) when it would cost more multiply-adds than this
ALS_MAX_FLOPS = 2e10
#: ALS stops when a sweep improves the relative error by less than this
ALS_TOL = 1e-6


# ---------------------------------------------------------------------- the mathematics
def tr_svd(a: torch.Tensor, rr: Sequence[int]) -> list[torch.Tensor]:
    """TR-SVD (Zhao et al. 2016): sequential truncated SVDs, the first one split over the ring bond.

    ``rr`` = (R, r_1, …, r_{d-1}, R). The first unfolding (n_1 × rest) keeps R·r_1
    singular triples, split into the ring bond and the first inner bond; the rest
    is a truncated TT-SVD of the remainder with the ring index moved to the end.
    Ranks above what an unfolding holds are zero-padded. Float64, cores (r_k, n_k, r_{k+1}).
    """
    dims = tuple(a.shape)
    d = len(dims)
    R, r1 = rr[0], rr[1]
    u, s, vh = thin_svd(a.reshape(dims[0], -1))
    k = min(R * r1, s.shape[0])
    left = torch.zeros(dims[0], R * r1, dtype=a.dtype)
    left[:, :k] = u[:, :k]
    rest = torch.zeros(R * r1, vh.shape[1], dtype=a.dtype)
    rest[:k] = s[:k, None] * vh[:k]
    cores = [left.reshape(dims[0], R, r1).permute(1, 0, 2).contiguous()]
    # remainder (R, r_1, n_2 … n_d) -> (r_1, n_2 … n_d, R)
    cur = rest.reshape(R, r1, -1).permute(1, 2, 0).reshape(r1, -1)
    rl = r1
    for j in range(1, d - 1):
        m = cur.reshape(rl * dims[j], -1)
        u, s, vh = thin_svd(m)
        t = rr[j + 1]
        k = min(t, s.shape[0])
        core = torch.zeros(rl * dims[j], t, dtype=a.dtype)
        core[:, :k] = u[:, :k]
        cores.append(core.reshape(rl, dims[j], t))
        nxt = torch.zeros(t, m.shape[1], dtype=a.dtype)
        nxt[:k] = s[:k, None] * vh[:k]
        cur, rl = nxt, t
    cores.append(cur.reshape(rl, dims[-1], R).contiguous())
    return cores


def _tt_in_ring(a: torch.Tensor, rr: Sequence[int]) -> list[torch.Tensor]:
    """The truncated TT-SVD at the inner ranks of ``rr``, embedded in a ring of bond R (zero-padded).

    Only ring index 0 is used, so the ring reproduces the TT exactly: a ring is
    never worse than the train of the same inner ranks, and is exact where it is.
    """
    cores = tt_truncate(tt_svd_full(a), rr[1:-1])
    R = rr[0]
    if R > 1:
        first = torch.zeros(R, *cores[0].shape[1:], dtype=a.dtype)
        first[0] = cores[0][0]
        last = torch.zeros(*cores[-1].shape[:2], R, dtype=a.dtype)
        last[..., 0] = cores[-1][..., 0]
        cores = [first, *cores[1:-1], last]
    return cores


def _unfold_cyclic(a: torch.Tensor, k: int) -> torch.Tensor:
    """Mode-k unfolding with the other modes in ring order k+1, …, d, 1, …, k-1: (n_k, N / n_k)."""
    d = a.dim()
    return a.permute([(k + j) % d for j in range(d)]).reshape(a.shape[k], -1)


def _ring_except(cores: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """The product of every core but k, in ring order from k+1: (r_{k+1}, N / n_k, r_k)."""
    d = len(cores)
    acc = cores[(k + 1) % d]
    for j in range(2, d):
        g = cores[(k + j) % d]
        left, cols, mid = acc.shape
        acc = (acc.reshape(left * cols, mid) @ g.reshape(mid, -1)).reshape(left, cols * g.shape[1], g.shape[2])
    return acc


def _normal_equations(a_k: torch.Tensor, cores: Sequence[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_k Qᵀ, Q Qᵀ) for core k, with A_k ≈ G_k(2) Q, G_k(2) = (n_k × r_k·r_{k+1})."""
    rest = _ring_except(cores, k)  # (r_{k+1}, cols, r_k)
    q = rest.permute(2, 0, 1).reshape(rest.shape[2] * rest.shape[0], -1)  # ((r_k, r_{k+1}), cols)
    return a_k @ q.T, q @ q.T


def _sq_error(norm2: float, g2: torch.Tensor, aq: torch.Tensor, qq: torch.Tensor) -> float:
    return max(0.0, norm2 - 2.0 * float((g2 * aq).sum()) + float((g2 * (g2 @ qq)).sum()))


def _as_matrix(core: torch.Tensor) -> torch.Tensor:
    return core.permute(1, 0, 2).reshape(core.shape[1], -1)


def ring_error(a: torch.Tensor, cores: Sequence[torch.Tensor]) -> float:
    """Relative Frobenius error ‖A − TR(cores)‖ / ‖A‖, without forming the ring's dense tensor twice."""
    norm2 = float((a * a).sum())
    if norm2 == 0.0:
        return 0.0
    aq, qq = _normal_equations(_unfold_cyclic(a, 0), cores, 0)
    return math.sqrt(_sq_error(norm2, _as_matrix(cores[0]), aq, qq) / norm2)


def als_cost(dims: Sequence[int], rr: Sequence[int], sweeps: int) -> tuple[float, int]:
    """(multiply-adds, peak bytes) of ``sweeps`` TR-ALS sweeps: an estimate, to decide whether to run them."""
    n = math.prod(dims)
    d = len(dims)
    flops, peak = 0.0, 0
    for k in range(d):
        cols = n // dims[k]
        ab = rr[k] * rr[k + 1]
        flops += cols * ab * ab + n * ab + cols * ab * max(rr) * (d - 1)
        peak = max(peak, 8 * (2 * n + 3 * ab * cols))
    return flops * max(1, sweeps), peak


def tr_als(
    a: torch.Tensor,
    cores: Sequence[torch.Tensor],
    sweeps: int = DEFAULT_SWEEPS,
    tol: float = ALS_TOL,
) -> tuple[list[torch.Tensor], float, int]:
    """Alternating least squares on a tensor ring (Zhao et al. 2016, TR-ALS), from ``cores``.

    Each core in turn is the least-squares solution given the others (normal
    equations with a tiny ridge). Returns the best cores seen (never worse than
    the start), their relative error and the number of sweeps run.
    """
    d = len(cores)
    norm2 = float((a * a).sum())
    if norm2 == 0.0:
        return list(cores), 0.0, 0
    unfolded = [_unfold_cyclic(a, k) for k in range(d)]
    cores = [c.clone() for c in cores]
    aq, qq = _normal_equations(unfolded[0], cores, 0)
    best_err = _sq_error(norm2, _as_matrix(cores[0]), aq, qq)
    best = [c.clone() for c in cores]
    previous = best_err
    done = 0
    for done in range(1, sweeps + 1):  # noqa: B007 - the sweep count is reported after the loop
        err = previous
        for k in range(d):
            aq, qq = _normal_equations(unfolded[k], cores, k)
            ridge = 1e-12 * float(torch.diagonal(qq).mean()) + 1e-300
            eye = torch.eye(qq.shape[0], dtype=qq.dtype)
            try:
                g2 = torch.linalg.solve(qq + ridge * eye, aq.T).T
            except RuntimeError:  # singular despite the ridge: keep this core
                continue
            if not torch.isfinite(g2).all():
                continue
            rk, n, rk1 = cores[k].shape
            cores[k] = g2.reshape(n, rk, rk1).permute(1, 0, 2).contiguous()
            err = _sq_error(norm2, g2, aq, qq)
            if err < best_err:
                best_err, best = err, [c.clone() for c in cores]
        if previous - err <= tol * previous:
            break
        previous = err
    return best, math.sqrt(best_err / norm2), done


# ---------------------------------------------------------------------- the method
class TR(NetworkMethod):
    """Tensor ring (TR) decomposition of a Linear (TR-matrix) or a Conv2d (ring of small convolutions).

    The layouts are those of ``tt`` (the same automatic split of in/out features
    or channels, see :class:`autorank.methods.tt.TT`), with one more bond: the
    ring bond R closes the first core onto the last,
    ``W = Trace(G_1 G_2 ⋯ G_d)``. The forward contracts one small core at a time
    and never rebuilds the weight: the ring index rides along as a batch index
    (a Linear: one matmul per core; a Conv2d: 1×1 convolutions over the
    input-channel factors, the k×k spatial core, 1×1 convolutions growing the
    output-channel factors, the last one closing the ring). Every layer the
    ring touches costs R times that of a train of the same inner ranks.

    The rank is an int r (the ring bond r, every inner bond min(r, its bound)) or
    a tuple (R, r_1, …, r_{d-1}). Factorization, per rank (not nested): the
    better of TR-SVD (Zhao et al.; the first SVD split over the ring bond) and
    the truncated TT-SVD embedded in the ring, refined by TR-ALS sweeps while
    they fit the time and memory budgets; the best cores seen are kept, so the
    ring is never worse than the train of the same inner ranks, and it is exact
    at :meth:`max_rank`.

    Options
    -------
    sweeps : TR-ALS sweeps after the SVD initialisation (default 3; 0 for none).
    memory_limit_bytes : refuse layers whose TT-SVD needs more memory, and skip
        ALS when it would (default 4 GiB, or ``AUTORANK_TT_MEMORY_LIMIT``).

    References
    ----------
    - W. Wang, Y. Sun, B. Eriksson, W. Wang, V. Aggarwal. Wide Compression: Tensor
      Ring Nets. CVPR 2018, arXiv 1802.09052.
    - Q. Zhao, G. Zhou, S. Xie, L. Zhang, A. Cichocki. Tensor Ring Decomposition.
      arXiv 1606.05535, 2016 (TR-SVD, TR-ALS).
    - N. Li, Y. Pan, Y. Chen, Z. Ding, D. Zhao, Z. Xu. Heuristic rank selection with
      progressively searching tensor ring network (PSTRN). Complex Intell. Syst. 2022.
    """

    name = "tr"
    aliases = ("tensor-ring", "tr-matrix")
    nested = False
    exact_at_max_rank = True
    data_aware = False
    ring = True
    structure = "TR-matrix ring of matmuls | Conv 1×1 chain C→R·r, k×k r→r, 1×1 chain r→N closing the ring"
    reference = "Wang et al. CVPR 2018 (arXiv 1802.09052); TR-SVD/ALS: Zhao et al. 2016"
    rank_format = "r | [R, r_1, ..., r_(d-1)]"
    options_help = {
        "sweeps": f"TR-ALS sweeps after the SVD initialisation (default {DEFAULT_SWEEPS}; 0 for none)",
        "memory_limit_bytes": f"refuse layers whose TT-SVD needs more memory, skip ALS above it (default 4 GiB or ${MEMORY_LIMIT_ENV})",
    }

    def rank_help(self) -> str:
        return (
            "int r (ring bond r, every inner bond min(r, its bound)), a list [R, r_1, ..., r_(d-1)], "
            "or fraction ρ of FLOPs in (0, 1]; not nested: each rank is its own factorization"
        )

    def is_nested(self, options: Optional[dict]) -> bool:
        """Never: each rank is its own initialisation and ALS run."""
        return False

    def _check_options(self, options: dict) -> None:
        _sweeps(options)
        memory_limit(options, self.name, MEMORY_LIMIT_ENV)

    def options_key(self, options: Optional[dict]) -> dict:
        return {"sweeps": _sweeps(options)}

    def _factorize(self, module, spec: LayerSpec, stats: Optional[LayerStats], rank, options: dict) -> Factors:
        rank = self.normalize_rank(spec, rank)
        layout = train_layout(spec)
        rr = bond_ranks(layout, rank, ring=True)
        limit = memory_limit(options, self.name, MEMORY_LIMIT_ENV)
        need = tt_svd_memory_bytes(layout.modes)
        if need > limit:
            raise RankTooLargeError(
                f"method 'tr': layer {spec.describe()}: the SVD initialisation would need about {need / 1e9:.3g} GB, "
                f"over the limit of {limit / 1e9:.3g} GB (options['memory_limit_bytes'] or {MEMORY_LIMIT_ENV})"
            )
        a = weight_tensor(module, layout)
        if not torch.isfinite(a).all():
            raise RankError(f"method 'tr': layer {spec.describe()} has non-finite weights")
        sweeps = _sweeps(options)
        embedded = _tt_in_ring(a, rr)
        flops, peak = als_cost(layout.modes, rr, sweeps + 2)
        init, rel, done = "tt-svd", None, 0
        cores = embedded
        if flops <= ALS_MAX_FLOPS and peak <= limit:
            candidates = {"tt-svd": embedded, "tr-svd": tr_svd(a, rr)}
            errors = {k: ring_error(a, c) for k, c in candidates.items()}
            init = min(errors, key=lambda k: errors[k])
            cores, rel = candidates[init], errors[init]
            if sweeps > 0 and rel is not None and rel > 1e-12:
                start = cores
                if init == "tt-svd" and rr[0] > 1:
                    start = _perturb_ring(cores)  # the unused ring slices are a fixed point of ALS
                refined, err, done = tr_als(a, start, sweeps)
                if err < rel:
                    cores, rel = refined, err
        else:
            logger.debug("tr: %s rank %s: ALS skipped (about %.3g multiply-adds, %.3g GB)", spec.describe(), rank,
                         flops, peak / 1e9)
        return Factors(
            {f"core{k}": c.contiguous() for k, c in enumerate(cores)},
            {"rank": list(rank) if isinstance(rank, tuple) else rank, "ranks": list(rr), "init": init,
             "rel_error": rel, "sweeps": done, "modes": list(layout.modes)},
        )

    def _build(self, spec: LayerSpec, factors: Optional[Factors], rank, options, bias, device, dtype) -> list[nn.Module]:
        layout = train_layout(spec)
        rr = bond_ranks(layout, rank, ring=True)
        cores = None
        if factors is not None:
            stored = factors.meta.get("ranks")
            if stored is not None and tuple(stored) != rr:
                raise ValueError(f"method 'tr': factors were computed for bond ranks {list(stored)}, not {list(rr)}")
            cores = [factors.tensors[f"core{k}"] for k in range(layout.n_cores)]
        return network_modules(spec, layout, rr, cores, bias, device, dtype)


def _perturb_ring(cores: Sequence[torch.Tensor], scale: float = 1e-2) -> list[torch.Tensor]:
    """Small seeded noise in the ring slices a TT embedding leaves at zero, so that ALS can use them."""
    g = torch.Generator().manual_seed(0)
    out = [c.clone() for c in cores]
    for idx, sl in ((0, (slice(1, None),)), (len(out) - 1, (Ellipsis, slice(1, None)))):
        c = out[idx]
        used = c[0] if idx == 0 else c[..., 0]
        rms = float(used.square().mean().sqrt()) or 1.0
        part = c[sl]
        c[sl] = torch.randn(part.shape, generator=g, dtype=c.dtype) * (scale * rms)
    return out


def _sweeps(options: Optional[dict]) -> int:
    v = (options or {}).get("sweeps", DEFAULT_SWEEPS)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"method 'tr': sweeps must be an integer >= 0, got {v!r}")
    return int(v)
