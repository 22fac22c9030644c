"""The Ray Tune engine of :class:`~autorank.search.executor.RayExecutor` (``engine="tune"``).

The same jobs through ``ray.tune.Tuner``: a Searcher fed by the driver's queue and
a reusable class trainable that keeps one TrialRunner per worker process. Why it
is not the default is explained in :mod:`autorank.search.executor`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import tempfile
import threading
from typing import Any, Optional

from autorank.search.ray_common import WAIT_S, RayExecutorError

logger = logging.getLogger("autorank")

__all__ = ["TuneEngine"]


class TuneEngine:
    """The same jobs through ``ray.tune.Tuner``: a Searcher fed by the driver's queue, a reusable class trainable."""

    def __init__(self, ex: Any, ship: dict):  # ex: the RayExecutor that owns this engine
        self.ex = ex
        self.ship = ship
        self.jobs: "queue.Queue[tuple[Any, str, dict]]" = queue.Queue()
        self.results: "queue.Queue[tuple[Any, dict]]" = queue.Queue()
        self.closing = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        self.submitted = 0
        self.returned = 0
        self.storage = tempfile.mkdtemp(prefix="autorank-tune-")
        self.builds_seen: dict[tuple, dict] = {}

    def start(self) -> Optional[str]:
        from ray import tune

        # results come back through the searcher: no per-trial result files, no console tables
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)  # "no result.json": by design
        searcher = _make_searcher(self)
        resources = {"cpu": self.ex.cpus_per_trial, "gpu": self.ex.gpus_per_trial, **self.ex.resources}
        trainable = tune.with_resources(tune.with_parameters(_tune_trainable(), ship=self.ship), resources)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=self.ex.workers,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name="autorank", storage_path=self.storage, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=self.ex.max_retries),
                                      checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)),
        )

        def fit() -> None:
            try:
                tuner.fit()
            except BaseException as exc:  # surfaced by wait()
                self.error = exc

        self.thread = threading.Thread(target=fit, name="autorank-tune", daemon=True)
        self.thread.start()
        return None

    def submit(self, ticket: Any, kind: str, payload: dict) -> None:
        self.submitted += 1
        self.jobs.put((ticket, kind, payload))

    def _raise_if_dead(self) -> None:
        if self.error is not None or (self.thread is not None and not self.thread.is_alive() and not self.closing.is_set()):
            raise RayExecutorError(f"the Ray Tune run stopped: {self.error!r}")

    def wait(self) -> list[tuple[Any, dict]]:
        out = []
        try:
            if self.submitted > self.returned:
                out.append(self.results.get(timeout=WAIT_S))
            while True:
                out.append(self.results.get_nowait())
        except queue.Empty:
            pass
        self.returned += len(out)
        if not out:
            self._raise_if_dead()
        return out

    def has_results(self) -> bool:
        return not self.results.empty()

    def running(self) -> int:
        return self.submitted - self.returned

    def info(self) -> list[dict]:
        return list(self.builds_seen.values())

    def close(self, settle: bool = False) -> None:
        self.closing.set()
        if self.thread is not None:
            self.thread.join(timeout=60)
        for k in [k for k, v in _TUNE_ENGINES.items() if v is self]:
            del _TUNE_ENGINES[k]
        shutil.rmtree(self.storage, ignore_errors=True)


_TUNE_ENGINES: dict[str, TuneEngine] = {}


def _make_searcher(engine: TuneEngine):
    from ray.tune.search import Searcher

    key = f"{os.getpid()}-{id(engine)}"
    _TUNE_ENGINES[key] = engine

    class _QueueSearcher(Searcher):
        """Tune's searcher: the jobs the driver's Optuna study asked for, in order.

        It runs in the driver, next to the executor; it holds only the executor's key (Tune pickles its searcher).
        """

        def __init__(self) -> None:
            super().__init__(metric="score", mode="max")
            self.key = key
            self.tickets: dict[str, Any] = {}

        @property
        def engine(self) -> TuneEngine:
            # imported at run time: a class defined in a function is pickled by value, with the globals it names
            from autorank.search import ray_tune

            return ray_tune._TUNE_ENGINES[self.key]

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True

        def save(self, checkpoint_path: str) -> None:  # the driver's study is the searcher's state
            pass

        def restore(self, checkpoint_path: str) -> None:
            pass

        def suggest(self, trial_id: str):
            engine = self.engine
            if engine.closing.is_set():
                return Searcher.FINISHED
            try:
                ticket, kind, payload = engine.jobs.get_nowait()
            except queue.Empty:
                return None
            self.tickets[trial_id] = ticket
            return {"autorank_job": json.dumps({"kind": kind, "payload": payload})}

        def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
            engine = self.engine
            if trial_id not in self.tickets:
                return
            ticket = self.tickets.pop(trial_id)
            if error or not result or "autorank_result" not in result:
                res = {"error": f"WorkerCrashed: the Tune trial failed {engine.ex.max_retries + 1} time(s)",
                       "error_type": "WorkerCrashed"}
            else:
                res = json.loads(result["autorank_result"])
                w = res.get("where", {})
                engine.builds_seen[(w.get("node_id"), w.get("pid"))] = {**w, "jobs": None}
            engine.results.put((ticket, res))

    return _QueueSearcher()


def _tune_trainable():
    from ray import tune

    class AutorankTrial(tune.Trainable):
        """One job per Tune trial; the TrialRunner is built once per worker process and reused."""

        def setup(self, config: dict, ship: Optional[dict] = None) -> None:
            import json

            from autorank.search import ray_worker  # the module's own state, not a pickled copy

            proc = ray_worker.PROCESS
            key = json.dumps(ship, sort_keys=True, default=str)  # the object ref prints as its id
            if proc["runner"] is None or proc["key"] != key:
                proc["runner"], _ = ray_worker.build_runner(ship)
                proc["key"] = key
            self.config = config

        def reset_config(self, new_config: dict) -> bool:
            self.config = new_config
            return True

        def step(self) -> dict:
            import json

            from autorank.search import ray_worker

            job = json.loads(self.config["autorank_job"])
            runner = ray_worker.PROCESS["runner"]
            res = ray_worker.finish(runner.run(job["kind"], job["payload"]), runner)
            score = res.get("score")
            return {"autorank_result": json.dumps(res), "score": float("nan") if score is None else float(score), "done": True}

    return AutorankTrial
