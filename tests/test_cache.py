"""The factor cache: nested methods factorize once per layer, others once per rank; disk sharing."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import autorank
from autorank import FactorCache
from autorank.tasks.demo import demo_weights_path


@pytest.fixture
def count(monkeypatch):
    """count("svd") -> the list of ranks each real factorization of that method was asked for."""

    def install(name: str) -> list:
        cls = type(autorank.methods.get(name))
        original = cls._factorize
        calls: list = []

        def counting(self, module, spec, stats, rank, options):
            calls.append(rank)
            return original(self, module, spec, stats, rank, options)

        monkeypatch.setattr(cls, "_factorize", counting)
        return calls

    return install


def _one(method, rank, name="0", options=None) -> dict:
    entry = {"method": method, "rank": rank}
    if options:
        entry["options"] = options
    return {"layers": {name: entry}}


def _same_params(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _conv(cin=8, cout=12, k=3, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, **kw))


# ---------------------------------------------------------------------- nested methods


@pytest.mark.parametrize("method,ranks", [
    ("svd", [4, 12, 0.3, 1]),
    ("spatial-svd", [5, 2, 0.5, 24]),
    ("tucker2", [(4, 4), (8, 6), 0.5, (8, 12)]),
])
def test_nested_method_factorizes_once_for_every_rank(count, method, ranks):
    calls = count(method)
    net = _conv()
    cache = FactorCache()
    cached = []
    for i, rank in enumerate(ranks):
        cached.append(autorank.decompose(net, _one(method, rank), cache=cache))
        assert len(calls) == 1, f"rank {rank!r} refactorized"
        assert cache.misses == 1 and cache.hits == i
    assert len(cache) == 1
    # a slice of the cached factorization is what a fresh factorization gives at that rank
    for rank, small in zip(ranks, cached):
        _same_params(small, autorank.decompose(net, _one(method, rank), cache=FactorCache()))
    assert len({tuple(p.shape for p in small.parameters()) for small in cached}) == len(ranks)


def test_cp_is_cached_per_rank(count):
    calls = count("cp")
    net = _conv(4, 6)
    cache = FactorCache()
    first = {}
    for rank in (2, 3, 2, 3, 5):
        small = autorank.decompose(net, _one("cp", rank), cache=cache)
        first.setdefault(rank, small)
        _same_params(small, first[rank])
    assert calls == [2, 3, 5]
    assert cache.misses == 3 and cache.hits == 2 and len(cache) == 3


def test_tucker2_hooi_is_cached_per_rank_and_apart_from_hosvd(count):
    calls = count("tucker2")
    net = _conv()
    cache = FactorCache()
    hooi = {"init": "hooi"}
    autorank.decompose(net, _one("tucker2", (4, 4), options=hooi), cache=cache)
    autorank.decompose(net, _one("tucker2", (4, 6), options=hooi), cache=cache)
    autorank.decompose(net, _one("tucker2", (4, 4), options=hooi), cache=cache)
    autorank.decompose(net, _one("tucker2", (4, 4)), cache=cache)  # hosvd: its own entry
    autorank.decompose(net, _one("tucker2", (2, 3)), cache=cache)
    assert calls == [(4, 4), (4, 6), None]
    assert cache.misses == 3 and cache.hits == 2


def test_calibration_is_part_of_the_key_only_for_data_aware_methods(count):
    svd_calls, tucker_calls = count("svd"), count("tucker2")
    net = _conv()
    x1, x2 = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    cache = FactorCache()
    for x in (x1, x1, x2, None):
        autorank.decompose(net, _one("svd", 3), calibration=x, cache=cache)
        autorank.decompose(net, _one("tucker2", 3), calibration=x, cache=cache)
    assert len(svd_calls) == 3  # x1, x2 and no calibration are three different factorizations
    assert len(tucker_calls) == 1  # tucker2 ignores calibration: one entry for all
    assert cache.misses == 4 and cache.hits == 4


def test_same_weight_other_padding_and_stride_shares_factors_and_stays_correct(count):
    calls = count("svd")
    a = nn.Conv2d(8, 12, 3)
    b = nn.Conv2d(8, 12, 3, padding=2, stride=2, bias=False)
    with torch.no_grad():
        b.weight.copy_(a.weight)
    cache = FactorCache()
    sa = autorank.decompose(nn.Sequential(a), _one("svd", 5), cache=cache)
    sb = autorank.decompose(nn.Sequential(b), _one("svd", 5), cache=cache)
    assert len(calls) == 1 and cache.hits == 1
    _same_params(sb, autorank.decompose(nn.Sequential(b), _one("svd", 5), cache=FactorCache()))
    x = torch.randn(1, 8, 9, 9)
    assert sb(x).shape == b(x).shape and sa(x).shape == a(x).shape


def test_memory_bound_evicts_least_recently_used(count):
    calls = count("svd")
    a, b = _conv(), _conv()
    entry = FactorCache()
    autorank.decompose(a, _one("svd", 2), cache=entry)
    one_entry = entry.stats()["bytes"]
    assert one_entry > 0
    cache = FactorCache(max_bytes=int(one_entry * 1.5))
    autorank.decompose(a, _one("svd", 2), cache=cache)
    autorank.decompose(b, _one("svd", 2), cache=cache)
    assert len(cache) == 1 and cache.stats()["bytes"] <= cache.max_bytes
    autorank.decompose(a, _one("svd", 3), cache=cache)  # a was evicted: computed again
    assert cache.misses == 3 and len(calls) == 4


# ---------------------------------------------------------------------- the key follows the weights


def test_in_place_edit_under_no_grad_changes_the_key():
    net = _conv()
    layer = net[0]
    cache = FactorCache()
    k0 = cache.key(autorank.methods.get("svd"), layer)
    before = autorank.decompose(net, _one("svd", 4), cache=cache)
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] += 1.0
    assert cache.key(autorank.methods.get("svd"), layer) != k0
    after = autorank.decompose(net, _one("svd", 4), cache=cache)
    assert cache.misses == 2
    _same_params(after, autorank.decompose(net, _one("svd", 4), cache=FactorCache()))
    assert not torch.equal(after.state_dict()["0.0.weight"], before.state_dict()["0.0.weight"])
    # load_state_dict copies in place too
    net.load_state_dict({"0.weight": torch.randn_like(layer.weight), "0.bias": layer.bias.detach()})
    again = autorank.decompose(net, _one("svd", 4), cache=cache)
    assert cache.misses == 3
    _same_params(again, autorank.decompose(net, _one("svd", 4), cache=FactorCache()))


@pytest.mark.parametrize("edit", ["data-in-place", "data-assign"])
def test_edit_through_data_changes_the_key(edit):
    net = _conv()
    layer = net[0]
    cache = FactorCache()
    autorank.decompose(net, _one("svd", 4), cache=cache)
    if edit == "data-in-place":
        layer.weight.data.mul_(-2.0)
    else:
        layer.weight.data = torch.randn_like(layer.weight)
    after = autorank.decompose(net, _one("svd", 4), cache=cache)
    _same_params(after, autorank.decompose(net, _one("svd", 4), cache=FactorCache()))


# ---------------------------------------------------------------------- on disk

DISK_PLAN = {
    "layers": {
        "features.0": {"method": "cp", "rank": 2},
        "features.3": {"method": "svd", "rank": 4},
        "features.6": {"method": "tucker2", "rank": [8, 8]},
    }
}


def test_disk_cache_is_shared_with_a_separate_process(tmp_path, count):
    """Another process fills $AUTORANK_CACHE_DIR; here every entry is read from disk, none recomputed."""
    directory = tmp_path / "cache"
    script = textwrap.dedent(
        f"""
        import json, torch, autorank
        from autorank.cache import default_cache
        torch.set_num_threads(1)
        autorank.decompose(autorank.load_model("demo"), json.loads({json.dumps(json.dumps(DISK_PLAN))}))
        print(json.dumps(default_cache().stats()))
        """
    )
    env = dict(os.environ, AUTORANK_CACHE_DIR=str(directory), PYTHONDONTWRITEBYTECODE="1")
    # the other process reads the trained demo this one has (training it again there took two minutes of the suite)
    autorank.load_model("demo")
    weights = demo_weights_path()
    (directory / "models").mkdir(parents=True)
    shutil.copyfile(weights, directory / "models" / weights.name)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["misses"] == 3
    factors = directory / "factors"  # the default cache's entries live in $AUTORANK_CACHE_DIR/factors
    entries = sorted(factors.rglob("*.pt"))
    assert len(entries) == 3
    assert not [p for p in factors.rglob("*") if p.is_file() and p.suffix != ".pt"]  # no temporary files left

    calls = count("svd") + count("cp") + count("tucker2")
    model = autorank.load_model("demo")
    cache = FactorCache(factors)
    shared = autorank.decompose(model, DISK_PLAN, cache=cache)
    assert cache.disk_hits == 3 and cache.misses == 0 and calls == []
    for entry in entries:  # entries hold plain data only
        torch.load(entry, weights_only=True)
    # what the other process computed is what this one computes
    fresh = autorank.decompose(model, DISK_PLAN, cache=FactorCache())
    for (k, a), (_, b) in zip(shared.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "foreign"])
def test_corrupt_disk_entry_is_ignored_and_rewritten(tmp_path, caplog, damage):
    net = _conv()
    plan = _one("svd", 3)
    good = autorank.decompose(net, plan, cache=FactorCache(tmp_path))
    (entry,) = tmp_path.rglob("*.pt")
    data = entry.read_bytes()
    if damage == "garbage":
        entry.write_bytes(b"\x00not a torch file\xff" * 10)
    elif damage == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        entry.write_bytes(b"")
    else:
        torch.save({"something": torch.zeros(3)}, entry)

    cache = FactorCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="autorank"):
        result = autorank.decompose(net, plan, cache=cache)
    assert cache.misses == 1 and cache.disk_hits == 0
    assert any(entry.name in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING), caplog.text
    _same_params(result, good)
    # the entry was written again, whole: the next process reads it
    third = FactorCache(tmp_path)
    _same_params(autorank.decompose(net, plan, cache=third), good)
    assert third.disk_hits == 1 and third.misses == 0


# ---------------------------------------------------------------------- what decompose returns owns its tensors

def test_fine_tuning_the_decomposed_model_leaves_the_original_untouched():
    model = autorank.load_model("demo")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = autorank.decompose(model, autorank.Plan.uniform(model, "svd", 0.5), cache=FactorCache())
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    small(torch.randn(8, 1, 8, 8)).square().mean().backward()
    opt.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == []


@pytest.mark.parametrize("method,rank,net", [
    ("svd", 4, lambda: nn.Sequential(nn.Linear(16, 12))),
    ("svd", 3, lambda: _conv(6, 8)),
    ("spatial-svd", 3, lambda: _conv(6, 8)),
    ("tucker2", (3, 4), lambda: _conv(6, 8)),
    ("cp", 3, lambda: _conv(6, 8)),
], ids=["svd-linear", "svd-conv", "spatial-svd", "tucker2", "cp"])
def test_in_place_training_of_a_float64_decomposed_model_leaves_later_decompositions_untouched(method, rank, net):
    """Later decompositions read the original layer (bias) and the cache (factors): neither may change."""
    net = net().double()
    cache = FactorCache()
    first = autorank.decompose(net, _one(method, rank), cache=cache)
    snapshot = {k: v.clone() for k, v in first.state_dict().items()}
    with torch.no_grad():
        for p in first.parameters():
            p.mul_(0.0)
    again = autorank.decompose(net, _one(method, rank), cache=cache)
    assert [k for k, v in again.state_dict().items() if not torch.equal(v, snapshot[k])] == []
