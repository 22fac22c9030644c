"""Empirical variational Bayesian matrix factorization (EVBMF): a rank estimate.

EVBMF models an observed matrix ``V`` (L × M) as a low-rank signal plus
Gaussian noise of unknown variance σ². Nakajima et al. (2013) showed that its
global solution is analytic: it shrinks the singular values ``γ_h`` of ``V`` and
keeps exactly those above a threshold,

    γ_h > σ √(M · x̲),     x̲ = (1 + τ̲)(1 + α/τ̲),     α = L / M ≤ 1,

where τ̲ > 0 solves ``log(τ + 1) + α log(τ/α + 1) = τ`` (≈ 2.5129 √α). The
noise variance σ² is itself estimated by minimising the free energy, a
one-dimensional problem on a bounded interval. The number of kept singular
values is the estimated rank. Kim et al. (2015) use it to pick the ranks of
Tucker-2 decompositions of convolution kernels.

References
----------
- S. Nakajima, M. Sugiyama, S. D. Babacan, R. Tomioka. Global analytic solution of
  fully-observed variational Bayesian matrix factorization. JMLR 14:1-37, 2013.
- S. Nakajima, R. Tomioka, M. Sugiyama, S. D. Babacan. Condition for perfect
  dimensionality recovery by variational Bayesian PCA. JMLR 16:3757-3811, 2015
  (the free energy as a function of σ² used here).
- Y.-D. Kim, E. Park, S. Yoo, T. Choi, L. Yang, D. Shin. Compression of Deep
  Convolutional Neural Networks for Fast and Low Power Mobile Applications.
  ICLR 2016, arXiv 1511.06530.
"""

from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch

__all__ = ["evbmf_rank", "evbmf_threshold_factor"]

ArrayLike = Union[np.ndarray, torch.Tensor]

#: grid points (log-spaced) used to find the global minimum of the free energy in σ²
_GRID = 256


def evbmf_threshold_factor(alpha: float) -> tuple[float, float]:
    """(τ̲, x̲) for the aspect ratio ``alpha = L/M`` in (0, 1].

    τ̲ is the positive root of ``log(τ + 1) + α log(τ/α + 1) − τ``; a singular
    value ``γ`` survives EVBMF iff ``γ² / (M σ²) > x̲ = (1 + τ̲)(1 + α/τ̲)``.
    """
    from scipy.optimize import brentq

    a = float(alpha)
    if not (0.0 < a <= 1.0):
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")

    def f(t: float) -> float:
        return math.log1p(t) + a * math.log1p(t / a) - t

    # f(0) = 0 with f'(0) = 1 > 0, and f → −∞: bracket the positive root
    lo, hi = 1e-12, 2.5129 * math.sqrt(a)
    while f(hi) > 0.0:
        hi *= 2.0
    tau = brentq(f, lo, hi, xtol=1e-14, rtol=1e-14, maxiter=200)
    return tau, (1.0 + tau) * (1.0 + a / tau)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """τ(x; α) = ½ (x − (1 + α) + √((x − (1 + α))² − 4α)), for x ≥ (1 + √α)²."""
    b = x - (1.0 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def _free_energy(sigma2: float, s2: np.ndarray, length: int, m: int, alpha: float, xbar: float) -> float:
    """2F/M as a function of σ², up to terms that do not depend on σ².

    ``Σ_h [x_h − log x_h] + Σ_{x_h > x̲} [log(τ_h + 1) + α log(τ_h/α + 1) − τ_h]``
    with ``x_h = γ_h² / (M σ²)``; ``−log x_h = log σ² + const``, so the first sum
    is written ``Σ x_h + L log σ²`` to stay finite for zero singular values.
    """
    x = s2 / (m * sigma2)
    obj = float(x.sum()) + length * math.log(sigma2)
    big = x[x > xbar]
    if big.size:
        t = _tau(big, alpha)
        obj += float(np.sum(np.log1p(t) + alpha * np.log1p(t / alpha) - t))
    return obj


def evbmf_rank(matrix: ArrayLike) -> int:
    """The rank EVBMF estimates for ``matrix``, always an integer in [1, min(matrix.shape)].

    The noise variance is estimated (not given): its free energy is minimised
    over the interval of Nakajima et al. (2013), on a log-spaced grid refined by
    bounded Brent search, so that the global minimum is found even when the
    objective has several local ones.

    Degenerate inputs give the smallest valid answer rather than an error: a
    zero matrix, a vector or a 1 × 1 matrix give 1. Non-finite entries raise
    ValueError (a layer with NaN weights has no meaningful rank).
    """
    from scipy.optimize import minimize_scalar

    if isinstance(matrix, torch.Tensor):
        v = matrix.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        v = np.asarray(matrix, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"evbmf_rank needs a 2-D matrix, got shape {tuple(v.shape)}")
    if v.size == 0:
        raise ValueError(f"evbmf_rank needs a non-empty matrix, got shape {tuple(v.shape)}")
    if not np.isfinite(v).all():
        raise ValueError("evbmf_rank: the matrix has non-finite entries")
    if v.shape[0] > v.shape[1]:
        v = v.T
    length, m = v.shape  # L ≤ M
    if length == 1:
        return 1
    peak = float(np.abs(v).max())
    if peak == 0.0:
        return 1
    v = v / peak  # rank is scale invariant: normalise in two steps, safe from overflow
    v = v / float(np.sqrt(np.mean(v * v)))  # unit mean square: σ² is then at most 1
    s = np.linalg.svd(v, compute_uv=False)
    s2 = s * s
    alpha = length / m
    _, xbar = evbmf_threshold_factor(alpha)

    # interval of σ² (Nakajima et al. 2013, sec. 5): at most H̄ = ⌈L/(1+α)⌉ − 1
    # components are signal, so the rest bound σ² from below; all-noise bounds it above
    h_bar = max(1, min(int(math.ceil(length / (1.0 + alpha))) - 1, length - 1))
    upper = float(s2.sum()) / (length * m)
    tail = s2[h_bar:]
    lower = max(float(tail[0]) / (m * xbar), float(tail.mean()) / m)
    lower = max(lower, upper * 1e-12)  # exactly low-rank input: σ² → 0, keep it positive
    if not lower < upper:
        sigma2 = upper
    else:
        args = (s2, length, m, alpha, xbar)
        grid = np.exp(np.linspace(math.log(lower), math.log(upper), _GRID))
        values = np.array([_free_energy(g, *args) for g in grid])
        i = int(np.argmin(values))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, _GRID - 1)]
        sigma2 = float(grid[i])
        if hi > lo:
            res = minimize_scalar(
                lambda t: _free_energy(math.exp(t), *args),
                bounds=(math.log(lo), math.log(hi)),
                method="bounded",
                options={"xatol": 1e-10},
            )
            if res.success and math.isfinite(res.fun) and res.fun <= values[i]:
                sigma2 = math.exp(float(res.x))
    threshold2 = m * sigma2 * xbar
    rank = int(np.count_nonzero(s2 > threshold2))
    return int(min(max(rank, 1), length))
