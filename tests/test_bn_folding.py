"""Batch-norm folding: the inference form of a model (autorank.bn_folding, the demo's recipe)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autorank
from autorank.bn_folding import fold_batch_norms, foldable_pairs
from autorank.cache import FactorCache
from autorank.models import DigitsCNN, ResNet, seeded
from autorank.specs import SPEC_ATTR
from autorank.tasks.demo import fold_demo


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with statistics and affine terms far from the identity, so that folding has work to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_resnet_bottlenecks_fold_through_fx_and_keep_their_outputs():
    model = _randomize_bn(seeded(lambda: ResNet(layers=(1, 1, 1, 1), num_classes=10)))
    pairs = foldable_pairs(model)
    # the stem, three convolutions per block and the four downsample shortcuts: 1 + 4*3 + 4
    assert len(pairs) == 17 and ("conv1", "bn1") in pairs and ("layer1.0.downsample.0", "layer1.0.downsample.1") in pairs
    folded, done = fold_batch_norms(model)
    assert done == pairs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert type(folded) is type(model) and isinstance(folded.bn1, nn.Identity)
    assert folded.conv1.bias is not None and model.conv1.bias is None  # a bias where the conv had none
    assert isinstance(model.bn1, nn.BatchNorm2d)  # the original is untouched
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _close(folded(x), model(x))


def test_folded_layers_still_decompose_by_name():
    model = _randomize_bn(seeded(lambda: ResNet(layers=(1, 1, 1, 1), num_classes=10)))
    folded, _ = fold_batch_norms(model)
    plan = {"layers": {"layer1.0.conv2": {"method": "tucker2", "rank": [32, 32]}, "fc": {"method": "svd", "rank": 4}}}
    small = autorank.decompose(folded, plan, cache=FactorCache())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        exact = autorank.decompose(folded, {"layers": {"layer1.0.conv2": {"method": "tucker2", "rank": [64, 64]}}},
                                   cache=FactorCache())
        assert _close(exact(x), folded(x))  # full rank: the folded bias rides along in the last factor
        assert small(x).shape == (1, 10)


def test_only_a_layers_sole_consumer_is_folded_and_shared_modules_stay():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.shared = nn.Conv2d(8, 8, 1)
            self.bn2 = nn.BatchNorm2d(8)
            self.lin = nn.Linear(8, 4)
            self.bn1d = nn.BatchNorm1d(4)

        def forward(self, x):
            y = self.conv(x)
            z = self.bn(y) + y  # the conv's output is read twice: folding would change the second read
            z = self.bn2(self.shared(self.shared(z)))  # a module called twice: folding would change both calls
            return self.bn1d(self.lin(z.mean((2, 3))))

    model = _randomize_bn(Branchy())
    assert foldable_pairs(model) == [("lin", "bn1d")]
    folded, _ = fold_batch_norms(model)
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        assert _close(folded(x), model(x))


def test_untraceable_model_folds_adjacent_sequential_children():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = x * 2
            return self.body(x)

    model = _randomize_bn(Dynamic())
    assert foldable_pairs(model) == [("body.0", "body.1")]  # the second batch norm follows a ReLU
    folded, _ = fold_batch_norms(model)
    assert isinstance(folded.body[1], nn.Identity) and isinstance(folded.body[3], nn.BatchNorm2d)
    x = torch.rand(2, 3, 7, 7)
    with torch.no_grad():
        assert _close(folded(x), model(x))


def test_a_model_without_batch_norms_comes_back_unchanged():
    plain = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False), nn.ReLU())  # no affine terms to fold
    plain[1].running_mean.fill_(0.5)
    plain[1].running_var.fill_(4.0)
    folded, pairs = fold_batch_norms(plain.eval())
    x = torch.randn(3, 4)
    assert pairs == [("0", "1")] and _close(folded(x), plain(x))
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    folded, pairs = fold_batch_norms(model)
    assert pairs == [] and folded is not model
    x = torch.randn(2, 4)
    assert torch.equal(folded(x), model(x))
    with pytest.raises(TypeError, match="nn.Module, got str"):
        fold_batch_norms("resnet50")


def test_the_demo_is_served_folded():
    trained = _randomize_bn(seeded(lambda: DigitsCNN(width=16)))
    folded = fold_demo(trained)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert [type(m).__name__ for m in folded.features][:3] == ["Conv2d", "Identity", "ReLU"]
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert _close(folded(x), trained(x))
    # the demo's cached weights are this inference form: no batch-norm keys, a bias on every convolution
    state = autorank.load_model("demo").state_dict()
    assert not any("running_mean" in k for k in state) and "features.9.bias" in state
    # a folded copy forgets the spec its original was loaded from: that spec builds the unfolded architecture
    net = autorank.load_model("demo")
    assert net.__dict__[SPEC_ATTR] == "demo" and SPEC_ATTR not in fold_batch_norms(net)[0].__dict__


def test_a_spec_that_folds_rebuilds_the_folded_model_for_save_and_load(tmp_path):
    """On the command line a user folds in their spec's callable: every rebuild by spec (workers, load) folds alike."""
    (tmp_path / "foldnet.py").write_text(
        "import torch, autorank\n"
        "from autorank.models import ResNet, seeded\n"
        "def build():\n"
        "    net = seeded(lambda: ResNet(layers=(1, 1, 1, 1), num_classes=10))\n"
        "    with torch.no_grad():\n"
        "        for m in net.modules():\n"
        "            if isinstance(m, torch.nn.BatchNorm2d):\n"
        "                m.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(m.num_features))\n"
        "    return autorank.fold_batch_norms(net)[0]\n"
    )
    spec = f"{tmp_path / 'foldnet.py'}:build"
    a, b = autorank.load_model(spec), autorank.load_model(spec)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())  # deterministic: workers agree
    small = autorank.decompose(a, {"layers": {"layer2.0.conv2": {"method": "svd", "rank": 0.5}}}, cache=FactorCache())
    back = autorank.load(autorank.save(small, tmp_path / "small.pt"), trust_spec=True)
    assert isinstance(back.bn1, nn.Identity) and back.conv1.bias is not None
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
