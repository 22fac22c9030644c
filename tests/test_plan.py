"""Plans: JSON io, validation of their structure, uniform plans, and resolve_plan's checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import autorank
from autorank import FactorCache, LayerPlan, Plan, resolve_plan
from autorank.errors import (
    AutorankError,
    NotApplicableError,
    PlanError,
    RankError,
    SaveLoadError,
    UnknownLayerError,
    UnknownMethodError,
)
from autorank.zoo import demo

DEMO_CONVS = ["features.0", "features.3", "features.6", "features.9"]
DEMO_LINEARS = ["classifier.2", "classifier.4"]


class Odd(nn.Module):
    """Layers that must be left alone: MHA internals, tied weights, a depthwise and a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.enc = nn.Linear(16, 16)
        self.dec = nn.Linear(16, 16)
        self.dec.weight = self.enc.weight  # tied
        self.dw = nn.Conv2d(4, 4, 3, groups=4)
        self.pw = nn.Conv2d(4, 8, 1)
        self.head = nn.Linear(16, 3)
        self.norm = nn.LayerNorm(16)


@pytest.fixture(scope="module")
def model():
    return demo()


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg, f"error message must be one line: {msg!r}"
    return msg



# ---------------------------------------------------------------------- JSON io


def test_json_round_trip_keeps_every_kind_of_rank_options_and_meta(tmp_path):
    plan = Plan(
        {
            "features.0": LayerPlan("svd", 4),
            "features.3": LayerPlan("tucker2", (8, 16), {"init": "hooi"}),
            "features.6": LayerPlan("spatial-svd", 0.25),
            "features.9": LayerPlan("tucker2", "vbmf"),
        },
        {"note": "hand-written", "budget": [1, 2]},
    )
    data = json.loads(plan.to_json())
    assert data["layers"]["features.3"] == {"method": "tucker2", "rank": [8, 16], "options": {"init": "hooi"}}
    assert "options" not in data["layers"]["features.0"]  # no empty noise in the file
    back = Plan.from_dict(data)
    assert back.layers == plan.layers and back.meta == plan.meta
    assert back.layers["features.3"].rank == (8, 16)  # a JSON list is a tuple rank again
    assert isinstance(back.layers["features.6"].rank, float)

    path = tmp_path / "plan.json"
    plan.save(path)
    text = path.read_text()
    assert text.endswith("\n") and json.loads(text) == plan.to_dict()
    loaded = Plan.load(path)
    assert loaded.layers == plan.layers and loaded.meta == plan.meta
    assert list(loaded) == list(plan.layers) and len(loaded) == 4  # order kept
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary file left behind


def test_save_overwrites_and_plan_of_decomposed_model_round_trips(tmp_path, model):
    path = tmp_path / "plan.json"
    path.write_text("old")
    plan = Plan.from_dict({"layers": {"features.3": {"method": "svd", "rank": 0.5}, "classifier.2": {"method": "svd", "rank": 7}}})
    small = autorank.decompose(model, plan, cache=FactorCache())
    concrete = autorank.plan_of(small)
    concrete.save(path)
    again = Plan.load(path)
    assert sorted(again.layers) == ["classifier.2", "features.3"]
    assert again.layers["classifier.2"].rank == 7
    r = again.layers["features.3"].rank
    assert isinstance(r, int) and 1 <= r < model.features[3].in_channels  # the fraction became the method's own rank
    # the concrete plan reproduces the same model
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(autorank.decompose(model, again, cache=FactorCache()).eval()(x), small.eval()(x))


def test_methods_used_counts():
    plan = Plan.from_dict({"layers": {"a": {"method": "svd", "rank": 1}, "b": {"method": "svd", "rank": 2},
                                      "c": {"method": "cp", "rank": 3}}})
    assert plan.methods_used() == {"svd": 2, "cp": 1}


# ---------------------------------------------------------------------- validation of the structure

BAD_STRUCTURES = [
    ([], ("JSON object", "list")),
    ({"layers": {}, "metadata": {}}, ("metadata",)),
    ({"layer": {"fc": {"method": "svd", "rank": 2}}}, ("'layer'",)),
    ({"layers": [["fc", "svd", 2]]}, ("'layers'",)),
    ({"layers": {"fc": 3}}, ("'fc'",)),
    ({"layers": {"fc": {"method": "svd"}}}, ("'fc'", "'rank'")),
    ({"layers": {"fc": {"rank": 2}}}, ("'fc'", "'method'")),
    ({"layers": {"fc": {"method": 7, "rank": 2}}}, ("'fc'", "'method'")),
    ({"layers": {"fc": {"method": "svd", "rank": 2, "opts": {}}}}, ("'fc'", "opts")),
    ({"layers": {"fc": {"method": "svd", "rank": 2, "options": ["x"]}}}, ("'fc'", "'options'")),
    ({"layers": {"fc": {"method": "svd", "rank": True}}}, ("'fc'", "True")),
    ({"layers": {"fc": {"method": "svd", "rank": None}}}, ("'fc'", "None")),
    ({"layers": {"fc": {"method": "svd", "rank": []}}}, ("'fc'", "[]")),
    ({"layers": {"fc": {"method": "svd", "rank": [2, 2.5]}}}, ("'fc'", "2.5")),
    ({"layers": {"fc": {"method": "svd", "rank": {"r": 2}}}}, ("'fc'",)),
    ({"layers": {}, "meta": ["x"]}, ("'meta'",)),
]


@pytest.mark.parametrize("data,culprits", BAD_STRUCTURES, ids=[str(i) for i in range(len(BAD_STRUCTURES))])
def test_malformed_structure_raises_plan_error_naming_the_key(data, culprits):
    with pytest.raises(PlanError) as info:
        Plan.from_dict(data, source="my-plan.json")
    msg = _one_line(info.value)
    assert isinstance(info.value, AutorankError)
    assert msg.startswith("my-plan.json"), msg
    for c in culprits:
        assert c in msg, f"{c!r} not in {msg!r}"


def test_load_missing_directory_bad_json_bad_encoding(tmp_path):
    with pytest.raises(SaveLoadError) as info:
        Plan.load(tmp_path / "nope.json")
    assert "nope.json" in _one_line(info.value)

    with pytest.raises(SaveLoadError) as info:
        Plan.load(tmp_path)
    assert str(tmp_path) in _one_line(info.value)

    bad = tmp_path / "bad.json"
    bad.write_text('{"layers": {\n  "fc": {"method": "svd", "rank": 2,}\n}}')
    with pytest.raises(PlanError) as info:
        Plan.load(bad)
    msg = _one_line(info.value)
    assert "bad.json" in msg and "line 2" in msg

    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(AutorankError) as info:
        Plan.load(binary)
    assert "binary.json" in _one_line(info.value)

    structure = tmp_path / "structure.json"
    structure.write_text('{"layers": {"fc": {"method": "svd"}}}')
    with pytest.raises(PlanError) as info:
        Plan.load(structure)
    assert "structure.json" in _one_line(info.value) and "'fc'" in str(info.value)


def test_coerce(tmp_path):
    plan = Plan.from_dict({"layers": {"fc": {"method": "svd", "rank": 2}}})
    assert Plan.coerce(plan) is plan
    assert Plan.coerce(plan.to_dict()).layers == plan.layers
    plan.save(tmp_path / "p.json")
    assert Plan.coerce(str(tmp_path / "p.json")).layers == plan.layers
    assert Plan.coerce(tmp_path / "p.json").layers == plan.layers
    with pytest.raises(PlanError, match="int"):
        Plan.coerce(42)


# ---------------------------------------------------------------------- uniform plans


def test_uniform_covers_exactly_the_layers_the_method_applies_to(model):
    svd = Plan.uniform(model, "svd", 0.5)
    assert list(svd.layers) == DEMO_CONVS + DEMO_LINEARS
    assert all(lp == LayerPlan("svd", 0.5) for lp in svd.layers.values())
    assert svd.meta == {"uniform": {"method": "svd", "rank": 0.5}}
    assert list(Plan.uniform(model, "spatial-svd", 3).layers) == DEMO_CONVS
    assert list(Plan.uniform(model, "svd", 4, include=r"^classifier").layers) == DEMO_LINEARS
    assert list(Plan.uniform(model, "svd", 4, exclude=r"features\.[03]$").layers) == ["features.6", "features.9"] + DEMO_LINEARS
    assert list(Plan.uniform(model, "svd", 4, include="features", exclude=r"\.9").layers) == DEMO_CONVS[:3]
    tucker = Plan.uniform(model, "tucker2", (4, 4), options={"init": "hooi"})
    assert tucker.layers["features.3"] == LayerPlan("tucker2", (4, 4), {"init": "hooi"})
    assert json.loads(tucker.to_json())["meta"]["uniform"]["rank"] == [4, 4]


def test_uniform_normalises_aliases_and_rejects_unknown_methods(model):
    assert {lp.method for lp in Plan.uniform(model, "Channel_SVD", 2).layers.values()} == {"svd"}
    assert {lp.method for lp in Plan.uniform(model, "Spatial_SVD", 2).layers.values()} == {"spatial-svd"}
    with pytest.raises(UnknownMethodError) as info:
        Plan.uniform(model, "svdd", 2)
    msg = _one_line(info.value)
    assert "'svdd'" in msg and "did you mean 'svd'" in msg


def test_uniform_skips_excluded_layers():
    odd = Odd()
    assert sorted(Plan.uniform(odd, "svd", 2).layers) == ["head", "pw"]  # no MHA, no tied, no depthwise
    assert sorted(Plan.uniform(odd, "spatial-svd", 2).layers) == ["dw"]  # 1x1 has no spatial extent
    reasons = {n: r for n, (_, r) in autorank.candidate_layers(odd).items()}
    assert "MultiheadAttention" in reasons["attn.out_proj"]
    assert "tied" in reasons["enc"] and "tied" in reasons["dec"]
    assert reasons["head"] is None and reasons["dw"] is None
    assert "norm" not in reasons


# ---------------------------------------------------------------------- resolve_plan


def _resolve(model, layers):
    return {rl.name: rl.rank for rl in resolve_plan(model, {"layers": layers})}


def test_resolve_turns_fractions_into_the_largest_rank_within_the_flops(model):
    svd = autorank.methods.get("svd")
    for rho in (0.1, 0.37, 0.5, 0.9):
        r = _resolve(model, {"features.6": {"method": "svd", "rank": rho}})["features.6"]
        module = model.get_submodule("features.6")
        dense = autorank.methods.dense_cost(module).flops
        assert svd.cost(module, r).flops <= rho * dense < svd.cost(module, r + 1).flops, rho
    lin = nn.Linear(64, 64)  # svd at rank r: 128 r multiply-adds per row against 4096
    assert _resolve(nn.Sequential(lin), {"0": {"method": "svd", "rank": 0.5}}) == {"0": 16}
    assert _resolve(nn.Sequential(lin), {"0": {"method": "svd", "rank": 1e-9}}) == {"0": 1}  # never below 1
    # explicit ranks are kept as given; an int is (r, r) for tucker2
    assert _resolve(model, {"features.3": {"method": "tucker2", "rank": 5}, "features.6": {"method": "tucker2", "rank": [3, 7]},
                            "classifier.2": {"method": "svd", "rank": 128}}) == {
        "features.3": (5, 5), "features.6": (3, 7), "classifier.2": 128}


def test_resolve_uses_the_real_input_shape_when_given():
    """Unpadded 3x3 conv on a 5x5 map: tucker2's first 1x1 runs on 25 pixels for 9 outputs, so it
    costs relatively more than on the nominal large map, and the kept rank must be smaller."""
    net = nn.Sequential(nn.Conv2d(32, 32, 3))
    plan = {"layers": {"0": {"method": "tucker2", "rank": 0.3}}}
    (nominal,) = resolve_plan(net, plan)
    (real,) = resolve_plan(net, plan, {"0": (1, 32, 5, 5)})
    method = autorank.methods.get("tucker2")
    dense = autorank.methods.dense_cost(net[0], (1, 32, 5, 5)).flops
    assert method.cost(net[0], real.rank, (1, 32, 5, 5)).flops <= 0.3 * dense
    assert method.cost(net[0], nominal.rank, (1, 32, 5, 5)).flops > 0.3 * dense
    assert sum(real.rank) < sum(nominal.rank)
    assert real.input_shape == (1, 32, 5, 5) and nominal.input_shape is None
    # decompose learns the shape from example inputs
    small = autorank.decompose(net, plan, example_inputs=torch.randn(1, 32, 5, 5), cache=FactorCache())
    assert autorank.plan_of(small).layers["0"].rank == real.rank


BAD_PLANS = [
    ({"features.99": {"method": "svd", "rank": 2}}, UnknownLayerError, ("'features.99'",)),
    ({"feature.3": {"method": "svd", "rank": 2}}, UnknownLayerError, ("'feature.3'", "did you mean 'features.3'")),
    ({"features.1": {"method": "svd", "rank": 2}}, NotApplicableError, ("'features.1'", "Identity")),  # a folded batch norm
    ({"features.0": {"method": "nosuch", "rank": 2}}, UnknownMethodError, ("'nosuch'", "svd")),
    ({"classifier.2": {"method": "spatial-svd", "rank": 2}}, NotApplicableError, ("'classifier.2'", "spatial-svd", "Linear")),
    ({"classifier.2": {"method": "tucker2", "rank": 2}}, NotApplicableError, ("'classifier.2'", "tucker2")),
    ({"features.0": {"method": "svd", "rank": 0}}, RankError, ("'features.0'", "rank 0")),
    ({"features.0": {"method": "svd", "rank": -2}}, RankError, ("'features.0'", "-2")),
    ({"features.0": {"method": "svd", "rank": 10}}, RankError, ("'features.0'", "10", "1..9")),  # 1 -> 96, 3x3: max 9
    ({"features.0": {"method": "svd", "rank": 1.5}}, RankError, ("'features.0'", "1.5")),
    ({"features.0": {"method": "svd", "rank": 0.0}}, RankError, ("'features.0'", "0.0")),
    ({"features.0": {"method": "svd", "rank": -0.5}}, RankError, ("'features.0'", "-0.5")),
    ({"features.0": {"method": "svd", "rank": math.nan}}, RankError, ("'features.0'", "nan")),
    ({"features.0": {"method": "svd", "rank": [2, 3]}}, RankError, ("'features.0'", "[2, 3]")),
    ({"features.0": {"method": "svd", "rank": "lots"}}, RankError, ("'features.0'", "lots")),
    ({"features.3": {"method": "tucker2", "rank": [1, 2, 3]}}, RankError, ("'features.3'", "(1, 2, 3)")),
    ({"features.3": {"method": "tucker2", "rank": [0, 4]}}, RankError, ("'features.3'", "[0, 4]")),
    ({"features.3": {"method": "tucker2", "rank": [97, 4]}}, RankError, ("'features.3'", "[97, 4]")),  # 96 -> 192
    ({"features.3": {"method": "spatial-svd", "rank": 289}}, RankError, ("'features.3'", "289")),  # max min(96*3, 192*3) = 288
]


@pytest.mark.parametrize("layers,error,culprits", BAD_PLANS, ids=[str(i) for i in range(len(BAD_PLANS))])
def test_resolve_errors_name_the_culprit(model, layers, error, culprits):
    with pytest.raises(error) as info:
        resolve_plan(model, {"layers": layers})
    assert isinstance(info.value, AutorankError)
    msg = _one_line(info.value)
    for c in culprits:
        assert c in msg, f"{c!r} not in {msg!r}"


def test_resolve_refuses_excluded_layers():
    odd = Odd()
    with pytest.raises(NotApplicableError, match=r"'attn.out_proj'.*MultiheadAttention"):
        resolve_plan(odd, {"layers": {"attn.out_proj": {"method": "svd", "rank": 2}}})
    with pytest.raises(NotApplicableError, match=r"'dec'.*tied"):
        resolve_plan(odd, {"layers": {"dec": {"method": "svd", "rank": 2}}})
    with pytest.raises(NotApplicableError, match=r"'dw'.*'svd'.*depthwise"):
        resolve_plan(odd, {"layers": {"dw": {"method": "svd", "rank": 2}}})
    with pytest.raises(NotApplicableError, match=r"'pw'.*'spatial-svd'.*1x1"):
        resolve_plan(odd, {"layers": {"pw": {"method": "spatial-svd", "rank": 1}}})
    with pytest.raises(NotApplicableError, match=r"'norm'.*LayerNorm"):
        resolve_plan(odd, {"layers": {"norm": {"method": "svd", "rank": 1}}})


def test_a_bad_entry_fails_decompose_before_any_factorization(model):
    """A bad last entry: nothing factorized, the model untouched."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = FactorCache()
    plan = {"layers": {"features.3": {"method": "svd", "rank": 4}, "classifier.4": {"method": "svd", "rank": 11}}}
    with pytest.raises(RankError, match="'classifier.4'"):
        autorank.decompose(model, plan, cache=cache)
    assert cache.misses == 0 and len(cache) == 0
    with pytest.raises(UnknownLayerError):
        autorank.decompose(model, {"layers": {"features.3": {"method": "svd", "rank": 4}, "nope": {"method": "svd", "rank": 1}}},
                           cache=cache)
    assert cache.misses == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) is not autorank.methods.Decomposed for m in model.modules())
