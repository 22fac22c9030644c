"""The Ray executor on real Ray (no mocks): local workers, a two-node cluster, a killed worker, a killed driver.

Ray on these machines (see docs/DESIGN.md): nodes on loopback addresses 127.0.0.2 / 127.0.0.3,
RAY_AUTH_MODE=token in every process, ``ray stop --force`` in teardown. The last test checks
that no Ray process is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest

ray = pytest.importorskip("ray")

from autorank.search import search  # noqa: E402
from autorank.search.executor import RayExecutor  # noqa: E402
from autorank.search.rundir import RunDir  # noqa: E402
from tests.search_toys import toy_cnn, toy_task  # noqa: E402

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
FAST = dict(sensitivity_points=2, measure_latency=False)
RAY_BIN = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
_BROKEN: list[str] = []  # why Ray cannot start here, once known


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="token", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO), **extra)
    env.pop("RAY_ADDRESS", None)
    return env


def _ray_stop() -> None:
    if RAY_BIN:
        subprocess.run([RAY_BIN, "stop", "--force"], env=_env(), capture_output=True, timeout=120)


def _skip_if_broken() -> None:
    if _BROKEN:
        pytest.skip(f"Ray cannot start here: {_BROKEN[0]}")


def _records(out: Path) -> dict[int, dict]:
    recs = {}
    for p in (out / "trials").glob("*.json") if (out / "trials").exists() else []:
        try:
            recs[int(p.stem)] = json.loads(p.read_text())
        except (ValueError, json.JSONDecodeError, OSError):
            pass
    return recs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def _token_auth(ray_exclusive):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("OMP_WAIT_POLICY", "PASSIVE")
        mp.delenv("RAY_ADDRESS", raising=False)
        yield
    _ray_stop()  # safety net: nothing of this module survives it


# ---------------------------------------------------------------------- a local instance shared by two tests
class TestLocalWorkers:
    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def local_ray(cls):
        """One local Ray instance on 127.0.0.2 for the tests of this class (the executor reuses, and keeps, it)."""
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_AUTH_MODE", "token")
            mp.setenv("PYTHONPATH", str(REPO))  # workers import tests.search_toys
            try:
                ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.2", logging_level="WARNING")
            except Exception as exc:  # pragma: no cover - depends on the machine
                _BROKEN.append(f"{type(exc).__name__}: {exc}")
                _ray_stop()
                pytest.skip(f"Ray cannot start here: {exc}")
            try:
                yield
            finally:
                ray.shutdown()
                _ray_stop()

    def test_trials_run_on_two_long_lived_workers(self, tmp_path):
        ex = RayExecutor(workers=2, cpus_per_trial=1)
        res = search(toy_cnn(), toy_task(), budget="30%flops", trials=6, finetune=1, out=tmp_path / "run", executor=ex, **FAST)
        assert res.front, "empty front"
        assert ray.is_initialized()  # the executor did not shut down an instance it did not start
        recs = _records(Path(res.run_dir))
        assert len(recs) == 6 and all(r["state"] == "COMPLETE" for r in recs.values())
        pids = set()
        for r in recs.values():
            w = r["where"]
            assert w["pid"] != os.getpid() and w["node_ip"] == "127.0.0.2" and w["node_id"]
            assert w["runner_builds"] == 1
            pids.add(w["pid"])
        assert len(pids) == 2
        # each worker built its TrialRunner once, for all the jobs it ran (sensitivity, trials, fine-tune, save)
        info = ex.worker_info
        assert len(info) == 2 and {i["pid"] for i in info} == pids
        assert [i["runner_builds"] for i in info] == [1, 1]
        jobs = sum(i["jobs"] for i in info)
        assert jobs > 6 + 1  # baseline + sensitivity + trials + fine-tune + save, far more than the builds
        # the factor cache on disk is shared: a worker read factorizations the other computed
        assert sum(i["cache"]["disk_hits"] for i in info) > 0
        assert any(m.finetuned for m in res.front) or any(r.get("finetune") for r in recs.values())

    def test_a_killed_worker_is_restarted_and_its_trial_retried_or_failed(self, tmp_path, monkeypatch):
        # each evaluate sleeps 0.8 s (the env reaches the workers through the executor's runtime_env)
        monkeypatch.setenv("AUTORANK_TOY_SLEEP", "0.8")
        out = tmp_path / "run"
        kills: list[tuple[int, int]] = []  # (trial, pid)
        stop = threading.Event()

        def killer():
            # workers=1 runs trials in order: trial n runs on the process that finished trial n-1
            while not stop.is_set() and len(kills) < 2:
                recs = _records(out)
                running = [n for n, r in recs.items() if r.get("state") == "RUNNING"]
                prev = recs.get(running[0] - 1) if running else None
                if prev and prev.get("state") == "COMPLETE" and prev["where"]["pid"] not in {p for _, p in kills}:
                    time.sleep(0.25)  # inside the trial's evaluate
                    os.kill(prev["where"]["pid"], signal.SIGKILL)
                    kills.append((running[0], prev["where"]["pid"]))
                time.sleep(0.05)

        th = threading.Thread(target=killer, daemon=True)
        th.start()
        # one restart and one retry: the first kill is retried on the restarted actor, the second fails the trial
        ex = RayExecutor(workers=1, max_retries=1)
        try:
            res = search(toy_cnn(), toy_task(), budget="30%flops", trials=5, finetune=0, warm_start=False,
                         out=out, executor=ex, **FAST)
        finally:
            stop.set()
            th.join(timeout=10)
        assert len(kills) == 2, kills
        recs = _records(out)
        assert len(recs) == 5
        (first, pid1), (second, pid2) = kills
        retried, failed = recs[first], recs[second]
        assert retried["state"] == "COMPLETE" and retried["where"]["pid"] != pid1  # rerun on the restarted worker
        assert failed["state"] == "FAIL" and failed["error_type"] == "WorkerCrashed" and "WorkerCrashed" in failed["error"]
        assert failed["where"]["pid"] == pid2
        others = [r for n, r in recs.items() if n != second]
        assert all(r["state"] == "COMPLETE" for r in others)
        assert any(r["where"]["pid"] not in (pid1, pid2, retried["where"]["pid"]) for r in others)  # a fresh worker
        # every finished trial is in the study, with the state its record has
        st_ = RunDir(out).load_study()
        S = optuna.trial.TrialState
        assert len(st_.trials) == 5
        for t in st_.trials:
            assert t.state == (S.FAIL if t.number == second else S.COMPLETE)
        assert st_.trials[second].user_attrs["error"].startswith("WorkerCrashed")
        assert res.front

    def test_the_tune_engine_runs_the_same_search_through_ray_tune(self, tmp_path):
        ex = RayExecutor(workers=1, engine="tune")
        res = search(toy_cnn(), toy_task(), budget="30%flops", trials=2, finetune=0, warm_start=False,
                     out=tmp_path / "run", executor=ex, **FAST)
        recs = _records(Path(res.run_dir))
        assert len(recs) == 2 and all(r["state"] == "COMPLETE" for r in recs.values())
        assert all(r["where"]["pid"] != os.getpid() and r["where"]["runner_builds"] == 1 for r in recs.values())
        assert res.front and ray.is_initialized()

    def test_latency_is_measured_by_a_ray_task_and_says_on_what(self, tmp_path):
        from autorank.cost.latency_table import LatencyTable
        from autorank.search.executor import measure_latency_remote

        res = measure_latency_remote("tests.search_toys:toy_cnn", [1, 3, 8, 8], device="cpu", threads=1,
                                     candidates={"head.2": [["svd", 4]]}, table_dir=str(tmp_path / "lat"))
        assert ray.is_initialized()  # not ours to shut down
        assert res["where"]["pid"] != os.getpid() and res["where"]["node_ip"] == "127.0.0.2"
        assert res["device"] == "cpu" and res["device_name"]
        assert res["layers"]["head.2"]["replacements"][0]["latency_s"] > 0 and res["base_latency_s"] > 0
        assert len(LatencyTable.from_dict(res["table"])) >= 2


# ---------------------------------------------------------------------- a two-node cluster on this machine
@pytest.fixture
def two_node_cluster(tmp_path):
    _skip_if_broken()
    if RAY_BIN is None:
        pytest.skip("the ray command is not installed")
    port = _free_port()
    env = _env()
    head = [RAY_BIN, "start", "--head", "--node-ip-address=127.0.0.2", "--port", str(port), "--num-cpus", "1",
            "--include-dashboard=false", "--disable-usage-stats"]
    worker = [RAY_BIN, "start", "--address", f"127.0.0.2:{port}", "--node-ip-address=127.0.0.3", "--num-cpus", "2",
              "--resources", json.dumps({"autorank_worker": 2}), "--disable-usage-stats"]
    try:
        for cmd in (head, worker):
            p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
            if p.returncode != 0:
                _BROKEN.append(p.stderr.strip()[-300:])
                pytest.skip(f"cannot start a Ray node here: {p.stderr.strip()[-300:]}")
        yield f"127.0.0.2:{port}"
    finally:
        _ray_stop()


def test_cli_search_on_a_two_node_cluster_runs_trials_where_the_resources_are(tmp_path, two_node_cluster):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "autorank.cli", "search", "--model", "tests.search_toys:toy_cnn", "--task",
           "tests.search_toys:toy_task", "--budget", "30%flops", "--trials", "6", "--finetune", "0",
           "--address", two_node_cluster, "--workers", "2", "--resources", '{"autorank_worker": 1}', "--out", str(out), "-q"]
    p = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "shipping the driver's model instead" not in p.stderr  # the workers built the model from its spec
    recs = _records(out)
    assert len(recs) == 6
    for r in recs.values():
        assert r["state"] == "COMPLETE"
        assert r["where"]["node_ip"] == "127.0.0.3", r["where"]  # the node with the autorank_worker resource
    assert len({r["where"]["pid"] for r in recs.values()}) == 2
    assert (out / "front.json").exists()


# ---------------------------------------------------------------------- the driver killed mid-search
KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    import torch
    torch.set_num_threads(1)  # as in the test process (conftest): the toy's SVD-shaped weights depend on it
    from autorank.search import search
    from autorank.search.executor import RayExecutor
    search("tests.search_toys:toy_cnn", "tests.search_toys:toy_task", budget="30%flops", trials={trials}, finetune=0,
           out={out!r}, sensitivity_points=2, measure_latency=False, warm_start=False, executor=RayExecutor(workers=1))
    """
)


def test_driver_killed_midway_resumes_on_ray_with_no_finished_trial_lost_or_repeated(tmp_path):
    _skip_if_broken()
    out = tmp_path / "killed"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO), trials=7, out=str(out)))
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen([sys.executable, str(script)], env=_env(AUTORANK_TOY_SLEEP="0.4"), cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300  # a loaded 2-core machine starts Ray and the toy trials slowly
        while time.time() < deadline:
            recs = _records(out)
            if sum(r.get("state") == "COMPLETE" for r in recs.values()) >= 3 and any(r.get("state") == "RUNNING" for r in recs.values()):
                break
            if proc.poll() is not None:
                pytest.fail("search ended before it could be killed: " + (tmp_path / "driver.log").read_text()[-3000:])
            time.sleep(0.02)
        else:
            pytest.fail("no 3 finished trials in time: " + (tmp_path / "driver.log").read_text()[-3000:])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        _ray_stop()  # the killed driver's local Ray instance
    before = {n: r for n, r in _records(out).items() if r.get("state") == "COMPLETE"}
    assert 3 <= len(before) < 7
    assert all(r["where"]["pid"] != proc.pid for r in before.values())  # they ran on a Ray worker
    st_ = RunDir(out).load_study()
    # the trial in flight when the driver died: one, or none when (on a loaded machine) it finished between the
    # poll above and the kill; the study knows of every trial whose record says RUNNING (asks are flushed first)
    running_records = {n for n, r in _records(out).items() if r.get("state") == "RUNNING"}
    running = sum(t.state == optuna.trial.TrialState.RUNNING for t in st_.trials)
    assert len(running_records) <= running <= 1

    # the same search again, here, on a fresh local Ray instance the executor starts and stops
    ex = RayExecutor(workers=1)
    res = search("tests.search_toys:toy_cnn", "tests.search_toys:toy_task", budget="30%flops", trials=7, finetune=0,
                 out=out, warm_start=False, executor=ex, **FAST)
    assert not ray.is_initialized()  # the executor shut down what it started
    done = [r for r in res.trials if r.get("state") in ("COMPLETE", "FAIL")]
    assert len(done) == 7
    for n, r in before.items():  # every trial finished before the kill is kept, unchanged
        again = _records(out)[n]
        assert again["time_total_s"] == r["time_total_s"] and again["where"] == r["where"]
    st_ = RunDir(out).load_study()
    S = optuna.trial.TrialState
    finished = [t for t in st_.trials if t.state in (S.COMPLETE, S.FAIL) and not t.user_attrs.get("interrupted")]
    assert len(finished) == 7
    interrupted = [t for t in st_.trials if t.user_attrs.get("interrupted")]
    assert len(interrupted) == running
    for t in interrupted:
        if t.number in running_records:
            assert _records(out)[t.number]["state"] == "INTERRUPTED"
        assert any(u.params == t.params and u.state == S.COMPLETE for u in st_.trials)  # rerun, not lost
    assert ex.worker_info and ex.worker_info[0]["runner_builds"] == 1


# ---------------------------------------------------------------------- nothing left behind
def test_no_ray_process_is_left_behind():
    if ray.is_initialized():
        ray.shutdown()
    deadline = time.time() + 30
    while True:
        p = subprocess.run(["pgrep", "-f", "raylet"], capture_output=True, text=True)
        if not p.stdout.strip() or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not p.stdout.strip(), "Ray processes left behind: " + p.stdout
