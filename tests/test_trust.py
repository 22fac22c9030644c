"""Trust: a model file or a run directory never runs code it was not asked to; Ray listens on loopback only.

Crafted files (issue 13): a valid autorank ``.pt`` whose spec names a file that
writes a marker when imported, a spec ``tempfile:mkdtemp``, a tampered
``settings.json``, ``front.json`` and trial record; random bytes and random JSON
fed to ``load``, ``front`` and ``export`` (one line, exit 2, never a traceback,
never a write); the listening sockets of a local Ray instance the search starts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import autorank
from autorank.cache import FactorCache
from autorank.errors import AutorankError, SaveLoadError
from autorank.saving import FORMAT, metadata
from autorank.search import search
from autorank.search.rundir import RunDirError
from autorank.specs import UntrustedSpecError, is_safe_spec
from autorank.zoo import SPEC_ATTR
from tests.cli_helpers import assert_one_line_error, run_main

REPO = Path(__file__).resolve().parents[1]

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("this file ran")
import torch


def build():
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))


def make():
    return None
"""


def _evil(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.py"
    evil.write_text(EVIL.format(marker=str(marker)))
    return evil, marker


def _small_file(tmp_path: Path, spec: str) -> Path:
    """A valid autorank model file whose recorded spec is ``spec``."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    small = autorank.decompose(model, {"layers": {"0": {"method": "svd", "rank": 2}}}, cache=FactorCache())
    return autorank.save(small, tmp_path / "crafted.pt", spec=spec)


def _one_line(exc: BaseException, *needles: str) -> str:
    text = str(exc)
    assert "\n" not in text and text, text
    for n in needles:
        assert n in text, (n, text)
    return text


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (symbolic links not followed) with its size and modification time."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            st_ = os.lstat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), root)] = (st_.st_size, st_.st_mtime_ns)
    return out


# ---------------------------------------------------------------------- the safe-spec rule
def test_the_safe_spec_rule_accepts_builtins_and_hf_only():
    for spec in ("demo", "resnet50", "bert-base", " minilm ", "hf:/models/llama", "hf:relative/dir", "no-such-builtin"):
        assert is_safe_spec(spec), spec
    for spec in ("tempfile:mkdtemp", "os:system", "pkg.mod:build", "mymodel.py:build", "/abs/m.py:build",
                 "dir/m.py", "m.py", "", None, 3):
        assert not is_safe_spec(spec), spec


# ---------------------------------------------------------------------- crafted model files
def test_a_crafted_model_file_never_runs_the_file_its_spec_names(tmp_path):
    evil, marker = _evil(tmp_path)
    path = _small_file(tmp_path, f"{evil}:build")
    assert metadata(path)["spec"] == f"{evil}:build"  # reading the label runs nothing
    with pytest.raises(UntrustedSpecError) as info:
        autorank.load(path)
    _one_line(info.value, str(path), "trust_spec=True", "--trust-spec", "model=", str(evil))
    assert isinstance(info.value, SaveLoadError)
    assert not marker.exists()

    # the caller's own architecture always works, and the file's spec does not ride along on it
    arch = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    loaded = autorank.load(path, model=arch)
    assert SPEC_ATTR not in loaded.__dict__
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert loaded(x).shape == (5, 3)
    # ...so exporting what was loaded never imports it either
    report = autorank.export_model(loaded, tmp_path / "out.pt")
    assert report.path.exists() and not marker.exists()
    assert metadata(report.path)["spec"] is None

    # the opt-in does what it says: the file runs
    trusted = autorank.load(path, trust_spec=True)
    assert marker.read_text() == "this file ran"
    with torch.no_grad():
        assert torch.equal(trusted(x), loaded(x))


def test_a_spec_naming_a_library_function_is_not_called(tmp_path, monkeypatch):
    calls = []
    real = tempfile.mkdtemp

    def recorder(*a, **kw):
        calls.append((a, kw))
        return real(*a, dir=str(tmp_path), **{k: v for k, v in kw.items() if k != "dir"})

    path = _small_file(tmp_path, "tempfile:mkdtemp")
    monkeypatch.setattr(tempfile, "mkdtemp", recorder)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UntrustedSpecError) as info:
        autorank.load(path)
    _one_line(info.value, "'tempfile:mkdtemp'", "trust_spec=True")
    assert calls == [] and sorted(os.listdir(tmp_path)) == before
    with pytest.raises(AutorankError, match="not a torch.nn.Module"):  # trusted, it is called (and is no model)
        autorank.load(path, trust_spec=True)
    assert len(calls) == 1


def test_a_text_file_is_named_as_not_a_model_file(tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("every layer is a tucker2 layer\n")
    with pytest.raises(SaveLoadError) as info:
        autorank.load(p)
    text = _one_line(info.value, str(p), "not a file written by torch.save")
    assert "101" not in text


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("scratch")


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300), prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04"]))
def test_random_bytes_give_one_line_and_write_nothing(scratch, data, prefix):
    d = scratch / uuid.uuid4().hex
    d.mkdir()
    p = d / "random.pt"
    p.write_bytes(prefix + data)
    with pytest.raises(SaveLoadError) as info:
        autorank.load(p)
    _one_line(info.value, str(p))
    assert os.listdir(d) == ["random.pt"]


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
PLAN_TEXT = st.one_of(
    JSONISH.map(json.dumps),
    st.text(max_size=30),
    st.fixed_dictionaries({"layers": st.dictionaries(st.sampled_from(["0", "2", "9", "x.y", "../a"]),
                                                     st.fixed_dictionaries({"method": st.sampled_from(["svd", "cp", "nope"]),
                                                                            "rank": JSONISH}), max_size=2)}).map(json.dumps),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=st.one_of(st.none(), st.sampled_from(["x.py:build", "tempfile:mkdtemp", "nope", "demo"]), JSONISH),
    plan=st.one_of(PLAN_TEXT, JSONISH),
    state=st.one_of(JSONISH, st.dictionaries(st.sampled_from(["0.weight", "2.bias", "9"]),
                                             st.sampled_from([torch.zeros(2), torch.ones(3, 4), torch.tensor(1.0)]), max_size=3)),
    extra=st.dictionaries(st.sampled_from(["version", "metadata", "format"]), JSONISH, max_size=2),
)
def test_random_json_in_a_model_file_gives_one_line_and_runs_nothing(scratch, monkeypatch, spec, plan, state, extra):
    called = []
    d = scratch / uuid.uuid4().hex
    d.mkdir()
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: called.append(1))
    p = d / "fuzz.pt"
    blob = {"format": FORMAT, "version": 1, "spec": spec, "plan": plan, "state_dict": state, **extra}
    torch.save(blob, p)
    try:
        autorank.load(p)
    except AutorankError as exc:
        _one_line(exc)
    assert called == []
    assert os.listdir(d) == ["fuzz.pt"]


# ---------------------------------------------------------------------- run directories
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One small search of the built-in demo (weights saved, front written)."""
    out = tmp_path_factory.mktemp("runs") / "demo"
    res = search("demo", None, budget="30%flops", trials=4, finetune=1, finetune_steps=5, sensitivity_points=2,
                 measure_latency=False, out=out)
    assert res.front and all(m.weights for m in res.front)
    return out


@pytest.fixture
def run_copy(demo_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(demo_run, dst, ignore=shutil.ignore_patterns("factor-cache"))
    return dst


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    data = fn(data) or data
    path.write_text(json.dumps(data))


def test_export_does_not_import_a_task_spec_planted_in_settings(run_copy, tmp_path, capsys, monkeypatch):
    evil, marker = _evil(tmp_path)

    def plant(s):
        s["task"]["spec"] = f"{evil}:make"

    _edit_json(run_copy / "settings.json", plant)
    rc, out, err = run_main("export", str(run_copy), "--pick", "best", "-o", str(tmp_path / "m.pt"),
                            cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert rc == 0, err
    assert not marker.exists()
    assert (tmp_path / "m.pt").exists()
    # the opt-in imports it (and this planted task is no task: one line)
    rc, out, err = run_main("export", str(run_copy), "--pick", "best", "-o", str(tmp_path / "m2.pt"), "--trust-spec",
                            cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert marker.exists()


def test_export_does_not_import_a_model_spec_planted_in_the_weights(run_copy, tmp_path, capsys, monkeypatch):
    evil, marker = _evil(tmp_path)
    front = json.loads((run_copy / "front.json").read_text())
    best = max(front["front"], key=lambda m: m["score"])
    weights = run_copy / best["weights"]
    blob = torch.load(weights, weights_only=True)
    blob["spec"] = f"{evil}:build"
    torch.save(blob, weights)
    rc, out, err = run_main("export", str(run_copy), "--pick", "best", "-o", str(tmp_path / "m.pt"),
                            cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert_one_line_error(rc, err, str(weights), "--trust-spec", "--model")
    assert not marker.exists() and not (tmp_path / "m.pt").exists()
    # the architecture from the command line (the user's own spec) works without trusting the run
    rc, out, err = run_main("export", str(run_copy), "--pick", "best", "-o", str(tmp_path / "m.pt"), "--model", "demo",
                            cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert rc == 0, err
    assert not marker.exists()


@pytest.mark.parametrize("weights", ["/etc/hostname", "../outside.pt", "weights/../../outside.pt", "link/x.pt"])
def test_front_json_paths_must_stay_inside_the_run(run_copy, tmp_path, capsys, monkeypatch, weights):
    (tmp_path / "outside.pt").write_bytes((run_copy / "weights").iterdir().__next__().read_bytes())
    (run_copy / "link").symlink_to(tmp_path)

    def plant(f):
        f["front"][0]["weights"] = weights

    _edit_json(run_copy / "front.json", plant)
    before = snapshot(run_copy)
    rc, out, err = run_main("front", str(run_copy), cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert_one_line_error(rc, err, "front.json", repr(weights))
    rc, out, err = run_main("export", str(run_copy), "--trial", str(json.loads((run_copy / "front.json").read_text())["front"][0]["trial"]),
                            "-o", str(tmp_path / "m.pt"), cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert_one_line_error(rc, err, "front.json")
    assert not (tmp_path / "m.pt").exists()
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("tamper, needle", [
    (lambda r: r.update(weights="/tmp/elsewhere.pt"), "weights"),
    (lambda r: r["plan"]["layers"].update({"features.0": {"method": "evil", "rank": 2}}), "unknown method 'evil'"),
    (lambda r: r["plan"]["layers"].update({"no.such.layer": {"method": "svd", "rank": 2}}), "'no.such.layer'"),
    (lambda r: r["plan"]["layers"].update({"os.system('x')": {"method": "svd", "rank": 2}}), "not a module path"),
])
def test_a_tampered_trial_record_is_refused_on_resume_and_by_front(run_copy, tmp_path, capsys, monkeypatch, tamper, needle):
    rec = run_copy / "trials" / "000001.json"
    _edit_json(rec, tamper)
    before = snapshot(run_copy)
    with pytest.raises(RunDirError) as info:  # the same search resumed: refused before anything is written
        search("demo", None, budget="30%flops", trials=4, finetune=1, finetune_steps=5, sensitivity_points=2,
               measure_latency=False, out=run_copy)
    _one_line(info.value, str(rec), needle)
    assert snapshot(run_copy) == before
    if needle != "'no.such.layer'":  # without the model, front checks what a record can be checked for alone
        rc, out, err = run_main("front", str(run_copy), cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
        assert_one_line_error(rc, err, "000001.json")


def _mutations():
    """A key path in front.json / a trial record / settings.json, and random JSON to put there."""
    targets = st.sampled_from([
        ("front.json", ()), ("front.json", ("front",)), ("front.json", ("front", 0)), ("front.json", ("front", 0, "weights")),
        ("front.json", ("front", 0, "plan")), ("front.json", ("front", 0, "plan", "layers")), ("front.json", ("budget",)),
        ("front.json", ("front", 0, "trial")), ("front.json", ("cost_metric",)), ("front.json", ("original",)),
        ("trials/000000.json", ()), ("trials/000000.json", ("plan",)), ("trials/000000.json", ("choice",)),
        ("trials/000000.json", ("state",)), ("trials/000000.json", ("costs",)), ("trials/000000.json", ("weights",)),
        ("settings.json", ()), ("settings.json", ("format",)), ("settings.json", ("model",)), ("settings.json", ("task",)),
        ("settings.json", ("task", "spec")),
    ])
    return st.tuples(targets, JSONISH)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=_mutations())
def test_random_json_in_a_run_directory_gives_one_line_and_writes_nothing(demo_run, scratch, capsys, monkeypatch, mutation):
    (name, keys), value = mutation
    work = scratch / uuid.uuid4().hex
    work.mkdir()
    run = work / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("factor-cache", "*.html", "*.png"))
    path = run / name
    if keys:
        data = json.loads(path.read_text())
        node = data
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    else:
        data = value
    path.write_text(json.dumps(data))
    for args in (["front", str(run)], ["export", str(run), "--pick", "best", "-o", str(work / "m.pt")]):
        before = snapshot(run)
        rc, out, err = run_main(*args, cwd=work, capsys=capsys, monkeypatch=monkeypatch)
        assert "Traceback" not in err
        if rc != 0:
            assert_one_line_error(rc, err)
            assert snapshot(run) == before, args
            assert not (work / "m.pt").exists()
    shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------- network exposure
def _listening_sockets() -> dict[int, tuple[str, int]]:
    """inode -> (address, port) of every listening TCP socket (IPv4 and IPv6) of this machine."""
    import socket

    out = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            ip, port = f[1].split(":")
            raw = bytes.fromhex(ip)
            raw = raw[::-1] if family == socket.AF_INET else b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
            out[int(f[9])] = (socket.inet_ntop(family, raw), int(port, 16))
    return out


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _sockets_of(pids: list[int]) -> list[tuple[int, str, tuple[str, int]]]:
    listening = _listening_sockets()
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:300]
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and int(link[8:-1]) in listening:
                found.append((pid, cmd, listening[int(link[8:-1])]))
    return found


def _loopback(addr: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs /proc to list sockets")
def test_the_local_ray_instance_listens_on_loopback_only(tmp_path, ray_exclusive):
    """`autorank search --workers 2`: every socket its Ray processes listen on is a loopback address."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", RAY_AUTH_MODE="token",
               AUTORANK_TOY_SLEEP="0.3")
    env.pop("RAY_ADDRESS", None)
    env.pop("AUTORANK_RAY_NODE_IP", None)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "autorank.cli", "search", "--model", "tests.search_toys:toy_cnn", "--task", "tests.search_toys:toy_task",
         "--budget", "30%flops", "--trials", "8", "--finetune", "0", "--no-warm-start", "--workers", "2", "-q", "--out", str(out)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        seen: dict[tuple, str] = {}
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            running = (out / "trials").exists() and any(
                json.loads(p.read_text()).get("state") == "RUNNING" for p in (out / "trials").glob("*.json"))
            for pid, cmd, addr in _sockets_of(_descendants(proc.pid)):
                seen[(pid, addr)] = cmd
            if running and any(cmd.startswith("ray::") for cmd in seen.values()):
                break  # the workers run trials: every server is up
            time.sleep(0.2)
        assert seen, "no listening socket found: did Ray start?"
        wildcard = {k: v for k, v in seen.items() if not _loopback(k[1][0])}
        assert not wildcard, f"listening on a non-loopback address: {wildcard}"
        # the servers the issue saw on *:PORT are among those checked: GCS, raylet, workers, the driver
        names = " ".join(seen.values())
        assert "gcs_server" in names and "raylet" in names and "ray::" in names, seen
        assert any(pid == proc.pid for pid, _ in seen), seen  # the driver's own server too
    finally:
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stdout.read().decode()[-3000:]
