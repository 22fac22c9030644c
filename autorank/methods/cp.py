"""CP: a k×k convolution as 1×1 → k×1 depthwise → 1×k depthwise → 1×1 (Lebedev et al. 2014)."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from autorank.errors import RankError, RankTooLargeError
from autorank.methods._base import (DEFAULT_MEMORY_LIMIT, BaseMethod, dense_kernel_reason, Factors, LayerStats, RefitTarget,
                                    conv_out_hw, last_factor_target, memory_limit)
from autorank.methods._layers import Cost, LayerSpec, conv_flops, make_conv, weight_matrix

__all__ = ["CP", "cp_als", "cp_als_memory_bytes", "DEFAULT_MEMORY_LIMIT"]

logger = logging.getLogger("autorank")

#: environment variable overriding :data:`DEFAULT_MEMORY_LIMIT` (bytes)
MEMORY_LIMIT_ENV = "AUTORANK_CP_MEMORY_LIMIT"
DEFAULT_N_ITER_MAX = 100
DEFAULT_TOL = 1e-6


# ---------------------------------------------------------------------- the mathematics
def cp_als_memory_bytes(dims: tuple[int, ...], rank: int) -> int:
    """An estimate of the peak memory (bytes, float64) TensorLy's CP-ALS needs.

    The largest term is the Khatri-Rao product of all factors but one,
    ``(prod(dims) / dims[i]) × rank`` for the smallest ``dims[i]``; added to it
    the tensor and one unfolding copy, and the SVD initialisation of the
    largest unfolding (U, Vᵀ and the copy LAPACK works on).
    """
    p = math.prod(dims)
    khatri_rao = max(p // d * rank for d in dims)
    svd_init = max(min(d, p // d) * (d + p // d) + p for d in dims)
    return 8 * (2 * p + khatri_rao + svd_init)


def _balance(factors: list[np.ndarray]) -> list[np.ndarray]:
    """Rescale each rank-one term so that its factor columns share one norm (product unchanged)."""
    norms = np.stack([np.linalg.norm(f, axis=0) for f in factors])  # (modes, rank)
    ok = np.all(norms > 0, axis=0)
    target = np.ones_like(norms[0])
    target[ok] = np.exp(np.log(norms[:, ok]).mean(axis=0))
    out = []
    for f, nrm in zip(factors, norms):
        scale = np.ones_like(nrm)
        scale[ok] = target[ok] / nrm[ok]
        out.append(f * scale)
    return out


def cp_als(
    tensor: np.ndarray,
    rank: int,
    *,
    n_iter_max: int = DEFAULT_N_ITER_MAX,
    tol: float = DEFAULT_TOL,
) -> tuple[list[np.ndarray], float, int]:
    """Rank-``rank`` CP decomposition by ALS (TensorLy ``parafac``, SVD init, seed 0).

    Returns ``(factors, rel_error, iterations)``: one (dims[i] × rank) float64
    factor per mode with the CP weights absorbed and the terms balanced (every
    factor column of a term has the same norm), the relative Frobenius error
    ‖T − T̂‖ / ‖T‖ and the number of ALS sweeps run. Deterministic for the same
    input. Raises :class:`RankError` when ALS breaks down (singular system or
    non-finite numbers).
    """
    import tensorly as tl
    from tensorly.decomposition import parafac

    t = np.ascontiguousarray(tensor, dtype=np.float64)
    norm = float(np.linalg.norm(t))
    if norm == 0.0:
        return [np.zeros((d, rank)) for d in t.shape], 0.0, 0
    ctx = (
        contextlib.nullcontext()
        if tl.get_backend() == "numpy"
        else tl.backend_context("numpy", local_threadsafe=True)
    )
    # solved at unit norm (the same solution up to scale; keeps the numbers O(1))
    with ctx, warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # e.g. "n_eigenvecs > min(matrix.shape)" for rank > a mode size
        try:
            cp, errors = parafac(
                t / norm, rank=rank, init="svd", n_iter_max=n_iter_max, tol=tol,
                random_state=0, normalize_factors=False, return_errors=True,
            )
        except np.linalg.LinAlgError as exc:
            raise RankError(f"CP-ALS broke down at rank {rank} ({exc}); try a smaller rank") from None
    weights, factors = cp
    factors = [np.asarray(f, dtype=np.float64) for f in factors]
    factors[0] = factors[0] * (np.asarray(weights, dtype=np.float64) * norm)[None, :]
    if not all(np.isfinite(f).all() for f in factors):
        raise RankError(f"CP-ALS at rank {rank} produced non-finite factors; try a smaller rank")
    factors = _balance(factors)
    rel = float(np.linalg.norm(t - _reconstruct(factors)) / norm)
    if not math.isfinite(rel):
        raise RankError(f"CP-ALS at rank {rank} produced a non-finite reconstruction; try a smaller rank")
    return factors, rel, len(errors)


def _reconstruct(factors: list[np.ndarray]) -> np.ndarray:
    """The full tensor of CP factors: mode-0 factor times the Khatri-Rao product of the rest."""
    first, rest = factors[0], factors[1:]
    rank = first.shape[1]
    kr = rest[0]
    for f in rest[1:]:
        kr = (kr[:, None, :] * f[None, :, :]).reshape(-1, rank)
    return (first @ kr.T).reshape([f.shape[0] for f in factors])


# ---------------------------------------------------------------------- the method
class CP(BaseMethod):
    """CP (CANDECOMP/PARAFAC) decomposition of a convolution kernel.

    The kernel W (N × C × kh × kw) is approximated by r rank-one terms,
    ``W ≈ Σ_r a_r ∘ b_r ∘ h_r ∘ w_r``, computed by CP-ALS (TensorLy, SVD
    initialisation, fixed seed). The layer becomes four convolutions:
    ``1×1 C → r``, ``kh×1 depthwise`` (the layer's vertical stride, padding and
    dilation), ``1×kw depthwise`` (the horizontal ones), ``1×1 r → N`` with the
    bias. Splitting padding and stride between the two depthwise convolutions is
    exact for every padding mode.

    Not nested (each rank is a separate ALS run) and not exact at
    :meth:`max_rank`, which is the generic bound ``prod(dims) // max(dims)`` on
    the tensor rank, not a guarantee.

    Options
    -------
    n_iter_max : ALS sweeps at most (default 100).
    tol : stop when the relative error changes by less than this between sweeps (default 1e-6).
    memory_limit_bytes : refuse ranks whose ALS would need more memory (default
        4 GiB, or the environment variable ``AUTORANK_CP_MEMORY_LIMIT``).

    References
    ----------
    - V. Lebedev, Y. Ganin, M. Rakhuba, I. Oseledets, V. Lempitsky. Speeding-up
      Convolutional Neural Networks Using Fine-tuned CP-Decomposition. ICLR 2015,
      arXiv 1412.6553.
    - T. G. Kolda, B. W. Bader. Tensor Decompositions and Applications. SIAM Review
      51(3):455-500, 2009 (CP-ALS).
    - J. Kossaifi, Y. Panagakis, A. Anandkumar, M. Pantic. TensorLy: Tensor Learning
      in Python. JMLR 20(26):1-6, 2019.
    """

    name = "cp"
    layer_kinds = ("conv2d",)
    nested = False
    exact_at_max_rank = False
    data_aware = False
    structure = "Conv 1×1 C→r, kh×1 depthwise, 1×kw depthwise, 1×1 r→N"
    reference = "Lebedev et al. ICLR 2015 (arXiv 1412.6553)"

    # ------------------------------------------------------------------ applicability
    def _applies(self, spec: LayerSpec) -> Optional[str]:
        return dense_kernel_reason(spec, "cp", "decomposes a dense out × in × kh × kw kernel")

    # ------------------------------------------------------------------ ranks
    def max_rank(self, spec: LayerSpec) -> int:
        dims = _dims(spec)
        return math.prod(dims) // max(dims)

    options_help = {
        "n_iter_max": "CP-ALS sweeps at most (default 100)",
        "tol": "CP-ALS relative tolerance (default 1e-6)",
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
        n_iter_max, tol = _als_options(options)
        return {"n_iter_max": n_iter_max, "tol": tol}

    def _factorize(self, module, spec: LayerSpec, stats: Optional[LayerStats], rank, options: dict) -> Factors:
        r = self.normalize_rank(spec, rank)
        n_iter_max, tol = _als_options(options)
        dims = _dims(spec)
        need = cp_als_memory_bytes(dims, r)
        limit = memory_limit(options, "cp", MEMORY_LIMIT_ENV)
        if need > limit:
            raise RankTooLargeError(
                f"method 'cp': layer {spec.describe()} at rank {r}: CP-ALS would need about "
                f"{need / 1e9:.3g} GB, over the limit of {limit / 1e9:.3g} GB "
                f"(options['memory_limit_bytes'] or {MEMORY_LIMIT_ENV}); use a smaller rank"
            )
        w = weight_matrix(module).detach().to(device="cpu", dtype=torch.float64).numpy()
        if not np.isfinite(w).all():
            raise RankError(f"method 'cp': layer {spec.describe()} has non-finite weights")
        try:
            factors, rel, iters = cp_als(w, r, n_iter_max=n_iter_max, tol=tol)
        except RankError as exc:
            raise type(exc)(f"method 'cp': layer {spec.describe()}: {exc}") from None
        a_out, b_in, k_h, k_w = (torch.from_numpy(np.ascontiguousarray(f)) for f in factors)
        logger.debug("cp: %s rank %d, %d ALS sweeps, relative error %.3g", spec.describe(), r, iters, rel)
        return Factors(
            {"u_out": a_out, "u_in": b_in, "k_h": k_h, "k_w": k_w},
            {"rank": r, "rel_error": rel, "iterations": iters},
        )

    def refit_target(self, replacement: nn.Module) -> Union[RefitTarget, str]:
        """The last 1×1 convolution r→N and the bias (the depthwise factors stay; see autorank.refit)."""
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


def _als_options(options: Optional[dict]) -> tuple[int, float]:
    opts = options or {}
    n_iter_max = opts.get("n_iter_max", DEFAULT_N_ITER_MAX)
    tol = opts.get("tol", DEFAULT_TOL)
    if isinstance(n_iter_max, bool) or not isinstance(n_iter_max, int) or n_iter_max < 1:
        raise ValueError(f"method 'cp': n_iter_max must be a positive integer, got {n_iter_max!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (tol >= 0) or not math.isfinite(tol):
        raise ValueError(f"method 'cp': tol must be a finite number >= 0, got {tol!r}")
    return int(n_iter_max), float(tol)


