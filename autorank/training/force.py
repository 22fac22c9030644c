"""Force regularization: pull each planned layer's weight toward its low-rank set before decomposing.

Before decomposing, train a copy of the dense model while every optimizer step is
followed by a pull of each target layer's weight toward its rank-r subspace, so
that the truncation to the planned rank then loses less (Wen et al. 2017's idea;
a proximal pull toward the planned rank instead of their pairwise filter force —
:func:`force_regularize` says why).

References
----------
- W. Wen, C. Xu, C. Wu, Y. Wang, Y. Chen, H. Li. "Coordinating Filters for Faster
  Deep Neural Networks." ICCV 2017.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from autorank import methods as registry
from autorank.errors import TrainingError
from autorank.methods._base import dense_cost
from autorank.methods._layers import layer_kind
from autorank.surgery import resolve_plan

logger = logging.getLogger("autorank")

__all__ = ["PullTarget", "force_targets", "force_regularize", "energy_share", "project", "TRUNCATION_VIEWS"]

#: the low-rank sets a weight can be pulled toward (see PullTarget and BaseMethod.truncation_view)
TRUNCATION_VIEWS = ("filters", "spatial", "tucker2")


@dataclass(frozen=True)
class PullTarget:
    """The low-rank structure a layer's weight is pulled toward.

    ``view``:
    - ``"filters"``: per group, the filter matrix (out/groups) × (in/groups·kh·kw)
      (what SVD truncates); ``rank`` an int, or a float: the fraction of its
      singular values to keep;
    - ``"spatial"``: the (C·kh) × (N·kw) matrix spatial-SVD truncates (groups = 1);
    - ``"tucker2"``: ``rank = (r_in, r_out)``: the HOSVD truncation of the kernel
      along its output (mode 0) and input (mode 1) channels.
    """

    rank: Union[int, float, tuple[int, int]]
    view: str = "filters"


def _as_target(t: Any) -> PullTarget:
    if isinstance(t, PullTarget):
        return t
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TrainingError(f"a force-regularization target is a PullTarget, a rank (int) or a fraction (float), got {t!r}")
    return PullTarget(t, "filters")


def _oriented(layer: nn.Module, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The weight as (out, in…) — a view of the stored tensor (GPT-2 Conv1D stores it transposed)."""
    w = layer.weight if weight is None else weight
    return w.t() if layer_kind(layer) == "conv1d" else w


def _keep(rank: Union[int, float], n: int) -> int:
    if isinstance(rank, float):
        return max(1, min(n, int(round(rank * n))))
    return max(1, min(n, int(rank)))


def _top_projector(m: torch.Tensor, r: int) -> torch.Tensor:
    """Orthogonal projector onto the span of the top-r left singular vectors of ``m`` (batched)."""
    u, _, _ = torch.linalg.svd(m, full_matrices=False)
    u = u[..., :r]
    return u @ u.transpose(-1, -2)


def project(layer: nn.Module, target: Any, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """P(W): the layer's weight (as (out, in…)) projected onto ``target``'s low-rank set (float64)."""
    t = _as_target(target)
    w = _oriented(layer, weight).detach().to(torch.float64)
    groups = int(getattr(layer, "groups", 1)) if w.dim() == 4 else 1
    if t.view == "spatial" and w.dim() == 4 and groups == 1:
        n, c, kh, kw = w.shape
        m = w.permute(1, 2, 0, 3).reshape(c * kh, n * kw)
        r = _keep(t.rank, min(m.shape))
        return (_top_projector(m, r) @ m).reshape(c, kh, n, kw).permute(2, 0, 1, 3)
    if t.view == "tucker2" and w.dim() == 4 and groups == 1:
        r_in, r_out = t.rank if isinstance(t.rank, tuple) else (t.rank, t.rank)
        n, c = w.shape[:2]
        p_out = _top_projector(w.reshape(n, -1), _keep(r_out, n))
        p_in = _top_projector(w.transpose(0, 1).reshape(c, -1), _keep(r_in, c))
        return torch.einsum("ab,bcij,dc->adij", p_out, w, p_in)
    rank = t.rank if not isinstance(t.rank, tuple) else max(t.rank)
    m = w.reshape(groups, w.shape[0] // groups, -1)
    r = _keep(rank, min(m.shape[1:]))
    return (_top_projector(m, r) @ m).reshape(w.shape)


def energy_share(layer: nn.Module, target: Any, weight: Optional[torch.Tensor] = None) -> float:
    """‖P(W)‖² / ‖W‖²: the share of the weight's energy in the target's low-rank set (top-r singular values)."""
    w = _oriented(layer, weight).detach().to(torch.float64)
    total = float((w * w).sum())
    if total == 0:
        return 1.0
    p = project(layer, target, weight)
    return float((p * p).sum()) / total


def force_targets(model: nn.Module, plan: Any, input_shapes: Optional[dict] = None) -> dict[str, PullTarget]:
    """What :func:`force_regularize` pulls each layer of ``plan`` toward, from the plan's method and rank.

    svd: its rank on the filter matrix; spatial-svd: its rank on the spatial-SVD
    matrix; tucker2: its (r_in, r_out) on the two channel unfoldings; any other
    method (cp, tt, tr, btd, dcf): the SVD rank that keeps the same fraction of the
    layer's FLOPs as the planned replacement (a float fraction of singular values
    where SVD does not apply). Fractional ranks ρ in the plan are resolved first.
    """
    out: dict[str, PullTarget] = {}
    for rl in resolve_plan(model, plan, input_shapes):
        view = rl.method.truncation_view(rl.rank)
        if view is not None:
            kind, rank = view
            out[rl.name] = PullTarget(rank, kind)
            continue
        dense = dense_cost(rl.module, rl.input_shape).flops
        rho = min(1.0, rl.method.cost(rl.module, rl.rank, rl.input_shape).flops / dense) if dense else 1.0
        svd = registry.get("svd")
        if svd.applies(rl.module) is None:
            out[rl.name] = PullTarget(int(svd.rank_for(rl.module, max(rho, 1e-9), rl.input_shape)), "filters")
        else:
            out[rl.name] = PullTarget(float(max(rho, 1e-3)), "filters")
    return out


def force_regularize(
    model: nn.Module,
    targets: dict[str, Any],
    task: Any,
    *,
    steps: int,
    strength: float,
    seed: int = 0,
    report: Optional[dict] = None,
) -> nn.Module:
    """A copy of the dense ``model`` trained by ``task.finetune`` while its target layers are pulled low-rank.

    Variant implemented — a *proximal pull toward the planned rank*, not Wen et
    al.'s pairwise force: after every optimizer step (a global
    ``register_optimizer_step_post_hook``, acting only on optimizers that hold a
    target weight, removed afterwards) each target weight moves toward its
    projection onto the target's low-rank set,

        W ← W − strength · (W − P_r(W)),

    where P_r is the truncated SVD at the planned rank (of the view the planned
    method truncates, see :class:`PullTarget`). This is a gradient step of
    ``strength/2 · ‖W − P_r(W)‖²`` (the squared distance to the rank-r matrices):
    the top-r singular values and vectors are left alone and the others shrink by
    ``(1 − strength)`` per step, against the task's gradient. Why not Wen et al.'s
    force (every normalised filter attracted by every other, ``Δw_i ∝ Σ_j (ŵ_j −
    ŵ_i)``)? It pulls all filters toward one common direction, i.e. toward rank 1
    whatever rank the plan chose, and its strength has to be tuned against the
    learning rate; the search already knows the rank each layer gets, and a pull
    toward exactly that subspace removes what the truncation will remove and
    nothing else. Cost: one SVD per target layer per step.

    ``targets``: ``{layer name: rank (int), fraction of singular values (float) or
    PullTarget}`` (see :func:`force_targets` to derive them from a plan). The
    original ``model`` is not modified. ``report`` (a dict), if given, receives
    ``pulls`` (how many optimizer steps applied the pull) and the energy share of
    each target before and after.
    """
    if not 0 < float(strength) <= 1:
        raise TrainingError(f"force regularization: strength must be in (0, 1], got {strength!r}")
    reg = copy.deepcopy(model)
    layers: dict[int, tuple[str, nn.Module, PullTarget]] = {}
    for name, t in targets.items():
        try:
            layer = reg.get_submodule(name)
        except AttributeError:
            raise TrainingError(f"force regularization: the model has no layer {name!r}") from None
        if layer_kind(layer) is None:
            raise TrainingError(f"force regularization: layer {name!r} is a {type(layer).__name__}, not Linear/Conv1D/Conv2d")
        layers[id(layer.weight)] = (name, layer, _as_target(t))
    before = {name: energy_share(layer, t) for name, layer, t in layers.values()}
    pulls = 0

    def hook(optimizer, args, kwargs) -> None:
        nonlocal pulls
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        hit = [v for k, v in layers.items() if k in held]
        if not hit:
            return
        with torch.no_grad():
            for _, layer, t in hit:
                w = _oriented(layer)
                w.sub_((float(strength) * (w.to(torch.float64) - project(layer, t))).to(w.dtype))
        pulls += 1

    handle = register_optimizer_step_post_hook(hook)
    try:
        torch.manual_seed(seed)
        trained = task.finetune(reg, int(steps), seed=seed)
        reg = trained if isinstance(trained, nn.Module) else reg
    finally:
        handle.remove()
    if pulls == 0 and steps > 0:
        logger.warning("force regularization: the task's fine-tuning ran no torch optimizer step on the target layers; nothing was pulled")
    if report is not None:
        report["pulls"] = pulls
        report["energy_before"] = before
        report["energy_after"] = {name: energy_share(layer, t) for name, layer, t in layers.values()}
    return reg.eval()
