"""Trials on Ray: one long-lived worker per concurrent trial, each holding its own :class:`TrialRunner`.

All of autorank's Ray code lives in this module, :mod:`autorank.search.ray_common`,
:mod:`autorank.search.ray_worker` and :mod:`autorank.search.ray_tune`; the rest of
the package runs without Ray. :class:`RayExecutor` has the interface of the search's executors
(:class:`~autorank.search.executor_base.BaseExecutor`: ``start``/``submit``/``wait``/
``has_results``/``running``/``close`` and ``concurrency``), so :func:`autorank.search.search` drives it with the same
Optuna ask → repair → record → run → tell loop::

    from autorank.search import search
    from autorank.search.executor import RayExecutor

    search("resnet50", "my_pkg.tasks:imagenet", budget="30%flops", trials=400,
           executor=RayExecutor(address="auto", workers=64, gpus_per_trial=1))

or from the command line ``autorank search ... --address auto --workers 64 --gpus-per-trial 1``.

What each worker keeps
----------------------
Building a trial's world is the expensive part: loading the model, the task's
data, the calibration statistics (Gram matrices) and the factorizations. Each
of the ``workers`` Ray actors builds one ``TrialRunner`` in its constructor and
keeps it for every trial it runs, so a trial costs only decompose → (fine-tune)
→ evaluate. The model and task go to the workers by spec when the search was
given specs (``"pkg.mod:build"``; each worker imports and calls it, and checks
that it built the driver's exact weights, else falls back to shipping), else
pickled once into the object store and shared by all actors. The factor cache
directory is on disk and shared by the actors of a node: a layer factorized by
one worker is read, not recomputed, by the others (entries are written
atomically, see :mod:`autorank.cache`).

Scheduling is Ray's: jobs go to idle actors, placed by Ray according to
``cpus_per_trial``, ``gpus_per_trial`` (fractions allowed: two trials per GPU with
0.5) and ``resources`` (e.g. ``{"accelerator_type:A100": 0.01}`` or a custom
node resource).

Faults
------
A worker process that dies mid-trial (killed, segfault, out of memory) is
restarted by Ray (``max_restarts``) and the trial is retried on it
(``max_task_retries``), up to ``max_retries`` times; if it still fails the trial
comes back as ``{"error": "WorkerCrashed: ...", "error_type": "WorkerCrashed"}``,
the search records it as failed and goes on on a fresh actor. A driver killed
mid-search loses nothing finished: records are written before the study is
told, and rerunning the same search resumes (the trials it interrupted are
marked INTERRUPTED and rerun). The driver's own local Ray instance dies with
it only if Ray's processes are stopped: ``ray stop --force``.

Where each trial ran
--------------------
Each result carries ``where``: host, pid, Ray node id and node IP of the worker
(``runner_builds``: how many times that process built its TrialRunner, 1 unless
the actor was restarted).

Ray Tune (``engine="tune"``)
----------------------------
The same interface runs the trials through ``ray.tune.Tuner`` instead: a custom
:class:`~ray.tune.search.Searcher` hands Tune the jobs the driver submitted (Optuna
stays the searcher: the driver's study asks, the plan is repaired to the budget
and recorded, then Tune runs it), a class trainable keeps one TrialRunner per
worker process (``reuse_actors=True``; the model and task always go pickled) and
Tune's ``FailureConfig`` retries crashed trials. Everything the search relies on
is kept (repair before a plan runs, the record written before tell, resume,
warm-start plans enqueued in the SQLite study).

It is not the default, for a measured reason. Tune's controller pulls trials
from its searcher; when no trial is live and the searcher has nothing yet it
blocks in ``TuneController._update_trial_queue(blocking=True)``, polling every
1 s (``time.sleep(1)``). The search's loop is ask → run → tell: the next plan
exists only after the previous result has come back through Tune, so a job
submitted into that gap waits up to a second before Tune starts it. Measured
with benchmarks/bench_executor.py on a shared 2-core machine (one job in
flight): median overhead per trial 1.02 s (p90 2.0 s; samples are bimodal,
~20 ms when the job arrives while Tune is still stepping, 1–2 s when it is
asleep) against 3–4 ms for the actors; with 2 workers Tune ran 0.57–1.02× the
throughput of 1 worker, the actors 1.03–1.19×. Handing the study to Tune's own
``OptunaSearch`` instead would remove the gap but lose repair-to-budget before
a plan runs, the per-trial record written before tell, the warm-start plans and
the driver-side resume. Use ``engine="tune"`` when a cluster's tooling expects
Tune experiments and trials are long (minutes: a second is then noise).

Latency where it belongs
------------------------
The search's latency jobs (the per-layer table before the first trial, the
front's re-measurement after the last) run as Ray tasks placed like the trials
(``resources``) and, for a CUDA target, on a node with a GPU
(:meth:`RayExecutor.measure_latency`), never in the driver: a cluster whose head
has no GPU and whose workers do is the usual case. Each task reserves as many
CPUs as the measurement's threads, and the trial workers are released before
the front is measured, so that nothing else of the search runs beside it. A
request no live node can satisfy fails at the start, in one line naming the
missing resource (:meth:`RayExecutor.check_latency_target`).
:func:`measure_latency_remote` measures a model spec's latency table the same
way, outside a search.

Network exposure: the local instance the executor starts has node address
127.0.0.1 and every Ray server of it (GCS, raylet, object manager, workers, the
driver, the runtime-env agent) listens on loopback only, with token
authentication on (:func:`~autorank.search.ray_common.loopback_node`; a cluster
given by ``address`` is the user's to configure). Ray on test machines:
``RAY_AUTH_MODE=token`` in every process, and ``ray stop --force`` in teardown
(see docs/DESIGN.md).
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any, Optional, Sequence

from autorank.errors import AutorankError
from autorank.search.executor_base import BaseExecutor
from autorank.search.identity import model_identity
from autorank.search.ray_common import (
    LOCAL_NODE_IP,
    WAIT_S,
    RayExecutorError,
    absolute_spec,
    check_placement,
    check_reachable,
    crash_result,
    driver_paths,
    forwarded_env,
    local_node_ip,
    loopback_node,
    ray_module,
)
from autorank.search.ray_tune import TuneEngine
from autorank.search.ray_worker import TrialWorker, latency_job_task, latency_task
from autorank.zoo import SPEC_ATTR

logger = logging.getLogger("autorank")

__all__ = ["RayExecutor", "RayExecutorError", "measure_latency_remote", "ENGINES", "LOCAL_NODE_IP"]

ENGINES = ("actors", "tune")


class RayExecutor(BaseExecutor):
    """Runs the search's trials on Ray workers, ``workers`` at a time.

    ``address``: None (a local Ray instance sized to this machine, unless
    ``$RAY_ADDRESS`` names a cluster or Ray is already initialised in this
    process), ``"auto"`` or ``"HOST:PORT"`` (an existing cluster). ``workers``:
    concurrent trials, one long-lived actor each. ``cpus_per_trial``,
    ``gpus_per_trial`` (fractions allowed), ``resources`` (custom resources per
    trial, e.g. ``{"accelerator_type:A100": 0.01}``): what each worker reserves.
    ``max_retries``: times a trial whose worker died is retried (the actor is
    restarted as often). ``engine``: ``"actors"`` (default) or ``"tune"`` (Ray
    Tune, see the module docstring). ``start_timeout``: seconds to wait for the
    first worker to be placed and built.
    """

    def __init__(
        self,
        address: Optional[str] = None,
        workers: int = 1,
        cpus_per_trial: float = 1.0,
        gpus_per_trial: float = 0.0,
        resources: Optional[dict[str, float]] = None,
        max_retries: int = 2,
        engine: str = "actors",
        start_timeout: float = 300.0,
    ):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise RayExecutorError(f"workers must be a positive integer, got {workers!r}")
        for label, v in (("cpus_per_trial", cpus_per_trial), ("gpus_per_trial", gpus_per_trial)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise RayExecutorError(f"{label} must be a number >= 0, got {v!r}")
        if resources is not None and (not isinstance(resources, dict)
                                      or not all(isinstance(v, (int, float)) and v >= 0 for v in resources.values())):
            raise RayExecutorError(f"resources must be a dict of numbers >= 0, got {resources!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise RayExecutorError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if engine not in ENGINES:
            raise RayExecutorError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
        self.address = address
        self.workers = workers
        self.concurrency = workers
        self.cpus_per_trial = float(cpus_per_trial)
        self.gpus_per_trial = float(gpus_per_trial)
        self.resources = dict(resources or {})
        self.max_retries = max_retries
        self.engine = engine
        self.start_timeout = float(start_timeout)
        self.name = f"ray-{engine}"
        self._owns_ray = False
        self._impl: Optional[ActorEngine | TuneEngine] = None
        #: what each worker reported when the executor closed: pid, node, runner_builds, jobs, cache stats
        self.worker_info: list[dict] = []

    # ------------------------------------------------------------------ connect
    def _connect(self) -> None:
        ray = ray_module()
        if ray.is_initialized():  # by someone else, or by this executor already (it then still owns it)
            return
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        if address:
            check_reachable(address)
        try:
            if address:
                ray.init(address=address, logging_level=logging.WARNING)
                logger.info("connected to the Ray cluster at %s", address)
            else:
                # loopback only: the node keeps 127.0.0.1, so Ray's servers listen on it (see loopback_node)
                with loopback_node():
                    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, dashboard_host="127.0.0.1",
                             _node_ip_address=local_node_ip(), logging_level=logging.WARNING)
                node_ip = ray.util.get_node_ip_address()
                if node_ip not in ("127.0.0.1", "::1"):
                    logger.warning("the local Ray instance has node address %s: Ray listens on every interface "
                                   "(token authentication stays on)", node_ip)
                logger.info("started a local Ray instance (%d CPUs) on %s", os.cpu_count(), node_ip)
        except Exception as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            hint = ("; a cluster with token authentication needs RAY_AUTH_MODE=token in every process"
                    if "auth" in str(exc).lower() or address else "")
            raise RayExecutorError(f"cannot connect to {where}: {type(exc).__name__}: {str(exc).strip()[:300]}{hint}") from exc
        self._owns_ray = True

    # ------------------------------------------------------------------ shipment
    def _options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.cpus_per_trial, "num_gpus": self.gpus_per_trial}
        if self.resources:
            opts["resources"] = dict(self.resources)
        env = forwarded_env()
        if env:
            opts["runtime_env"] = {"env_vars": env}
        return opts

    def _shipment(self, model, task, calibrate, cache_dir, model_spec, task_spec, pickled: bool) -> dict:
        ray = ray_module()
        ship: dict[str, Any] = {"paths": driver_paths(), "calibrate": calibrate, "cache_dir": cache_dir, "objects": None,
                                "threads": max(1, int(round(self.cpus_per_trial)))}
        if not pickled and model_spec:
            import torch

            ship["model_spec"] = model.__dict__.get(SPEC_ATTR) or model_spec
            ship["model_digest"] = model_identity(model)["weights"]
            ship["load_threads"] = torch.get_num_threads()
        if not pickled and task_spec:
            ship["task_spec"] = absolute_spec(task_spec)
            ship["task_fingerprint"] = task.fingerprint() if hasattr(task, "fingerprint") else None
        need_model, need_task = not ship.get("model_spec"), not ship.get("task_spec")
        if need_model or need_task:
            # one object for both, so a task holding the model (distillation) pickles it once; nested in a list
            # so that workers unpickle it after putting the driver's project directories on sys.path
            ship["objects"] = [ray.put((model if need_model else None, task if need_task else None))]
        return ship

    # ------------------------------------------------------------------ interface
    def start(self, model, task, *, calibrate: Optional[list[str]], cache_dir: Optional[str], setup: bool = True,
              model_spec: Optional[str] = None, task_spec: Optional[str] = None, **_: Any) -> None:
        """Connect to Ray and start the workers (each builds its TrialRunner; ``setup`` is always done on the workers)."""
        self._connect()
        try:
            # Tune builds its runners inside trials, where a spec mismatch could not fall back: it always ships pickled
            ship = self._shipment(model, task, calibrate, cache_dir, model_spec, task_spec, pickled=self.engine == "tune")
            engine_cls = ActorEngine if self.engine == "actors" else TuneEngine
            self._impl = engine_cls(self, ship)
            mismatch = self._impl.start()
            if mismatch:
                logger.warning("%s", mismatch)
                self._impl.close(settle=True)
                ship = self._shipment(model, task, calibrate, cache_dir, model_spec, task_spec, pickled=True)
                self._impl = engine_cls(self, ship)
                self._impl.start()
        except BaseException:
            self.close()
            raise

    def submit(self, ticket: Any, kind: str, payload: dict) -> None:
        assert self._impl is not None, "start() first"
        self._impl.submit(ticket, kind, payload)

    def wait(self) -> list[tuple[Any, dict]]:
        """What has finished since the last call; blocks up to ~0.05 s for a first result while jobs are in flight."""
        assert self._impl is not None, "start() first"
        return self._impl.wait()

    def has_results(self) -> bool:
        return self._impl is not None and self._impl.has_results()

    def running(self) -> int:
        return 0 if self._impl is None else self._impl.running()

    def close(self) -> None:
        """Stop the workers; shut down the Ray connection (and the local instance) only if this executor started it."""
        self.release_workers()
        if self._owns_ray:
            ray_module().shutdown()
            self._owns_ray = False

    # ------------------------------------------------------------------ latency on the target
    def _latency_need(self, device: str, threads: Optional[int]) -> dict[str, float]:
        gpus = 1.0 if str(device).startswith("cuda") else 0.0
        return {"CPU": float(threads or 1), "GPU": gpus, **self.resources}

    def check_latency_target(self, device: str, threads: Optional[int] = None) -> None:
        """Connect, and fail in one line unless a live node offers the latency jobs' resources (device, threads, ``resources``)."""
        self._connect()
        check_placement(self._latency_need(device, threads), f"latency on {device}")

    def measure_latency(self, kind: str, model, payload: dict, progress=None) -> dict:
        """Run a latency job as a Ray task on a node with the target device and ``resources`` (see the module docstring).

        Reserves ``payload["threads"]`` CPUs (1 when the node's default is
        wanted) and a whole GPU for a CUDA device. ``progress`` is not reported
        from a remote node. An :class:`~autorank.errors.AutorankError` raised there
        (a device the node lacks, a table of another device) is raised here as is.
        """
        ray = ray_module()
        self._connect()
        device, threads = str(payload["device"]), payload.get("threads")
        need = self._latency_need(device, threads)
        check_placement(need, f"latency on {device}")
        opts: dict[str, Any] = {"num_cpus": need["CPU"], "num_gpus": need["GPU"], "max_retries": 0}
        if self.resources:
            opts["resources"] = dict(self.resources)
        env = forwarded_env()
        if env:
            opts["runtime_env"] = {"env_vars": env}
        ref = ray.remote(latency_job_task).options(**opts).remote(driver_paths(), kind, [ray.put(model)], dict(payload))
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, AutorankError):
                raise cause from None
            text = (str(cause or exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise RayExecutorError(f"the latency job ({kind}) on {device} failed on the Ray cluster: {text[:300]}") from exc

    def release_workers(self) -> None:
        """Stop the trial workers (their CPUs, GPUs and resources are free again); stay connected."""
        if self._impl is not None:
            try:
                self.worker_info = self._impl.info()
            except Exception:  # pragma: no cover - informational
                pass
            self._impl.close()
            self._impl = None

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------- engine: actors
class ActorEngine:
    def __init__(self, ex: RayExecutor, ship: dict):
        ray = ray_module()
        self.ex = ex
        self.ship = ship
        self.cls = ray.remote(TrialWorker)
        self.actors: list[Any] = []
        self.wheres: dict[int, dict] = {}  # id(actor) -> where it runs
        self.pending: dict[Any, Any] = {}  # ready() ref -> actor, not yet usable
        self.idle: collections.deque = collections.deque()
        self.queue: collections.deque = collections.deque()
        self.inflight: dict[Any, tuple[Any, Any]] = {}  # run ref -> (ticket, actor)
        self.done: list[tuple[Any, dict]] = []
        self.replaced = 0

    def _spawn(self) -> Any:
        a = self.cls.options(max_restarts=self.ex.max_retries, max_task_retries=self.ex.max_retries,
                             **self.ex._options()).remote({k: v for k, v in self.ship.items() if k != "objects"})
        self.actors.append(a)
        self.pending[a.ready.remote(self.ship.get("objects"))] = a
        return a

    def start(self) -> Optional[str]:
        ray = ray_module()
        for _ in range(self.ex.workers):
            self._spawn()
        deadline = time.monotonic() + self.ex.start_timeout
        first: Optional[dict] = None
        while self.pending and time.monotonic() < deadline:
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=min(30.0, max(0.1, deadline - time.monotonic())))
            if not ready:
                logger.info("waiting for Ray to place %d worker(s) needing %s", len(self.pending), self._need())
                continue
            for ref in ready:
                info = self._reap(ref, fatal=True)
                if first is None and info is not None:
                    first = info
                    if info.get("mismatch"):
                        return info["mismatch"]
        if not self.idle:
            raise RayExecutorError(
                f"no Ray worker could be started in {self.ex.start_timeout:g} s: each needs {self._need()}; "
                f"the cluster has {ray_module().cluster_resources()}"
            )
        if self.pending:
            logger.warning("%d of %d Ray workers are not placed yet; starting with %d", len(self.pending), self.ex.workers, len(self.idle))
        return None

    def _need(self) -> dict:
        return {"CPU": self.ex.cpus_per_trial, "GPU": self.ex.gpus_per_trial, **self.ex.resources}

    def _reap(self, ref: Any, fatal: bool = False) -> Optional[dict]:
        """A worker whose constructor finished: usable, or (its constructor failed) dropped."""
        ray = ray_module()
        actor = self.pending.pop(ref)
        try:
            info = ray.get(ref)
        except Exception as exc:
            cause = getattr(exc, "cause", None)
            text = str(cause if cause is not None else exc).strip().splitlines()
            msg = f"a Ray worker could not build its trial runner: {text[-1] if text else type(exc).__name__}"
            if fatal and not self.idle:
                raise RayExecutorError(msg + " (is autorank installed, and the model/task importable, on every node?)") from exc
            logger.warning("%s", msg)
            self._drop(actor)
            return None
        self.wheres[id(actor)] = info
        self.idle.append(actor)
        return info

    def _drop(self, actor: Any) -> None:
        try:
            ray_module().kill(actor, no_restart=True)
        except Exception:  # pragma: no cover
            pass
        if actor in self.actors:
            self.actors.remove(actor)

    def _poll_pending(self) -> None:
        if self.pending:
            ready, _ = ray_module().wait(list(self.pending), num_returns=len(self.pending), timeout=0)
            for ref in ready:
                self._reap(ref)

    def _dispatch(self) -> None:
        while self.queue and self.idle:
            actor = self.idle.popleft()
            ticket, kind, payload = self.queue.popleft()
            self.inflight[actor.run.remote(kind, payload, self.ship.get("objects"))] = (ticket, actor)
        if self.queue and not self.idle and not self.inflight and not self.pending:
            # every worker is gone (constructors failing on restart): fail the jobs rather than hang
            while self.queue:
                ticket, _, _ = self.queue.popleft()
                self.done.append((ticket, {"error": "WorkerCrashed: no Ray worker is left to run this trial",
                                           "error_type": "WorkerCrashed"}))

    def submit(self, ticket: Any, kind: str, payload: dict) -> None:
        self.queue.append((ticket, kind, payload))
        self._poll_pending()
        self._dispatch()

    def _collect(self, refs: list) -> None:
        ray = ray_module()
        for ref in refs:
            ticket, actor = self.inflight.pop(ref)
            try:
                res = ray.get(ref)
                self.idle.append(actor)
                if isinstance(res.get("where"), dict):  # the worker's current process (a restarted actor has a new pid)
                    self.wheres[id(actor)] = res["where"]
            except Exception as exc:
                res = crash_result(exc, self.wheres.get(id(actor)), self.ex.max_retries + 1)
                logger.warning("trial %s: %s", ticket, res["error"])
                if res["error_type"] in ("WorkerCrashed", "OutOfMemory"):  # the actor is gone for good: replace it
                    self._drop(actor)
                    self.replaced += 1
                    self._spawn()
                else:  # the job raised (not a trial error: those come back as results); the worker is fine
                    self.idle.append(actor)
            self.done.append((ticket, res))

    def wait(self) -> list[tuple[Any, dict]]:
        ray = ray_module()
        self._poll_pending()
        self._dispatch()
        if self.inflight and not self.done:
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=WAIT_S)
            if ready:
                ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
            self._collect(ready)
        elif self.inflight:
            ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
            self._collect(ready)
        elif self.queue and self.pending:  # nothing placed yet: wait for a worker
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=WAIT_S)
            for ref in ready:
                self._reap(ref)
        self._dispatch()
        done, self.done = self.done, []
        return done

    def has_results(self) -> bool:
        if self.done:
            return True
        if self.inflight:
            ready, _ = ray_module().wait(list(self.inflight), num_returns=1, timeout=0)
            return bool(ready)
        return bool(self.queue)

    def running(self) -> int:
        return len(self.inflight) + len(self.queue)

    def info(self) -> list[dict]:
        ray = ray_module()
        refs = [a.info.remote() for a in self.actors if any(a is b for b in self.idle)]
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=10))
            except Exception:  # pragma: no cover - a worker that died at the end
                pass
        return out

    def close(self, settle: bool = False) -> None:
        if settle and self.pending:  # let constructors finish first: a call cut short by kill is retried, noisily
            ray_module().wait(list(self.pending), num_returns=len(self.pending), timeout=60)
        for a in list(self.actors):
            self._drop(a)
        self.actors.clear()
        self.idle.clear()
        self.pending.clear()
        self.inflight.clear()


# ---------------------------------------------------------------------- latency on the target device
def measure_latency_remote(
    model_spec: str,
    input_shape: Sequence[int],
    *,
    device: str = "cpu",
    resources: Optional[dict[str, float]] = None,
    num_cpus: float = 1.0,
    num_gpus: Optional[float] = None,
    address: Optional[str] = None,
    timeout: Optional[float] = None,
    **job_kwargs: Any,
) -> dict[str, Any]:
    """Measure ``model_spec``'s latency table on the Ray node that has the target device.

    Runs :func:`autorank.search.latency.profile_latency_job` as a Ray task that
    reserves ``num_cpus``, ``num_gpus`` (default: 1 when ``device`` is CUDA) and
    ``resources`` (e.g. ``{"accelerator_type:A100": 0.01}`` or a custom resource
    of the node with the target device). Connects like :class:`RayExecutor`
    (``address``) when Ray is not initialised, and disconnects afterwards.
    Returns the job's summary with the whole table (``"table"``, load it with
    ``LatencyTable.from_dict``), ``device_name`` (what it was measured on) and
    ``where`` (host, pid, node). ``job_kwargs``: ``batch_size``, ``threads``,
    ``candidates``, ``rhos``, ``clock``, ``table_dir``.
    """
    ray = ray_module()
    ex = RayExecutor(address=address)
    ex._connect()
    try:
        gpus = num_gpus if num_gpus is not None else (1.0 if str(device).startswith("cuda") else 0.0)
        opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": gpus, "max_retries": 0}
        if resources:
            opts["resources"] = dict(resources)
        env = forwarded_env()
        if env:
            opts["runtime_env"] = {"env_vars": env}
        job_kwargs.setdefault("include_table", True)
        ref = ray.remote(latency_task).options(**opts).remote(driver_paths(), model_spec, list(input_shape), device, job_kwargs)
        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, AutorankError):
                raise cause from None
            raise RayExecutorError(f"latency measurement of {model_spec!r} on {device} failed: {cause or exc}") from exc
    finally:
        ex.close()
