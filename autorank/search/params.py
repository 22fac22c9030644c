"""The search's parameters in Optuna: samplers, and per-layer ``method:NAME`` / ``rho:NAME`` parameters.

Every candidate layer gets the same two parameters — its method (``none``
included) and ρ, the kept fraction of its FLOPs — so the space is static for
every sampler.
"""

from __future__ import annotations

from typing import Any

import optuna

from autorank.cost.cost_model import ChoicePlan
from autorank.errors import SearchError
from autorank.search.space import LayerChoice, SearchSpace

__all__ = ["SAMPLERS", "DEFAULT_SAMPLER", "make_sampler", "suggest", "choice_to_params", "params_to_choice"]

SAMPLERS = ("tpe", "nsga2", "gp", "random")
#: the default sampler, chosen by benchmarks/bench_search.py (see the README)
DEFAULT_SAMPLER = "tpe"


def make_sampler(name: str, seed: int, n_layers: int) -> optuna.samplers.BaseSampler:
    """The seeded Optuna sampler called ``name`` (one of :data:`SAMPLERS`), sized for ``n_layers`` layers."""
    name = name.lower()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10, constant_liar=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, min(50, 2 * n_layers + 4)))
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=10)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise SearchError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")


def _mkey(name: str) -> str:
    return f"method:{name}"


def _rkey(name: str) -> str:
    return f"rho:{name}"


def suggest(trial: optuna.Trial, choices: dict[str, LayerChoice], space: SearchSpace) -> ChoicePlan:
    """The choice plan the trial's sampler proposes (ρ snapped to the layer's grid)."""
    cp: ChoicePlan = {}
    for name, ch in choices.items():
        m = trial.suggest_categorical(_mkey(name), list(ch.methods))
        if space.rho_step is not None and len(ch.rhos) > 1:
            r = trial.suggest_float(_rkey(name), ch.rhos[0], ch.rhos[-1], step=space.rho_step)
            r = min(ch.rhos, key=lambda g: abs(g - r))
        else:
            r = trial.suggest_categorical(_rkey(name), list(ch.rhos))
        r = ch.snap(m, r)  # a (method, ρ) the method refuses (CP too slow at that rank) runs at the next ρ down
        cp[name] = (m, float(r))
    return cp


def choice_to_params(cp: ChoicePlan) -> dict[str, Any]:
    """A choice plan as Optuna parameters (to enqueue it as a trial)."""
    out: dict[str, Any] = {}
    for name, (m, r) in cp.items():
        out[_mkey(name)] = m
        out[_rkey(name)] = r
    return out


def params_to_choice(params: dict[str, Any], choices: dict[str, LayerChoice]) -> ChoicePlan:
    """The choice plan of a trial's Optuna parameters."""
    return {n: (params[_mkey(n)], float(params[_rkey(n)])) for n in choices if _mkey(n) in params}
