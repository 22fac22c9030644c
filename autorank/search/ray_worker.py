"""What runs inside a Ray worker: one TrialRunner per process, built once, and the latency job.

Imported by the workers (the actor class and the tasks are defined here so that
Ray pickles them by reference); see :mod:`autorank.search.executor`.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from autorank.search.identity import model_identity
from autorank.search.latency import latency_job, profile_latency_job
from autorank.search.ray_common import extend_sys_path, ray_module
from autorank.search.trial import TrialRunner, where
from autorank.tasks import load_task
from autorank.zoo import load_model

__all__ = ["PROCESS", "build_runner", "finish", "TrialWorker", "latency_task", "latency_job_task"]

PROCESS: dict[str, Any] = {"builds": 0, "runner": None, "key": None}


def build_runner(ship: dict) -> tuple[Any, Optional[str]]:
    """A TrialRunner from a shipment; also a mismatch message when a spec built other weights than the driver's."""
    extend_sys_path(ship.get("paths", ()))
    if ship.get("load_threads"):  # build by spec as the driver did: some weights (SVD-shaped inits) depend on it
        torch.set_num_threads(int(ship["load_threads"]))

    mismatch = None
    model = task = None
    if ship.get("objects") is not None:
        model, task = ray_module().get(ship["objects"][0])
    if ship.get("model_spec"):
        model = load_model(ship["model_spec"])
        digest = model_identity(model)["weights"]
        if ship.get("model_digest") and digest != ship["model_digest"]:
            mismatch = (f"model spec {ship['model_spec']!r} builds other weights on the worker than in the driver "
                        f"({digest} != {ship['model_digest']}): shipping the driver's model instead")
    if ship.get("task_spec"):
        task = load_task(ship["task_spec"], ship.get("model_spec"))
        fp = task.fingerprint() if hasattr(task, "fingerprint") else None
        if mismatch is None and ship.get("task_fingerprint") is not None and fp != ship["task_fingerprint"]:
            mismatch = f"task spec {ship['task_spec']!r} builds another task on the worker than in the driver: shipping the driver's"
    if ship.get("threads"):
        torch.set_num_threads(int(ship["threads"]))
    runner = TrialRunner(model.eval(), task, calibrate=ship.get("calibrate"), cache_dir=ship.get("cache_dir"), setup=True)
    PROCESS["builds"] += 1
    return runner, mismatch


def finish(res: dict, runner: Any) -> dict:
    """A job's result with where it ran (pid, how many times this process built its runner)."""
    res = dict(res)
    w = res.setdefault("where", {})
    w.setdefault("pid", os.getpid())
    w["runner_builds"] = PROCESS["builds"]
    return res


class TrialWorker:
    """One Ray actor: builds its TrialRunner once (on its first call), then runs jobs on it.

    The pickled model and task come with each call as a nested object ref (fetched only to build), not as
    constructor arguments, so that a restarted actor rebuilds from the same object.
    """

    def __init__(self, ship: dict):
        self.ship = ship
        self.runner: Any = None
        self.mismatch: Optional[str] = None
        self.jobs = 0

    def _ensure(self, objects: Optional[list]) -> Any:
        if self.runner is None:
            self.runner, self.mismatch = build_runner({**self.ship, "objects": objects})
        return self.runner

    def ready(self, objects: Optional[list] = None) -> dict:
        runner = self._ensure(objects)
        return {**where(), "runner_builds": PROCESS["builds"], "setup_s": runner.setup_s, "mismatch": self.mismatch}

    def run(self, kind: str, payload: dict, objects: Optional[list] = None) -> dict:
        runner = self._ensure(objects)
        self.jobs += 1
        return finish(runner.run(kind, payload), runner)

    def info(self) -> dict:
        out = {**where(), "runner_builds": PROCESS["builds"], "jobs": self.jobs}
        if self.runner is not None:
            out.update(cache=self.runner.cache.stats(), setup_s=self.runner.setup_s)
        return out


def latency_task(paths: list[str], model_spec: str, input_shape: list[int], device: str, kwargs: dict) -> dict:
    """The latency job on this worker (see :func:`autorank.search.executor.measure_latency_remote`)."""
    extend_sys_path(paths)
    out = profile_latency_job(model_spec, input_shape, device=device, **kwargs)
    out["where"] = where()
    return out


def latency_job_task(paths: list[str], kind: str, objects: list, payload: dict) -> dict:
    """A search's latency job on the node Ray placed it on (see :meth:`autorank.search.executor.RayExecutor.measure_latency`).

    The model comes as an object ref nested in ``objects``, fetched after the
    driver's project directories are on ``sys.path``.
    """
    extend_sys_path(paths)
    model = ray_module().get(objects[0])
    out = latency_job(kind, model, payload)
    out["where"] = where()
    return out
