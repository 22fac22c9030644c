"""Faults: one search per run directory, refused starts leave nothing behind, a full disk is one line and
resumable, a resumed run asks for the plans an uninterrupted one would, a scored plan is not run again;
and the small ones (an empty space file, ``profile --help``, ``profile --batch-size -1``)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import torch

from autorank import fileio
from autorank.cache import FactorCache
from autorank.fileio import DiskFullError, atomic_torch_save, atomic_write_text
from autorank.methods import get as get_method
from autorank.search import SearchSpace, SpaceError, search
from autorank.search import rundir as rundir_mod
from autorank.search.rundir import RunDir, RunDirLockedError, RunLock
from tests.cli_helpers import assert_one_line_error, run_main
from tests.search_toys import toy_cnn, toy_task

REPO = Path(__file__).resolve().parents[1]
TOY = ["--model", "tests.search_toys:toy_cnn", "--task", "tests.search_toys:toy_task"]
QUICK = ["--finetune", "0", "--no-warm-start", "-q"]


def cli_env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", RAY_AUTH_MODE="token")
    env.update(extra)
    return env


def records(run: Path) -> dict[int, dict]:
    out = {}
    for p in (run / "trials").glob("*.json") if (run / "trials").exists() else []:
        try:
            out[int(p.stem)] = json.loads(p.read_text())
        except (ValueError, OSError):
            pass
    return out


def leftovers(root: Path) -> list[str]:
    """Temporary files a write left behind (atomic writes name theirs .NAME.*.tmp)."""
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


# ---------------------------------------------------------------------- one run directory, one search
@pytest.mark.slow
def test_a_second_search_on_a_running_directory_is_refused_while_front_and_export_work(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    base = ["search", *TOY, "--budget", "30%flops", *QUICK, "--out", str(run)]
    rc, out, err = run_main(*base, "--trials", "3", cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert rc == 0, err
    proc = subprocess.Popen([sys.executable, "-m", "autorank.cli", *base, "--trials", "12"], cwd=tmp_path,
                            env=cli_env(AUTORANK_TOY_SLEEP="0.3"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            owner = RunLock(run).owner()
            if owner and owner.get("pid") == proc.pid and any(r.get("state") == "RUNNING" for r in records(run).values()):
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            time.sleep(0.05)
        else:
            pytest.fail("the first search did not start")
        rc, out, err = run_main(*base, "--trials", "12", cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
        line = assert_one_line_error(rc, err, f"pid {proc.pid}", socket.gethostname(), str(run), "another --out")
        # readers keep working while it runs, and front leaves the writing to the search
        front_before = (run / "front.json").stat().st_mtime_ns
        rc, out, err = run_main("front", str(run), cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
        assert rc == 0, err
        assert "a search is running" in out
        assert (run / "front.json").stat().st_mtime_ns == front_before
        rc, out, err = run_main("export", str(run), "--pick", "best", "-o", str(tmp_path / "m.pt"), "--trust-spec",
                                cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
        assert rc == 0, err
        assert (tmp_path / "m.pt").exists()
        assert proc.poll() is None, "the first search should still be running (raise AUTORANK_TOY_SLEEP)"
    finally:
        proc.wait(timeout=300)
    assert proc.returncode == 0, proc.stdout.read().decode()[-3000:]
    recs = records(run)
    assert sorted(recs) == list(range(len(recs))) and sum(r["state"] == "COMPLETE" for r in recs.values()) == 12
    assert not (run / rundir_mod.LOCK_NAME).exists()  # released at the end
    assert "pid" in line


def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / rundir_mod.LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}))
    kw = dict(budget="30%flops", trials=2, finetune=0, warm_start=False, sensitivity_points=2, measure_latency=False, out=run)
    with caplog.at_level(logging.WARNING, logger="autorank"):
        res = search(toy_cnn(), toy_task(), **kw)
    assert len(res.trials) == 2
    assert any("stale lock" in r.getMessage() and str(dead.pid) in r.getMessage() for r in caplog.records)
    assert not (run / rundir_mod.LOCK_NAME).exists()

    holder = RunLock(run).acquire(command="a test holding the lock")
    try:
        with pytest.raises(RunDirLockedError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            search(toy_cnn(), toy_task(), **{**kw, "trials": 3})
    finally:
        holder.release()
    assert len(search(toy_cnn(), toy_task(), **{**kw, "trials": 3}).trials) == 3


def test_without_flock_the_pid_and_host_decide(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir_mod, "fcntl", None)
    live = subprocess.Popen(["sleep", "30"])
    try:
        lock_file = tmp_path / rundir_mod.LOCK_NAME
        for owner, free in (({"pid": live.pid, "host": socket.gethostname()}, False),
                            ({"pid": 2 ** 22 + 7, "host": socket.gethostname()}, True),  # no such process
                            ({"pid": live.pid, "host": "another-host"}, False)):
            lock_file.write_text(json.dumps(owner))
            lock = RunLock(tmp_path)
            if free:
                lock.acquire()
                assert json.loads(lock_file.read_text())["pid"] == os.getpid()
                lock.release()
                assert not lock_file.exists()
            else:
                with pytest.raises(RunDirLockedError, match=f"pid {owner['pid']} on host {owner['host']}"):
                    lock.acquire()
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------- refused starts
FAILING_TASK = '''
from tests.search_toys import ToyFidelity


class Broken(ToyFidelity):
    def evaluate(self, model):
        raise RuntimeError("this task cannot score anything")


def make():
    return Broken()
'''


@pytest.mark.parametrize("case", ["budget", "space", "task"])
def test_a_refused_start_leaves_nothing_and_the_corrected_command_runs(tmp_path, capsys, monkeypatch, case):
    (tmp_path / "nomatch.yaml").write_text("methods: [svd]\nlayers: {include: ['^no_such_layer$']}\n")
    (tmp_path / "broken_task.py").write_text(FAILING_TASK)
    monkeypatch.syspath_prepend(str(REPO))
    run = tmp_path / "run"
    good = ["search", *TOY, "--budget", "30%flops", "--trials", "3", *QUICK, "--out", str(run)]
    bad = {
        "budget": (["--budget", "1%flops"], "cannot be met"),
        "space": (["--space", str(tmp_path / "nomatch.yaml")], "no layer to decompose"),
        "task": (["--task", f"{tmp_path / 'broken_task.py'}:make"], "cannot score the original"),
    }[case]
    rc, out, err = run_main(*good, *bad[0], cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert_one_line_error(rc, err, bad[1])
    assert not run.exists() or list(run.iterdir()) == []
    rc, out, err = run_main(*good, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert rc == 0, err
    assert len(records(run)) == 3


def test_a_refused_start_in_an_existing_directory_leaves_it_as_it_was(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    rc, out, err = run_main("search", *TOY, "--budget", "30%flops", "--trials", "2", *QUICK, "--out", str(run),
                            cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert_one_line_error(rc, err, "not empty")
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------- a full disk
class SimulatedDisk:
    """ENOSPC at the write layer: after ``allow`` writes under ``root``, every write there fails half-way."""

    def __init__(self, monkeypatch, root: Path, allow: int):
        self.root, self.allow, self.writes, self.full = Path(root).resolve(), allow, 0, True
        real = fileio.atomic_write

        def atomic_write(path, write):
            def maybe_fail(tmp):
                if self.full and Path(tmp).resolve().is_relative_to(self.root):
                    self.writes += 1
                    if self.writes > self.allow:
                        Path(tmp).write_bytes(b"half a file")  # what a full disk leaves
                        raise OSError(errno.ENOSPC, "No space left on device", tmp)
                write(tmp)

            real(path, maybe_fail)

        monkeypatch.setattr(fileio, "atomic_write", atomic_write)


def test_disk_full_error_names_the_device_and_the_file(tmp_path):
    with pytest.raises(DiskFullError) as info:
        def write(tmp):
            Path(tmp).write_bytes(b"x" * 10)
            raise OSError(errno.ENOSPC, "No space left on device", tmp)

        fileio.atomic_write(tmp_path / "f.bin", write)
    text = str(info.value)
    assert text.startswith("no space left on ") and text.endswith(f"while writing {tmp_path / 'f.bin'}")
    assert "\n" not in text and info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # the partial temporary file is gone
    # a library's wording is recognised too (SQLite), and a worker's message comes back whole
    wrapped = RuntimeError("commit failed")
    wrapped.__cause__ = Exception("(sqlite3.OperationalError) database or disk is full")
    assert isinstance(fileio.disk_full_error(wrapped, tmp_path / "study.db"), DiskFullError)
    again = DiskFullError.from_message(f"DiskFullError: {text}")
    assert str(again) == text


def test_the_factor_cache_on_a_full_disk_is_one_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    disk = SimulatedDisk(monkeypatch, tmp_path / "cache", allow=1)
    cache = FactorCache(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # created with the first entry, not before
    a, b = torch.nn.Linear(12, 10), torch.nn.Linear(12, 11)
    cache.get(get_method("svd"), a)
    with pytest.raises(DiskFullError) as info:
        cache.get(get_method("svd"), b)
    assert str(info.value).startswith("no space left on ") and "\n" not in str(info.value)
    assert leftovers(tmp_path) == [] and len(list((tmp_path / "cache").rglob("*.pt"))) == 1
    disk.full = False  # space freed: the same call works and is cached
    cache.get(get_method("svd"), b)
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 2


@pytest.mark.parametrize("allow", [3, 9])
def test_a_full_disk_stops_the_search_with_one_line_and_the_same_command_resumes(tmp_path, capsys, monkeypatch, allow):
    run = tmp_path / "run"
    args = ["search", *TOY, "--budget", "30%flops", "--trials", "5", "--finetune", "1", "--finetune-steps", "3",
            "--no-warm-start", "-q", "--out", str(run)]
    disk = SimulatedDisk(monkeypatch, run, allow=allow)
    rc, out, err = run_main(*args, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    line = assert_one_line_error(rc, err, "no space left on ", f"while writing {run}")
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
    assert leftovers(run) == [] and not (run / rundir_mod.LOCK_NAME).exists()
    disk.full = False  # space is freed
    rc, out, err = run_main(*args, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert rc == 0, err
    recs = records(run)
    assert sum(r["state"] == "COMPLETE" for r in recs.values()) == 5
    assert json.loads((run / "front.json").read_text())["front"]
    assert "no space" in line


def test_export_on_a_full_disk_writes_nothing(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    rc, out, err = run_main("search", "--budget", "30%flops", "--trials", "2", *QUICK, "--out", str(run),
                            cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert rc == 0, err
    dest = tmp_path / "out"
    dest.mkdir()
    SimulatedDisk(monkeypatch, dest, allow=0)
    rc, out, err = run_main("export", str(run), "--pick", "best", "-o", str(dest / "m.pt"),
                            cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert_one_line_error(rc, err, "no space left on ", f"while writing {dest / 'm.pt'}")
    assert list(dest.iterdir()) == []


def test_the_summary_lists_only_the_plots_that_were_written(tmp_path, capsys, monkeypatch, caplog):
    from autorank.search import result as result_mod

    def no_backend(*a, **k):
        raise RuntimeError("no plotting backend")

    monkeypatch.setattr(result_mod, "plot_front", no_backend)
    run = tmp_path / "run"
    rc, out, err = run_main("search", *TOY, "--budget", "30%flops", "--trials", "2", "--finetune", "0", "--no-warm-start",
                            "--out", str(run), cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert rc == 0, err
    assert any("could not draw the Pareto plot" in r.getMessage() for r in caplog.records)
    assert "pareto.png" not in out and "pareto.html" not in out and "plot: none written" in out
    monkeypatch.undo()
    rc, out, err = run_main("front", str(run), cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert rc == 0 and "pareto.png" in out and "pareto.html" in out and (run / "pareto.png").exists()


MOUNT_SCRIPT = """
set -u
mkdir -p "$MNT"
mount -t tmpfs -o size=$SIZE tmpfs "$MNT" || exit 99
cd "$WORK"
python -m autorank.cli $ARGS > out1 2> err1; echo $? > rc1
find "$MNT" -name '*.tmp' -o -name '.tmp-*' > tmps
mount -o remount,size=64m "$MNT"
python -m autorank.cli $ARGS > out2 2> err2; echo $? > rc2
ls "$MNT/run/trials" > trials
cp "$MNT/run/front.json" front.json 2>/dev/null
true
"""


@pytest.mark.slow
@pytest.mark.parametrize("size", ["400k"])  # 400k fills during the trials (the study's SQLite); 1m at the plots
def test_a_real_small_filesystem_fills_up_then_the_run_resumes(tmp_path, size):
    """On a tmpfs of ``size`` (mounted in a private user and mount namespace; skipped where that is not allowed)."""
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) to mount a small filesystem")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mkdir -p {tmp_path}/p && mount -t tmpfs -o size=64k tmpfs {tmp_path}/p"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()[:200]}")
    work = tmp_path / "work"
    work.mkdir()
    mnt = tmp_path / "mnt"
    args = " ".join(["search", *TOY, "--budget", "30%flops", "--trials", "6", "--finetune", "1", "--finetune-steps", "3",
                     "--no-warm-start", "-q", "--out", str(mnt / "run")])
    env = cli_env(MNT=str(mnt), SIZE=size, WORK=str(work), ARGS=args,
                  PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", MOUNT_SCRIPT], env=env,
                       capture_output=True, text=True, timeout=600)
    if p.returncode == 99:
        pytest.skip("cannot mount a tmpfs here")
    rc1, rc2 = (work / "rc1").read_text().strip(), (work / "rc2").read_text().strip()
    err1 = (work / "err1").read_text()
    assert rc1 == "2", err1[-2000:]
    lines = [ln for ln in err1.splitlines() if ln.strip() and not ln.startswith(("WARNING: Location", "WARNING autorank: this machine is busy"))]
    assert len(lines) == 1 and lines[0].startswith(f"error: no space left on {mnt} (tmpfs) while writing {mnt}/run"), lines
    assert "Traceback" not in err1
    assert (work / "tmps").read_text().strip() == ""  # no partial file anywhere
    assert rc2 == "0", (work / "err2").read_text()[-2000:]
    assert len((work / "trials").read_text().split()) >= 6
    assert json.loads((work / "front.json").read_text())["front"]


# ---------------------------------------------------------------------- resume and repeated plans
KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    import torch
    torch.set_num_threads(1)
    from autorank.search import search
    from tests.search_toys import toy_cnn, toy_task
    search(toy_cnn(), toy_task(), **{kw!r}, out={out!r})
    """
)


@pytest.mark.slow
def test_a_killed_and_resumed_run_asks_for_the_same_plans_as_an_uninterrupted_one(tmp_path):
    kw = dict(budget="30%flops", trials=18, finetune=0, sensitivity_points=2, measure_latency=False, warm_start=True, seed=3)
    straight = search(toy_cnn(), toy_task(), **kw, out=tmp_path / "straight")
    killed = tmp_path / "killed"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO), kw=kw, out=str(killed)))
    proc = subprocess.Popen([sys.executable, str(script)], env=cli_env(AUTORANK_TOY_SLEEP="0.12"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        recs = records(killed)
        if sum(r.get("state") == "COMPLETE" for r in recs.values()) >= 12 and any(r.get("state") == "RUNNING" for r in recs.values()):
            break
        if proc.poll() is not None:
            pytest.fail("the search ended before it could be killed: " + proc.stdout.read().decode()[-2000:])
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    resumed = search(toy_cnn(), toy_task(), **kw, out=killed)
    assert any(r["state"] == "INTERRUPTED" for r in resumed.trials)

    def plans(res):
        return [(r["choice"], r.get("origin"), r.get("duplicate_of") is not None) for r in res.trials if r["state"] != "INTERRUPTED"]

    a, b = plans(straight), plans(resumed)
    assert len(a) == len(b) == 18
    assert b == a, next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert [m.plan.to_dict() for m in resumed.front] == [m.plan.to_dict() for m in straight.front]


def test_a_plan_already_scored_is_not_run_again(tmp_path):
    # two layers, one method, one rho: at most four different plans, so ten trials must repeat some
    space = {"methods": ["svd"], "rho": [0.5], "layers": {"include": ["^head\\.2$", "^head\\.4$"]}}
    res = search(toy_cnn(), toy_task(), budget="99%params", space=space, trials=10, finetune=2, finetune_steps=3,
                 sampler="random", warm_start=False, sensitivity_points=2, measure_latency=False, out=tmp_path / "run")
    ran = [r for r in res.trials if r["state"] == "COMPLETE" and r.get("duplicate_of") is None]
    repeats = [r for r in res.trials if r.get("duplicate_of") is not None]
    keys = [json.dumps(r["choice"], sort_keys=True) for r in ran]
    assert len(keys) == len(set(keys)) <= 4  # every plan that ran is different
    assert len(ran) + len(repeats) == 10 and repeats
    by_number = {r["number"]: r for r in res.trials}
    for r in repeats:
        first = by_number[r["duplicate_of"]]
        assert first["choice"] == r["choice"] and first["score"] == r["score"] and first.get("duplicate_of") is None
        assert r["time_total_s"] == 0.0 and "time_evaluate_s" not in r
    tuned = [r for r in res.trials if r.get("finetune")]
    assert len({json.dumps(r["choice"], sort_keys=True) for r in tuned}) == len(tuned)  # fine-tuned once per plan
    assert len({m.trial for m in res.front}) == len(res.front)
    assert all(by_number[m.trial].get("duplicate_of") is None for m in res.front)
    st_ = RunDir(tmp_path / "run").load_study()
    told = [t for t in st_.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(told) == 10 and sum("duplicate_of" in t.user_attrs for t in told) == len(repeats)


# ---------------------------------------------------------------------- the small ones
@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n", "description: nothing here\n"])
def test_an_empty_or_keyless_space_file_is_an_error(tmp_path, capsys, monkeypatch, text):
    f = tmp_path / "space.yaml"
    f.write_text(text)
    with pytest.raises(SpaceError) as info:
        SearchSpace.load(f)
    assert str(f) in str(info.value) and "empty" in str(info.value) and "\n" not in str(info.value)
    rc, out, err = run_main("search", *TOY, "--budget", "30%flops", "--space", str(f), "--out", str(tmp_path / "run"),
                            cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert_one_line_error(rc, err, str(f), "empty")
    assert not (tmp_path / "run").exists()


def test_profile_help_shows_a_budget_that_can_be_typed(tmp_path, capsys, monkeypatch):
    rc, out, err = run_main("profile", "--help", cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert rc == 0
    assert "%%" not in out and "--budget 30%flops" in out
    for cmd in ("search", "export", "decompose", "plan", "front"):
        rc, out, err = run_main(cmd, "--help", cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
        assert rc == 0 and "%%" not in out, cmd


@pytest.mark.parametrize("value", ["-1", "0"])
def test_profile_refuses_a_batch_size_below_one(tmp_path, capsys, monkeypatch, value):
    rc, out, err = run_main("profile", "--batch-size", value, "--no-latency", cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert_one_line_error(rc, err, f"--batch-size {value}")


def test_atomic_torch_save_round_trips(tmp_path):
    atomic_torch_save(tmp_path / "t.pt", {"a": torch.arange(3)})
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True)["a"], torch.arange(3))
    atomic_write_text(tmp_path / "t.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.pt", "t.txt"]
