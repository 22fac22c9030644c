"""The search's parameters in Optuna: samplers, and per-layer ``method:NAME`` / ``rho:NAME`` parameters.

Every candidate layer gets the same two parameters — its method (``none``
included) and ρ, the kept fraction of its FLOPs — so the space is static for
every sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.samplers._tpe import _truncnorm
from optuna.samplers._tpe.probability_distributions import (
    _BatchedCategoricalDistributions,
    _BatchedDiscreteTruncNormDistributions,
    _unique_inverse_2d,
)
from optuna.samplers._tpe.sampler import _split_trials, default_gamma, default_gamma_multiobjective
from optuna.trial import TrialState

from autorank.cost.cost_model import ChoicePlan
from autorank.errors import SearchError
from autorank.search.space import LayerChoice, SearchSpace

__all__ = ["SAMPLERS", "DEFAULT_SAMPLER", "make_sampler", "suggest", "choice_to_params", "params_to_choice", "distributions",
           "StaticTPESampler", "params_choice"]

SAMPLERS = ("tpe", "nsga2", "gp", "random")
#: the default sampler, chosen by benchmarks/bench_search.py (see the README)
DEFAULT_SAMPLER = "tpe"


def make_sampler(name: str, seed: int, n_layers: int, space: Optional[dict[str, BaseDistribution]] = None) -> optuna.samplers.BaseSampler:
    """The seeded Optuna sampler called ``name`` (one of :data:`SAMPLERS`), sized for ``n_layers`` layers.

    ``space``: the study's parameters (:func:`distributions`); TPE then runs as
    :class:`StaticTPESampler`, whose ask does not grow with the whole history.
    """
    name = name.lower()
    if name == "tpe":
        if space is not None:
            return StaticTPESampler(space, seed=seed, multivariate=True, n_startup_trials=10, constant_liar=True)
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


def distributions(choices: dict[str, LayerChoice], space: SearchSpace) -> dict[str, BaseDistribution]:
    """Every parameter of the study and its distribution, exactly as :func:`suggest` asks for them."""
    out: dict[str, BaseDistribution] = {}
    for name, ch in choices.items():
        out[_mkey(name)] = CategoricalDistribution(list(ch.methods))
        if space.rho_step is not None and len(ch.rhos) > 1:
            out[_rkey(name)] = FloatDistribution(ch.rhos[0], ch.rhos[-1], step=space.rho_step)
        else:
            out[_rkey(name)] = CategoricalDistribution(list(ch.rhos))
    return out


@dataclass
class _Fit:
    key: tuple
    n_finished: int
    below: Any
    above: Any
    below_table: Optional["_Table"] = None
    above_table: Optional["_Table"] = None


class _Table:
    """A Parzen estimator's log density tabulated on a grid space (categoricals and stepped floats).

    ``log_pdf`` equals the estimator's own (same mixture, same formulas) with one gather
    over (candidates, parameters, components) instead of a pass per parameter.
    """

    def __init__(self, mpe: Any):
        mix = mpe._mixture_distribution
        k = len(mix.weights)
        self.grids: list = []
        widths = []
        for d in mix.distributions:
            if isinstance(d, _BatchedCategoricalDistributions):
                self.grids.append(None)
                widths.append(d.weights.shape[1])
            elif isinstance(d, _BatchedDiscreteTruncNormDistributions):
                n = int(round((d.high - d.low) / d.step)) + 1
                self.grids.append((d.low, d.step, n))
                widths.append(n)
            else:
                raise TypeError("not a grid parameter")
        self.table = np.full((len(widths), k, max(widths)), -np.inf)
        disc = [i for i, g in enumerate(self.grids) if g is not None]
        for i, d in enumerate(mix.distributions):
            if self.grids[i] is None:
                with np.errstate(divide="ignore"):
                    self.table[i, :, : widths[i]] = np.log(d.weights)
        # every stepped parameter in one call, on its distinct (μ, σ) pairs (a handful: components share
        # bandwidths and sit on the grid): the mass of each grid cell under each component, truncated
        pairs, offsets, lows, steps, los, his, ns = [], [], [], [], [], [], []
        total = 0
        for i in disc:
            d = mix.distributions[i]
            mu_u, sg_u, inv = _unique_inverse_2d(d.mu, d.sigma)
            pairs.append((mu_u, sg_u))
            offsets.append((total, inv))
            total += len(mu_u)
            lows.append(np.full(len(mu_u), d.low))
            steps.append(np.full(len(mu_u), d.step))
            los.append(np.full(len(mu_u), d.adapted_low))
            his.append(np.full(len(mu_u), d.adapted_high))
            ns.append(widths[i])
        if disc:
            n = max(ns)
            mu = np.concatenate([p[0] for p in pairs])[:, None]
            sg = np.concatenate([p[1] for p in pairs])[:, None]
            step = np.concatenate(steps)[:, None]
            v = np.concatenate(lows)[:, None] + step * np.arange(n)[None, :]
            t = _truncnorm._log_gauss_mass(((v - step / 2 - mu) / sg).ravel(), ((v + step / 2 - mu) / sg).ravel()).reshape(total, n)
            t -= _truncnorm._log_gauss_mass((np.concatenate(los) - mu[:, 0]) / sg[:, 0], (np.concatenate(his) - mu[:, 0]) / sg[:, 0])[:, None]
            for i, (off, inv), w in zip(disc, offsets, ns):
                self.table[i, :, :w] = t[off + inv, :w]
        self.table = self.table.astype(np.float32)  # the gather below is memory-bound; float32 halves it
        with np.errstate(divide="ignore"):
            self.log_w = np.log(mix.weights)
        self.mpe = mpe

    def sample(self, rng: np.random.RandomState, size: int) -> dict[str, np.ndarray]:
        """Draws from the same mixture: a component per draw, then each parameter's grid value with the
        component's probability of its cell (what sampling the truncated normal and rounding to the grid gives)."""
        w = np.exp(self.log_w)
        comp = rng.choice(len(w), size=size, p=w / w.sum())
        cum = np.cumsum(np.exp(self.table[:, comp, :]), axis=-1)  # (D, n, V)
        cum /= cum[..., -1:]
        idx = (cum < rng.rand(self.table.shape[0], size, 1)).sum(axis=-1)  # (D, n)
        x = np.empty((size, self.table.shape[0]))
        for i, g in enumerate(self.grids):
            x[:, i] = idx[i] if g is None else np.clip(g[0] + idx[i] * g[1], g[0], g[0] + (g[2] - 1) * g[1])
        return self.mpe._untransform(x)

    def log_pdf(self, samples: dict[str, np.ndarray]) -> np.ndarray:
        x = self.mpe._transform(samples)
        idx = np.empty(x.shape, dtype=np.int64)
        for i, g in enumerate(self.grids):
            idx[:, i] = x[:, i] if g is None else np.clip(np.round((x[:, i] - g[0]) / g[1]), 0, g[2] - 1)
        lp = self.table[np.arange(x.shape[1])[None, :], :, idx].sum(axis=1, dtype=np.float64) + self.log_w[None, :]  # (n, K)
        m = lp.max(axis=1)
        m[np.isneginf(m)] = 0
        with np.errstate(divide="ignore"):
            return np.log(np.exp(lp - m[:, None]).sum(axis=1)) + m


def _table(mpe: Any) -> Optional[_Table]:
    try:
        return _Table(mpe)
    except TypeError:  # a continuous or log-scaled parameter: Optuna's own log_pdf
        return None


class StaticTPESampler(optuna.samplers.TPESampler):
    """Optuna's multivariate TPE for a search space known in advance, with an ask that stays cheap in long studies.

    Same model (Bergstra et al., NeurIPS 2011; Watanabe 2023; the constant liar for
    parallel asks), three changes measured on a 108-parameter space at 2 000 trials
    (``benchmarks/bench_driver.py``), where Optuna's ask took about 0.5 s in memory:

    - the relative search space is ``space``, not recomputed as the intersection of
      every trial's parameters at each ask (about half of that time);
    - the internal representation of a finished trial is computed once;
    - the Parzen estimators are refitted when the finished trials have grown by
      ``refit_fraction`` of their number (at least one), not at every ask — every
      ask of a batch, and the asks between two refits, sample new candidates from the
      same fit; and the "above" estimator keeps at most ``max_above`` trials (a seeded
      uniform subsample: the same mixture density in expectation, with a cost bounded
      per candidate). Below ``max_above`` and 1/``refit_fraction`` trials it is TPE as Optuna runs it;
    - on a grid space (categoricals and stepped floats, as autorank's) the densities
      are tabulated per fit, so drawing and scoring the candidates are a few array operations (:class:`_Table`).

    References: J. Bergstra, R. Bardenet, Y. Bengio, B. Kégl. Algorithms for
    Hyper-Parameter Optimization. NeurIPS 2011. S. Watanabe. Tree-Structured
    Parzen Estimator: Understanding Its Algorithm Components. arXiv 2304.11127, 2023.
    """

    def __init__(self, space: dict[str, BaseDistribution], *, max_above: int = 128, refit_fraction: float = 0.02, **kwargs: Any):
        super().__init__(**kwargs)
        self._subsample_seed = int(kwargs.get("seed") or 0)
        self._static = {k: v for k, v in space.items() if not v.single()}
        self._max_above = int(max_above)
        self._refit_fraction = float(refit_fraction)
        self._fit: Optional[_Fit] = None
        self._repr: dict[int, dict[str, float]] = {}

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return dict(self._static)

    def reseed(self, seed: int) -> None:
        """Seed the generators of the next draws (the search reseeds per ask: a resumed run asks what an
        uninterrupted one would); the fitted estimators are kept."""
        self._rng.rng.seed(int(seed) % 2**32)
        self._random_sampler._rng.rng.seed(int(seed) % 2**32)

    def _refit_points(self, n_done: int) -> int:
        """The last point of the refit schedule at or below ``n_done``: refits happen at ``n_startup``, then
        whenever the finished trials have grown by ``refit_fraction`` (at least one) — a function of the
        count alone, so that a resumed search fits on the same trials as an uninterrupted one."""
        t = self._n_startup_trials
        while True:
            nxt = t + 1
            while nxt - t < max(1, int(self._refit_fraction * nxt)):
                nxt += 1
            if nxt > n_done:
                return t
            t = nxt

    def sample_params(self, study, n_complete: Optional[int] = None) -> dict[str, Any]:
        """Every parameter of a new trial at once (random during the startup trials), for a trial created
        with all of them in one storage operation (:func:`autorank.search.study` does) instead of one per parameter."""
        dummy = optuna.trial.FrozenTrial(
            number=-1, state=TrialState.RUNNING, value=None, datetime_start=None, datetime_complete=None, params={},
            distributions={}, user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=-1,
        )
        if n_complete is None:  # the caller may know it (the search counts its results): saves a pass over all trials
            n_complete = len(study._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED), use_cache=False))
        if n_complete < self._n_startup_trials:
            return {k: self._random_sampler.sample_independent(study, dummy, k, d) for k, d in self._static.items()}
        return self._sample(study, dummy, self._static, n_done=n_complete)

    def _get_internal_repr(self, trials, search_space, study) -> dict[str, np.ndarray]:
        values: dict[str, list[float]] = {k: [] for k in search_space}
        for t in trials:
            hit = self._repr.get(t._trial_id) if t.state.is_finished() else None
            if hit is None:
                params = self._get_params(t, study)
                if not search_space.keys() <= params.keys():
                    continue
                hit = {k: d.to_internal_repr(params[k]) for k, d in search_space.items()}
                if t.state.is_finished():
                    self._repr[t._trial_id] = hit
            for k in search_space:
                values[k].append(hit[k])
        return {k: np.asarray(v) for k, v in values.items()}

    def _sample(self, study, trial, search_space, n_done: Optional[int] = None) -> dict[str, Any]:
        finished = (TrialState.COMPLETE, TrialState.PRUNED)
        if n_done is None:
            n_done = len(study._get_trials(deepcopy=False, states=finished, use_cache=False))
        key = tuple(search_space)
        fit = self._fit
        point = self._refit_points(n_done)
        if fit is None or fit.key != key or fit.n_finished != point:
            states = finished + ((TrialState.RUNNING,) if self._constant_liar else ())
            trials = [t for t in study._get_trials(deepcopy=False, states=states, use_cache=False) if t.number != trial.number]
            if n_done > point:  # resumed between two refits: fit on the finished trials the schedule's point saw
                done = sorted((t for t in trials if t.state != TrialState.RUNNING), key=lambda t: t.number)
                keep = {t.number for t in done[:point]}
                trials = [t for t in trials if t.state == TrialState.RUNNING or t.number in keep]
            if self._gamma is None:
                self._gamma = default_gamma if len(study.directions) <= 1 else default_gamma_multiobjective
            n = sum(t.state != TrialState.RUNNING for t in trials)
            below, above = _split_trials(study, trials, self._gamma(n))
            if len(above) > self._max_above:
                # seeded by the schedule's point, not the ask: a resumed search draws the same subsample
                rs = np.random.RandomState(np.random.SeedSequence((self._subsample_seed % 2**32, point)).generate_state(1)[0])
                idx = np.sort(rs.choice(len(above), self._max_above, replace=False))
                above = [above[i] for i in idx]
            mb = self._build_parzen_estimator(study, search_space, below, handle_below=True)
            ma = self._build_parzen_estimator(study, search_space, above, handle_below=False)
            fit = self._fit = _Fit(key, point, mb, ma, _table(mb), _table(ma))
        if fit.below_table is not None and fit.above_table is not None:
            samples = fit.below_table.sample(self._rng.rng, self._n_ei_candidates)
            acq = fit.below_table.log_pdf(samples) - fit.above_table.log_pdf(samples)
        else:
            samples = fit.below.sample(self._rng.rng, self._n_ei_candidates)
            acq = self._compute_acquisition_func(samples, fit.below, fit.above)
        ret = self._compare(samples, acq)
        return {k: d.to_external_repr(ret[k]) for k, d in search_space.items()}


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


def params_choice(params: dict[str, Any], choices: dict[str, LayerChoice]) -> ChoicePlan:
    """The choice plan :func:`suggest` would read from these parameters (ρ snapped to the layer's grid,
    then to the method's allowed values, see :meth:`LayerChoice.snap`)."""
    out: ChoicePlan = {}
    for n, ch in choices.items():
        m = params[_mkey(n)]
        r = min(ch.rhos, key=lambda g: abs(g - float(params[_rkey(n)])))
        out[n] = (m, float(ch.snap(m, r)))
    return out


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
