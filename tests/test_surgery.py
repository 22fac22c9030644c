"""Finding layers in any nn.Module, swapping them, and what decompose() leaves alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autorank
from autorank.candidates import candidate_layers
from autorank.errors import NotApplicableError, UnknownLayerError
from autorank.methods import Decomposed
from autorank.surgery import resolve_plan


class Odd(nn.Module):
    """A user model with containers of every kind, attention, and tied weights."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.ReLU()) for c in (3, 8)])
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 4)})
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.embed = nn.Embedding(4, 8)
        self.tied = nn.Linear(8, 4, bias=False)
        self.tied.weight = self.embed.weight

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        t = x.mean((2, 3))[:, None, :]
        t, _ = self.attn(t, t, t)
        t = self.heads["a"](t)
        return self.heads["b"](t) + self.tied(t)


def test_candidates_found_in_every_container_and_exclusions_explained():
    cands = candidate_layers(Odd())
    assert {n for n, (_, r) in cands.items() if r is None} == {"blocks.0.0", "blocks.1.0", "heads.a", "heads.b"}
    assert "MultiheadAttention" in cands["attn.out_proj"][1]
    assert "tied" in cands["tied"][1] and "embed.weight" in cands["tied"][1]


def test_excluded_layer_is_refused_by_name():
    with pytest.raises(NotApplicableError, match="attn.out_proj.*MultiheadAttention"):
        autorank.decompose(Odd(), {"layers": {"attn.out_proj": {"method": "svd", "rank": 2}}})
    with pytest.raises(NotApplicableError, match="'blocks.0.1' is a ReLU"):
        autorank.decompose(Odd(), {"layers": {"blocks.0.1": {"method": "svd", "rank": 2}}})
    with pytest.raises(UnknownLayerError, match="did you mean 'heads.a'"):
        autorank.decompose(Odd(), {"layers": {"heads.aa": {"method": "svd", "rank": 2}}})


def test_decompose_returns_a_new_model_and_leaves_the_input_untouched():
    model = Odd().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 6, 6)
    y = model(x)
    plan = {"layers": {"blocks.1.0": {"method": "tucker2", "rank": [3, 4]}, "heads.a": {"method": "svd", "rank": 8}}}
    small = autorank.decompose(model, plan).eval()
    assert isinstance(small.blocks[1][0], Decomposed) and isinstance(small.heads["a"], Decomposed)
    assert not isinstance(model.blocks[1][0], Decomposed)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # undecomposed parts are copies, not shared: training the copy leaves the original alone
    assert small.blocks[0][0].weight.data_ptr() != model.blocks[0][0].weight.data_ptr()
    # the tie between embed and tied survives the copy
    assert small.tied.weight is small.embed.weight
    assert small(x).shape == y.shape


def test_full_rank_plan_reproduces_the_model():
    model = Odd().eval()
    x = torch.randn(2, 3, 6, 6)
    plan = {"layers": {"blocks.0.0": {"method": "svd", "rank": 8}, "blocks.1.0": {"method": "tucker2", "rank": [8, 8]},
                       "heads.a": {"method": "svd", "rank": 8}, "heads.b": {"method": "svd", "rank": 4}}}
    small = autorank.decompose(model, plan).eval()
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-4)


def test_fraction_uses_real_input_shapes_when_given():
    """ρ counts FLOPs on the real feature maps: a strided conv on a tiny input keeps its fraction."""
    model = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2), nn.ReLU())
    x = torch.randn(1, 16, 5, 5)
    shapes = {"0": tuple(x.shape)}
    layers = resolve_plan(model, {"layers": {"0": {"method": "tucker2", "rank": 0.3}}}, shapes)
    m = layers[0].method
    dense = autorank.methods.dense_cost(model[0], x.shape).flops
    assert m.cost(model[0], layers[0].rank, x.shape).flops <= 0.3 * dense
    small = autorank.decompose(model, {"layers": {"0": {"method": "tucker2", "rank": 0.3}}}, example_inputs=x)
    assert small[0].rank == layers[0].rank


def test_progress_reports_every_layer():
    seen = []
    autorank.decompose(Odd(), autorank.Plan.uniform(Odd(), "svd", 0.5), progress=lambda d, t, n: seen.append((d, t, n)))
    assert [d for d, _, _ in seen] == [1, 2, 3, 4] and all(t == 4 for _, t, _ in seen)


def test_a_decomposed_model_can_be_decomposed_again_and_saved(tmp_path):
    model = Odd().eval()
    once = autorank.decompose(model, {"layers": {"heads.a": {"method": "svd", "rank": 6}}})
    twice = autorank.decompose(once, {"layers": {"heads.a.0": {"method": "svd", "rank": 3}}}).eval()
    assert isinstance(twice.heads["a"][0], Decomposed)
    autorank.save(twice, tmp_path / "m.pt")
    back = autorank.load(tmp_path / "m.pt", model=Odd())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(back(x), twice(x))


def test_a_module_used_at_two_places_is_excluded():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    cands = candidate_layers(model)
    assert list(cands) == ["0"] and "also used as 2" in cands["0"][1]
    with pytest.raises(NotApplicableError, match="shared module"):
        autorank.decompose(model, {"layers": {"0": {"method": "svd", "rank": 2}}})
