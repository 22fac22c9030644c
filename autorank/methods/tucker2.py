"""Tucker-2: a k×k convolution as 1×1 → k×k core → 1×1 (Kim et al. 2015)."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from autorank.errors import RankError
from autorank.methods._base import BaseMethod, Factors, LayerStats, Rank, RefitTarget, conv_out_hw, dense_kernel_reason, last_factor_target
from autorank.methods._layers import Cost, LayerSpec, conv_flops, make_conv, weight_matrix
from autorank.methods._linalg import thin_svd
from autorank.methods._vbmf import evbmf_rank

__all__ = ["Tucker2", "hosvd_factors", "hooi_factors", "tucker_core"]

_INITS = ("hosvd", "hooi")
#: HOOI sweeps at most this many times ...
HOOI_MAX_ITER = 10
#: ... and stops earlier when the captured energy ‖core‖² grows by less than this fraction of ‖W‖²
HOOI_TOL = 1e-10


# ---------------------------------------------------------------------- the mathematics
def _orthonormal_basis(m: torch.Tensor) -> torch.Tensor:
    """A square orthogonal matrix whose leading columns are the left singular vectors of ``m``.

    Columns are ordered by decreasing singular value; when ``m`` has fewer columns
    than rows, the basis is completed with an orthonormal basis of the complement
    (singular value 0). Signs are fixed (largest-magnitude entry of each column
    positive) so that the result does not depend on the LAPACK build.
    """
    n = m.shape[0]
    u, _, _ = thin_svd(m)
    k = u.shape[1]
    if k < n:
        q = torch.linalg.qr(u, mode="complete").Q
        q[:, :k] = u
        u = q
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(n)])
    signs[signs == 0] = 1.0
    return u * signs


def _mode_unfold(w: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding of a 4-D tensor: (w.shape[mode], rest)."""
    return w.movedim(mode, 0).reshape(w.shape[mode], -1)


def tucker_core(w: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """``W ×0 U_outᵀ ×1 U_inᵀ``: (r_out, r_in, kh, kw)."""
    return torch.einsum("nchw,nb,ca->bahw", w, u_out, u_in)


def hosvd_factors(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full HOSVD of a conv kernel on its two channel modes, in float64.

    Returns ``(u_in (C×C), core (N×C×kh×kw), u_out (N×N))`` with
    ``W = core ×0 U_out ×1 U_in``; the truncation to (r_in, r_out) is
    ``u_in[:, :r_in]``, ``core[:r_out, :r_in]``, ``u_out[:, :r_out]``.
    """
    w = w.detach().to(device="cpu", dtype=torch.float64)
    u_out = _orthonormal_basis(_mode_unfold(w, 0))
    u_in = _orthonormal_basis(_mode_unfold(w, 1))
    return u_in, tucker_core(w, u_out, u_in), u_out


def hooi_factors(
    w: torch.Tensor,
    r_in: int,
    r_out: int,
    max_iter: int = HOOI_MAX_ITER,
    tol: float = HOOI_TOL,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Tucker-2 at (r_in, r_out) refined by HOOI (higher-order orthogonal iteration).

    Starts from the truncated HOSVD and alternates: ``U_out`` ← leading left
    singular vectors of ``W ×1 U_inᵀ`` (mode 0), ``U_in`` ← those of
    ``W ×0 U_outᵀ`` (mode 1). Each sweep cannot decrease ‖core‖² (the captured
    energy), so the reconstruction error never grows above HOSVD's.

    Returns ``(u_in (C×r_in), core (r_out×r_in×kh×kw), u_out (N×r_out), sweeps)``.
    """
    w = w.detach().to(device="cpu", dtype=torch.float64)
    u_in_full, _, u_out_full = hosvd_factors(w)
    u_in, u_out = u_in_full[:, :r_in], u_out_full[:, :r_out]
    total = float((w * w).sum())
    energy = float(tucker_core(w, u_out, u_in).square().sum())
    sweeps = 0
    for sweeps in range(1, max_iter + 1):  # noqa: B007 - the sweep count is reported after the loop
        y = torch.einsum("nchw,ca->nahw", w, u_in)  # W ×1 U_inᵀ
        u_out = _orthonormal_basis(_mode_unfold(y, 0))[:, :r_out]
        z = torch.einsum("nchw,nb->bchw", w, u_out)  # W ×0 U_outᵀ
        u_in = _orthonormal_basis(_mode_unfold(z, 1))[:, :r_in]
        new = float(tucker_core(w, u_out, u_in).square().sum())
        gain = new - energy
        energy = new
        if gain <= tol * total:
            break
    return u_in.contiguous(), tucker_core(w, u_out, u_in), u_out.contiguous(), sweeps


# ---------------------------------------------------------------------- the method
class Tucker2(BaseMethod):
    """Tucker-2 decomposition of a convolution kernel on its channel modes.

    A k×k convolution C → N becomes ``1×1 conv C → r_in`` (at the input
    resolution), ``k×k core conv r_in → r_out`` (with the layer's stride,
    padding, padding mode and dilation), ``1×1 conv r_out → N`` (with the bias).
    The factors come from the HOSVD of the kernel (nested: every rank pair is a
    slice of one factorization, exact at ``(in_channels, out_channels)``), or,
    with ``options={"init": "hooi"}``, are refined by HOOI for one rank pair.
    The rank ``"vbmf"`` picks (r_in, r_out) by EVBMF on the mode-1 and mode-0
    unfoldings, as in the paper.

    Options
    -------
    init : ``"hosvd"`` (default) or ``"hooi"`` (rank-specific, not nested).

    References
    ----------
    - Y.-D. Kim, E. Park, S. Yoo, T. Choi, L. Yang, D. Shin. Compression of Deep
      Convolutional Neural Networks for Fast and Low Power Mobile Applications.
      ICLR 2016, arXiv 1511.06530.
    - L. R. Tucker. Some mathematical notes on three-mode factor analysis.
      Psychometrika 31(3):279-311, 1966.
    - L. De Lathauwer, B. De Moor, J. Vandewalle. A multilinear singular value
      decomposition; On the best rank-1 and rank-(R1, R2, ..., RN) approximation of
      higher-order tensors. SIAM J. Matrix Anal. Appl. 21(4), 2000 (HOSVD, HOOI).
    - S. Nakajima, M. Sugiyama, S. D. Babacan, R. Tomioka. Global analytic solution
      of fully-observed variational Bayesian matrix factorization. JMLR 14, 2013 (EVBMF).
    """

    name = "tucker2"
    aliases = ("tucker", "tucker-2")
    layer_kinds = ("conv2d",)
    nested = True
    exact_at_max_rank = True
    data_aware = False
    structure = "Conv 1×1 C→r_in, k×k r_in→r_out, 1×1 r_out→N"
    reference = "Kim et al. ICLR 2016 (arXiv 1511.06530)"

    # ------------------------------------------------------------------ applicability
    def _applies(self, spec: LayerSpec) -> Optional[str]:
        return dense_kernel_reason(spec, "tucker2", "factors the channel modes of a dense kernel")

    # ------------------------------------------------------------------ ranks
    def max_rank(self, spec: LayerSpec) -> tuple[int, int]:
        return (spec.in_channels, spec.out_channels)

    def rank_arity(self) -> int:
        return 2

    rank_format = "[r_in, r_out] | r | vbmf"
    options_help = {"init": "hosvd (default; nested, one factorization for every rank) or hooi (refined per rank)"}

    def _check_options(self, options: dict) -> None:
        _init_of(options)

    def rank_help(self) -> str:
        return (
            "(r_in, r_out) pair of kept input and output channels (1..in_channels, 1..out_channels), "
            "int r for (r, r), 'vbmf' for the EVBMF estimate from the weights, "
            "or fraction ρ of FLOPs in (0, 1]"
        )

    def resolve_rank(
        self,
        module_or_spec,
        rank: Any,
        input_shape: Optional[Sequence[int]] = None,
        name: str = "",
    ) -> Rank:
        """As :meth:`BaseMethod.resolve_rank`, plus ``"vbmf"``: EVBMF on the layer's weights."""
        if isinstance(rank, str) and rank.strip().lower() == "vbmf":
            if isinstance(module_or_spec, LayerSpec):
                where = f"layer {name!r}, " if name else ""
                raise RankError(
                    f"{where}method {self.name!r}: rank 'vbmf' needs the layer's weights, not only its shape "
                    f"({module_or_spec.describe()})"
                )
            return self.suggest_rank(module_or_spec, name=name)
        return super().resolve_rank(module_or_spec, rank, input_shape, name)

    def suggest_rank(self, module: nn.Module, name: str = "") -> tuple[int, int]:
        """(r_in, r_out) estimated by EVBMF on the mode-1 and mode-0 unfoldings of the kernel."""
        self.check_applies(module, name)
        w = weight_matrix(module).to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(w).all():
            where = f"layer {name!r}, " if name else ""
            raise RankError(f"{where}method {self.name!r}: rank 'vbmf' needs finite weights")
        r_in = evbmf_rank(_mode_unfold(w, 1))
        r_out = evbmf_rank(_mode_unfold(w, 0))
        return (r_in, r_out)

    def is_nested(self, options: Optional[dict]) -> bool:
        """True for HOSVD (one factorization serves every rank), False for HOOI."""
        return _init_of(options) == "hosvd"

    def truncation_view(self, rank: Rank) -> Optional[tuple[str, Any]]:
        r_in, r_out = _as_pair(rank)
        return ("tucker2", (int(r_in), int(r_out)))

    # ------------------------------------------------------------------ cost
    def _cost(self, spec: LayerSpec, rank: Rank, input_shape: tuple[int, ...]) -> Cost:
        r_in, r_out = _as_pair(rank)
        b, h, w, oh, ow = conv_out_hw(spec, input_shape)
        kh, kw = spec.kernel_size
        c, n = spec.in_channels, spec.out_channels
        params = c * r_in + r_out * r_in * kh * kw + n * r_out + (n if spec.bias else 0)
        flops = (
            conv_flops(b, r_in, c, 1, 1, h, w)  # the first 1×1 runs at the input resolution
            + conv_flops(b, r_out, r_in, kh, kw, oh, ow)
            + conv_flops(b, n, r_out, 1, 1, oh, ow)
        )
        return Cost(params, flops)

    # ------------------------------------------------------------------ factorize / build
    def options_key(self, options: Optional[dict]) -> dict:
        return {"init": _init_of(options)}

    def _factorize(self, module, spec: LayerSpec, stats: Optional[LayerStats], rank, options: dict) -> Factors:
        init = _init_of(options)
        w = weight_matrix(module)
        if init == "hosvd":
            u_in, core, u_out = hosvd_factors(w)
            return Factors({"u_in": u_in, "core": core, "u_out": u_out}, {"init": "hosvd"})
        if rank is None:
            raise ValueError(f"method {self.name!r} with init='hooi' is not nested: factorize() needs a rank")
        r_in, r_out = self.normalize_rank(spec, rank)
        u_in, core, u_out, sweeps = hooi_factors(w, r_in, r_out)
        return Factors(
            {"u_in": u_in, "core": core, "u_out": u_out},
            {"init": "hooi", "rank": [r_in, r_out], "sweeps": sweeps},
        )

    def refit_target(self, replacement: nn.Module) -> Union[RefitTarget, str]:
        """The last 1×1 convolution r_out→N and the bias (the first 1×1 and the core stay; see autorank.training.refit)."""
        return last_factor_target(replacement)

    def _build(self, spec: LayerSpec, factors: Optional[Factors], rank, options, bias, device, dtype) -> list[nn.Module]:
        r_in, r_out = _as_pair(rank)
        c, n = spec.in_channels, spec.out_channels
        kh, kw = spec.kernel_size
        w1 = w2 = w3 = None
        if factors is not None:
            t = factors.tensors
            stored = factors.meta.get("rank")
            if stored is not None and tuple(stored) != (r_in, r_out):
                raise ValueError(
                    f"method {self.name!r}: factors were computed for rank {list(stored)}, not {[r_in, r_out]}"
                )
            u_in, core, u_out = t["u_in"], t["core"], t["u_out"]
            if u_in.shape[1] < r_in or u_out.shape[1] < r_out:
                raise ValueError(
                    f"method {self.name!r}: factors hold ranks up to {[u_in.shape[1], u_out.shape[1]]}, "
                    f"asked {[r_in, r_out]}"
                )
            w1 = u_in[:, :r_in].T.reshape(r_in, c, 1, 1)
            w2 = core[:r_out, :r_in]
            w3 = u_out[:, :r_out].reshape(n, r_out, 1, 1)
        kw_ = {"device": device, "dtype": dtype}
        first = make_conv(c, r_in, (1, 1), weight=w1, **kw_)
        middle = make_conv(
            r_in, r_out, (kh, kw), stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
            padding_mode=spec.padding_mode, weight=w2, **kw_,
        )
        last = make_conv(r_out, n, (1, 1), weight=w3, bias=bias, has_bias=spec.bias or bias is not None, **kw_)
        return [first, middle, last]


def _init_of(options: Optional[dict]) -> str:
    init = str((options or {}).get("init", "hosvd")).strip().lower()
    if init not in _INITS:
        raise ValueError(f"method 'tucker2': unknown init {init!r}; choose one of {', '.join(_INITS)}")
    return init


def _as_pair(rank: Rank) -> tuple[int, int]:
    if isinstance(rank, int):
        return (rank, rank)
    r_in, r_out = rank
    return (int(r_in), int(r_out))
