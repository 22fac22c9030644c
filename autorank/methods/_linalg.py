"""Linear algebra shared by the SVD family: plain and data-aware (whitened) low-rank factors.

Both return *balanced, nested* factors of a matrix ``M`` (m × d): ``left`` (m × k)
and ``right`` (k × d), k = min(m, d), ordered by decreasing singular value, so
that ``left[:, :r] @ right[:r]`` is the best rank-r approximation in the chosen
norm for every r: truncation is a slice.

Data-aware: given the Gram matrix ``G = Σ x xᵀ`` of the layer's inputs, the
minimiser of ‖(M − M′) X‖_F over rank-r M′ is ``U_r Σ_r V_rᵀ S⁻¹`` where
``S = chol(G)`` and ``U Σ Vᵀ = svd(M S)`` (Masana et al. 2017; SVD-LLM, Wang et
al. 2024). Computed in float64; the Cholesky factorization gets a jitter scaled
to the matrix (a fraction of its mean diagonal), increased until it succeeds,
with an eigendecomposition as the last resort. When the statistics cannot be
used at all (all-zero inputs, non-finite values), the plain SVD is returned and
the reason logged and recorded: never a random layer.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("autorank")

__all__ = ["thin_svd", "balanced_svd", "whitening", "data_aware_svd"]


def thin_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(m, full_matrices=False)``, computed on the tall orientation.

    LAPACK's SVD of a wide matrix is 2–3× slower than of its transpose (measured
    here on 512×4608 and 768×3072), so wide matrices are decomposed transposed.
    """
    if m.shape[0] < m.shape[1]:
        u, s, vh = torch.linalg.svd(m.T, full_matrices=False)
        return vh.T, s, u.T
    return torch.linalg.svd(m, full_matrices=False)


def balanced_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(left, right, singular values) with left = U Σ^½, right = Σ^½ Vᵀ, in float64."""
    m = m.detach().to(torch.float64)
    u, s, vh = thin_svd(m)
    root = s.sqrt()
    return u * root, root[:, None] * vh, s


def whitening(gram: torch.Tensor, jitter0: float = 1e-8, max_tries: int = 8) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A factor S with S Sᵀ ≈ G, and S⁻¹, robust to a G that is not positive definite.

    Returns (S, S_inv, how) where ``how`` says which path was taken.
    """
    g = gram.detach().to(torch.float64)
    g = 0.5 * (g + g.T)
    d = g.shape[0]
    scale = float(torch.diagonal(g).abs().mean()) if d else 0.0
    if not torch.isfinite(g).all():
        raise ValueError("the input Gram matrix has non-finite values")
    if scale <= 0.0:
        raise ValueError("the layer's calibration inputs are all zero")
    eye = torch.eye(d, dtype=torch.float64, device=g.device)
    jitter = jitter0
    for _ in range(max_tries):
        chol, info = torch.linalg.cholesky_ex(g + (jitter * scale) * eye)
        if int(info) == 0 and torch.isfinite(chol).all():
            s_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
            if torch.isfinite(s_inv).all():
                return chol, s_inv, f"cholesky (jitter {jitter:g} x mean diagonal)"
        jitter *= 100.0
    # last resort: symmetric eigendecomposition with eigenvalues floored
    evals, evecs = torch.linalg.eigh(g)
    floor = max(float(evals.max()) * 1e-10, scale * 1e-10)
    evals = evals.clamp_min(floor)
    root = evals.sqrt()
    s = evecs * root
    s_inv = (evecs / root).T
    return s, s_inv, "eigendecomposition (Gram matrix not positive definite)"


def data_aware_svd(
    m: torch.Tensor, gram: torch.Tensor, *, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Nested factors minimising the output error on the calibration inputs.

    ``side="right"``: inputs multiply M on the right (y = M x, G over the d
    columns): minimises ‖(M − M′) X‖. ``side="left"``: G is over the m rows
    (y = Mᵀ x): minimises ‖Xᵀ (M − M′)‖.

    Returns (left, right, singular values, how); ``how`` starts with "plain" when
    the statistics could not be used and the plain SVD was returned instead.
    """
    m64 = m.detach().to(torch.float64)
    try:
        s, s_inv, how = whitening(gram)
    except ValueError as exc:
        logger.warning("data-aware initialisation not possible (%s); using the plain SVD", exc)
        left, right, sv = balanced_svd(m64)
        return left, right, sv, f"plain ({exc})"
    if side == "right":
        u, sv, vh = thin_svd(m64 @ s)
        root = sv.sqrt()
        left = u * root
        right = (root[:, None] * vh) @ s_inv
    else:
        # ‖Sᵀ (M − M′)‖: SVD of Sᵀ M, then undo the whitening on the left
        u, sv, vh = thin_svd(s.T @ m64)
        root = sv.sqrt()
        left = s_inv.T @ (u * root)
        right = root[:, None] * vh
    if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
        logger.warning("data-aware factors are not finite; using the plain SVD")
        left, right, sv = balanced_svd(m64)
        return left, right, sv, "plain (data-aware factors were not finite)"
    return left, right, sv, "data-aware " + how

