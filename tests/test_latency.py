"""Latency: measurement, the per-layer lookup table, the plan estimate, rank alignment, the worker job.

These tests check behaviour (statistics ordered, threads restored, cache files
reused and invalidated, the estimate's arithmetic), never speed: layers are tiny
and repeats few.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from autorank import Plan
from autorank.cost.latency import align_plan, build_table, estimate_latency
from autorank.cost.latency_table import LatencyTable, layer_signature, model_signature
from autorank.cost.profile import profile_model
from autorank.cost.timing import DeviceError, LatencyError, Timing, device_name, measure, omp_wait_policy
from autorank.errors import AutorankError, RankError
from autorank.methods._base import align_rank
from autorank.methods._base import align_rank as autorank_align
from autorank.search.latency import profile_latency_job

FAST = dict(warmup=1, repeats=3, min_time=0.0)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def table_dir(tmp_path):
    return tmp_path / "latency"


def _table(table_dir, **kw) -> LatencyTable:
    args = dict(threads=1, batch_size=4, **FAST)
    args.update(kw)
    return LatencyTable(table_dir, **args)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, a, b):
        return self.lin(a) + b


def small_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


# ---------------------------------------------------------------------- measure
def test_timing_statistics_are_ordered_and_threads_recorded_then_restored():
    before = torch.get_num_threads()
    layer = nn.Linear(8, 4).train()
    t = measure(layer, torch.randn(3, 8), warmup=2, repeats=7, threads=1)
    assert isinstance(t, Timing)
    assert 0 < t.min <= t.p25 <= t.median <= t.p75 <= t.max
    assert t.repeats >= 7 and t.warmup == 2 and t.number >= 1
    assert t.threads == 1 and t.batch_size == 3 and t.clock == "wall"
    assert t.device == device_name("cpu") and t.device.startswith("cpu: ")
    assert torch.get_num_threads() == before
    assert layer.training, "training mode is restored"
    d = t.to_dict()
    assert json.loads(json.dumps(d))["median"] == t.median and Timing.from_dict(d) == t


def test_measure_default_threads_is_current_count_and_tuple_inputs():
    t = measure(TwoInputs(), (torch.randn(2, 8), torch.randn(2, 4)), warmup=0, repeats=2)
    assert t.threads == torch.get_num_threads() and t.batch_size == 2


def test_measure_keeps_sampling_until_min_time():
    t = measure(nn.Linear(4, 4), torch.randn(1, 4), warmup=0, repeats=2, number=1, min_time=0.02)
    assert t.repeats > 2


def test_measure_cpu_clock_needs_one_thread():
    t = measure(nn.Linear(8, 4), torch.randn(3, 8), repeats=3, threads=1, clock="cpu")
    assert t.clock == "cpu" and t.median > 0
    with pytest.raises(LatencyError, match="threads=1"):
        measure(nn.Linear(8, 4), torch.randn(3, 8), repeats=3, threads=2, clock="cpu")


def test_measure_refuses_meta_module():
    with pytest.raises(LatencyError, match="meta"):
        measure(nn.Linear(4, 4, device="meta"), torch.randn(1, 4))


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_measure_refuses_unavailable_device(device):
    with pytest.raises(DeviceError) as info:
        measure(nn.Linear(4, 4), torch.randn(1, 4), device=device)
    msg = str(info.value)
    assert isinstance(info.value, AutorankError) and repr(device) in msg and "\n" not in msg


def test_measure_refuses_unknown_device_and_out_of_range_index():
    with pytest.raises(DeviceError, match="'tpu'"):
        measure(nn.Linear(4, 4), torch.randn(1, 4), device="tpu")
    bad = f"cuda:{torch.cuda.device_count() + 3}"
    with pytest.raises(DeviceError, match=bad):
        measure(nn.Linear(4, 4), torch.randn(1, 4), device=bad)


@no_cuda
def test_table_for_unavailable_device_is_refused(table_dir):
    with pytest.raises(DeviceError, match="cuda"):
        LatencyTable(table_dir, device="cuda")


@needs_cuda
def test_measure_on_cuda_uses_events():
    layer = nn.Linear(64, 64)
    t = measure(layer, torch.randn(8, 64), device="cuda", warmup=2, repeats=5)
    assert t.device == device_name("cuda") and t.device.startswith("cuda: ")
    assert 0 < t.min <= t.median <= t.max
    assert next(layer.parameters()).device.type == "cpu", "moved back to where it was"


@needs_cuda
def test_table_and_estimate_on_cuda(table_dir):
    model = small_mlp()
    prof = profile_model(model, torch.randn(4, 16))
    table = LatencyTable(table_dir, device="cuda", batch_size=4, **FAST)
    build_table(model, prof, {"0": [("svd", 0.5)]}, table=table)
    assert estimate_latency(prof, {"0": ("svd", 0.5)}, table) > 0
    assert table.measured_on["device_name"].startswith("cuda: ")


# ---------------------------------------------------------------------- the table
def test_table_round_trip_and_reuse_in_process(table_dir):
    layer = nn.Linear(16, 8)
    t1 = _table(table_dir)
    dense = t1.measure_layer(layer, (4, 16))
    svd = t1.measure_layer(layer, (4, 16), "svd", 3)
    assert t1.measurements == 2 and dense > 0 and svd > 0
    assert t1.measure_layer(layer, (4, 16), "SVD", 3) == svd and t1.measurements == 2  # cached, name normalised
    data = json.loads(t1.path.read_text())
    assert data["measured_on"]["device_name"] == device_name("cpu")
    assert data["validity"] == {
        "device_name": device_name("cpu"), "torch": torch.__version__, "dtype": "float32",
        "threads": 1, "batch_size": 4, "clock": "wall", "omp_wait_policy": omp_wait_policy(),
    }
    t2 = _table(table_dir)
    assert t2.path == t1.path and len(t2) == 2
    assert t2.get(layer, (4, 16)) == dense and t2.get(layer, (4, 16), "svd", 3) == svd
    assert t2.get(layer, (4, 16), "svd", 4) is None and t2.get(layer, (5, 16)) is None
    assert t2.measure_layer(layer, (4, 16), "svd", 3) == svd and t2.measurements == 0
    # a fraction resolves to the concrete rank it stands for
    rank = __import__("autorank").methods.get("svd").resolve_rank(layer, 0.5, (4, 16))
    t2.measure_layer(layer, (4, 16), "svd", 0.5)
    assert t2.get(layer, (4, 16), "svd", rank) is not None
    assert t2.get(layer, (4, 16), "svd", 0.5) == t2.get(layer, (4, 16), "svd", rank)
    with pytest.raises(LatencyError, match="concrete rank"):
        t2.get(layer, (4, 16), "svd", None)


_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from torch import nn
    from autorank.cost.latency_table import LatencyTable
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    t = LatencyTable(sys.argv[1], threads=1, batch_size=4, warmup=1, repeats=3, min_time=0.0)
    out = {"dense": t.measure_layer(layer, (4, 16)), "svd": t.measure_layer(layer, (4, 16), "svd", 3),
           "measurements": t.measurements}
    if len(sys.argv) > 2:  # measure something new, for the parent to find
        t.measure_layer(layer, (4, 16), "svd", 5)
    print(json.dumps(out))
    """
)


def _child(table_dir, *extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(table_dir), *extra], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_table_reused_by_another_process_without_measuring(table_dir):
    first = _child(table_dir)
    assert first["measurements"] == 2
    second = _child(table_dir, "and-a-new-entry")
    assert second["measurements"] == 0, "the second process measured again"
    assert second["dense"] == first["dense"] and second["svd"] == first["svd"]
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    here = _table(table_dir)
    assert here.get(layer, (4, 16), "svd", 5) is not None, "entries saved by another process are read"
    here.measure_layer(layer, (4, 16), "svd", 2)  # saving merges, does not drop the other process's entries
    assert len(_table(table_dir)) == 4


@pytest.mark.parametrize(
    "change",
    [
        {"threads": 2},
        {"batch_size": 8},
        {"dtype": torch.float64},
        {"device_name_override": "cpu: some other processor"},
        {"clock": "cpu"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_table_invalidated_when_its_key_changes(table_dir, change):
    layer = nn.Linear(16, 8)
    base = _table(table_dir)
    base.measure_layer(layer, (4, 16))
    other = _table(table_dir, **change)
    assert other.path != base.path and other.key != base.key
    assert other.get(layer, (4, 16)) is None and len(other) == 0
    assert _table(table_dir).get(layer, (4, 16)) is not None, "the original file is left alone"


def test_table_invalidated_by_another_torch_version(table_dir, monkeypatch):
    layer = nn.Linear(16, 8)
    base = _table(table_dir)
    base.measure_layer(layer, (4, 16))
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    other = _table(table_dir)
    assert other.path != base.path and other.get(layer, (4, 16)) is None


def test_table_for_another_device_cannot_measure_here(table_dir):
    table = _table(table_dir, device_name_override="cpu: some other processor")
    with pytest.raises(LatencyError, match="some other processor"):
        table.measure_layer(nn.Linear(4, 4), (4, 4))


def test_table_opened_or_shipped_elsewhere_estimates_but_cannot_measure(table_dir, tmp_path, monkeypatch):
    model = small_mlp()
    prof = profile_model(model, torch.randn(4, 16))
    plan = {"0": ("svd", 2)}
    table = build_table(model, prof, {"0": [("svd", 2)]}, table=_table(table_dir))
    opened = LatencyTable.open(table.path)
    assert opened.validity == table.validity and len(opened) == len(table) and opened.measurements == 0
    shipped = LatencyTable.from_dict(json.loads(json.dumps(table.to_dict())), tmp_path / "driver")
    expected = estimate_latency(prof, plan, table)
    assert estimate_latency(prof, plan, opened) == expected == estimate_latency(prof, plan, shipped)
    shipped.save()
    assert LatencyTable.open(shipped.path).get(model[0], (4, 16), "svd", 2) == table.get(model[0], (4, 16), "svd", 2)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    with pytest.raises(LatencyError, match="torch"):
        opened.measure_layer(model[0], (4, 16), "svd", 3)
    with pytest.raises(LatencyError, match="cannot read"):
        LatencyTable.open(tmp_path / "missing.json")


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": "autorank-latency-table", "version": 1}'])
def test_corrupt_table_file_is_ignored_with_a_warning(table_dir, caplog, content):
    layer = nn.Linear(16, 8)
    path = _table(table_dir).path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="autorank"):
        table = _table(table_dir)
    assert len(table) == 0
    assert any(str(path) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    table.measure_layer(layer, (4, 16))  # and it is rewritten, valid
    assert _table(table_dir).get(layer, (4, 16)) is not None


def test_cpu_tables_are_kept_apart_by_the_openmp_wait_policy(table_dir, monkeypatch):
    """A table measured with OMP_WAIT_POLICY=PASSIVE (threads sleep between operators: the demo on two threads
    ran 2.6 ms against 1.2 ms by default) is another file than one measured without it; a table read back
    keeps the policy it was measured under; CUDA tables do not depend on it."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    passive = _table(table_dir)
    passive.measure_layer(nn.Linear(16, 8), (4, 16))
    monkeypatch.delenv("OMP_WAIT_POLICY")
    default = _table(table_dir)
    assert passive.validity["omp_wait_policy"] == "PASSIVE" and default.validity["omp_wait_policy"] == "DEFAULT"
    assert passive.path != default.path and len(default) == 0
    back = LatencyTable.open(passive.path)
    assert back.validity == passive.validity and len(back) == 1
    cuda = LatencyTable(table_dir, device="cpu", device_name_override="cuda: NVIDIA H200", batch_size=4, threads=1)
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    assert "omp_wait_policy" not in cuda.validity
    assert LatencyTable(table_dir, device="cpu", device_name_override="cuda: NVIDIA H200", batch_size=4, threads=1).key == cuda.key


def test_table_file_with_foreign_validity_is_ignored(table_dir, caplog):
    table = _table(table_dir)
    table.put(nn.Linear(4, 4), (4, 4), None, None, 1.0)
    table.save()
    data = json.loads(table.path.read_text())
    data["validity"]["threads"] = 99
    table.path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="autorank"):
        assert len(_table(table_dir)) == 0
    assert "validity" in caplog.text


def test_replacement_is_measured_without_factorizing(table_dir, monkeypatch):
    from autorank import methods

    def boom(*a, **k):
        raise AssertionError("latency must not need a factorization")

    for name in methods.available():
        monkeypatch.setattr(type(methods.get(name)), "_factorize", boom)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    table = _table(table_dir)
    for method, rank in [("svd", 2), ("spatial-svd", 2), ("tucker2", (2, 3)), ("cp", 4)]:
        assert table.measure_layer(conv, (4, 8, 6, 6), method, rank) > 0


def test_layer_signature_names_what_makes_latency():
    sig = layer_signature(nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False), (2, 3, 9, 9))
    assert sig.startswith("Conv2d:conv2d(") and "3->5" in sig and "s2x2" in sig and "bias=0" in sig
    assert sig.endswith("@2x3x9x9")
    assert layer_signature(nn.Linear(3, 5), (2, 3)) != layer_signature(nn.Linear(3, 5, bias=False), (2, 3))


# ---------------------------------------------------------------------- estimate
def _fake_table(table_dir, prof, plan, base: float, dense: dict, repl: dict) -> LatencyTable:
    table = _table(table_dir)
    table.put_model(model_signature(prof, table.batch_size), base)
    for name, (method, rank) in plan.items():
        lp = prof.layers[name]
        sig = layer_signature(lp.spec, lp.input_shape, lp.type)
        table.put(sig, lp.input_shape, None, None, dense[name])
        table.put(sig, lp.input_shape, method, prof.concrete_rank(name, method, rank), repl[name])
    return table


def test_estimate_arithmetic_is_exact(table_dir):
    model = small_mlp()
    prof = profile_model(model, torch.randn(4, 16))
    plan = {"0": ("svd", 0.5), "2": ("svd", 3)}
    dense = {"0": 0.25, "2": 0.125}
    repl = {"0": 0.0625, "2": 0.5}
    table = _fake_table(table_dir, prof, plan, 2.0, dense, repl)
    expected = 2.0 - 0.25 - 0.125 + 0.0625 + 0.5
    assert estimate_latency(prof, plan, table) == expected
    assert estimate_latency(prof, plan, table, base_latency=3.0) == expected + 1.0
    t = Timing(3.0, 2.0, 4.0, 1.0, 5, 1, 1, "cpu: x", 4)
    assert estimate_latency(prof, plan, table, base_latency=t) == expected + 1.0
    as_plan = Plan.from_dict({"layers": {"0": {"method": "svd", "rank": 0.5}, "2": {"method": "svd", "rank": 3}}})
    assert estimate_latency(prof, as_plan, table) == expected
    assert estimate_latency(prof, {"0": ("svd", 0.5)}, table) == 2.0 - 0.25 + 0.0625
    assert estimate_latency(prof, {"0": ("none", None)}, table) == 2.0
    assert estimate_latency(prof, {}, table) == 2.0


def test_estimate_missing_entries(table_dir):
    model = small_mlp()
    prof = profile_model(model, torch.randn(4, 16))
    table = _fake_table(table_dir, prof, {"0": ("svd", 2)}, 1.0, {"0": 0.5}, {"0": 0.25})
    with pytest.raises(LatencyError, match="layer '2'.*build_table"):
        estimate_latency(prof, {"0": ("svd", 2), "2": ("svd", 2)}, table)
    est = estimate_latency(prof, {"0": ("svd", 2), "2": ("svd", 2)}, table, model=model)
    assert table.measurements == 2  # layer "2": dense and svd rank 2, measured on demand
    assert est == pytest.approx(1.0 - 0.5 + 0.25 - table.get(model[2], (4, 32)) + table.get(model[2], (4, 32), "svd", 2))
    empty = _table(table_dir, batch_size=8)
    with pytest.raises(LatencyError, match="base latency"):
        estimate_latency(prof, {"0": ("svd", 2)}, empty)


def test_build_table_measures_once_and_fills_the_profile(table_dir):
    model = small_mlp()
    x = torch.randn(4, 16)
    prof = profile_model(model, x)
    cands = {"0": [("svd", 0.5), ("svd", 4)], "2": [("svd", 0.25)]}
    seen = []
    table = build_table(model, prof, cands, table=_table(table_dir), progress=lambda d, n, w: seen.append((d, n)))
    assert table.measurements == 1 + 2 + 3  # base, two dense layers, three replacements
    assert seen[-1] == (6, 6)
    assert prof.latency == table.get_model(model_signature(prof, 4)) > 0
    assert prof.layers["0"].latency == table.get(model[0], (4, 16)) > 0
    again = build_table(model, prof, cands, table=_table(table_dir))
    assert again.measurements == 0
    est = estimate_latency(prof, {"0": ("svd", 4), "2": ("svd", 0.25)}, again)
    assert est > 0
    with pytest.raises(LatencyError, match="unknown layer 'nope'"):
        build_table(model, prof, {"nope": [("svd", 1)]}, table=again)


def test_build_table_at_another_batch_size_scales_shapes(table_dir):
    model = small_mlp()
    prof = profile_model(model, torch.randn(2, 16))
    table = build_table(model, prof, {"0": [("svd", 2)]}, table=_table(table_dir, batch_size=6))
    assert table.get(model[0], (6, 16), "svd", 2) is not None and table.get(model[0], (2, 16)) is None
    assert estimate_latency(prof, {"0": ("svd", 2)}, table) > 0
    assert prof.latency is None, "the profile's own batch size was not measured"


# ---------------------------------------------------------------------- rank alignment
@settings(max_examples=300, deadline=None)
@given(
    r=st.integers(1, 5000),
    r2=st.integers(1, 5000),
    k=st.sampled_from([1, 2, 4, 8, 16, 32]),
    mx=st.one_of(st.none(), st.integers(1, 5000)),
    mode=st.sampled_from(["nearest", "down", "up"]),
)
def test_align_rank_properties(r, r2, k, mx, mode):
    out = align_rank(r, k, mx, mode=mode)
    assert isinstance(out, int) and out >= 1
    if mx is not None:
        assert out <= mx
    if mx is None or mx >= k:
        assert out % k == 0 and out >= k  # a multiple, never below it
    else:
        assert out == mx  # max_rank below the multiple: max_rank wins
    if mx is None and r >= k:  # no clamping: rounding moves by less than one multiple
        if mode == "nearest":
            assert abs(out - r) <= k // 2
        elif mode == "down":
            assert r - k < out <= r
        else:
            assert r <= out < r + k
    if mx is not None and k <= r <= mx:
        assert abs(out - r) < k
    assert align_rank(out, k, mx, mode=mode) == out  # idempotent
    lo, hi = sorted((r, r2))
    assert align_rank(lo, k, mx, mode=mode) <= align_rank(hi, k, mx, mode=mode)  # monotone


@given(r=st.tuples(st.integers(1, 600), st.integers(1, 600)), k=st.sampled_from([8, 16]))
def test_align_rank_tuples_per_component(r, k):
    mx = (512, 300)
    out = align_rank(r, k, mx)
    assert out == (align_rank(r[0], k, mx[0]), align_rank(r[1], k, mx[1]))


@settings(max_examples=300, deadline=None)
@given(r=st.integers(1, 3000), k=st.integers(2, 64), mx=st.one_of(st.none(), st.integers(1, 3000)))
def test_align_rank_down_is_the_plan_option_rule(r, k, mx):
    """Default mode 'down' agrees with the rule a plan entry's ``align`` option applies (for valid ranks)."""
    from autorank.methods._base import align_rank as plan_align

    if mx is not None and r > mx:
        r = mx
    assert align_rank(r, k, mx) == plan_align(r, k, mx)


def test_align_rank_examples_and_errors():
    assert align_rank(13, 8) == 8 and align_rank(17, 8) == 16 and align_rank(3, 8) == 8
    n = dict(mode="nearest")
    assert align_rank(13, 8, **n) == 16 and align_rank(11, 8, **n) == 8 and align_rank(12, 8, **n) == 16
    assert align_rank(17, 16, mode="up") == 32 and align_rank(16, 16, mode="up") == 16
    assert align_rank(70, 16, 70) == 64 and align_rank(5, 8, 6) == 6
    assert align_rank([13, 30], 8, 24) == (8, 24)
    for bad in [(0, 8), (5, 0), (5, 8, 0), (True, 8)]:
        with pytest.raises(RankError):
            align_rank(*bad)
    with pytest.raises(RankError, match="mode"):
        align_rank(5, 8, mode="sideways")


def test_align_plan_respects_method_max_rank():
    model = nn.Sequential(nn.Conv2d(12, 20, 3, padding=1), nn.ReLU(), nn.Linear(8, 8))
    prof = profile_model(model, torch.randn(1, 12, 8, 8))
    aligned = align_plan(prof, {"0": ("tucker2", 0.5), "2": ("svd", 7)}, 8)
    assert aligned["2"] == ("svd", 8)  # max rank of an 8->8 Linear's SVD is 8
    r_in, r_out = aligned["0"][1]
    assert r_in == 8 and r_out in (8, 16)
    assert align_plan(prof, {"0": ("tucker2", 0.9)}, 8, mode="up")["0"][1] == (8, 16)  # multiples of 8 within (12, 20)


def test_estimate_follows_the_plan_align_option(table_dir):
    """A plan entry's ``align`` option changes the rank decompose builds: the estimate looks up that rank."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    prof = profile_model(model, torch.randn(4, 64))
    plain = prof.concrete_rank("0", "svd", 0.3)
    aligned = autorank_align(plain, 8, 64)
    assert aligned != plain  # the case is meaningful
    table = _table(table_dir)
    table.put_model(model_signature(prof, 4), 1.0)
    sig = layer_signature(prof.layers["0"].spec, (4, 64), "Linear")
    table.put(sig, (4, 64), None, None, 0.5)
    table.put(sig, (4, 64), "svd", plain, 0.25)
    table.put(sig, (4, 64), "svd", aligned, 0.125)
    plan = Plan.from_dict({"layers": {"0": {"method": "svd", "rank": 0.3, "options": {"align": 8}}}})
    assert estimate_latency(prof, plan, table) == 1.0 - 0.5 + 0.125
    assert estimate_latency(prof, {"0": ("svd", 0.3)}, table) == 1.0 - 0.5 + 0.25
    from autorank.surgery import decompose, plan_of

    assert plan_of(decompose(model, plan, example_inputs=torch.randn(4, 64))).layers["0"].rank == aligned


# ---------------------------------------------------------------------- the worker job
def test_profile_latency_job_in_a_separate_process(table_dir):
    ctx = multiprocessing.get_context("spawn")
    cands = {"features.3": [["svd", 0.5], ["tucker2", 0.5]], "classifier.2": [["svd", 16]]}
    kwargs = dict(batch_size=4, threads=1, table_dir=str(table_dir), candidates=cands)
    with ctx.Pool(1) as pool:
        first = pool.apply(profile_latency_job, ("demo", (1, 1, 8, 8)), kwargs)
        second = pool.apply(profile_latency_job, ("demo", (1, 1, 8, 8)), kwargs)
    assert json.loads(json.dumps(first)) == first, "JSON-able"
    assert first["pid"] != os.getpid()
    assert first["device_name"] == device_name("cpu") and first["threads"] == 1 and first["batch_size"] == 4
    assert first["input_shape"] == [4, 1, 8, 8] and first["base_latency_s"] > 0
    assert set(first["layers"]) == set(cands)
    layer = first["layers"]["features.3"]
    assert layer["dense_s"] > 0 and layer["input_shape"] == [4, 96, 16, 16]  # the demo CNN: 96 channels, 16x16 maps
    assert [r["method"] for r in layer["replacements"]] == ["svd", "tucker2"]
    assert all(r["latency_s"] > 0 for r in layer["replacements"])
    assert first["layers"]["classifier.2"]["replacements"][0]["rank"] == 16
    assert first["new_measurements"] == 1 + 2 + 3
    assert second["new_measurements"] == 0 and second["base_latency_s"] == first["base_latency_s"]


def test_profile_latency_job_checks_device_first(table_dir):
    if torch.cuda.is_available():
        pytest.skip("checks the error raised without CUDA")
    with pytest.raises(DeviceError, match="cuda"):
        profile_latency_job("demo", (1, 1, 8, 8), device="cuda", table_dir=str(table_dir))
