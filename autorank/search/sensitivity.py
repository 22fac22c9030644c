"""A cheap per-layer sensitivity estimate, calibrated by a few real evaluations.

The exhaustive table (:func:`autorank.search.warm_start.measure_sensitivity` with
``mode="full"``) scores the model once per (layer, method, probe ρ): a full
``task.evaluate`` each, hundreds on a transformer. The estimate needs one pass
over the calibration batches and a handful of evaluations:

1. **Statistics** (:func:`collect_statistics`, one pass): per layer, the Gram
   matrix ``G = Σ x xᵀ`` of its input rows (the same statistics the data-aware
   methods use) and, where the model's output is differentiable, a per-output-
   channel weight ``w_o = mean over rows of g_o²`` where ``g = Jᵀv`` is the
   gradient of a random projection ``vᵀy`` of the model's output with respect to
   the layer's output (one backward per batch; ``E[g gᵀ] = JᵀJ`` for Rademacher
   ``v``). The diagonal ``w`` weights a layer's output error by how much of it
   reaches the model's output — the diagonal Fisher-style weighting of FWSVD.
2. **Errors** (:func:`layer_errors`): for each method and each ρ of the layer's
   grid (nested methods: all ranks from one cached factorization; CP, BTD and TR,
   which pay a factorization per rank: the full table's probe ρ), the
   replacement's effective weight ``W′`` (read off the built replacement,
   :func:`effective_weight`) and the propagated output error
   ``e = Σ_o w_o [(W − W′) G (W − W′)ᵀ]_oo / Σ_n ‖y_n‖²``, a relative error of
   the model's output that needs no forward pass of the model.
3. **Calibration** (:func:`calibration_probes`, :func:`calibrate`): a few real
   zero-shot evaluations at the ends of the grid (each on half the held-out split,
   ``PROBE_FRACTION``, its drop taken from the original's score on the same half) fit ``drop ≈ k · c_method · e^α``
   (``k`` per layer where probed, else per layer role); the evaluated points keep
   their measured scores.

References
----------
- Y.-C. Hsu, T. Hua, S. Chang, Q. Lou, Y. Shen, H. Jin. Language model compression
  with weighted low-rank factorization (FWSVD). ICLR 2022 (Fisher-weighted rows).
- Y. LeCun, J. Denker, S. Solla. Optimal Brain Damage. NeurIPS 1989 (second-order
  saliency from the curvature of the output).
- M. Hutchinson. A stochastic estimator of the trace of the influence matrix.
  1990 (random projections for ``diag(JᵀJ)``).
- X. Wang et al. SVD-LLM. 2024 (truncation error under whitening by the input Gram).
"""

from __future__ import annotations

import logging
import math
import re
import statistics
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from autorank import methods as registry
from autorank.batches import call
from autorank.cache import FactorCache
from autorank.calibration import Calibration, as_batches, collect
from autorank.methods._base import LayerStats
from autorank.methods._layers import LayerSpec, layer_spec, weight_matrix
from autorank.tasks.base import primary_output

logger = logging.getLogger("autorank")

__all__ = [
    "LayerStatistics", "collect_statistics", "effective_weight", "layer_errors", "calibrate", "calibration_probes",
    "estimated_scores", "layer_role", "spearman", "SENSITIVITY_MODES",
]

#: how the sensitivity table is obtained: every probe evaluated (``full``), estimated and calibrated
#: (``estimate``), or ``auto``: the full table where its evaluations are cheap, else the estimate
SENSITIVITY_MODES = ("auto", "estimate", "full")
#: ``auto`` takes the full table when its evaluations would take at most this long (seconds of evaluation,
#: the original's evaluation time × the full table's probes / the concurrent workers): the estimate only
#: saves evaluations, and where they cost little the measured table is the better one (the digits demo:
#: 92 probes of 0.1 s, hypervolume 0.200 against the estimate's 0.180 at equal trials)
AUTO_FULL_SECONDS = 30.0


@dataclass
class LayerStatistics:
    """What the estimate needs of one layer: input Gram (groups, d, d), output-channel weights (out,) or None."""

    gram: torch.Tensor
    weights: Optional[torch.Tensor]
    output_energy: float


# ---------------------------------------------------------------------- statistics
def collect_statistics(
    model: nn.Module,
    inputs: Any,
    layers: Sequence[str],
    *,
    calibration: Optional[Calibration] = None,
    weighting: bool = True,
    seed: int = 0,
) -> dict[str, LayerStatistics]:
    """Per-layer input Gram matrices and output-gradient weights from one pass over ``inputs``.

    Gram matrices already in ``calibration`` are reused. ``weighting``: also one
    backward pass per batch of a Rademacher projection of the model's output
    (falls back to unweighted errors, with a log line, when the output cannot be
    differentiated). The model's weights, ``requires_grad`` flags and mode are left as they were.
    """
    layers = list(layers)
    have = calibration.stats if calibration is not None else {}
    missing = [n for n in layers if n not in have]
    cal = collect(model, inputs, missing) if missing else Calibration()
    grams = {n: (have[n] if n in have else cal.stats.get(n)) for n in layers}
    weights: dict[str, Optional[torch.Tensor]] = {n: None for n in layers}
    energy = 1.0
    if weighting:
        try:
            weights, energy = _output_weights(model, inputs, layers, seed)
        except Exception as exc:  # a model whose output is not differentiable: unweighted errors
            logger.warning("sensitivity estimate: no output gradients (%s: %s); using unweighted layer errors",
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            weights = {n: None for n in layers}
    out: dict[str, LayerStatistics] = {}
    for n in layers:
        st: Optional[LayerStats] = grams.get(n)
        if st is None:
            continue
        out[n] = LayerStatistics(st.gram, weights.get(n), float(energy))
    return out


def _output_weights(model: nn.Module, inputs: Any, layers: list[str], seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """``w_o`` = mean over output rows of ``(Jᵀv)_o²`` per layer, and ``Σ_n ‖y_n‖²`` of the model's output."""
    named = dict(model.named_modules())
    specs = {n: layer_spec(named[n]) for n in layers}
    outs: dict[str, list[torch.Tensor]] = {}
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    handles = []
    for n in layers:
        def hook(_mod, _args, out, n=n):
            outs.setdefault(n, []).append(out)
            # the rest of the model reads a copy: an in-place op after the layer (a ReLU(inplace=True) or
            # `out += identity` once a batch norm is folded) must not rewrite the tensor differentiated against
            return out.clone() if isinstance(out, torch.Tensor) else None
        handles.append(named[n].register_forward_hook(hook))
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    gen = torch.Generator().manual_seed(int(seed))
    energy = 0.0
    try:
        model.eval()
        for n in layers:
            named[n].weight.requires_grad_(True)
        for batch in as_batches(inputs):
            outs.clear()
            with torch.enable_grad():
                if isinstance(batch, dict):
                    y = primary_output(model(**batch))
                else:
                    y = primary_output(call(model, batch))
                if not y.is_floating_point():
                    raise TypeError(f"model output is {y.dtype}")
                v = (torch.randint(0, 2, y.shape, generator=gen) * 2 - 1).to(y.device, y.dtype)
                got = [(n, t) for n, ts in outs.items() for t in ts if t.requires_grad]
                if not got:
                    raise RuntimeError("no layer output is part of the graph")
                grads = torch.autograd.grad((v * y).sum(), [t for _, t in got], allow_unused=True)
            energy += float((y.detach().double() ** 2).sum())
            for (n, _t), g in zip(got, grads):
                if g is None:
                    continue
                g = g.detach().double()
                g = g.movedim(1, -1) if specs[n].is_conv else g
                g = g.reshape(-1, g.shape[-1])
                sums[n] = sums.get(n, 0) + (g * g).sum(0)
                rows[n] = rows.get(n, 0) + g.shape[0]
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
    return {n: (sums[n] / rows[n]).cpu() for n in sums}, max(energy, 1e-300)


# ---------------------------------------------------------------------- effective weights
@torch.no_grad()
def effective_weight(spec: LayerSpec, replacement: nn.Module) -> torch.Tensor:
    """The dense weight a (linear, bias-affine) replacement applies, as (groups, out/groups, d) in float64.

    Read off by probing: a Linear / Conv1D replacement with the identity matrix;
    a Conv2d replacement with one-hot patches placed so that one output position
    sees exactly the kernel's receptive field, away from any padding (so padding
    modes and the stages' own paddings do not enter). ``d`` follows the
    calibration Gram's ``F.unfold`` order (channel-major, then kh, kw).
    """
    p = next(replacement.parameters())
    dev, dt = p.device, p.dtype
    replacement = replacement.eval()
    if not spec.is_conv:
        eye = torch.eye(spec.in_channels, device=dev, dtype=dt)
        zero = torch.zeros(1, spec.in_channels, device=dev, dtype=dt)
        w = (replacement(eye) - replacement(zero)).double().t()  # (out, in)
        return w.reshape(1, spec.out_channels, spec.in_channels).cpu()
    kh, kw = spec.kernel_size
    dh, dw = spec.dilation
    sh, sw = spec.stride
    ph, pw = spec.padding
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    oh_off = ph + (-2 * ph) % sh  # the probe's first row: output row (oh_off + ph) / sh reads rows oh_off..
    ow_off = pw + (-2 * pw) % sw
    H, W = oh_off + eh + ph, ow_off + ew + pw
    orow, ocol = (oh_off + ph) // sh, (ow_off + pw) // sw
    C = spec.in_channels
    n = C * kh * kw
    full = torch.empty(spec.out_channels, n, dtype=torch.float64)
    base = replacement(torch.zeros(1, C, H, W, device=dev, dtype=dt))[0, :, orow, ocol].double()
    chunk = max(1, min(n, (1 << 24) // max(1, C * H * W)))
    idx = torch.arange(n)
    cs, ii, jj = idx // (kh * kw), (idx // kw) % kh, idx % kw
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = torch.zeros(e - s, C, H, W, device=dev, dtype=dt)
        r = torch.arange(e - s)
        x[r, cs[s:e], oh_off + ii[s:e] * dh, ow_off + jj[s:e] * dw] = 1.0
        full[:, s:e] = (replacement(x)[:, :, orow, ocol].double() - base).t().cpu()
    g = spec.groups
    cg, og = spec.in_per_group, spec.out_per_group
    full = full.reshape(spec.out_channels, C, kh * kw)
    return torch.stack([full[gi * og:(gi + 1) * og, gi * cg:(gi + 1) * cg].reshape(og, cg * kh * kw) for gi in range(g)])


def _dense_weight(module: nn.Module, spec: LayerSpec) -> torch.Tensor:
    w = weight_matrix(module).double().cpu()
    return w.reshape(spec.groups, spec.out_per_group, -1)


def _weighted_energy(dw: torch.Tensor, gram: torch.Tensor, weights: Optional[torch.Tensor]) -> float:
    """Σ_g Σ_o w_o [dW_g G_g dW_gᵀ]_oo (float32 products of a float64 difference)."""
    total = 0.0
    g_, og, _ = dw.shape
    for gi in range(g_):
        d = dw[gi].to(gram.device).float()  # the Gram stays where calibration made it (the task's device)
        rowsq = ((d @ gram[gi].float()) * d).sum(1).double()
        if weights is not None:
            rowsq = rowsq * weights[gi * og:(gi + 1) * og].to(rowsq.device).double()
        total += float(rowsq.clamp_min(0).sum())
    return total


def _replacement_weight(m, spec: LayerSpec, module: nn.Module, factors, rank) -> torch.Tensor:
    """The effective weight of ``m`` at ``rank``: for SVD the product of its truncated factors (what
    :meth:`autorank.methods.svd.SVD._build` puts in its two layers), otherwise read off the built replacement."""
    t = factors.tensors if factors is not None else {}
    if m.name == "svd" and "left" in t and "right" in t and isinstance(rank, int):
        return (t["left"][:, :, :rank].double() @ t["right"][:, :rank, :].double()).cpu()
    return effective_weight(spec, m.build(module, factors, rank, {}))


def _whitened_svd_tail(factors, stats: LayerStatistics, method_stats: Optional[LayerStats]) -> Optional[torch.Tensor]:
    """For a data-aware SVD whitened by the estimate's own Gram matrix: ``tail[g, r]`` = the weighted output
    error energy of keeping rank ``r`` of group ``g``, else None.

    With ``M S = U Σ Vᵀ`` (``S Sᵀ = G``) the truncation error is ``ΔW = Σ_{i≥r} u_i σ_i v_iᵀ S⁻¹``, so
    ``ΔW G ΔWᵀ = Σ_{i≥r} σ_i² u_i u_iᵀ`` and ``Σ_o w_o [ΔW G ΔWᵀ]_oo = Σ_{i≥r} σ_i Σ_o w_o left_oi²`` (the
    cached ``left = U Σ^½``): every rank from one pass over the factors, no product per rank."""
    if factors is None or "s" not in factors.tensors or "left" not in factors.tensors:
        return None
    if not str(factors.meta.get("init", "")).startswith("data-aware cholesky") or method_stats is None:
        return None
    if method_stats.gram is not stats.gram and not (method_stats.gram.shape == stats.gram.shape
                                                    and torch.equal(method_stats.gram.cpu(), stats.gram.cpu())):
        return None
    left, sv = factors.tensors["left"].double().cpu(), factors.tensors["s"].double().cpu()  # (g, out, k), (g, k)
    sq = left * left
    if stats.weights is not None:
        w = stats.weights.double().cpu().reshape(left.shape[0], left.shape[1], 1)
        sq = sq * w
    per = sv * sq.sum(1)  # (g, k)
    tail = per.flip(-1).cumsum(-1).flip(-1)  # tail[:, r] = Σ_{i≥r}
    return torch.cat([tail, torch.zeros(tail.shape[0], 1, dtype=tail.dtype)], dim=1)


def layer_errors(
    module: nn.Module,
    method: str,
    ranks: Sequence[Any],
    stats: LayerStatistics,
    *,
    cache: FactorCache,
    method_stats: Optional[LayerStats] = None,
) -> list[Optional[float]]:
    """The propagated relative output error of ``module`` replaced by ``method`` at each of ``ranks``.

    ``method_stats``: the calibration statistics the method's data-aware
    factorization uses (the same the trials use, so the factor cache is shared
    with them). A rank that cannot be built gives None.
    """
    m = registry.get(method)
    spec = layer_spec(module)
    w = _dense_weight(module, spec)
    gram = stats.gram.to(torch.float64)
    denom = stats.output_energy if stats.weights is not None else max(_weighted_energy(w, gram, None), 1e-300)
    out: list[Optional[float]] = []
    factors = tail = None
    seen: dict[Any, Optional[float]] = {}
    for rank in ranks:
        rank = tuple(rank) if isinstance(rank, list) else rank
        if rank in seen:  # several ρ of the grid can build the same rank (aligned ranks)
            out.append(seen[rank])
            continue
        try:
            if factors is None or not m.is_nested({}):
                factors = cache.get(m, module, method_stats if m.data_aware else None, rank, {})
                tail = _whitened_svd_tail(factors, stats, method_stats) if m.name == "svd" else None
            if tail is not None and isinstance(rank, int) and 0 <= rank < tail.shape[1]:
                out.append(float(tail[:, rank].clamp_min(0).sum()) / denom)
            else:
                dw = w - _replacement_weight(m, spec, module, factors, rank)
                out.append(_weighted_energy(dw, gram, stats.weights) / denom)
        except Exception as exc:  # a rank the method refuses (memory, convergence): no estimate there
            logger.info("sensitivity estimate: %s at rank %s: %s", method, rank, exc)
            out.append(None)
        seen[rank] = out[-1]
    return out


# ---------------------------------------------------------------------- calibration
#: layers of each role probed for the calibration's per-layer scale (None: every layer; see calibration_probes)
CALIBRATION_PER_ROLE: Optional[int] = None
#: the part of the task's held-out split a calibration probe is scored on (its drop from the original's score
#: on the same part; tasks whose ``evaluate`` takes a ``fraction``): a scale per layer needs less than a score
PROBE_FRACTION = 0.5


def layer_role(name: str) -> str:
    """Layers that play the same part in repeated blocks share a role: the name with its indices as ``#``
    (``encoder.layer.3.attention.self.value`` → ``encoder.layer.#.attention.self.value``)."""
    return re.sub(r"\d+", "#", name)


def _ok(pts: list[tuple[float, Optional[float]]]) -> list[tuple[float, float]]:
    return sorted((r, e) for r, e in pts if e is not None and e > 0)


def calibration_probes(errors: dict[str, dict[str, list[tuple[float, Optional[float]]]]], *, per_role: Optional[int] = None,
                       ends: int = 4, per_method: int = 4) -> list[tuple[str, str, float]]:
    """The few (layer, method, ρ) to evaluate for real: the ends of the grid, where the drops are largest.

    - scale: ``per_role`` layers of each role (:func:`layer_role`; spread over the
      role's estimated errors; None: every layer) at the smallest ρ of their first method;
    - exponent: ``ends`` of those layers (spread over all errors) also at the largest ρ;
    - methods: for each method, ``per_method`` layers whose first method it is
      not, at their smallest ρ, spread over that method's estimated errors.
    """
    first: dict[str, str] = {}
    for name, ms in errors.items():
        for method, pts in ms.items():
            if _ok(pts):
                first[name] = method
                break
    roles: dict[str, list[tuple[float, str]]] = {}
    for name, method in first.items():
        roles.setdefault(layer_role(name), []).append((_ok(errors[name][method])[0][1], name))
    chosen: list[str] = []
    for members in roles.values():
        members.sort()
        chosen += [n for _, n in (members if per_role is None else _spread(members, per_role))]
    probes = [(n, first[n], _ok(errors[n][first[n]])[0][0]) for n in chosen]
    for _, n in _spread(sorted((_ok(errors[n][first[n]])[0][1], n) for n in chosen), ends):
        top = _ok(errors[n][first[n]])[-1][0]
        if (n, first[n], top) not in probes:
            probes.append((n, first[n], top))
    for method in sorted({m for ms in errors.values() for m in ms}):
        cands = sorted((_ok(ms[method])[0][1], name) for name, ms in errors.items()
                       if first.get(name) not in (None, method) and method in ms and _ok(ms[method]))
        picked = _spread(cands, per_method)
        probes += [(n, method, _ok(errors[n][method])[0][0]) for _, n in picked]
        if picked and ends > 0:  # this method's own exponent: its most sensitive probed layer at the top of the grid too
            n = picked[-1][1]
            probes.append((n, method, _ok(errors[n][method])[-1][0]))
    return list(dict.fromkeys(probes))


def _spread(items: list, k: int) -> list:
    """``k`` of a sorted list, its ends included."""
    if k <= 0 or not items:
        return []
    if len(items) <= k:
        return list(items)
    if k == 1:
        return [items[-1]]
    return [items[i] for i in sorted({round(j * (len(items) - 1) / (k - 1)) for j in range(k)})]


def calibrate(
    errors: dict[str, dict[str, list[tuple[float, Optional[float]]]]],
    measured: dict[tuple[str, str, float], float],
    base: float,
) -> dict[str, Any]:
    """Fit ``drop ≈ k_layer · c_method · e^α`` to the measured drops; returns the fit.

    ``measured[(layer, method, rho)]`` = the zero-shot score of the model with
    that layer alone decomposed. ``α``: the median log-slope of drop against
    error between the two ends of the grid of layers probed at both (1 without
    such pairs; per method where it has such a pair); ``k_layer`` from the layer's probes of its first method, else the
    median of its role (:func:`layer_role`), else of all layers; ``c_method`` (1
    for each layer's first method) the median ratio of the other methods' probes.
    """
    def err(name, method, rho):
        for r, e in errors.get(name, {}).get(method, []):
            if abs(r - rho) < 1e-9:
                return e
        return None

    first = {name: next((m for m, pts in ms.items() if _ok(pts)), None) for name, ms in errors.items()}
    drops: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for (name, method, rho), score in measured.items():
        e = err(name, method, rho)
        if e is not None and e > 0:
            drops.setdefault((name, method), []).append((e, max(base - score, 1e-6)))
    slopes: dict[str, list[float]] = {}
    ref_slopes: list[float] = []
    for (name, method), pts in drops.items():
        if len(pts) >= 2:
            (e0, d0), (e1, d1) = min(pts), max(pts)
            if e1 > e0 * 1.5:
                sl = min(2.0, max(0.25, math.log(d1 / d0) / math.log(e1 / e0)))
                slopes.setdefault(method, []).append(sl)
                if method == first.get(name):
                    ref_slopes.append(sl)
    alpha = float(statistics.median(ref_slopes)) if ref_slopes else 1.0
    alphas = {m: float(statistics.median(v)) for m, v in slopes.items()}
    k_layer = {name: float(statistics.median(d / e ** alphas.get(method, alpha) for e, d in pts))
               for (name, method), pts in drops.items() if method == first.get(name)}
    k_med = float(statistics.median(k_layer.values())) if k_layer else 1.0
    by_role: dict[str, list[float]] = {}
    for n, v in k_layer.items():
        by_role.setdefault(layer_role(n), []).append(v)
    k_role = {r: float(statistics.median(v)) for r, v in by_role.items()}
    ratios: dict[str, list[float]] = {}
    for (name, method), pts in drops.items():
        if method == first.get(name):
            continue
        kl = k_layer.get(name, k_role.get(layer_role(name), k_med))
        a = alphas.get(method, alpha)
        ratios.setdefault(method, []).extend(math.log(d / max(kl * e ** a, 1e-12)) for e, d in pts)
    c_method = {m: float(math.exp(statistics.median(v))) for m, v in ratios.items() if v}
    return {"alpha": alpha, "alpha_method": alphas, "k_layer": k_layer, "k_role": k_role, "k_median": k_med,
            "c_method": c_method, "reference": first}


def estimated_scores(
    errors: dict[str, dict[str, list[tuple[float, Optional[float]]]]],
    fit: dict[str, Any],
    measured: dict[tuple[str, str, float], float],
    base: float,
) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """The sensitivity table of the estimate: ``base − k·c·e`` at every ρ, measured scores where evaluated."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    k_layer, k_med, c_method, alpha = fit["k_layer"], fit["k_median"], fit["c_method"], fit.get("alpha", 1.0)
    for name, ms in errors.items():
        for method, pts in ms.items():
            kl = k_layer.get(name, fit.get("k_role", {}).get(layer_role(name), k_med))
            c = 1.0 if method == fit["reference"].get(name) else c_method.get(method, 1.0)
            a = fit.get("alpha_method", {}).get(method, alpha)
            rows = []
            known = [e for _, e in pts if e is not None]
            worst = max(known) if known else 1.0
            for rho, e in pts:
                if (name, method, rho) in measured:
                    rows.append((rho, float(measured[(name, method, rho)])))
                elif e is not None:
                    rows.append((rho, base - kl * c * e ** a))
                else:  # no estimate at this rank: as bad as the worst of the layer's estimates (never chosen first)
                    rows.append((rho, base - kl * c * (2 * worst) ** a))
            out.setdefault(name, {})[method] = sorted(rows)
    return out


# ---------------------------------------------------------------------- agreement with the full table
def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan for fewer than 3 points or a constant side."""
    if len(a) != len(b) or len(a) < 3:
        return float("nan")

    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2.0
            i = j + 1
        return r

    ra, rb = ranks(list(a)), ranks(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va > 0 and vb > 0 else float("nan")
