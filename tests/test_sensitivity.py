"""The sensitivity estimate: effective weights, layer errors, output weights, calibration, the table it gives."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from autorank import methods as registry
from autorank.cache import FactorCache
from autorank.calibration import _rows, collect
from autorank.errors import SearchError
from autorank.methods._layers import layer_spec
from autorank.search import search
from autorank.search.allocate import Sensitivity
from autorank.search.sensitivity import (
    LayerStatistics,
    calibrate,
    calibration_probes,
    collect_statistics,
    effective_weight,
    estimated_scores,
    layer_errors,
    layer_role,
    spearman,
)
from tests.conftest import LAYER_CASES
from tests.search_toys import ToyFidelity, toy_cnn, toy_task

CASES = [(c, m) for c in LAYER_CASES for m in registry.available() if registry.get(m).applies(c.build()[0]) is None]


@pytest.mark.parametrize("case,method", CASES, ids=[f"{c.id}-{m}" for c, m in CASES])
def test_effective_weight_reproduces_every_replacement(case, method):
    """The dense weight read off a built replacement maps unfolded inputs to its outputs (bias removed)."""
    layer, x = case.build()
    spec = layer_spec(layer)
    m = registry.get(method)
    rank = m.rank_for(spec, 0.4, tuple(x.shape))
    rep = m.build(layer, m.factorize(layer, None, rank, {}), rank, {})
    w = effective_weight(spec, rep)
    with torch.no_grad():
        y = (rep(x) - rep(torch.zeros_like(x))).double()
    rows = _rows(layer, spec, x)
    pred = torch.einsum("grd,god->gro", rows, w)
    if spec.is_conv:
        y = y.movedim(1, -1)
        y = y.reshape(-1, spec.groups, spec.out_per_group).permute(1, 0, 2)
    else:
        y = y.reshape(1, -1, spec.out_channels)
    assert torch.allclose(pred, y, atol=1e-5 * float(y.abs().max()) + 1e-6)


def test_svd_factor_product_is_the_weight_its_layers_apply():
    """The estimate's shortcut for SVD (left × right factors) equals the weight read off its built layers."""
    sensitivity = importlib.import_module("autorank.search.sensitivity")
    m = registry.get("svd")
    for case in LAYER_CASES:
        layer, x = case.build()
        if m.applies(layer) is not None:
            continue
        spec = layer_spec(layer)
        f = m.factorize(layer, None)
        for r in (1, m.max_rank(spec)):
            short = sensitivity._replacement_weight(m, spec, layer, f, r)
            assert torch.allclose(short, effective_weight(spec, m.build(layer, f, r, {})), atol=1e-5), case.id


def test_unweighted_svd_error_is_the_whitened_tail_of_singular_values():
    """Data-aware SVD: ‖(W − W_r)X‖² / ‖WX‖² = Σ_{i>r} s_i² / Σ s_i² (Eckart–Young in the whitened space)."""
    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(24, 16)
    x = torch.randn(200, 24, generator=g) @ torch.randn(24, 24, generator=g)  # correlated inputs
    cal = collect(layer, [x])
    stats = LayerStatistics(cal.stats[""].gram, None, 1.0)
    ranks = [1, 3, 6, 10, 16]
    errs = layer_errors(layer, "svd", ranks, stats, cache=FactorCache(), method_stats=cal.stats[""])
    s = registry.get("svd").factorize(layer, cal.stats[""]).tensors["s"][0].double()
    want = [float((s[r:] ** 2).sum() / (s ** 2).sum()) for r in ranks]
    assert errs == pytest.approx(want, rel=1e-3, abs=1e-6)
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-6
    # and on the inputs themselves, by a forward pass
    m = registry.get("svd")
    rep = m.build(layer, m.factorize(layer, cal.stats[""]), 3, {})
    with torch.no_grad():
        direct = float(((layer(x) - rep(x)) ** 2).sum() / ((layer(x) - layer.bias) ** 2).sum())
    assert errs[1] == pytest.approx(direct, rel=1e-3)


def test_svd_errors_from_the_whitened_tail_equal_the_weighted_error_of_each_truncation():
    """The closed form (every rank from the cached singular values) gives what the product of the truncated
    factors gives, with output-channel weights and groups; a Gram other than the factorization's is not taken."""
    from autorank.search.sensitivity import _dense_weight, _weighted_energy, _whitened_svd_tail

    g = torch.Generator().manual_seed(5)
    for layer, x in ((nn.Linear(24, 16), torch.randn(300, 24, generator=g) @ torch.randn(24, 24, generator=g)),
                     (nn.Conv2d(8, 12, 3, padding=1, groups=2), torch.randn(6, 8, 9, 9, generator=g))):
        cal = collect(layer, [x])
        st = cal.stats[""]
        spec = layer_spec(layer)
        weights = torch.rand(spec.out_channels, generator=g) + 0.1
        stats = LayerStatistics(st.gram, weights, 3.0)
        ranks = [1, 2, 4, 7, 11]
        errs = layer_errors(layer, "svd", ranks, stats, cache=FactorCache(), method_stats=st)
        f = registry.get("svd").factorize(layer, st)
        assert _whitened_svd_tail(f, stats, st) is not None
        w = _dense_weight(layer, spec)
        want = []
        for r in ranks:
            dw = w - f.tensors["left"][:, :, :r].double() @ f.tensors["right"][:, :r, :].double()
            want.append(_weighted_energy(dw, st.gram.double(), weights) / 3.0)
        assert errs == pytest.approx(want, rel=2e-3, abs=1e-6 * max(want)), (errs, want)
        other = LayerStatistics(st.gram * 2, weights, 3.0)
        assert _whitened_svd_tail(f, other, st) is None  # the estimate's Gram is not the one the factors were whitened by


def test_output_weights_are_the_jacobian_column_energies():
    """For y = B·(A x), the gradient energy of layer A's outputs under random projections is diag(BᵀB)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6, bias=False), nn.Linear(6, 9, bias=False))
    with torch.no_grad():  # B with orthogonal columns of different norms: BᵀB is diagonal
        q, _ = torch.linalg.qr(torch.randn(9, 6))
        model[1].weight.copy_(q * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.25, 0.1]))
    x = torch.randn(4000, 8)
    st = collect_statistics(model, [x], ["0"], weighting=True, seed=1)["0"]
    want = (model[1].weight.detach().double() ** 2).sum(0)
    assert torch.allclose(st.weights, want, rtol=0.08)
    with torch.no_grad():
        assert st.output_energy == pytest.approx(float((model(x).double() ** 2).sum()), rel=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    # weighted error of a perturbation of layer 0 = the error it causes at the model's output (BᵀB diagonal)
    dw = torch.randn(6, 8) * 0.01
    approx = float((((dw.double() @ st.gram[0]) * dw.double()).sum(1) * st.weights).sum())
    with torch.no_grad():
        exact = float((((model[1].weight @ dw) @ x.t()).double() ** 2).sum())
    assert approx == pytest.approx(exact, rel=0.1)


def test_output_weights_ignore_an_in_place_op_after_the_layer():
    """A ReLU(inplace=True) right after a layer (a folded batch norm's place) must not rewrite the output
    the gradient energies are taken against: the weights equal those of the same model without in-place."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 9))
    inplace = nn.Sequential(plain[0], nn.ReLU(inplace=True), plain[2])
    x = torch.randn(500, 8)
    a = collect_statistics(plain, [x], ["0"], weighting=True, seed=1)["0"]
    b = collect_statistics(inplace, [x], ["0"], weighting=True, seed=1)["0"]
    assert torch.allclose(a.weights, b.weights) and a.output_energy == pytest.approx(b.output_energy)
    assert float(a.weights.min()) < float(a.weights.max())  # the ReLU masks some rows: not a trivial case


def test_calibration_recovers_scales_and_exponent():
    """Drops generated as k_layer · c_method · e^α are fitted back from the probes the estimate picks."""
    errors, truth_k = {}, {}
    for i in range(6):
        name = f"block.{i}.fc"
        truth_k[name] = 0.5 + i
        errors[name] = {"svd": [(r, (1 - r) * (i + 1) * 0.01) for r in (0.1, 0.5, 0.9)],
                        "tt": [(r, (1 - r) * (i + 1) * 0.02) for r in (0.1, 0.5, 0.9)]}
    alpha, c_tt, base = 0.7, 3.0, 1.0

    def score(n, m, r):
        e = dict(errors[n][m])[r]
        return base - truth_k[n] * (c_tt if m == "tt" else 1.0) * e ** alpha

    probes = calibration_probes(errors, per_role=None, ends=2, per_method=2)
    assert {(n, "svd", 0.1) for n in errors} <= set(probes)  # every layer at the small end of its grid
    assert any(p[1] == "tt" for p in probes) and sum(p[2] == 0.9 and p[1] == "svd" for p in probes) == 2
    measured = {p: score(*p) for p in probes}
    fit = calibrate(errors, measured, base)
    assert fit["alpha"] == pytest.approx(alpha, rel=1e-6)
    assert fit["c_method"]["tt"] == pytest.approx(c_tt, rel=1e-6)
    assert all(fit["k_layer"][n] == pytest.approx(k, rel=1e-6) for n, k in truth_k.items())
    table = estimated_scores(errors, fit, measured, base)
    for n, ms in table.items():
        for m, pts in ms.items():
            for r, s in pts:
                assert s == pytest.approx(score(n, m, r), rel=1e-9)
    assert layer_role("encoder.layer.11.attention.self.value") == "encoder.layer.#.attention.self.value"


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [1, 2, 2, 3, 7, 7, 0], [1, 3, 2, 4, 4, 9, 2]
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic)  # ties get average ranks
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_estimate_ranks_layers_like_the_full_table_with_far_fewer_evaluations(tmp_path):
    """On the toy CNN: the estimated table orders (layer, ρ) drops as the measured one does, from fewer evaluations."""
    kw = dict(budget="30%flops", trials=4, finetune=0, measure_latency=False, sensitivity_points=4)
    full = search(toy_cnn(), toy_task(), out=tmp_path / "full", sensitivity_mode="full", **kw)
    est = search(toy_cnn(), toy_task(), out=tmp_path / "est", sensitivity_mode="estimate", **kw)
    f = json.loads((full.run_dir / "sensitivity.json").read_text())
    e = json.loads((est.run_dir / "sensitivity.json").read_text())
    assert f["mode"] == "full" and e["mode"] == "estimate"
    n_full = sum(len(p) for ms in f["scores"].values() for p in ms.values())
    assert len(e["estimate"]["probes"]) < n_full / 2
    sens = Sensitivity.from_dict(e)
    rhos = {}
    for method in ("svd", "spatial-svd", "tucker2"):
        pts = [(n, r, s) for n, ms in f["scores"].items() for r, s in ms.get(method, [])]
        rhos[method] = spearman([sens.drop(n, (method, r)) for n, r, _ in pts], [f["base"] - s for _, _, s in pts])
    # svd and spatial SVD: 20 and 12 (layer, ρ) points (Tucker-2's drops on these 16- and 32-channel toy
    # convs are not even monotone in ρ, so its ranking is not asserted; benchmarks/bench_sensitivity.py reports it)
    assert rhos["svd"] > 0.9 and rhos["spatial-svd"] > 0.8, rhos
    # probed points keep their measured scores
    for n, m, r, s in e["estimate"]["probes"]:
        assert dict(map(tuple, e["scores"][n][m]))[r] == s


class _HalfScoringToy(ToyFidelity):
    """The toy task scoring part of its inputs when asked (``fraction``), 0.1 lower there, each call recorded."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[float, float]] = []

    def evaluate(self, model: nn.Module, fraction: float = 1.0) -> float:
        if fraction == 1.0:
            score = super().evaluate(model)
        else:
            n = max(1, round(fraction * len(self.x)))
            with torch.no_grad():
                out = model.eval()(self.x[:n])
            score = float(1 - (out - self.ref[:n]).norm() / self.ref[:n].norm()) - 0.1
        self.calls.append((fraction, score))
        return score


def test_calibration_probes_score_half_the_held_out_split_against_the_original_on_that_half(tmp_path):
    """Each probe is scored on half the held-out split (PROBE_FRACTION) and enters the table as the drop from
    the original's score on that half, taken off the whole score; the trials are scored whole. A task that
    cannot score a part has its probes scored whole."""
    task = _HalfScoringToy()
    res = search(toy_cnn(), task, budget="30%flops", trials=3, finetune=0, measure_latency=False, out=tmp_path / "r",
                 sensitivity_mode="estimate")
    doc = json.loads((res.run_dir / "sensitivity.json").read_text())
    est = doc["estimate"]
    halves = [s for f, s in task.calls if f == 0.5]
    assert est["probe_fraction"] == 0.5 and est["probe_base"] == pytest.approx(halves[0]) and halves[0] < 0.95
    probes = sorted(s for _, _, _, s in est["probes"])
    assert len(probes) == len(halves) - 1 >= 3
    assert probes == pytest.approx(sorted(doc["base"] - (halves[0] - h) for h in halves[1:]))
    assert sum(f == 1.0 for f, _ in task.calls) >= 1 + 3  # the original and the trials, scored whole
    whole = search(toy_cnn(), toy_task(), budget="30%flops", trials=2, finetune=0, measure_latency=False, out=tmp_path / "w",
                   sensitivity_mode="estimate")
    est = json.loads((whole.run_dir / "sensitivity.json").read_text())["estimate"]
    assert est["probe_base"] == pytest.approx(json.loads((whole.run_dir / "sensitivity.json").read_text())["base"])


def test_auto_measures_the_full_table_when_its_evaluations_are_cheap_and_keeps_its_choice_on_resume(tmp_path, monkeypatch):
    """auto: the full table when the original's evaluation time × the full table's probes is at most
    AUTO_FULL_SECONDS, else the estimate; the choice is checkpointed and a resumed run keeps it."""
    sens_mod = importlib.import_module("autorank.search.sensitivity")
    kw = dict(budget="30%flops", trials=2, finetune=0, measure_latency=False, sensitivity_points=2)
    cheap = search(toy_cnn(), toy_task(), out=tmp_path / "cheap", **kw)
    doc = json.loads((cheap.run_dir / "sensitivity.json").read_text())
    assert doc["mode"] == "full" and doc["auto"]["mode"] == "full"
    n = doc["auto"]["full_evaluations"]
    assert n == sum(len(p) for ms in doc["scores"].values() for p in ms.values())
    assert doc["auto"]["full_seconds"] == pytest.approx(doc["auto"]["evaluate_s"] * n)
    monkeypatch.setattr(sens_mod, "AUTO_FULL_SECONDS", 0.0)
    dear = search(toy_cnn(), toy_task(), out=tmp_path / "dear", **kw)
    doc = json.loads((dear.run_dir / "sensitivity.json").read_text())
    assert doc["mode"] == "estimate" and doc["auto"]["mode"] == "estimate" and "estimate" in doc
    # the choice recorded in the checkpoint wins over a threshold that changed meanwhile
    from autorank.search.rundir import RunDir
    from autorank.search.warm_start import CHECKPOINT, resolve_mode

    class _One:
        concurrency = 1

    rd = RunDir(tmp_path / "resumed")
    rd.path.mkdir()
    rd.append_jsonl(CHECKPOINT, {"kind": "mode", "mode": "estimate", "full_evaluations": n})
    monkeypatch.setattr(sens_mod, "AUTO_FULL_SECONDS", 1e9)  # would choose the full table now
    assert resolve_mode(rd, _One(), {}, 2, 0.001)[0] == "estimate"
    assert resolve_mode(RunDir(tmp_path / "fresh"), _One(), {}, 2, 0.001)[0] == "full"


def test_a_bad_sensitivity_mode_is_refused(tmp_path):
    with pytest.raises(SearchError, match="sensitivity mode 'exact'"):
        search(toy_cnn(), toy_task(), budget="30%flops", trials=2, out=tmp_path / "r", sensitivity_mode="exact")
    assert not (tmp_path / "r").exists()


def test_model_without_differentiable_output_falls_back_to_unweighted_errors():
    class ArgMax(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x).argmax(-1)

    st = collect_statistics(ArgMax(), [torch.randn(10, 4)], ["fc"], weighting=True)
    assert st["fc"].weights is None and st["fc"].gram.shape == (1, 4, 4)


def test_the_command_line_chooses_the_table(tmp_path, capsys, monkeypatch):
    """`autorank search --sensitivity full` measures every probe, `estimate` estimates, the default (auto) measures
    a table whose evaluations are cheap; a bad value is refused."""
    from tests.test_cli_search import run_inproc

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    common = ("search", "--model", "tests.search_toys:toy_cnn", "--task", "tests.search_toys:toy_task", "--budget", "30%flops",
              "--trials", "3", "--finetune", "0", "--sensitivity-points", "2", "-q")
    for mode in ("full", "estimate", None):
        out = tmp_path / (mode or "default")
        args = common + ("--out", str(out)) + (("--sensitivity", mode) if mode else ())
        p = run_inproc(*args, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
        assert p.returncode == 0, p.stderr[-2000:]
        table = json.loads((out / "sensitivity.json").read_text())
        # the default, auto: the toy's full table costs well under a second of evaluation, so it is measured
        assert table["mode"] == (mode or "full") and (mode is not None or table["auto"]["full_seconds"] < 30)
        assert json.loads((out / "settings.json").read_text())["sensitivity"] == (mode or "auto")
    bad = run_inproc(*common, "--out", str(tmp_path / "bad"), "--sensitivity", "exact", cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert bad.returncode == 2 and "invalid choice: 'exact'" in bad.stderr
