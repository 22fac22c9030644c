"""CP: a k×k convolution as 1×1 → k×1 depthwise → 1×k depthwise → 1×1 (Lebedev et al. 2014)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from autorank.errors import RankError, RankTooLargeError
from autorank.methods._base import (
    DEFAULT_MEMORY_LIMIT,
    BaseMethod,
    Factors,
    LayerStats,
    RefitTarget,
    conv_out_hw,
    dense_kernel_reason,
    last_factor_target,
    memory_limit,
)
from autorank.methods._layers import Cost, LayerSpec, conv_flops, make_conv, weight_matrix

__all__ = ["CP", "CPFit", "cp_als", "cp_init", "cp_fit_gflop", "cp_als_memory_bytes", "reconstruct", "DEFAULT_MEMORY_LIMIT"]

logger = logging.getLogger("autorank")

#: environment variable overriding :data:`DEFAULT_MEMORY_LIMIT` (bytes)
MEMORY_LIMIT_ENV = "AUTORANK_CP_MEMORY_LIMIT"
DEFAULT_N_ITER_MAX = 200
DEFAULT_TOL = 1e-4
#: estimated work of one fit at most (GFLOP, one multiply-add = two); see :func:`cp_fit_gflop`
DEFAULT_MAX_GFLOP = 500.0
#: a rank whose initialisation and this many sweeps do not fit in max_gflop is refused
MIN_SWEEPS = 5
#: the throughput used to put seconds on a refusal (float32 GEMMs on 2 CPU cores, measured on a shared box)
NOMINAL_GFLOPS = 40.0


# ---------------------------------------------------------------------- the mathematics
#: the tolerance is tested on the mean decrease over this many sweeps (one sweep's is noisy with line search)
TOL_WINDOW = 5
#: relative ridge added to every ALS normal-equation matrix (times its mean diagonal)
RIDGE = 1e-6


@dataclass
class CPFit:
    """The result of :func:`cp_als`.

    ``factors``: one (dims[i] × rank) tensor per mode, terms balanced (every
    factor column of a term has the same norm), on the input's device in the
    working precision; ``rel_error``: ‖T − T̂‖ / ‖T‖ computed from the
    reconstruction; ``init_error``: the same for the initialisation;
    ``errors``: the error after each sweep (from the normal equations, cheap);
    ``sweeps``: sweeps run; ``sweep_limit``: the most the budget allowed;
    ``converged``: stopped by the tolerance rather than by the limit.
    """

    factors: list[torch.Tensor]
    rel_error: float
    init_error: float
    errors: list[float]
    sweeps: int
    sweep_limit: int
    converged: bool


def cp_fit_gflop(dims: Sequence[int], rank: int) -> tuple[float, float]:
    """Estimated work (GFLOP, one multiply-add = two) of :func:`cp_als`: ``(initialisation, one sweep)``.

    A sweep is three GEMMs of ``prod(dims) × rank`` multiply-adds (the MTTKRPs
    of the two channel modes and the shared one of the two spatial modes), the
    Gram matrices of the channel factors, and four Cholesky factorisations and
    solves of ``rank × rank`` systems. The initialisation is one SVD per
    spatial position of an ``N × C`` matrix.
    """
    n, c, h, w = dims
    p = math.prod(dims)
    r = rank
    sweep = 2 * (3 * p * r + (n + c) * r * r + 4 * r ** 3 / 3 + (n + c + h + w) * r * r)
    m = min(n, c)
    init = 2 * (p * h * w + h * w * 6 * n * c * m) + 2 * p * r  # rotation, SVDs, error check
    return init / 1e9, sweep / 1e9


def _line_search_gflop(dims: Sequence[int], rank: int) -> tuple[float, float]:
    """(work of one line-search step, of its MTTKRP alone, which the next sweep reuses when the step is kept), GFLOP."""
    n, c = dims[0], dims[1]
    gemm = 2 * math.prod(dims) * rank
    return (gemm + 2 * (n + c) * rank * rank) / 1e9, gemm / 1e9


def cp_init(tensor: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """Initial rank-``rank`` CP factors of a 4-way kernel (N × C × kh × kw).

    The spatial modes are rotated to their HOSVD bases (orthonormal ``U_h``,
    ``U_w``; De Lathauwer et al. 2000), which writes the kernel exactly as
    ``Σ_ij M_ij ∘ u_i ∘ v_j`` with N × C slices ``M_ij``; every singular triplet
    ``σ a bᵀ`` of every slice is a rank-one term ``a ∘ b ∘ u_i ∘ v_j``. The
    ``rank`` terms of largest σ are kept: as the ``u_i ∘ v_j`` are orthonormal,
    the squared error is exactly the sum of the discarded σ², the best any set
    of terms with spatial factors from these bases can do (Eckart-Young per
    slice). Exact at ``rank = kh · kw · min(N, C)``. Terms beyond the kernel's
    nonzero singular values start as small seeded random vectors.
    """
    n, c, h, w = tensor.shape
    t = tensor.to(torch.float64)
    uh = torch.linalg.eigh(_unfold(t, 2) @ _unfold(t, 2).T)[1].flip(-1)  # h × h, descending
    uw = torch.linalg.eigh(_unfold(t, 3) @ _unfold(t, 3).T)[1].flip(-1)
    slices = (t.reshape(n * c, h * w) @ torch.kron(uh, uw)).reshape(n, c, h * w).permute(2, 0, 1)
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)  # (hw, n, m), (hw, m), (hw, m, c)
    m = s.shape[1]
    flat = s.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)[:rank]
    sl, idx = order // m, order % m
    sigma = flat[order]
    live = sigma > flat.max() * 1e-12 if flat.numel() else torch.zeros_like(sigma, dtype=torch.bool)
    scale = sigma.clamp_min(0) ** 0.25
    factors = [u[sl, :, idx].T, vh[sl, idx, :].T, uh[:, sl // w], uw[:, sl % w]]
    if len(order) < rank or not bool(live.all()):  # dead terms: tiny seeded random columns
        g = torch.Generator().manual_seed(0)
        tiny = (float(flat.max()) * 1e-12) ** 0.25 if flat.numel() else 1e-3
        out = []
        for f, d in zip(factors, tensor.shape):
            full = torch.randn(d, rank, generator=g, dtype=torch.float64)
            full = full / full.norm(dim=0, keepdim=True) * tiny
            k = len(order)
            keep = live[:k]
            full[:, :k][:, keep] = (f[:, :k] * scale[None, :k])[:, keep]
            out.append(full.to(tensor.device))
        return out
    return [f * scale[None, :] for f in factors]


def cp_als_memory_bytes(dims: Sequence[int], rank: int) -> int:
    """An estimate of the peak memory (bytes) of :func:`cp_als` on an N × C × kh × kw kernel.

    The kernel in float64 and float32 copies (and the float64 slices of the
    initialisation and of the final error check), the slices' SVD factors, the
    Khatri-Rao products and MTTKRP outputs (``prod(dims) / min(N, C) × rank``
    float32 each, three alive at once) and about ten ``rank × rank`` matrices
    (Grams, their products, the Cholesky factors).
    """
    n, c, h, w = dims
    p = math.prod(dims)
    m = min(n, c)
    tensors = 8 * 4 * p + 4 * 3 * p
    svd = 8 * h * w * (n + c + 1) * m
    kr = 4 * 3 * (p // max(1, m)) * rank
    grams = 4 * 10 * rank * rank
    return int(tensors + svd + kr + grams)


def _unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def _khatri_rao(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column-wise Kronecker product: row ``i * len(b) + j`` is ``a[i] * b[j]``."""
    return (a[:, None, :] * b[None, :, :]).reshape(-1, a.shape[1])


def _solve(rhs: torch.Tensor, gram: torch.Tensor, solve_dtype: torch.dtype, ridge: float) -> torch.Tensor:
    """``rhs @ (gram + λI)⁻¹`` by Cholesky, λ = ``ridge`` × mean diagonal (raised until it factorises)."""
    g = gram.to(solve_dtype)
    lam = ridge * float(g.diagonal().mean().clamp_min(torch.finfo(solve_dtype).tiny))
    eye = torch.eye(g.shape[0], dtype=solve_dtype, device=g.device)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(g + lam * eye)
        if int(info) == 0:
            break
        lam *= 100.0
    else:
        raise RankError("the ALS normal equations are singular")
    return torch.cholesky_solve(rhs.T.to(solve_dtype), chol).T.to(rhs.dtype)


def cp_als(
    tensor,
    rank: int,
    *,
    n_iter_max: int = DEFAULT_N_ITER_MAX,
    tol: float = DEFAULT_TOL,
    max_gflop: float = DEFAULT_MAX_GFLOP,
    dtype: torch.dtype = torch.float32,
    solve_dtype: torch.dtype = torch.float32,
    ridge: float = RIDGE,
    line_search: bool = True,
) -> CPFit:
    """Rank-``rank`` CP decomposition of a 4-way kernel (N × C × kh × kw) by ALS.

    Initialised by :func:`cp_init`; then alternating least squares (Kolda &
    Bader 2009, §3.4) over the modes in the order N, C, kh, kw, with the
    MTTKRPs as GEMMs in ``dtype`` on the tensor's device (the two spatial modes
    share one contraction with the channel factors) and the normal equations
    solved by Cholesky in ``solve_dtype`` with a small ridge. The factor
    columns are rebalanced after every sweep, and from the second sweep on
    each sweep is followed by an extrapolation along the last step, kept when
    it lowers the error (Bro 1998). Stops when the relative error decreased by
    less than ``tol`` of itself per sweep on average over the last
    :data:`TOL_WINDOW` sweeps, after ``n_iter_max`` sweeps, or when the next
    sweep would take the estimated work (:func:`cp_fit_gflop`) over
    ``max_gflop``; at least one sweep is run. The factors returned are those
    of the lowest error seen, the initialisation included.
    Deterministic for the same input, device and thread count.

    The defaults were chosen by measurement (``benchmarks/bench_cp.py``): float32
    and float64 solves gave the same errors to 4 digits at half the time; the
    line search lowered the error reached in a given time; a tolerance of 1e-4
    over 5 sweeps stops within about 0.5% of the error 200 sweeps reach.
    """
    t = torch.as_tensor(tensor).detach()
    if t.ndim != 4:
        raise ValueError(f"cp_als takes a 4-way tensor (N × C × kh × kw), got shape {tuple(t.shape)}")
    n, c, h, w = t.shape
    dims = (n, c, h, w)
    init_gf, sweep_gf = cp_fit_gflop(dims, rank)
    limit = max(1, min(n_iter_max, int((max_gflop - init_gf) // sweep_gf)))
    ls_gf, gemm_gf = _line_search_gflop(dims, rank)
    t64 = t.to(torch.float64)
    norm = float(t64.norm())
    if norm == 0.0 or not math.isfinite(norm):
        if norm == 0.0:
            z = [torch.zeros(d, rank, dtype=dtype, device=t.device) for d in dims]
            return CPFit(z, 0.0, 0.0, [], 0, limit, True)
        raise RankError("the kernel has non-finite entries")
    t64 = t64 / norm  # solved at unit norm (the same solution up to scale)
    factors = init = [f.to(dtype) for f in cp_init(t64, rank)]
    init_error = _rel_error(t64, factors)
    x = t64.to(dtype)
    x0 = x.reshape(n, c * h * w)
    x1 = x.transpose(0, 1).reshape(c, n * h * w)
    grams = [f.T @ f for f in factors]
    errors: list[float] = []
    converged = False
    work = init_gf
    m0 = None  # x0 @ KR(b, fh, fw) for the current factors, when known
    best = (factors, init_error)
    for k in range(1, n_iter_max + 1):
        if k > 1 and work + sweep_gf > max_gflop:
            break
        work += sweep_gf
        start = factors
        a, b, fh, fw = factors
        s = _khatri_rao(fh, fw)  # (h w) × r
        if m0 is None:
            m0 = x0 @ _khatri_rao(b, s)
        a = _solve(m0, grams[1] * grams[2] * grams[3], solve_dtype, ridge)
        grams[0] = a.T @ a
        b = _solve(x1 @ _khatri_rao(a, s), grams[0] * grams[2] * grams[3], solve_dtype, ridge)
        grams[1] = b.T @ b
        z = (x0.T @ a).reshape(c, h * w, rank)
        p = torch.einsum("cpr,cr->pr", z, b).reshape(h, w, rank)
        fh = _solve(torch.einsum("hwr,wr->hr", p, fw), grams[0] * grams[1] * grams[3], solve_dtype, ridge)
        grams[2] = fh.T @ fh
        g3 = grams[0] * grams[1] * grams[2]
        m3 = torch.einsum("hwr,hr->wr", p, fh)
        fw = _solve(m3, g3, solve_dtype, ridge)
        grams[3] = fw.T @ fw
        m0 = None
        err = _error_from(float((m3.double() * fw.double()).sum()), g3, grams[3])
        if not math.isfinite(err):
            raise RankError(f"CP-ALS at rank {rank} produced non-finite numbers")
        # rebalance: every factor column of a term gets the geometric mean norm (Grams rescaled, not recomputed)
        factors, grams = _rebalance([a, b, fh, fw], grams)
        if line_search and k >= 2 and work + ls_gf + sweep_gf <= max_gflop:
            # extrapolate along the last step (Bro 1998; Tomasi & Bro 2006); kept only if the error drops
            work += ls_gf
            step = k ** (1.0 / 3.0)
            cand = [f + step * (f - f0) for f, f0 in zip(factors, start)]
            cg = [f.T @ f for f in cand]
            cm0 = x0 @ _khatri_rao(cand[1], _khatri_rao(cand[2], cand[3]))
            cerr = _error_from(float((cm0.double() * cand[0].double()).sum()), cg[1] * cg[2] * cg[3], cg[0])
            if math.isfinite(cerr) and cerr < err:
                factors, grams, m0, err = cand, cg, cm0, cerr  # m0 serves the next sweep's first mode
                work -= gemm_gf
        errors.append(err)
        if err < best[1]:
            best = (factors, err)
        if len(errors) > TOL_WINDOW and errors[-1 - TOL_WINDOW] - err < TOL_WINDOW * tol * errors[-1 - TOL_WINDOW]:
            converged = True
            break
    factors = best[0]  # the lowest error seen (float32 rounding can lift it slightly on a plateau)
    if not all(bool(torch.isfinite(f).all()) for f in factors):
        raise RankError(f"CP-ALS at rank {rank} produced non-finite factors")
    rel = _rel_error(t64, factors)
    if not math.isfinite(rel):
        raise RankError(f"CP-ALS at rank {rank} produced a non-finite reconstruction")
    if rel > init_error:  # ALS never ends worse than where it started (e.g. an exact initialisation)
        factors, rel = init, init_error
    factors = [f * norm ** 0.25 for f in factors]  # back to the kernel's scale, terms still balanced
    return CPFit(factors, rel, init_error, errors, len(errors), limit, converged)


def _error_from(inner: float, gram_rest: torch.Tensor, gram_last: torch.Tensor) -> float:
    """Relative error of unit-norm T from ⟨T, T̂⟩ and the Grams: ‖T̂‖² = Σ (Hadamard product of all Grams)."""
    sq = float((gram_rest.double() * gram_last.double()).sum())
    return math.sqrt(max(0.0, 1.0 - 2.0 * inner + sq))


def _rebalance(factors: list[torch.Tensor], grams: list[torch.Tensor]):
    norms = torch.stack([g.diagonal().clamp_min(0).sqrt() for g in grams])  # (modes, r)
    ok = (norms > 0).all(dim=0)
    target = torch.where(ok, norms.clamp_min(1e-300).log().mean(dim=0).exp(), torch.ones_like(norms[0]))
    out_f, out_g = [], []
    for f, g, nrm in zip(factors, grams, norms):
        sc = torch.where(ok, target / nrm.clamp_min(1e-300), torch.ones_like(nrm))
        out_f.append(f * sc[None, :])
        out_g.append(g * (sc[:, None] * sc[None, :]))
    return out_f, out_g


def reconstruct(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full N × C × kh × kw tensor of CP factors (mode-0 factor times the Khatri-Rao product of the rest)."""
    a, b, fh, fw = factors
    kr = _khatri_rao(b, _khatri_rao(fh, fw))
    return (a @ kr.T).reshape(a.shape[0], b.shape[0], fh.shape[0], fw.shape[0])


def _rel_error(t64: torch.Tensor, factors: Sequence[torch.Tensor]) -> float:
    """‖t − T̂‖ / ‖t‖ with the reconstruction in the factors' precision, the difference in float64."""
    return float((t64 - reconstruct(factors).to(torch.float64)).norm() / t64.norm())


# ---------------------------------------------------------------------- the method
class CP(BaseMethod):
    """CP (CANDECOMP/PARAFAC) decomposition of a convolution kernel.

    The kernel W (N × C × kh × kw) is approximated by r rank-one terms,
    ``W ≈ Σ_r a_r ∘ b_r ∘ h_r ∘ w_r``, computed by :func:`cp_als` (initialised
    from the SVDs of the kernel's slices in the HOSVD basis of its spatial
    modes, then ALS with line search, in float32 on the weight's device: on the
    GPU when the layer is on one). The layer becomes four convolutions:
    ``1×1 C → r``, ``kh×1 depthwise`` (the layer's vertical stride, padding and
    dilation), ``1×kw depthwise`` (the horizontal ones), ``1×1 r → N`` with the
    bias. Splitting padding and stride between the two depthwise convolutions is
    exact for every padding mode.

    Not nested (each rank is a separate ALS run) and not exact at
    :meth:`max_rank`, which is the generic bound ``prod(dims) // max(dims)`` on
    the tensor rank, not a guarantee.

    The work of one fit is bounded: ALS stops at ``n_iter_max`` sweeps, at the
    tolerance, or when the estimated work (:func:`cp_fit_gflop`) would pass
    ``max_gflop``. A rank whose initialisation and :data:`MIN_SWEEPS` sweeps
    would not fit in ``max_gflop``, or whose memory would pass
    ``memory_limit_bytes``, is refused (:meth:`rank_refusal`; the search space
    leaves it out and ``autorank profile`` reports it).

    Options
    -------
    n_iter_max : ALS sweeps at most (default 200).
    tol : stop when the sweeps lower the relative error by less than this fraction of it per sweep,
        averaged over the last 5 (default 1e-4).
    max_gflop : estimated work of one fit at most, in GFLOP (default 500: 10-15 s on 2 shared CPU cores,
        well under a second on a data-centre GPU, where a larger value buys more sweeps).
    memory_limit_bytes : refuse ranks whose ALS would need more memory (default
        4 GiB, or the environment variable ``AUTORANK_CP_MEMORY_LIMIT``).

    References
    ----------
    - V. Lebedev, Y. Ganin, M. Rakhuba, I. Oseledets, V. Lempitsky. Speeding-up
      Convolutional Neural Networks Using Fine-tuned CP-Decomposition. ICLR 2015,
      arXiv 1412.6553.
    - T. G. Kolda, B. W. Bader. Tensor Decompositions and Applications. SIAM Review
      51(3):455-500, 2009 (CP-ALS).
    - L. De Lathauwer, B. De Moor, J. Vandewalle. A Multilinear Singular Value
      Decomposition. SIAM J. Matrix Anal. Appl. 21(4):1253-1278, 2000 (HOSVD).
    - R. Bro. Multi-way Analysis in the Food Industry. PhD thesis, University of
      Amsterdam, 1998; G. Tomasi, R. Bro. A comparison of algorithms for fitting
      the PARAFAC model. Comput. Stat. Data Anal. 50(7):1700-1734, 2006 (line search).
    """

    name = "cp"
    aliases = ("cp-als", "parafac")
    layer_kinds = ("conv2d",)
    nested = False
    exact_at_max_rank = False
    data_aware = False
    structure = "Conv 1×1 C→r, kh×1 depthwise, 1×kw depthwise, 1×1 r→N"
    reference = "Lebedev et al. ICLR 2015 (arXiv 1412.6553)"
    cache_version = 2  # 2: torch ALS with HOSVD-slice initialisation and line search (was TensorLy parafac)

    # ------------------------------------------------------------------ applicability
    def _applies(self, spec: LayerSpec) -> Optional[str]:
        return dense_kernel_reason(spec, "cp", "decomposes a dense out × in × kh × kw kernel")

    # ------------------------------------------------------------------ ranks
    def max_rank(self, spec: LayerSpec) -> int:
        dims = _dims(spec)
        return math.prod(dims) // max(dims)

    options_help = {
        "n_iter_max": f"CP-ALS sweeps at most (default {DEFAULT_N_ITER_MAX})",
        "tol": f"stop when the sweeps lower the relative error by less than this fraction of it per sweep, "
               f"averaged over the last {TOL_WINDOW} (default {DEFAULT_TOL:g})",
        "max_gflop": f"estimated work of one CP-ALS fit at most, GFLOP (default {DEFAULT_MAX_GFLOP:g}); "
                     f"ranks that cannot run {MIN_SWEEPS} sweeps within it are refused",
        "memory_limit_bytes": "refuse ranks whose CP-ALS needs more memory (default 4 GiB or $AUTORANK_CP_MEMORY_LIMIT)",
    }

    def _check_options(self, options: dict) -> None:
        _als_options(options)
        memory_limit(options, "cp", MEMORY_LIMIT_ENV)

    def rank_help(self) -> str:
        return (
            "int r, the number of rank-one terms (1..prod(N, C, kh, kw) // max(N, C, kh, kw)), "
            "or fraction ρ of FLOPs in (0, 1]; not nested: each rank is its own CP-ALS run"
        )

    def is_nested(self, options: Optional[dict]) -> bool:
        """Never: each rank is a separate CP-ALS run."""
        return False

    def rank_refusal(self, spec: LayerSpec, rank, input_shape=None, options: Optional[dict] = None) -> Optional[str]:
        """Why CP-ALS at ``rank`` is refused on ``spec`` (estimated work or memory over the limit), or None.

        From the shapes alone (:func:`cp_fit_gflop`, :func:`cp_als_memory_bytes`);
        monotone: every rank above a refused one is refused too.
        """
        r = _as_int(rank)
        dims = _dims(spec)
        _, _, max_gflop = _als_options(options)
        need = cp_als_memory_bytes(dims, r)
        limit = memory_limit(options, "cp", MEMORY_LIMIT_ENV)
        if need > limit:
            return (f"rank {r}: CP-ALS would need about {need / 1e9:.3g} GB, over the limit of {limit / 1e9:.3g} GB "
                    f"(options['memory_limit_bytes'] or {MEMORY_LIMIT_ENV})")
        init_gf, sweep_gf = cp_fit_gflop(dims, r)
        work = init_gf + MIN_SWEEPS * sweep_gf
        if work > max_gflop:
            return (f"rank {r}: CP-ALS needs about {work:.0f} GFLOP for its initialisation and {MIN_SWEEPS} sweeps "
                    f"(~{work / NOMINAL_GFLOPS:.0f} s on 2 CPU cores), over max_gflop {max_gflop:g}")
        return None

    # ------------------------------------------------------------------ cost
    def _cost(self, spec: LayerSpec, rank, input_shape: tuple[int, ...]) -> Cost:
        r = _as_int(rank)
        b, h, w, oh, ow = conv_out_hw(spec, input_shape)
        kh, kw = spec.kernel_size
        c, n = spec.in_channels, spec.out_channels
        params = r * c + r * kh + r * kw + n * r + (n if spec.bias else 0)
        flops = (
            conv_flops(b, r, c, 1, 1, h, w)  # input resolution
            + conv_flops(b, r, 1, kh, 1, oh, w)  # vertical: output rows, input columns
            + conv_flops(b, r, 1, 1, kw, oh, ow)
            + conv_flops(b, n, r, 1, 1, oh, ow)
        )
        return Cost(params, flops)

    # ------------------------------------------------------------------ factorize / build
    def options_key(self, options: Optional[dict]) -> dict:
        n_iter_max, tol, max_gflop = _als_options(options)
        return {"n_iter_max": n_iter_max, "tol": tol, "max_gflop": max_gflop}

    def _factorize(self, module, spec: LayerSpec, stats: Optional[LayerStats], rank, options: dict) -> Factors:
        r = self.normalize_rank(spec, rank)
        n_iter_max, tol, max_gflop = _als_options(options)
        why = self.rank_refusal(spec, r, None, options)
        if why is not None:
            raise RankTooLargeError(f"method 'cp': layer {spec.describe()}: {why}; use a smaller rank")
        w = weight_matrix(module).detach()
        if not bool(torch.isfinite(w).all()):
            raise RankError(f"method 'cp': layer {spec.describe()} has non-finite weights")
        try:
            fit = cp_als(w, r, n_iter_max=n_iter_max, tol=tol, max_gflop=max_gflop)
        except RankError as exc:
            raise type(exc)(f"method 'cp': layer {spec.describe()}: {exc}") from None
        a_out, b_in, k_h, k_w = (f.to(device="cpu", dtype=torch.float64).contiguous() for f in fit.factors)
        logger.debug("cp: %s rank %d, %d ALS sweeps (limit %d), relative error %.3g (initialisation %.3g)",
                     spec.describe(), r, fit.sweeps, fit.sweep_limit, fit.rel_error, fit.init_error)
        return Factors(
            {"u_out": a_out, "u_in": b_in, "k_h": k_h, "k_w": k_w},
            {"rank": r, "rel_error": fit.rel_error, "iterations": fit.sweeps, "init_error": fit.init_error,
             "converged": fit.converged},
        )

    def refit_target(self, replacement: nn.Module) -> Union[RefitTarget, str]:
        """The last 1×1 convolution r→N and the bias (the depthwise factors stay; see autorank.training.refit)."""
        return last_factor_target(replacement)

    def _build(self, spec: LayerSpec, factors: Optional[Factors], rank, options, bias, device, dtype) -> list[nn.Module]:
        r = _as_int(rank)
        c, n = spec.in_channels, spec.out_channels
        kh, kw = spec.kernel_size
        (sh, sw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
        w1 = w2 = w3 = w4 = None
        if factors is not None:
            stored = factors.meta.get("rank")
            if stored is not None and int(stored) != r:
                raise ValueError(f"method 'cp': factors were computed for rank {stored}, not {r}")
            t = factors.tensors
            w1 = t["u_in"].T.reshape(r, c, 1, 1)
            w2 = t["k_h"].T.reshape(r, 1, kh, 1)
            w3 = t["k_w"].T.reshape(r, 1, 1, kw)
            w4 = t["u_out"].reshape(n, r, 1, 1)
        kw_ = {"device": device, "dtype": dtype}
        pm = spec.padding_mode
        return [
            make_conv(c, r, (1, 1), weight=w1, **kw_),
            make_conv(r, r, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), groups=r,
                      padding_mode=pm, weight=w2, **kw_),
            make_conv(r, r, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw), groups=r,
                      padding_mode=pm, weight=w3, **kw_),
            make_conv(r, n, (1, 1), weight=w4, bias=bias, has_bias=spec.bias or bias is not None, **kw_),
        ]


def _dims(spec: LayerSpec) -> tuple[int, int, int, int]:
    kh, kw = spec.kernel_size
    return (spec.out_channels, spec.in_per_group, kh, kw)


def _as_int(rank) -> int:
    if isinstance(rank, (list, tuple)):
        (rank,) = rank
    return int(rank)


def _als_options(options: Optional[dict]) -> tuple[int, float, float]:
    opts = options or {}
    n_iter_max = opts.get("n_iter_max", DEFAULT_N_ITER_MAX)
    tol = opts.get("tol", DEFAULT_TOL)
    max_gflop = opts.get("max_gflop", DEFAULT_MAX_GFLOP)
    if isinstance(n_iter_max, bool) or not isinstance(n_iter_max, int) or n_iter_max < 1:
        raise ValueError(f"method 'cp': n_iter_max must be a positive integer, got {n_iter_max!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (tol >= 0) or not math.isfinite(tol):
        raise ValueError(f"method 'cp': tol must be a finite number >= 0, got {tol!r}")
    if isinstance(max_gflop, bool) or not isinstance(max_gflop, (int, float)) or not (max_gflop > 0) \
            or not math.isfinite(max_gflop):
        raise ValueError(f"method 'cp': max_gflop must be a positive number of GFLOP, got {max_gflop!r}")
    return int(n_iter_max), float(tol), float(max_gflop)
