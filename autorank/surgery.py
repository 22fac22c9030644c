"""Swap layers of any nn.Module by qualified name: decompose a model by a plan, rebuild skeletons for load.

:func:`decompose` checks a plan against the model (:func:`resolve_plan`),
factorizes each layer through the factor cache and returns a new model with the
replacements swapped in; :func:`apply_skeleton` does the same with meta-device
skeletons, for :func:`autorank.load`. Which layers are candidates is decided by
:func:`autorank.candidates.candidate_layers`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from autorank import methods as registry
from autorank.cache import FactorCache, default_cache
from autorank.calibration import Calibration, collect, record_input_shapes
from autorank.candidates import candidate_layers
from autorank.errors import NotApplicableError, UnknownLayerError
from autorank.factor_layers import restore_structure
from autorank.methods._base import BaseMethod, Rank, align_rank
from autorank.methods._layers import Decomposed
from autorank.plan import LayerPlan, Plan

logger = logging.getLogger("autorank")

__all__ = [
    "set_submodule",
    "ResolvedLayer",
    "resolve_plan",
    "decompose",
    "share_with",
    "plan_of",
    "apply_skeleton",
]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the module at qualified ``name`` (works for Sequential / ModuleList indices too)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@dataclass(frozen=True)
class ResolvedLayer:
    """One layer of a plan checked against a model: its module, method and concrete rank."""

    name: str
    module: nn.Module
    method: BaseMethod
    rank: Rank
    options: dict
    input_shape: Optional[tuple[int, ...]]


def _lookup(model: nn.Module, name: str, candidates: dict) -> nn.Module:
    if name in candidates:
        module, reason = candidates[name]
        if reason is not None:
            raise NotApplicableError(f"layer {name!r} cannot be decomposed: {reason}")
        return module
    try:
        module = model.get_submodule(name)
    except AttributeError:
        import difflib

        close = difflib.get_close_matches(name, list(candidates), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownLayerError(f"unknown layer {name!r}: the model has no module by that name{hint}") from None
    raise NotApplicableError(
        f"layer {name!r} is a {type(module).__name__}; autorank decomposes Linear, Conv1D (GPT-2) and Conv2d layers"
    )


def resolve_plan(
    model: nn.Module,
    plan: Union[Plan, dict, str],
    input_shapes: Optional[dict[str, tuple[int, ...]]] = None,
) -> list[ResolvedLayer]:
    """Check every entry of ``plan`` against ``model`` and turn fractions ρ into concrete ranks.

    Raises, before anything is computed, the first error among: unknown layer,
    layer of another type or excluded, unknown method, method not applicable,
    invalid rank.
    """
    plan = Plan.coerce(plan)
    candidates = candidate_layers(model)
    out = []
    for name, lp in plan.layers.items():
        module = _lookup(model, name, candidates)
        method = registry.get(lp.method)
        method.check_applies(module, name)
        options = method.check_options(lp.options, name)
        shape = (input_shapes or {}).get(name)
        rank = method.resolve_rank(module, lp.rank, shape, name=name)
        if isinstance(lp.rank, float) and options.get("align"):
            rank = align_rank(rank, options["align"], method.max_rank(registry.layer_spec(module)))
        out.append(ResolvedLayer(name, module, method, rank, options, shape))
    return out


def _needs_shapes(plan: Plan) -> bool:
    return any(isinstance(lp.rank, float) for lp in plan.layers.values())


def decompose(
    model: nn.Module,
    plan: Union[Plan, dict, str],
    calibration: Any = None,
    *,
    example_inputs: Any = None,
    cache: Optional[FactorCache] = None,
    progress: Optional[Callable[[int, int, str], None]] = None,
    share: bool = False,
) -> nn.Module:
    """A new model with the layers of ``plan`` decomposed; ``model`` is left untouched.

    ``calibration``: a :class:`~autorank.calibration.Calibration`, or inputs
    (tensor, list of batches, DataLoader) from which one is collected. Data-aware
    methods then minimise the output error on these inputs.
    ``example_inputs``: inputs used only to learn each layer's input shape, so that
    fractional ranks count FLOPs on the real feature-map sizes.
    ``cache``: where factorizations are kept (default: the process-wide cache).
    ``progress``: called as ``progress(done, total, layer_name)``.
    ``share``: the new model shares every parameter and buffer it keeps with
    ``model`` instead of copying them (see :func:`share_with`): memory for the
    replaced layers only, for a search's trials on large models. Then training the
    new model's kept parameters, or moving it to another device or dtype, changes
    ``model`` too; by default (``False``) the new model is independent.
    """
    plan = Plan.coerce(plan)
    cache = cache if cache is not None else default_cache()
    # check the plan before any work (collecting statistics or shapes runs the model)
    if calibration is not None or example_inputs is not None:
        resolve_plan(model, plan)
    cal: Optional[Calibration] = None
    if calibration is not None:
        if isinstance(calibration, Calibration):
            cal = calibration
        else:
            wanted = [n for n, lp in plan.layers.items() if registry.get(lp.method).data_aware]
            cal = collect(model, calibration, wanted)
            if _needs_shapes(plan):
                missing = [n for n in plan.layers if n not in cal.input_shapes]
                if missing:
                    cal.input_shapes.update(record_input_shapes(model, calibration, missing))
    shapes: dict[str, tuple[int, ...]] = dict(cal.input_shapes) if cal is not None else {}
    if example_inputs is not None and _needs_shapes(plan):
        shapes.update({k: v for k, v in record_input_shapes(model, example_inputs, list(plan.layers)).items() if k not in shapes})
    resolved = resolve_plan(model, plan, shapes)

    replacements: dict[str, nn.Module] = {}
    total = len(resolved)
    for i, rl in enumerate(resolved):
        stats = cal.get(rl.name) if (cal is not None and rl.method.data_aware) else None
        factors = cache.get(rl.method, rl.module, stats, rl.rank, rl.options)
        replacements[rl.name] = _restore(rl.method.build(rl.module, factors, rl.rank, rl.options), rl.options)
        if progress is not None:
            progress(i + 1, total, rl.name)
    return share_with(model, replacements) if share else _copy_with(model, replacements)


def _copy_with(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """Deep copy of ``model`` in which the replaced layers are never copied, then swapped in."""
    named = dict(model.named_modules())
    memo: dict[int, Any] = {}
    skipped: set[int] = set()
    for name in replacements:
        memo[id(named[name])] = nn.Identity()
        skipped.update(id(t) for t in named[name].parameters())
    # plain parameters and buffers cloned up front: a third faster than deepcopy's own path,
    # and identical for them (ties kept by the memo); anything unusual goes through deepcopy
    for p in model.parameters():
        if id(p) not in skipped and type(p) is nn.Parameter and p.grad is None and not p.__dict__:
            memo[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    for b in model.buffers():
        if type(b) is torch.Tensor and not b.__dict__ and b.grad is None:
            memo[id(b)] = b.detach().clone()
    new = copy.deepcopy(model, memo)
    for name, module in sorted(replacements.items(), key=lambda kv: kv[0].count(".")):
        set_submodule(new, name, module)
    return new


def share_with(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A structural copy of ``model`` that shares its tensors, with ``replacements`` swapped in.

    Every module object is new (its own ``training`` flag, child and hook
    dictionaries, so swapping a child, calling ``.train()`` or registering a
    hook on the copy leaves ``model`` as it was), but the parameters and buffers
    are ``model``'s own objects: the copy costs no tensor memory, ties between
    weights stay ties, and a weight the copy keeps is the original's. Whatever
    changes those tensors in place (an optimizer step, ``.to(other device or
    dtype)``, ``requires_grad_``) changes ``model``: train only new parameters
    (those of the replacements) or copy first.
    """
    memo: dict[int, nn.Module] = {}

    def clone(module: nn.Module) -> nn.Module:
        hit = memo.get(id(module))
        if hit is not None:  # a module registered at two places stays one module
            return hit
        new = module.__class__.__new__(module.__class__)
        memo[id(module)] = new
        state = {}
        for key, value in module.__dict__.items():
            if key == "_modules":
                continue
            state[key] = value.copy() if isinstance(value, (dict, set, list)) else value
        new.__dict__.update(state)
        new.__dict__["_modules"] = type(module._modules)(
            (k, None if child is None else clone(child)) for k, child in module._modules.items()
        )
        return new

    new = clone(model)
    for name, module in sorted(replacements.items(), key=lambda kv: kv[0].count(".")):
        set_submodule(new, name, module)
    return new


def plan_of(model: nn.Module) -> Plan:
    """The concrete plan a decomposed model carries (from its Decomposed modules)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, Decomposed):
            layers[name] = LayerPlan(module.method, module.rank, dict(getattr(module, "options", {}) or {}))
    return Plan(layers)


def apply_skeleton(model: nn.Module, plan: Plan) -> nn.Module:
    """Replace the plan's layers in place by meta-device skeletons (for loading saved weights)."""
    for name, lp in sorted(plan.layers.items(), key=lambda kv: kv[0].count(".")):
        candidates = {name: (model.get_submodule(name), None)} if has_submodule(model, name) else {}
        module = _lookup(model, name, candidates)
        method = registry.get(lp.method)
        method.check_applies(module, name)
        rank = method.normalize_rank(registry.layer_spec(module), lp.rank, name)
        set_submodule(model, name, _restore(method.build(module, None, rank, lp.options), lp.options))
    return model


def _restore(replacement: Decomposed, options: Optional[dict]) -> Decomposed:
    """Apply a plan entry's training-time options (``bias_after_fold``, ``fixed_point``; see autorank.factor_layers)."""
    if options and (options.get("bias_after_fold") or options.get("fixed_point")):
        restore_structure(replacement, options)
    return replacement


def has_submodule(model: nn.Module, name: str) -> bool:
    """Whether ``model`` has a submodule at the qualified ``name``."""
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False

