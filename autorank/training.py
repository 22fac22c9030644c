"""Training-time methods: batch norm between factors, force regularization, fixed-point factors.

Three ways to make a decomposed model recover more of the original's quality, or
cost less, during fine-tuning. Each hooks into the task's own training loop
(``task.finetune(model, steps, seed=...)``), which it never replaces:

- :func:`insert_factor_bn` / :func:`fold_factor_bn` — a batch norm after every
  factor of a decomposed layer but the last, trained with the factors and folded
  back into the factor before it for export (Tai et al. 2015). The exported model
  has the plain decomposed structure again (plus a bias on the factors that had
  none, recorded in the plan as ``options["bias_after_fold"]``).
- :func:`force_regularize` — before decomposing, train a copy of the dense model
  while every optimizer step is followed by a pull of each target layer's weight
  toward its rank-r subspace, so that the truncation to the planned rank then
  loses less (Wen et al. 2017's idea; a proximal pull toward the planned rank
  instead of their pairwise filter force — :func:`force_regularize` says why).
- :func:`quantize_factors` / :func:`freeze_fixed_point` — fixed-point factors
  (Wang & Cheng 2017): per-output-channel symmetric b-bit weights, fake-quantised
  with a straight-through estimator while fine-tuning, then stored as int8 tensors
  with per-channel float scales (``options["fixed_point"] = b`` in the plan, so that
  :func:`autorank.load` rebuilds them). :func:`model_bytes` is the stored size.

:func:`apply_training` strings them together for the search's fine-tuning stage
(:meth:`autorank.search.trial.TrialRunner.finetune`).

References
----------
- C. Tai, T. Xiao, Y. Zhang, X. Wang, W. E. "Convolutional neural networks with
  low-rank regularization." ICLR 2016, arXiv:1511.06067 (2015).
- W. Wen, C. Xu, C. Wu, Y. Wang, Y. Chen, H. Li. "Coordinating Filters for Faster
  Deep Neural Networks." ICCV 2017.
- P. Wang, J. Cheng. "Fixed-Point Factorized Networks." CVPR 2017.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from autorank.errors import AutorankError
from autorank.methods._layers import Decomposed, layer_kind

logger = logging.getLogger("autorank")

__all__ = [
    "TrainingError",
    "FactorBatchNorm2d",
    "FactorBatchNorm1d",
    "insert_factor_bn",
    "fold_factor_bn",
    "PullTarget",
    "force_targets",
    "force_regularize",
    "energy_share",
    "project",
    "FakeQuantize",
    "FixedPointConv2d",
    "FixedPointLinear",
    "quantize_per_channel",
    "quantize_factors",
    "freeze_fixed_point",
    "restore_structure",
    "model_bytes",
    "apply_training",
    "deployed_zero_shot",
]


class TrainingError(AutorankError, RuntimeError):
    """A training-time method asked of a model it cannot apply to (e.g. folding into a frozen layer)."""


def _decomposed(model: nn.Module) -> list[tuple[str, Decomposed]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Decomposed)]


def _reset_children(seq: nn.Sequential, layers: list[nn.Module]) -> None:
    """Give ``seq`` exactly ``layers``, keyed 0..n-1 (the keys the state dict uses)."""
    for key in list(seq._modules):
        del seq._modules[key]
    for i, layer in enumerate(layers):
        seq.add_module(str(i), layer)


def _float_weight(layer: nn.Module) -> torch.Tensor:
    """The trainable float weight of a Conv2d/Linear factor, behind a fake-quant parametrization if any."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


# ====================================================================== 1. BN between factors
class FactorBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d inserted between two factors by :func:`insert_factor_bn` (folded away for export)."""


class FactorBatchNorm1d(nn.BatchNorm1d):
    """Batch norm over the last (feature) dimension of a Linear factor's output, for 2-D and N-D inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return super().forward(x)
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)


_FACTOR_BN = (FactorBatchNorm2d, FactorBatchNorm1d)


def _foldable(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.Conv2d, nn.Linear))


def insert_factor_bn(model: nn.Module, inputs: Any = None, *, eps: float = 1e-5, momentum: float = 0.1) -> int:
    """Insert a batch norm after every factor but the last of each :class:`Decomposed`; returns how many.

    Only after factors a batch norm can be folded back into (``nn.Conv2d`` /
    ``nn.Linear``, so not after DCF's fixed DCT basis); a Decomposed holding a
    single module (TT, TR) gets none. ``BatchNorm2d`` after a convolution,
    :class:`FactorBatchNorm1d` (over the last dimension) after a Linear.

    Each batch norm is, at insertion, an exact identity in eval mode, so that
    evaluating right after insertion gives the same outputs as before:

    - ``inputs=None``: running mean 0, running variance ``1 - eps``, weight 1, bias 0
      (``sqrt(1 - eps + eps) == 1`` exactly in float32);
    - ``inputs`` (model inputs: a tensor or a list of batches, e.g. the task's
      calibration inputs): running mean μ and (biased) variance σ² of the factor's
      output on them, weight ``sqrt(σ² + eps)`` and bias μ — still the identity in eval
      mode (up to float rounding), and now close to it in *train* mode too, where the
      batch statistics replace the running ones. With the plain initialisation, train
      mode starts by whitening every factor's output, which a short fine-tune from a
      good decomposition does not recover from.
    """
    added: list[nn.Module] = []
    for _, dec in _decomposed(model):
        children = list(dec)
        if len(children) < 2 or any(isinstance(c, _FACTOR_BN) for c in children):
            continue
        out: list[nn.Module] = []
        for i, layer in enumerate(children):
            out.append(layer)
            if i < len(children) - 1 and _foldable(layer):
                w = _float_weight(layer)
                if isinstance(layer, nn.Conv2d):
                    bn = FactorBatchNorm2d(layer.out_channels, eps=eps, momentum=momentum)
                else:
                    bn = FactorBatchNorm1d(layer.out_features, eps=eps, momentum=momentum)
                bn = bn.to(device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    bn.running_mean.zero_()
                    bn.running_var.fill_(1.0 - eps)
                    bn.weight.fill_(1.0)
                    bn.bias.zero_()
                bn.train(layer.training)
                out.append(bn)
                added.append(bn)
        _reset_children(dec, out)
    if inputs is not None and added:
        _init_bn_from_data(model, added, inputs)
    return len(added)


def _batches(inputs: Any) -> list:
    if isinstance(inputs, (list,)):
        return inputs
    try:
        from torch.utils.data import DataLoader

        if isinstance(inputs, DataLoader):
            return list(inputs)
    except ImportError:  # pragma: no cover
        pass
    return [inputs]


def _init_bn_from_data(model: nn.Module, bns: list[nn.Module], inputs: Any) -> None:
    """Running statistics and affine parameters from the factors' outputs on ``inputs`` (see insert_factor_bn)."""
    from autorank.tasks.base import call, to_device

    sums: dict[int, list] = {id(bn): [0.0, 0.0, 0] for bn in bns}

    def hook(bn, args):
        x = args[0].detach().to(torch.float64)
        if isinstance(bn, FactorBatchNorm2d):
            x = x.transpose(0, 1).reshape(x.shape[1], -1)
        else:
            x = x.reshape(-1, x.shape[-1]).t()
        acc = sums[id(bn)]
        acc[0] = acc[0] + x.sum(1)
        acc[1] = acc[1] + (x * x).sum(1)
        acc[2] += x.shape[1]

    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        with torch.no_grad():
            for batch in _batches(inputs):
                call(model, to_device(batch, device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for bn in bns:
        s, ss, n = sums[id(bn)]
        if n == 0:
            continue
        mean = s / n
        var = (ss / n - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.weight.copy_((var + bn.eps).sqrt())
            bn.bias.copy_(mean)


def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """``bn(layer(x)) == layer'(x)`` in eval mode: scale the layer's output channels, shift its bias."""
    if not _foldable(layer):
        raise TrainingError(
            f"cannot fold a batch norm into a {type(layer).__name__}: fold_factor_bn() must run before freeze_fixed_point()"
        )
    w = _float_weight(layer)
    with torch.no_grad():
        scale = bn.weight.to(torch.float64) / (bn.running_var.to(torch.float64) + bn.eps).sqrt()
        shift = bn.bias.to(torch.float64) - bn.running_mean.to(torch.float64) * scale
        w.copy_((w.to(torch.float64) * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(shift.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
        else:
            layer.bias.copy_((layer.bias.to(torch.float64) * scale + shift).to(layer.bias.dtype))


def fold_factor_bn(model: nn.Module) -> int:
    """Fold every batch norm :func:`insert_factor_bn` inserted into the factor before it and remove it.

    ``w' = w·γ/√(σ²+ε)`` per output channel, ``b' = (b − μ)·γ/√(σ²+ε) + β`` (a bias
    is created where the factor had none, and its index recorded in the layer's
    ``options["bias_after_fold"]`` so that :func:`autorank.load` rebuilds it). The model
    then has the plain Decomposed structure its plan describes; in eval mode its
    outputs are those of the model with batch norms. Works on fake-quantised factors
    too (it scales the float weight; per-channel quantisation commutes with a
    per-channel scale). Returns how many batch norms were folded.
    """
    folded = 0
    for _, dec in _decomposed(model):
        children = list(dec)
        if not any(isinstance(c, _FACTOR_BN) for c in children):
            continue
        out: list[nn.Module] = []
        bias_idx = set(dec.options.get("bias_after_fold") or [])
        for layer in children:
            if isinstance(layer, _FACTOR_BN):
                prev = out[-1]
                had_bias = getattr(prev, "bias", None) is not None
                _fold_into(prev, layer)
                if not had_bias:
                    bias_idx.add(len(out) - 1)
                folded += 1
                continue
            out.append(layer)
        _reset_children(dec, out)
        if bias_idx:
            dec.options["bias_after_fold"] = sorted(bias_idx)
    return folded


# ====================================================================== 2. force regularization
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
    from autorank import methods as registry
    from autorank.methods._base import dense_cost
    from autorank.surgery import resolve_plan

    out: dict[str, PullTarget] = {}
    for rl in resolve_plan(model, plan, input_shapes):
        name = rl.method.name
        if name == "svd":
            out[rl.name] = PullTarget(int(rl.rank), "filters")
        elif name == "spatial-svd":
            out[rl.name] = PullTarget(int(rl.rank), "spatial")
        elif name == "tucker2":
            r_in, r_out = rl.rank
            out[rl.name] = PullTarget((int(r_in), int(r_out)), "tucker2")
        else:
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


# ====================================================================== 3. fixed-point factors
def quantize_per_channel(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel (dim 0) quantisation: int8 codes in ±(2^(bits−1)−1) and float scales.

    ``w ≈ codes · scale[:, None, …]``; ``2^bits − 1`` levels per channel; an all-zero
    channel gets scale 1 and codes 0.
    """
    bits = int(bits)
    if not 2 <= bits <= 8:
        raise TrainingError(f"fixed point: bits must be in 2..8 (stored as int8), got {bits}")
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        flat = w.detach().reshape(w.shape[0], -1)
        scale = flat.abs().amax(dim=1) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.clamp(torch.round(flat / scale[:, None]), -qmax, qmax)
    return codes.to(torch.int8).reshape(w.shape), scale


def _dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.to(scale.dtype) * scale.reshape(-1, *([1] * (codes.dim() - 1)))


class _STEQuant(torch.autograd.Function):
    """Forward: the fake-quantised weight exactly (as the frozen layer computes it); backward: identity."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, bits: int) -> torch.Tensor:
        codes, scale = quantize_per_channel(w, bits)
        return _dequantize(codes, scale.to(w.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class FakeQuantize(nn.Module):
    """A weight parametrization: per-channel symmetric ``bits``-bit fake quantisation, straight-through gradient."""

    def __init__(self, bits: int = 8):
        super().__init__()
        quantize_per_channel(torch.ones(1), bits)  # validates bits
        self.bits = int(bits)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _STEQuant.apply(w, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def _codes_and_scale(layer: nn.Module, bits: int, qshape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    w = layer.weight
    if w.device.type == "meta":  # skeleton for autorank.load: real (empty) storage, filled by load_state_dict
        return torch.empty(qshape, dtype=torch.int8), torch.empty(qshape[0], dtype=w.dtype)
    codes, scale = quantize_per_channel(w.detach(), bits)
    return codes, scale.to(w.dtype)


class _FixedPointStorage(nn.Module):
    """int8 codes (``qweight``) and per-output-channel float ``scale`` as buffers; the weight is their product."""

    def _store(self, layer: nn.Module, bits: int) -> None:
        self.bits = int(bits)
        codes, scale = _codes_and_scale(layer, bits, tuple(layer.weight.shape))
        self.register_buffer("qweight", codes)
        self.register_buffer("scale", scale)
        if layer.bias is not None:
            self.bias = layer.bias
        else:
            self.register_parameter("bias", None)

    @property
    def weight(self) -> torch.Tensor:
        return _dequantize(self.qweight, self.scale)


class FixedPointConv2d(_FixedPointStorage):
    """A Conv2d whose weight is stored as int8 codes (``qweight``) and per-output-channel float ``scale``.

    Computes with the dequantised weight ``qweight · scale`` (exactly the weight
    :class:`FakeQuantize` trained with). Bias, if any, stays a float parameter.
    """

    def __init__(self, conv: nn.Conv2d, bits: int = 8):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups, self.padding_mode = conv.dilation, conv.groups, conv.padding_mode
        self._reversed_padding_repeated_twice = list(conv._reversed_padding_repeated_twice)
        self._store(conv, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bits={self.bits}, bias={self.bias is not None}")


class FixedPointLinear(_FixedPointStorage):
    """A Linear whose weight is stored as int8 codes and per-output-channel float scales (see FixedPointConv2d)."""

    def __init__(self, linear: nn.Linear, bits: int = 8):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._store(linear, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, bias={self.bias is not None}"


def _factor_layers(dec: Decomposed) -> Iterator[tuple[str, nn.Module]]:
    """The Conv2d / Linear modules inside a Decomposed (also nested, e.g. in a tensor-network conv)."""
    for name, m in list(dec.named_modules()):
        if name and isinstance(m, (nn.Conv2d, nn.Linear)):
            yield name, m


def _set_in(parent: nn.Module, name: str, new: nn.Module) -> None:
    owner_name, _, child = name.rpartition(".")
    owner = parent.get_submodule(owner_name) if owner_name else parent
    setattr(owner, child, new)


def quantize_factors(model: nn.Module, bits: int = 8) -> int:
    """Fake-quantise every Conv2d/Linear factor of every Decomposed (per-channel, ``bits`` bits, STE); returns how many.

    The float weights stay the trained parameters (``parametrizations.weight.original``);
    the forward pass sees their quantised values, the gradient passes straight through
    (Wang & Cheng's "full-precision weights recovery", with b-bit symmetric codes instead
    of their ternary ones). :func:`freeze_fixed_point` makes it permanent. Tensor-network
    cores (TT/TR on Linear layers) and DCF's fixed basis stay float.
    """
    n = 0
    for _, dec in _decomposed(model):
        for _, layer in _factor_layers(dec):
            if parametrize.is_parametrized(layer, "weight"):
                continue
            parametrize.register_parametrization(layer, "weight", FakeQuantize(bits))
            n += 1
    return n


def _to_fixed_point(layer: nn.Module, bits: int) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        return FixedPointConv2d(layer, bits)
    return FixedPointLinear(layer, bits)


def freeze_fixed_point(model: nn.Module, bits: Optional[int] = None) -> int:
    """Replace fake-quantised factors by :class:`FixedPointConv2d`/:class:`FixedPointLinear` (int8 storage).

    Every Decomposed with a fake-quantised factor, or every Decomposed when ``bits``
    is given (post-training quantisation of a model never fine-tuned), has all its
    Conv2d/Linear factors converted, and ``options["fixed_point"] = bits`` recorded
    in its plan entry so that :func:`autorank.load` rebuilds int8 layers. The frozen
    layers compute exactly what the fake-quantised ones did. Returns how many
    layers were converted.
    """
    n = 0
    for _, dec in _decomposed(model):
        layers = list(_factor_layers(dec))
        found = [m.parametrizations.weight[0].bits for _, m in layers
                 if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], FakeQuantize)]
        b = found[0] if found else bits
        if not b or not layers:
            continue
        for name, layer in layers:
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            _set_in(dec, name, _to_fixed_point(layer, b))
            n += 1
        dec.options["fixed_point"] = int(b)
    return n


def restore_structure(dec: Decomposed, options: Optional[dict]) -> Decomposed:
    """Apply a plan entry's training-time options to a freshly built Decomposed (real or meta skeleton).

    ``bias_after_fold``: indices of factors that carry a bias after batch-norm
    folding (zero bias when built from factors; a skeleton parameter otherwise);
    ``fixed_point``: convert its Conv2d/Linear factors to int8 fixed-point layers
    (quantising the factors' weights when real). Used by :func:`autorank.decompose`
    and by :func:`autorank.load` (via ``apply_skeleton``).
    """
    options = dict(options or {})
    children = list(dec)
    for i in options.get("bias_after_fold") or []:
        if not 0 <= int(i) < len(children):
            raise TrainingError(f"option bias_after_fold: factor index {i} out of range (the layer has {len(children)})")
        layer = children[int(i)]
        if getattr(layer, "bias", "missing") is None and _foldable(layer):
            w = layer.weight
            n_out = w.shape[0]
            layer.bias = nn.Parameter(torch.zeros(n_out, device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
    bits = options.get("fixed_point")
    if bits:
        for name, layer in list(_factor_layers(dec)):
            _set_in(dec, name, _to_fixed_point(layer, int(bits)))
    return dec


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers as stored (int8 codes count 1 byte each); shared tensors once."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


# ====================================================================== the search's fine-tuning stage
def deployed_zero_shot(build: Any, training: Optional[dict]) -> Optional[nn.Module]:
    """The zero-shot model (``build()``, called only when needed) in the form the options deliver, or None.

    None means the plain zero-shot model is that form already.

    What a fine-tune with these options is compared with: with ``fixed_point`` the
    deliverable is an int8 model, so the fallback is the decomposition quantised
    without training; batch norms fold to nothing and force regularization changes
    only the starting point, so they need no other fallback than ``model``.
    """
    bits = (training or {}).get("fixed_point")
    if not bits:
        return None
    model = build()
    freeze_fixed_point(model, bits=int(bits))
    return model


def apply_training(
    dense: nn.Module,
    plan: Any,
    task: Any,
    training: Optional[dict],
    *,
    steps: int,
    seed: int = 0,
    calibration: Any = None,
    cache: Any = None,
    decomposed: Optional[nn.Module] = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Decompose ``dense`` by ``plan`` and fine-tune it with the training-time options; (model, what was applied).

    ``training`` (the search space's ``training`` mapping, any subset):

    1. ``force_regularization: {steps, strength}``: a copy of ``dense`` is trained by
       :func:`force_regularize` toward the plan's ranks (:func:`force_targets`), then
       decomposed instead of ``dense`` (same calibration statistics; a private factor
       cache, since its weights are never seen again);
    2. ``bn_between_factors``: :func:`insert_factor_bn` (initialised from the task's
       calibration inputs when it has them) before fine-tuning, :func:`fold_factor_bn`
       after;
    3. ``fixed_point: bits``: :func:`quantize_factors` before fine-tuning,
       :func:`freeze_fixed_point` after.

    Then ``task.finetune(model, steps, seed=seed)``. ``decomposed``: ``dense`` already
    decomposed by ``plan`` (reused unless force regularization asks for another
    starting point). The returned model is in eval mode with the plain Decomposed
    structure (what :func:`autorank.save` / :func:`autorank.load` handle). The dict
    says which options were applied, with counts.
    """
    from autorank.cache import FactorCache
    from autorank.surgery import decompose

    training = dict(training or {})
    applied: dict[str, Any] = {}
    device = next((p.device for p in dense.parameters()), torch.device("cpu"))
    fr = training.get("force_regularization")
    if fr:
        fr = {"steps": 50, "strength": 0.05, **(fr if isinstance(fr, dict) else {})}
        shapes = dict(getattr(calibration, "input_shapes", None) or {}) or None
        targets = force_targets(dense, plan, shapes)
        report: dict[str, Any] = {}
        reg = force_regularize(dense, targets, task, steps=int(fr["steps"]), strength=float(fr["strength"]), seed=seed, report=report)
        model = decompose(reg, plan, calibration, cache=FactorCache())
        before, after = report["energy_before"], report["energy_after"]
        applied["force_regularization"] = {
            "steps": int(fr["steps"]), "strength": float(fr["strength"]), "layers": len(targets), "pulls": report["pulls"],
            "energy_share_before": sum(before.values()) / max(1, len(before)),
            "energy_share_after": sum(after.values()) / max(1, len(after)),
        }
    elif decomposed is not None:
        model = decomposed
    else:
        model = decompose(dense, plan, calibration, cache=cache)
    model = model.to(device).eval()
    bn = bool(training.get("bn_between_factors"))
    if bn:
        inputs = None
        try:
            inputs = task.calibration_inputs()
        except Exception as exc:  # a task without calibration inputs: identity initialisation
            logger.debug("no calibration inputs for the batch-norm initialisation: %s", exc)
        applied["bn_between_factors"] = insert_factor_bn(model, inputs)
    bits = training.get("fixed_point")
    if bits:
        applied["fixed_point"] = {"bits": int(bits), "layers": quantize_factors(model, int(bits))}
    torch.manual_seed(seed)
    trained = task.finetune(model, int(steps), seed=seed)
    model = trained if isinstance(trained, nn.Module) else model
    if bn:
        fold_factor_bn(model)
    if bits:
        freeze_fixed_point(model)
    return model.eval(), applied
