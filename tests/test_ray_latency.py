"""Latency on the target node of a Ray cluster: the table and the front's re-measurement run where the resources are.

A two-node cluster on loopback (docs/DESIGN.md, "Ray on these machines"): a head on 127.0.0.2 with nothing
special, a second node on 127.0.0.3 with a custom resource ``target_cpu`` standing for the target device. The
cluster is started with ``ray.cluster_utils.Cluster`` and stopped through it: only the processes it started are
ended (no ``ray stop``, which would end every Ray process on a shared machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from autorank.search import search  # noqa: E402
from autorank.search.executor import RayExecutor, RayExecutorError  # noqa: E402
from tests.latency_toys import SLOW_LAYERS, mlp_task, wide_mlp  # noqa: E402

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
TARGET = {"target_cpu": 1}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="token", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO), **extra)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def cluster(ray_exclusive):
    """Head 127.0.0.2 (1 CPU), target node 127.0.0.3 (2 CPUs, target_cpu=2); yields the address."""
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:
        for k, v in _env().items():
            mp.setenv(k, v)
        mp.delenv("RAY_ADDRESS", raising=False)
        c = None
        try:
            c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.2",
                                                              "include_dashboard": False})
            c.add_node(num_cpus=2, resources={"target_cpu": 2}, node_ip_address="127.0.0.3")
        except Exception as exc:  # pragma: no cover - depends on the machine
            if c is not None:
                c.shutdown()
            pytest.skip(f"cannot start a two-node Ray cluster here: {type(exc).__name__}: {exc}")
        try:
            yield c.address
        finally:
            if ray.is_initialized():
                ray.shutdown()
            c.shutdown()


def test_table_and_front_are_measured_on_the_target_node_not_the_driver(tmp_path, cluster):
    """`autorank search --budget 70%latency --device cpu --threads 1 --address ...`: the Done-when command, on a cluster
    (70%, not 50%: on a 2-core AMD EPYC VM the toy MLP's cheapest plan was estimated at 46% + a 6% reserve)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "autorank.cli", "search", "--model", "tests.latency_toys:wide_mlp", "--task",
           "tests.latency_toys:mlp_task", "--budget", "70%latency", "--device", "cpu", "--threads", "1", "--trials", "5",
           "--finetune", "0", "--sensitivity-points", "2", "--space", str(_space(tmp_path)), "--address", cluster,
           "--resources", json.dumps(TARGET), "--out", str(out), "-q"]
    p = subprocess.run(cmd, env=_env(AUTORANK_CACHE_DIR=str(tmp_path / "cache")), cwd=tmp_path, capture_output=True,
                       text=True, timeout=480)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    info = json.loads((out / "latency.json").read_text())
    assert info["measured_on"]["node_ip"] == "127.0.0.3", info["measured_on"]  # the table, on the target node
    assert info["validity"]["threads"] == 1 and info["device_name"].startswith("cpu: ")
    assert set(info["dropped"]) == set(SLOW_LAYERS)  # the break-even, from the target's table
    front = json.loads((out / "front.json").read_text())
    lat = front["latency"]
    assert lat["measured_on"]["node_ip"] == "127.0.0.3", lat  # the front, re-measured on the target node
    assert lat["device"] == "cpu" and lat["threads_used"] == 1 and lat["table"]["measured_on"]["node_ip"] == "127.0.0.3"
    # every member measured there: on the front, or left out of it when this shared machine measured it over the budget
    # (the tiny MLP's 0.1 ms members: on a 2-core VM the one member of a 5-trial front did so once, the front then empty)
    assert front["front"] + front["over_budget"] and front["original_latency_s"] > 0
    for o in front["over_budget"]:
        assert o["latency_measured_s"] > o["limit_s"] > 0
    for m in front["front"]:
        assert m["latency_measured_s"] > 0 and m["speedup"] > 0 and m["latency_breach"] in (True, False)
        assert m["latency_estimated_s"] > 0
    records = [json.loads(f.read_text()) for f in (out / "trials").glob("*.json")]
    ran = [r for r in records if r.get("duplicate_of") is None]  # a repeated plan is not run again
    assert ran
    for r in ran:  # the trials ran there too (the same --resources)
        assert r["where"]["node_ip"] == "127.0.0.3"
    assert "node 127.0.0.3" in p.stdout and "speed-up" in p.stdout


def _space(tmp_path: Path) -> Path:
    space = tmp_path / "space.yaml"
    space.write_text("methods: [svd]\nrho: [0.1, 0.2, 0.4]\n")
    return space


@pytest.mark.parametrize("resources,device,needle", [
    ({"accelerator_type:H100": 1}, "cpu", "no node of the Ray cluster has accelerator_type:H100=1"),
    (TARGET, "cuda", "no node of the Ray cluster has GPU=1"),
])
def test_a_request_no_node_can_satisfy_fails_before_the_first_trial(tmp_path, cluster, resources, device, needle):
    out = tmp_path / "run"
    ex = RayExecutor(address=cluster, resources=resources)
    with pytest.raises(RayExecutorError) as err:
        search(wide_mlp(), mlp_task(), budget="50%latency", out=out, space=str(_space(tmp_path)), device=device, threads=1,
               trials=3, finetune=0, executor=ex)
    text = str(err.value)
    assert needle in text and "\n" not in text, text
    assert not list(out.glob("trials/*.json")) and not (out / "latency.json").exists()
    assert not ray.is_initialized()  # the executor closed the connection it opened


def test_members_measured_over_the_budget_are_replaced_by_trials_saved_by_restarted_workers(tmp_path, cluster, monkeypatch):
    """The trial workers are released while the front is measured; when the first round's members (made to measure over
    the budget here) leave the front, workers start again to save the promoted trials' weights, which are then measured."""
    real, rounds = RayExecutor.measure_latency, []

    def measure(self, kind, model, payload, progress=None):
        res = real(self, kind, model, payload, progress)
        if kind == "front":
            rounds.append(sorted(int(m["trial"]) for m in payload["members"]))
            if len(rounds) == 1:
                res["members"] = {k: {**t, "min": 3 * res["original"]["min"]} for k, t in res["members"].items()}
                res["speedups"] = {k: 1 / 3 for k in res["members"]}
        return res

    monkeypatch.setattr(RayExecutor, "measure_latency", measure)
    monkeypatch.setenv("AUTORANK_CACHE_DIR", str(tmp_path / "cache"))
    ex = RayExecutor(address=cluster, resources=TARGET)
    res = search(wide_mlp(), mlp_task(), budget="90%latency", out=tmp_path / "run", space=str(_space(tmp_path)), threads=1,
                 trials=8, finetune=0, sensitivity_points=2, executor=ex)
    assert len(rounds) >= 2 and rounds[1], rounds
    assert set(rounds[0]) <= {o["trial"] for o in res.over_budget}
    for m in res.front:
        assert m.trial not in rounds[0] and m.latency_measured_s > 0 and (Path(res.run_dir) / m.weights).exists()
    assert not ray.is_initialized()
