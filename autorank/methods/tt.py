"""Tensor train: a Linear as a TT-matrix (Novikov et al. 2015), a Conv2d as a chain of small convolutions.

The layouts, the TT-SVD, the replacement modules and their costs are shared with
tensor ring and live in :mod:`autorank.methods._tensor_network`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from autorank.errors import RankError, RankTooLargeError
from autorank.methods._base import Factors, LayerStats, memory_limit
from autorank.methods._layers import LayerSpec
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

__all__ = ["TT"]


class TT(NetworkMethod):
    """Tensor train (TT) decomposition of a Linear (TT-matrix) or a Conv2d (chain of small convolutions).

    - Linear (out × in) and GPT-2 ``Conv1D``: in and out features are split into
      d balanced factors (768 → 8·8·12, 3072 → 12·16·16; the fewest factors that
      are all ≤ 16, at least 2), paired core by core as a TT-matrix
      ``W[(o_1…o_d), (i_1…i_d)] = G_1[o_1, i_1] ⋯ G_d[o_d, i_d]`` (Novikov et al.).
      The forward contracts the input with one core at a time (one matmul of a
      reshaped view each). Features with a prime factor > 64 are refused (they
      factor poorly; a TT-matrix of a prime dimension is a plain SVD).
    - Conv2d k×k, C → N: the kernel, as a tensor with modes
      (c_1, …, c_p, k·k, n_1, …, n_q), is a train: 1×1 convolutions reduce the
      input-channel factors one at a time (on reshaped views, no copies), a
      k×k convolution r_p → r_{p+1} is the spatial core (the layer's stride,
      padding, padding mode, dilation), 1×1 convolutions grow the output-channel
      factors one at a time. Garipov et al. put the spatial core first; it is
      placed between the channel cores here, as in Tucker-2, so that the k×k
      convolution runs on r channels. With p = q = 1 this is Tucker-2 computed
      by TT-SVD. Grouped, depthwise and 1×1 convolutions are refused.

    The rank is the TT-rank: an int r (every inner bond min(r, its bound)) or a
    tuple of d−1 bond ranks. Factorization: one exact TT-SVD per layer
    (right-orthogonal, float64); any rank is then a truncation sweep over the
    small cores (nested; equal to the truncated TT-SVD). Exact at
    :meth:`max_rank` (the largest bond bound).

    Options
    -------
    memory_limit_bytes : refuse layers whose TT-SVD would need more memory
        (default 4 GiB, or ``AUTORANK_TT_MEMORY_LIMIT``).

    References
    ----------
    - A. Novikov, D. Podoprikhin, A. Osokin, D. Vetrov. Tensorizing Neural Networks.
      NeurIPS 2015, arXiv 1509.06569 (TT-matrix fully-connected layers).
    - T. Garipov, D. Podoprikhin, A. Novikov, D. Vetrov. Ultimate tensorization:
      compressing convolutional and FC layers alike. arXiv 1611.03214, 2016.
    - I. V. Oseledets. Tensor-Train Decomposition. SIAM J. Sci. Comput. 33(5):2295-2317,
      2011 (TT-SVD).
    """

    name = "tt"
    aliases = ("tensor-train", "tt-matrix")
    nested = True
    exact_at_max_rank = True
    data_aware = False
    ring = False
    structure = "TT-matrix chain of matmuls | Conv 1×1 chain C→r, k×k r→r, 1×1 chain r→N"
    reference = "Novikov et al. NeurIPS 2015; Garipov et al. 2016 (arXiv 1611.03214)"
    rank_format = "r | [r_1, ..., r_(d-1)]"
    options_help = {
        "memory_limit_bytes": f"refuse layers whose TT-SVD needs more memory (default 4 GiB or ${MEMORY_LIMIT_ENV})",
    }

    def rank_help(self) -> str:
        return (
            "int r, the TT-rank of every inner bond (capped by each bond's bound), a list of the d-1 bond "
            "ranks, or fraction ρ of FLOPs in (0, 1]"
        )

    def _factorize(self, module, spec: LayerSpec, stats: Optional[LayerStats], rank, options: dict) -> Factors:
        layout = train_layout(spec)
        need = tt_svd_memory_bytes(layout.modes)
        limit = memory_limit(options, self.name, MEMORY_LIMIT_ENV)
        if need > limit:
            raise RankTooLargeError(
                f"method 'tt': layer {spec.describe()}: TT-SVD would need about {need / 1e9:.3g} GB, over the "
                f"limit of {limit / 1e9:.3g} GB (options['memory_limit_bytes'] or {MEMORY_LIMIT_ENV})"
            )
        a = weight_tensor(module, layout)
        if not torch.isfinite(a).all():
            raise RankError(f"method 'tt': layer {spec.describe()} has non-finite weights")
        cores = tt_svd_full(a)
        return Factors(
            {f"core{k}": c for k, c in enumerate(cores)},
            {"modes": list(layout.modes), "in_factors": list(layout.in_factors), "out_factors": list(layout.out_factors)},
        )

    def _build(self, spec: LayerSpec, factors: Optional[Factors], rank, options, bias, device, dtype) -> list[nn.Module]:
        layout = train_layout(spec)
        rr = bond_ranks(layout, rank, ring=False)
        cores = None
        if factors is not None:
            modes = factors.meta.get("modes")
            if modes is not None and tuple(modes) != layout.modes:
                raise ValueError(f"method 'tt': factors were computed for modes {modes}, not {list(layout.modes)}")
            full = [factors.tensors[f"core{k}"] for k in range(layout.n_cores)]
            cores = tt_truncate(full, rr[1:-1])
        return network_modules(spec, layout, rr, cores, bias, device, dtype)
