"""The machinery shared by the tensor-network methods ``tt`` and ``tr``.

- how a layer's dimensions are split into small factors (:func:`train_layout`);
- the TT-SVD (full, right-orthogonal) and its truncation to any bond ranks
  (:func:`tt_svd_full`, :func:`tt_truncate`): nested, one factorization serves
  every rank;
- the replacement modules, written for a *ring* of cores (``ring=1`` is a
  train): :class:`TensorNetworkLinear` and :class:`TensorNetworkConv2d`. Their
  forward passes contract the input with one small core at a time and never
  rebuild the dense weight;
- the exact cost of those modules (:func:`network_cost`), in fvcore's convention
  (one multiply-add = one FLOP).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from autorank.errors import RankError
from autorank.methods._base import BaseMethod, Rank, conv_out_hw, dense_kernel_reason, memory_limit
from autorank.methods._layers import Cost, LayerSpec, conv_flops, layer_spec, make_conv, rows_of, weight_matrix
from autorank.methods._linalg import thin_svd

__all__ = [
    "NetworkMethod",
    "bond_ranks",
    "network_full",
    "tt_svd_memory_bytes",
    "MEMORY_LIMIT_ENV",
    "TrainLayout",
    "train_layout",
    "balanced_factors",
    "tt_svd_full",
    "tt_truncate",
    "network_cost",
    "network_modules",
    "TensorNetworkLinear",
    "TensorNetworkConv2d",
    "layout_reason",
    "weight_tensor",
    "MAX_FACTOR",
    "MAX_PRIME",
]

logger = logging.getLogger("autorank")

#: the automatic split of a dimension uses the fewest factors that are all <= this
MAX_FACTOR = 16
#: a Linear whose in or out features have a prime factor above this is refused (it factors poorly)
MAX_PRIME = 64
#: at most this many cores per dimension
MAX_CORES = 6
#: environment variable overriding :data:`DEFAULT_MEMORY_LIMIT` (bytes)
MEMORY_LIMIT_ENV = "AUTORANK_TT_MEMORY_LIMIT"


# ---------------------------------------------------------------------- factorising dimensions
def _divisors(n: int) -> list[int]:
    small, large = [], []
    i = 1
    while i * i <= n:
        if n % i == 0:
            small.append(i)
            if i * i != n:
                large.append(n // i)
        i += 1
    return small + large[::-1]


def largest_prime_factor(n: int) -> int:
    """The largest prime factor of ``n`` (1 for n <= 1)."""
    best, p = 1, 2
    while p * p <= n:
        while n % p == 0:
            best, n = p, n // p
        p += 1
    return max(best, n) if n > 1 else best


@functools.lru_cache(maxsize=4096)
def balanced_factors(n: int, d: int) -> tuple[int, ...]:
    """``n`` as ``d`` factors (ascending, 1s allowed) with the smallest largest factor.

    Ties are broken by the smallest sum of squares (the most even split):
    ``balanced_factors(768, 3) == (8, 8, 12)``, ``balanced_factors(13, 2) == (1, 13)``.
    """
    if n < 1 or d < 1:
        raise ValueError(f"cannot split {n} into {d} factors")
    best: list[Any] = [None, None]

    def rec(rem: int, k: int, start: int, acc: tuple[int, ...]) -> None:
        if k == 1:
            if rem >= start:
                cand = acc + (rem,)
                key = (cand[-1], sum(f * f for f in cand))
                if best[0] is None or key < best[0]:
                    best[0], best[1] = key, cand
            return
        for f in _divisors(rem):
            if f < start:
                continue
            if f**k > rem:
                break
            rec(rem // f, k - 1, f, acc + (f,))

    rec(n, d, 1, ())
    return best[1]


def _cores_for(n: int) -> int:
    """The fewest factors (1..MAX_CORES) whose balanced split of ``n`` keeps every factor <= MAX_FACTOR."""
    best_d, best_max = 1, n
    for d in range(1, MAX_CORES + 1):
        m = balanced_factors(n, d)[-1]
        if m <= MAX_FACTOR:
            return d
        if m < best_max:
            best_d, best_max = d, m
    return best_d


@dataclass(frozen=True)
class TrainLayout:
    """How a layer's weight is laid out as a chain (or ring) of cores.

    ``kind == "matrix"`` (Linear, Conv1D): core k has mode ``out_factors[k] * in_factors[k]``
    (a TT-matrix); the out index is the major one. ``kind == "conv"``: the cores are the
    input-channel factors (``in_factors``, the first one major), then the spatial
    core (``kh * kw``), then the output-channel factors (``out_factors``).
    """

    kind: str
    in_factors: tuple[int, ...]
    out_factors: tuple[int, ...]
    kernel: tuple[int, int] = (1, 1)

    @property
    def modes(self) -> tuple[int, ...]:
        if self.kind == "matrix":
            return tuple(o * i for o, i in zip(self.out_factors, self.in_factors))
        return self.in_factors + (self.kernel[0] * self.kernel[1],) + self.out_factors

    @property
    def n_cores(self) -> int:
        return len(self.modes)

    @property
    def bounds(self) -> tuple[int, ...]:
        """The largest useful rank of each inner bond: min(product of modes left, right)."""
        m = self.modes
        return tuple(min(math.prod(m[:k]), math.prod(m[k:])) for k in range(1, len(m)))

    def describe(self) -> str:
        if self.kind == "matrix":
            return f"in {'x'.join(map(str, self.in_factors))}, out {'x'.join(map(str, self.out_factors))}"
        kh, kw = self.kernel
        return f"in {'x'.join(map(str, self.in_factors))}, {kh}x{kw}, out {'x'.join(map(str, self.out_factors))}"


def layout_reason(spec: LayerSpec, method: str) -> Optional[str]:
    """Why ``method`` (a tensor-network method) refuses ``spec``, or None."""
    if spec.is_conv:
        return dense_kernel_reason(spec, method, "splits the channel modes of a dense kernel")
    for what, n in (("in_features", spec.in_channels), ("out_features", spec.out_channels)):
        p = largest_prime_factor(n)
        if p > MAX_PRIME:
            return (
                f"{what}={n} has the prime factor {p} > {MAX_PRIME}: {method} needs dimensions that split "
                f"into small factors (use svd)"
            )
    if len(_matrix_layout(spec.in_channels, spec.out_channels).modes) < 2:
        return f"{spec.in_channels}->{spec.out_channels} is too small to split into a chain of two cores (use svd)"
    return None


def _matrix_layout(n_in: int, n_out: int) -> TrainLayout:
    d = max(2, _cores_for(n_in), _cores_for(n_out))
    fi = balanced_factors(n_in, d)  # ascending: the last contraction (core 1) touches the output times i_1
    fo = balanced_factors(n_out, d)[::-1]  # descending: the first contraction (core d) touches the input times o_d
    pairs = [(i, o) for i, o in zip(fi, fo) if i * o > 1]
    return TrainLayout("matrix", tuple(i for i, _ in pairs), tuple(o for _, o in pairs))


@functools.lru_cache(maxsize=4096)
def _layout_cached(kind: str, n_in: int, n_out: int, kernel: tuple[int, int]) -> TrainLayout:
    if kind != "conv":
        return _matrix_layout(n_in, n_out)
    # input factors descending (an early large factor shrinks the chain quickly),
    # output factors ascending (the chain grows into the large factors last)
    fi = tuple(f for f in balanced_factors(n_in, _cores_for(n_in))[::-1] if f > 1) or (1,)
    fo = tuple(f for f in balanced_factors(n_out, _cores_for(n_out)) if f > 1) or (1,)
    return TrainLayout("conv", fi, fo, kernel)


def train_layout(spec: LayerSpec) -> TrainLayout:
    """The automatic layout of ``spec``: 768 -> 8x8x12, 3072 -> 12x16x16, conv 64 -> 8x8."""
    if spec.is_conv:
        return _layout_cached("conv", spec.in_channels, spec.out_channels, spec.kernel_size)
    return _layout_cached("matrix", spec.in_channels, spec.out_channels, (1, 1))


def weight_tensor(module: nn.Module, layout: TrainLayout) -> torch.Tensor:
    """The layer's weight as a float64 tensor with one axis per core (``layout.modes``)."""
    w = weight_matrix(module).detach().to(device="cpu", dtype=torch.float64)
    if layout.kind == "matrix":
        d = len(layout.in_factors)
        t = w.reshape(*layout.out_factors, *layout.in_factors)
        perm = [a for k in range(d) for a in (k, d + k)]
        return t.permute(perm).reshape(layout.modes).contiguous()
    return w.permute(1, 2, 3, 0).reshape(layout.modes).contiguous()


def tt_svd_memory_bytes(modes: Sequence[int]) -> int:
    """An estimate of the peak memory (bytes, float64) of :func:`tt_svd_full` on a tensor of ``modes``."""
    n = math.prod(modes)
    peak, r = 0, 1
    for k in range(len(modes) - 1, 0, -1):
        rows, cols = math.prod(modes[:k]), modes[k] * r
        t = min(rows, cols)
        peak = max(peak, t * (rows + cols) + rows * cols)
        r = t
    return 8 * (3 * n + peak)


# ---------------------------------------------------------------------- TT-SVD
def tt_svd_full(a: torch.Tensor) -> list[torch.Tensor]:
    """Exact TT decomposition of ``a`` (float64), right-orthogonal: cores 2..d have orthonormal rows.

    Computed right to left by successive SVDs without truncation, so the bond
    ranks are the bounds ``min(prod(modes[:k]), prod(modes[k:]))``. The first
    core carries the norm. Any truncation is then :func:`tt_truncate`.
    """
    dims = tuple(a.shape)
    d = len(dims)
    cores: list[Optional[torch.Tensor]] = [None] * d
    r_next = 1
    cur = a.reshape(math.prod(dims[:-1]), dims[-1])
    for k in range(d - 1, 0, -1):
        u, s, vh = thin_svd(cur)
        t = s.shape[0]
        cores[k] = vh.reshape(t, dims[k], r_next).contiguous()
        cur = (u * s).reshape(math.prod(dims[: k - 1]), dims[k - 1] * t)
        r_next = t
    cores[0] = cur.reshape(1, dims[0], r_next).contiguous()
    return cores  # type: ignore[return-value]


def tt_truncate(cores: Sequence[torch.Tensor], ranks: Sequence[int]) -> list[torch.Tensor]:
    """Truncate a right-orthogonal TT (from :func:`tt_svd_full`) to bond ``ranks`` (d-1 values).

    A left-to-right sweep of SVDs of one core at a time: because the rest of the
    train is right-orthogonal, the singular values of each core's unfolding are
    those of the full tensor's unfolding, so the result is exactly the truncated
    TT-SVD of the original tensor (Oseledets 2011, Alg. 1), with error at most
    sqrt(sum of the squared discarded singular values over all bonds). Cheap: the
    dense tensor is never formed.
    """
    d = len(cores)
    if len(ranks) != d - 1:
        raise ValueError(f"{d} cores need {d - 1} bond ranks, got {list(ranks)}")
    out: list[torch.Tensor] = []
    g = cores[0]
    for k in range(d - 1):
        rl, n, rfull = g.shape
        t = int(ranks[k])
        if t > min(rl * n, rfull):
            raise ValueError(f"bond {k + 1}: rank {t} exceeds what the cores hold ({min(rl * n, rfull)})")
        u, s, vh = thin_svd(g.reshape(rl * n, rfull))
        out.append(u[:, :t].reshape(rl, n, t))
        nxt = cores[k + 1]
        g = ((s[:t, None] * vh[:t]) @ nxt.reshape(nxt.shape[0], -1)).reshape(t, nxt.shape[1], nxt.shape[2])
    out.append(g)
    return out


def network_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The dense tensor of a train or ring of cores (trace over the ring bond). For tests and small layers."""
    acc = cores[0]  # (R, n1, r1)
    for g in cores[1:]:
        left, cols, mid = acc.shape
        acc = (acc.reshape(left * cols, mid) @ g.reshape(mid, -1)).reshape(left, cols * g.shape[1], g.shape[2])
    full = torch.diagonal(acc, dim1=0, dim2=2).sum(-1)
    return full.reshape([g.shape[1] for g in cores])


# ---------------------------------------------------------------------- ranks
def bond_ranks(layout: TrainLayout, rank: Rank, ring: bool) -> tuple[int, ...]:
    """The d+1 bond ranks (r_0, r_1, ..., r_d) of ``rank`` on ``layout``; r_0 = r_d is the ring bond (1 for a train).

    An int r gives every inner bond min(r, its bound) (and the ring bond r); a
    tuple gives them one by one (for a ring, the ring bond first).
    """
    b = layout.bounds
    if isinstance(rank, (tuple, list)):
        vals = [int(v) for v in rank]
        if ring:
            ring_r, inner = vals[0], vals[1:]
        else:
            ring_r, inner = 1, vals
        if len(inner) != len(b):
            raise ValueError(f"{len(b)} inner bonds need {len(b)} ranks, got {list(rank)}")
        inner = [min(r, m) for r, m in zip(inner, b)]
    else:
        r = int(rank)
        ring_r = r if ring else 1
        inner = [min(r, m) for m in b]
    return (ring_r, *inner, ring_r)


# ---------------------------------------------------------------------- cost
def network_cost(spec: LayerSpec, layout: TrainLayout, rr: Sequence[int], input_shape: Sequence[int]) -> Cost:
    """Exact parameters and FLOPs of :func:`network_modules` (fvcore's count: one multiply-add = one FLOP)."""
    bias = spec.out_channels if spec.bias else 0
    R = rr[0]
    params = sum(rr[k] * m * rr[k + 1] for k, m in enumerate(layout.modes)) + bias
    if layout.kind == "matrix":
        rows = rows_of(input_shape)
        fi, fo = layout.in_factors, layout.out_factors
        d = len(fi)
        flops = 0
        for k in range(d):  # core k contracts (i_k, r_{k+1}) into (r_k, o_k), with the ring bond carried
            i_le = math.prod(fi[: k + 1])
            o_ge = math.prod(fo[k:])
            carry = R if 0 < k < d - 1 else 1
            flops += rows * carry * i_le * o_ge * rr[k] * rr[k + 1]
        return Cost(params, flops)
    b, h, w, oh, ow = conv_out_hw(spec, input_shape)
    ci, co = layout.in_factors, layout.out_factors
    p, q = len(ci), len(co)
    kh, kw = spec.kernel_size
    flops = conv_flops(b, R * rr[1], ci[0], 1, 1, math.prod(ci[1:]) * h, w)
    for k in range(1, p):
        flops += conv_flops(b * R, rr[k + 1], rr[k] * ci[k], 1, 1, math.prod(ci[k + 1 :]) * h, w)
    flops += conv_flops(b * R, rr[p + 1], rr[p], kh, kw, oh, ow)
    for j in range(q):
        ra, rb = rr[p + 1 + j], rr[p + 2 + j]
        n_before = math.prod(co[:j])
        if j < q - 1:
            flops += conv_flops(b * R * n_before, co[j] * rb, ra, 1, 1, oh, ow)
        else:
            flops += conv_flops(b * n_before, co[j], R * ra, 1, 1, oh, ow)
    return Cost(params, flops)


# ---------------------------------------------------------------------- modules
def _param(t: Optional[torch.Tensor], shape: Sequence[int], device, dtype) -> nn.Parameter:
    if t is None:
        return nn.Parameter(torch.empty(tuple(shape), device="meta", dtype=dtype))
    if tuple(t.shape) != tuple(shape):
        raise RuntimeError(f"internal: core shape {tuple(t.shape)} != {tuple(shape)}")
    return nn.Parameter(t.to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True))


class TensorNetworkLinear(nn.Module):
    """``y = W x + b`` with W a TT-matrix (``ring == 1``) or a TR-matrix, never formed.

    Core k (0-based) of the chain has shape (r_k, o_k, i_k, r_{k+1}); it is
    stored in the layout its matrix product uses. The input (..., prod i) is
    contracted with the last core first (input modes shrink, output modes
    appear), one ``torch.matmul`` of a reshaped 2-D view per core, the ring bond
    carried along as a batch index and closed by the first core.
    """

    def __init__(
        self,
        in_factors: Sequence[int],
        out_factors: Sequence[int],
        ranks: Sequence[int],
        cores: Optional[Sequence[torch.Tensor]] = None,
        bias: Optional[torch.Tensor] = None,
        has_bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_factors = tuple(int(v) for v in in_factors)
        self.out_factors = tuple(int(v) for v in out_factors)
        self.ranks = tuple(int(v) for v in ranks)
        self.in_features = math.prod(self.in_factors)
        self.out_features = math.prod(self.out_factors)
        fi, fo, rr = self.in_factors, self.out_factors, self.ranks
        d = len(fi)
        if d < 2 or len(fo) != d or len(rr) != d + 1 or rr[0] != rr[-1]:
            raise ValueError(f"internal: inconsistent tensor-network layout {fi} {fo} {rr}")
        params = []
        for k in range(d):
            shape = self._stored_shape(k)
            t = None
            if cores is not None:
                t = cores[k].reshape(rr[k], fo[k], fi[k], rr[k + 1]).permute(*self._perm(k))
            params.append(_param(t, shape, device, dtype))
        self.cores = nn.ParameterList(params)
        if has_bias or bias is not None:
            b = None if cores is None else (bias if bias is not None else torch.zeros(self.out_features))
            self.bias = _param(b, (self.out_features,), device, dtype)
        else:
            self.register_parameter("bias", None)

    def _perm(self, k: int) -> tuple[int, ...]:
        d = len(self.in_factors)
        if k == d - 1:
            return (2, 0, 1, 3)  # (i, r_k, o, R)
        if k == 0:
            return (0, 2, 3, 1)  # (R, i, r_1, o)
        return (2, 3, 0, 1)  # (i, r_{k+1}, r_k, o)

    def _stored_shape(self, k: int) -> tuple[int, ...]:
        src = (self.ranks[k], self.out_factors[k], self.in_factors[k], self.ranks[k + 1])
        return tuple(src[a] for a in self._perm(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fi, fo, rr = self.in_factors, self.out_factors, self.ranks
        d, R = len(fi), rr[0]
        lead = x.shape[:-1]
        # core d-1: (B·I<, i) @ (i, r·o·R)
        g = self.cores[d - 1]
        i_lt = math.prod(fi[:-1])
        s = torch.matmul(x.reshape(-1, fi[-1]), g.reshape(fi[-1], -1))
        s = s.reshape(-1, i_lt, rr[d - 1], fo[-1], R).permute(0, 4, 3, 1, 2)  # (B, R, o, I<, r)
        for k in range(d - 2, 0, -1):
            g = self.cores[k]
            i_lt = math.prod(fi[:k])
            o_gt = math.prod(fo[k + 1 :])
            s = torch.matmul(s.reshape(-1, fi[k] * rr[k + 1]), g.reshape(fi[k] * rr[k + 1], rr[k] * fo[k]))
            s = s.reshape(-1, R, o_gt, i_lt, rr[k], fo[k]).permute(0, 1, 5, 2, 3, 4)  # (B, R, o_k, O>, I<, r_k)
        # core 0 closes the ring: contract (R, i_0, r_1)
        g = self.cores[0]
        o_gt = math.prod(fo[1:])
        s = s.reshape(-1, R, o_gt, fi[0] * rr[1]).permute(0, 2, 1, 3).reshape(-1, R * fi[0] * rr[1])
        s = torch.matmul(s, g.reshape(R * fi[0] * rr[1], fo[0]))
        y = s.reshape(-1, o_gt, fo[0]).transpose(1, 2).reshape(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"in={'x'.join(map(str, self.in_factors))}, out={'x'.join(map(str, self.out_factors))}, ranks={list(self.ranks)}"


class TensorNetworkConv2d(nn.Module):
    """A Conv2d as a chain (``ring == 1``) or ring of small convolutions, the kernel never formed.

    Input channels C = c_1·…·c_p, output channels N = n_1·…·n_q. The input is
    viewed as (B, c_1, c_2…c_p·H, W) and reduced one channel factor at a time by
    1×1 convolutions on reshaped views (``in_convs``), then the spatial core runs
    as a k×k convolution r_p → r_{p+1} with the layer's stride, padding, padding
    mode and dilation (``core``), then 1×1 convolutions grow the output factors
    one at a time with the already produced ones in the batch (``out_convs``).
    The ring bond (tensor ring) is carried in the batch and closed by the last one.
    """

    def __init__(self, spec: LayerSpec, layout: TrainLayout, ranks: Sequence[int], convs: Sequence[nn.Module],
                 bias: Optional[nn.Parameter]):
        super().__init__()
        self.in_factors = layout.in_factors
        self.out_factors = layout.out_factors
        self.ranks = tuple(int(v) for v in ranks)
        self.out_channels = spec.out_channels
        p, q = len(layout.in_factors), len(layout.out_factors)
        self.in_convs = nn.ModuleList(convs[:p])
        self.core = convs[p]
        self.out_convs = nn.ModuleList(convs[p + 1 :])
        if len(self.out_convs) != q:
            raise ValueError("internal: wrong number of convolutions")
        if bias is not None:
            self.bias = bias
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ci, co, rr = self.in_factors, self.out_factors, self.ranks
        p, q, R = len(ci), len(co), rr[0]
        b, _, h, w = x.shape
        s = self.in_convs[0](x.reshape(b, ci[0], -1, w))  # (B, R·r_1, C>·H, W)
        for k in range(1, p):
            s = self.in_convs[k](s.reshape(b * R, rr[k] * ci[k], -1, w))
        s = self.core(s.reshape(b * R, rr[p], h, w))
        oh, ow = s.shape[-2], s.shape[-1]
        for j in range(q - 1):
            s = self.out_convs[j](s.reshape(-1, rr[p + 1 + j], oh, ow))
        ra = rr[p + q]
        n_before = math.prod(co[:-1])
        s = s.reshape(b, R, n_before, ra, oh, ow).transpose(1, 2).reshape(b * n_before, R * ra, oh, ow)
        y = self.out_convs[q - 1](s).reshape(b, self.out_channels, oh, ow)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return f"in={'x'.join(map(str, self.in_factors))}, out={'x'.join(map(str, self.out_factors))}, ranks={list(self.ranks)}"


def network_modules(
    spec: LayerSpec,
    layout: TrainLayout,
    rr: Sequence[int],
    cores: Optional[Sequence[torch.Tensor]],
    bias: Optional[torch.Tensor],
    device,
    dtype,
) -> list[nn.Module]:
    """The replacement for ``spec`` from cores (r_k, mode_k, r_{k+1}) of ``layout`` (a meta skeleton when None)."""
    has_bias = spec.bias or bias is not None
    if layout.kind == "matrix":
        return [TensorNetworkLinear(layout.in_factors, layout.out_factors, rr, cores, bias, has_bias, device, dtype)]
    ci, co = layout.in_factors, layout.out_factors
    p, q, R = len(ci), len(co), rr[0]
    kh, kw = spec.kernel_size
    kw_ = {"device": device, "dtype": dtype}
    c = cores
    convs: list[nn.Module] = []
    convs.append(make_conv(ci[0], R * rr[1], (1, 1),
                           weight=None if c is None else c[0].permute(0, 2, 1).reshape(R * rr[1], ci[0], 1, 1), **kw_))
    for k in range(1, p):
        wt = None if c is None else c[k].reshape(rr[k] * ci[k], rr[k + 1]).T.reshape(rr[k + 1], rr[k] * ci[k], 1, 1)
        convs.append(make_conv(rr[k] * ci[k], rr[k + 1], (1, 1), weight=wt, **kw_))
    wt = None if c is None else c[p].reshape(rr[p], kh, kw, rr[p + 1]).permute(3, 0, 1, 2)
    convs.append(make_conv(rr[p], rr[p + 1], (kh, kw), stride=spec.stride, padding=spec.padding,
                           dilation=spec.dilation, padding_mode=spec.padding_mode, weight=wt, **kw_))
    for j in range(q):
        g = None if c is None else c[p + 1 + j]  # (r_a, n_j, r_b)
        ra, rb = rr[p + 1 + j], rr[p + 2 + j]
        if j < q - 1:
            wt = None if g is None else g.permute(1, 2, 0).reshape(co[j] * rb, ra, 1, 1)
            convs.append(make_conv(ra, co[j] * rb, (1, 1), weight=wt, **kw_))
        else:
            wt = None if g is None else g.permute(1, 2, 0).reshape(co[j], R * ra, 1, 1)
            convs.append(make_conv(R * ra, co[j], (1, 1), weight=wt, **kw_))
    bias_p = None
    if has_bias:
        b = None if cores is None else (bias if bias is not None else torch.zeros(spec.out_channels))
        bias_p = _param(b, (spec.out_channels,), device, dtype)
    return [TensorNetworkConv2d(spec, layout, rr, convs, bias_p)]


# ---------------------------------------------------------------------- the base class of tt and tr
class NetworkMethod(BaseMethod):
    """What ``tt`` and ``tr`` share: layouts, bond-rank validation, cost."""

    layer_kinds = ("linear", "conv1d", "conv2d")
    ring: bool = False

    def _applies(self, spec: LayerSpec) -> Optional[str]:
        return layout_reason(spec, self.name)

    def refit_target(self, replacement: nn.Module) -> str:
        """Not re-fitted: every core is contracted inside one module, none is a separate linear layer."""
        return (f"method {self.name!r} is not re-fitted: its cores are contracted inside one "
                f"{'tensor-ring' if self.ring else 'tensor-train'} module, with no separate last factor to solve")

    def layout(self, module_or_spec) -> TrainLayout:
        """The automatic split of the layer's dimensions into cores."""
        spec = module_or_spec if isinstance(module_or_spec, LayerSpec) else layer_spec(module_or_spec)
        return train_layout(spec)

    def bond_bounds(self, spec: LayerSpec) -> tuple[int, ...]:
        """The largest rank of each bond a rank tuple lists (for a ring: the ring bond first)."""
        b = train_layout(spec).bounds
        return ((max(b),) + b) if self.ring else b

    def max_rank(self, spec: LayerSpec) -> int:
        return max(train_layout(spec).bounds)

    def normalize_rank(self, spec: LayerSpec, rank: Any, name: str = "") -> Rank:
        where = f"layer {name!r}, " if name else ""
        bounds = self.bond_bounds(spec)
        mx = max(bounds)
        if isinstance(rank, (list, tuple)) and len(rank) == 1:
            rank = rank[0]
        if isinstance(rank, bool):
            raise RankError(f"{where}method {self.name!r}: rank must be a number, got {rank!r}")
        if isinstance(rank, int):
            if rank < 1 or rank > mx:
                raise RankError(f"{where}method {self.name!r}: rank {rank} is out of range 1..{mx}")
            return int(rank)
        if isinstance(rank, (list, tuple)):
            if len(rank) != len(bounds) or not all(isinstance(r, int) and not isinstance(r, bool) for r in rank):
                what = "the ring bond then the inner bonds" if self.ring else "one per inner bond"
                raise RankError(
                    f"{where}method {self.name!r}: a rank tuple needs {len(bounds)} integers ({what}) for "
                    f"{spec.describe()} ({train_layout(spec).describe()}), got {list(rank)}"
                )
            for r, m in zip(rank, bounds):
                if r < 1 or r > m:
                    raise RankError(f"{where}method {self.name!r}: rank {list(rank)} is out of range (1..{list(bounds)})")
            return tuple(int(r) for r in rank)
        raise RankError(
            f"{where}method {self.name!r}: rank must be an integer, {len(bounds)} integers or a fraction in (0, 1], got {rank!r}"
        )

    def _cost(self, spec: LayerSpec, rank: Rank, input_shape: tuple[int, ...]) -> Cost:
        layout = train_layout(spec)
        return network_cost(spec, layout, bond_ranks(layout, rank, self.ring), input_shape)

    def _check_options(self, options: dict) -> None:
        memory_limit(options, self.name, MEMORY_LIMIT_ENV)
