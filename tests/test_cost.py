"""Cost model: analytic plan costs equal fvcore's count, budgets, reachability, `autorank profile`."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import autorank
from autorank.cost.budget import BudgetError, check_reachable, parse_budget, smallest_reachable
from autorank.cost.flops import count_flops, count_flops_torch
from autorank.cost.profile import profile_model
from autorank.errors import NotApplicableError, RankError, UnknownLayerError


class SmallResNetish(nn.Module):
    """Strided, dilated, grouped and padded convs plus linears: every formula path."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 5, stride=2, padding=2)
        self.a = nn.Conv2d(16, 24, 3, padding=2, dilation=2, padding_mode="reflect")
        self.b = nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=3)
        self.c = nn.Conv2d(24, 32, (1, 3), padding=(0, 1))
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 48, 1)
        self.fc1 = nn.Linear(48, 40)
        self.fc2 = nn.Linear(40, 10, bias=False)

    def forward(self, x):
        for conv in (self.stem, self.a, self.b, self.c, self.dw, self.pw):
            x = torch.relu(conv(x))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def random_plan(profile, rng, methods=None):
    plan = {}
    for name, lp in profile.layers.items():
        usable = [m for m in lp.applicable() if methods is None or m in methods]
        if not usable or rng.random() < 0.2:
            continue
        m = rng.choice(usable)
        rank = rng.choice([0.1, 0.25, 0.5, 0.8, 1.0]) if rng.random() < 0.7 else autorank.methods.get(m).rank_path(lp.spec)[0]
        plan[name] = {"method": m, "rank": list(rank) if isinstance(rank, tuple) else rank}
    return {"layers": plan}


@pytest.mark.parametrize("seed", range(4))
def test_analytic_estimate_equals_fvcore_on_the_decomposed_model(seed):
    model = SmallResNetish().eval()
    x = torch.randn(2, 3, 33, 29)
    prof = profile_model(model, x)
    plan = random_plan(prof, random.Random(seed), methods=["svd", "spatial-svd", "tucker2"] if seed % 2 else None)
    est = prof.estimate(autorank.Plan.from_dict(plan))
    small = autorank.decompose(model, plan, example_inputs=x)
    assert est.flops == count_flops(small, x)
    assert est.params == sum(p.numel() for p in small.parameters())
    # the plain-mapping form gives the same number
    fast = {n: (e["method"], tuple(e["rank"]) if isinstance(e["rank"], list) else e["rank"]) for n, e in plan["layers"].items()}
    assert prof.estimate(fast) == est


def test_profile_lists_layers_with_real_shapes_and_reasons():
    model = SmallResNetish()
    prof = profile_model(model, torch.randn(1, 3, 32, 32))
    assert prof.layers["b"].input_shape == (1, 24, 16, 16) and prof.layers["fc1"].input_shape == (1, 48)
    assert prof.layers["dw"].applicable() == ["spatial-svd"]
    assert "depthwise" in prof.layers["dw"].reasons["svd"]
    assert prof.flops == count_flops(model, torch.randn(1, 3, 32, 32))
    # break-even: the returned rank is no dearer than dense, the next rank is
    for lp in prof.layers.values():
        for m in lp.applicable():
            be = lp.break_even(m)
            meth = autorank.methods.get(m)
            path = meth.rank_path(lp.spec)
            if be is None:
                assert meth.cost(lp.spec, path[0], lp.input_shape).flops > lp.dense.flops
                continue
            assert meth.cost(lp.spec, be, lp.input_shape).flops <= lp.dense.flops
            i = path.index(be)
            if i + 1 < len(path):
                assert meth.cost(lp.spec, path[i + 1], lp.input_shape).flops > lp.dense.flops


def test_estimate_refuses_what_the_model_cannot_do():
    prof = profile_model(SmallResNetish(), torch.randn(1, 3, 32, 32))
    with pytest.raises(UnknownLayerError, match="nope"):
        prof.estimate({"nope": ("svd", 0.5)})
    with pytest.raises(NotApplicableError, match="'dw'.*tucker2"):
        prof.estimate({"dw": ("tucker2", 0.5)})
    with pytest.raises(RankError, match="'fc1'"):
        prof.estimate({"fc1": ("svd", 999)})


def test_fvcore_and_torch_flop_counter_agree_where_both_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, (3, 1), dilation=2),
                          nn.Flatten(), nn.LazyLinear(7))
    x = torch.randn(2, 3, 15, 12)
    model(x)
    assert count_flops(model, x) == count_flops_torch(model, x) > 0
    small = autorank.decompose(model, autorank.Plan.uniform(model, "svd", 0.5))
    assert count_flops(small, x) == count_flops_torch(small, x) < count_flops(model, x)


@pytest.mark.parametrize("text,metric,value,relative", [
    ("30%flops", "flops", 0.30, True),
    ("50%params", "params", 0.50, True),
    ("60%latency", "latency", 0.60, True),
    ("flops<=1.2G", "flops", 1.2e9, False),
    ("params<=5M", "params", 5e6, False),
    ("latency<=4ms", "latency", 4e-3, False),
    ("latency<=250us", "latency", 250e-6, False),
    (" FLOPS <= 2.5e9 ", "flops", 2.5e9, False),
])
def test_budget_forms(text, metric, value, relative):
    (c,) = parse_budget(text).constraints
    assert (c.metric, c.relative) == (metric, relative)
    assert c.value == pytest.approx(value)
    assert parse_budget(c.text()).constraints == (c,)  # prints back to something that parses the same


def test_budget_combination_and_words():
    b = parse_budget("30%flops,latency<=4ms")
    assert b.metrics == ("flops", "latency") and b.needs_latency
    words = b.describe()
    assert "at most 30% of the original model's FLOPs" in words and "4 ms" in words and "multiply-add" in words
    original = {"flops": 1000, "latency": 0.010}
    assert b.limits(original) == {"flops": 300, "latency": 0.004}
    assert b.satisfied({"flops": 300, "latency": 0.004}, original)
    assert not b.satisfied({"flops": 301, "latency": 0.001}, original)
    assert b.violation({"flops": 600, "latency": 0.001}, original) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", ["", "30flops", "%flops", "30%memory", "latency<=4", "flops<=3X", "0%flops",
                                 "150%flops", "30%flops,,", "flops>=1G", "fast", "flops<=-1G"])
def test_budget_rejects_malformed_with_what_was_expected(bad):
    with pytest.raises(BudgetError) as info:
        parse_budget(bad)
    msg = str(info.value)
    assert "\n" not in msg and ("expected" in msg or "must" in msg or "unknown" in msg or "needs" in msg)


def test_unreachable_budget_is_refused_with_the_smallest_cost():
    prof = profile_model(SmallResNetish(), torch.randn(1, 3, 32, 32))
    reach = smallest_reachable(prof)
    assert 0 < reach["flops"] < prof.flops
    check_reachable(parse_budget("50%flops"), prof)
    too_small = 100 * reach["flops"] / prof.flops / 2
    with pytest.raises(BudgetError, match=r"smallest plan reaches .*% of the original"):
        check_reachable(parse_budget(f"{too_small:.3f}%flops"), prof)
    # fewer methods, higher floor
    assert smallest_reachable(prof, ["svd"])["flops"] >= reach["flops"]


# ---------------------------------------------------------------------- `autorank profile` end to end
def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "autorank.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_profile_cli_table_and_json_on_demo():
    res = run_cli("profile", "--budget", "30%flops", "--threads", "1")
    assert res.returncode == 0, res.stderr
    for text in ("features.3", "classifier.2", "tucker2", "total", "multiply-add", "at most 30%", "ms"):
        assert text in res.stdout
    res = run_cli("profile", "--json", "--threads", "1")
    data = json.loads(res.stdout)
    names = [lp["name"] for lp in data["layers"]]
    assert names == ["features.0", "features.3", "features.6", "features.9", "classifier.2", "classifier.4"]
    assert all(lp["latency_s"] > 0 for lp in data["layers"]) and data["latency_s"] > 0
    assert data["threads"] == 1
    assert data["flops"] >= sum(lp["flops"] for lp in data["layers"]) > 0  # activations, pooling etc. count too
    assert data["layers"][4]["methods"]["svd"]["break_even_rank"] == 192  # the demo's Linear(384, 384)
    assert data["layers"][4]["methods"]["tucker2"]["applies"] is False


def test_profile_cli_user_file_model(tmp_path):
    (tmp_path / "mynet.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def build():
            return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 5))
    """))
    res = run_cli("profile", "--model", "mynet.py:build", "--input", "2x3x8x8", "--json", "--no-latency", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert [lp["name"] for lp in data["layers"]] == ["0", "3"]
    assert data["input_shape"] == [2, 3, 8, 8]
    assert data["layers"][0]["flops"] == 2 * 16 * 3 * 9 * 64


@pytest.mark.parametrize("args,needle", [
    (["profile", "--model", "mynet.py:build"], "--input"),
    (["profile", "--budget", "30flops"], "30flops"),
    (["profile", "--budget", "0.01%flops", "--no-latency"], "cannot be met"),
    (["profile", "--device", "cuda:7"], "cuda"),
])
def test_profile_cli_bad_input(tmp_path, args, needle):
    (tmp_path / "mynet.py").write_text("import torch.nn as nn\ndef build():\n    return nn.Linear(4, 4)\n")
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr


def test_rank_alignment_rounds_fraction_ranks_down_to_multiples():
    model = SmallResNetish()
    x = torch.randn(1, 3, 32, 32)
    prof = profile_model(model, x)
    plan = autorank.Plan.from_dict({"layers": {
        "fc1": {"method": "svd", "rank": 0.7, "options": {"align": 8}},
        "a": {"method": "tucker2", "rank": 0.6, "options": {"align": 8}},
        "pw": {"method": "svd", "rank": 5},                      # explicit ranks are kept as given
    }})
    small = autorank.decompose(model, plan, example_inputs=x)
    assert small.fc1.rank % 8 == 0 and all(r % 8 == 0 for r in small.a.rank) and small.pw.rank == 5
    unaligned = autorank.decompose(model, {"layers": {"fc1": {"method": "svd", "rank": 0.7}}}, example_inputs=x)
    assert small.fc1.rank <= unaligned.fc1.rank  # rounding down keeps the FLOPs fraction
    assert prof.estimate(plan).flops == count_flops(small, x)
    with pytest.raises(autorank.AutorankError, match="align"):
        autorank.decompose(model, {"layers": {"fc1": {"method": "svd", "rank": 0.7, "options": {"align": 0}}}})


def test_align_rank_never_below_multiple_nor_above_max():
    from autorank.methods._base import align_rank

    assert align_rank(37, 8) == 32 and align_rank(5, 8) == 8 and align_rank(5, 8, max_rank=6) == 6
    assert align_rank((17, 40), 16, (20, 48)) == (16, 32) and align_rank(9, 1) == 9
