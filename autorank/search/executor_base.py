"""Where trials run: the executor interface the search drives, and the in-process executor.

The search talks to an executor only through :class:`BaseExecutor`: it starts
it once with the model and task (``start``), submits jobs (``submit``: a ticket, a job
kind — ``zero_shot``, ``finetune`` or ``save`` — and a JSON-able payload, see
:meth:`autorank.search.trial.TrialRunner.run`), and collects results with
``wait`` until every ticket has come back; ``concurrency`` says how many jobs
it runs at once. :class:`InProcessExecutor` runs them one at a time in this
process; :class:`autorank.search.executor.RayExecutor` on Ray workers.

Latency is measured where the executor says the target is:
``check_latency_target`` fails early when it cannot be reached,
``measure_latency`` runs a latency job (:func:`autorank.search.latency.latency_job`)
there, and ``release_workers`` frees what the trials hold before the front is
re-measured. The defaults measure in this process, on this machine.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Optional

from torch import nn

from autorank.cost.timing import resolve_device
from autorank.search.latency import latency_job
from autorank.search.trial import TrialRunner, where

__all__ = ["BaseExecutor", "InProcessExecutor", "run_one"]


class BaseExecutor(abc.ABC):
    """What the search needs of an executor.

    ``name``: shown in reports. ``concurrency``: how many submitted jobs run at
    once (the search keeps that many in flight).
    """

    name: str = "executor"
    concurrency: int = 1

    @abc.abstractmethod
    def start(self, model: nn.Module, task: Any, *, calibrate: Optional[list[str]], cache_dir: Optional[str], setup: bool = True,
              model_spec: Optional[str] = None, task_spec: Optional[str] = None) -> None:
        """Get ready to run jobs on ``model`` and ``task`` (build the trial runners).

        ``calibrate``: layers whose input statistics data-aware methods need;
        ``cache_dir``: the factor cache shared by the workers of a node;
        ``setup``: whether the runners call ``task.setup`` (the driver may have);
        ``model_spec`` / ``task_spec``: what a remote worker may rebuild them from.
        """

    @abc.abstractmethod
    def submit(self, ticket: Any, kind: str, payload: dict) -> None:
        """Queue one job; its result comes back from :meth:`wait` with ``ticket``."""

    @abc.abstractmethod
    def wait(self) -> list[tuple[Any, dict]]:
        """The ``(ticket, result)`` pairs finished since the last call (may block briefly; may be empty)."""

    @abc.abstractmethod
    def has_results(self) -> bool:
        """Whether :meth:`wait` would return something now (the search sleeps briefly when not)."""

    @abc.abstractmethod
    def running(self) -> int:
        """Jobs submitted and not yet returned by :meth:`wait` that are running or queued."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the workers and free what :meth:`start` built."""

    # ------------------------------------------------------------------ latency on the target
    def check_latency_target(self, device: str, threads: Optional[int] = None) -> None:
        """Fail now (DeviceError) if latency cannot be measured on ``device`` where this executor measures it: here."""
        resolve_device(device)

    def measure_latency(self, kind: str, model: nn.Module, payload: dict, progress: Optional[Callable] = None) -> dict:
        """Run the latency job ``kind`` on ``model`` where the target device is (here, in this process)."""
        out = latency_job(kind, model, payload, progress)
        out.setdefault("where", where())
        return out

    def release_workers(self) -> None:  # noqa: B027 - optional hook: nothing to free in this process
        """Free what the trials hold (workers and the resources they reserved), so that the target is idle for a measurement."""


class InProcessExecutor(BaseExecutor):
    """Runs trials one at a time in this process (the default without Ray)."""

    name = "in-process"
    concurrency = 1

    def __init__(self) -> None:
        self.runner: Optional[TrialRunner] = None
        self._done: list[tuple[Any, str, dict]] = []  # queued jobs, run by wait()

    def start(self, model: nn.Module, task: Any, *, calibrate: Optional[list[str]], cache_dir: Optional[str], setup: bool = True,
              model_spec: Optional[str] = None, task_spec: Optional[str] = None) -> None:
        self.runner = TrialRunner(model, task, calibrate=calibrate, cache_dir=cache_dir, setup=setup)

    def submit(self, ticket: Any, kind: str, payload: dict) -> None:
        assert self.runner is not None
        self._done.append((ticket, kind, payload))

    def wait(self) -> list[tuple[Any, dict]]:
        """Runs the oldest queued job and returns its result (one at a time, so progress is reported per job)."""
        if not self._done:
            return []
        ticket, kind, payload = self._done.pop(0)
        return [(ticket, self.runner.run(kind, payload))]

    def has_results(self) -> bool:
        return bool(self._done)

    def running(self) -> int:
        return len(self._done)

    def close(self) -> None:
        self.runner = None


def run_one(executor: BaseExecutor, kind: str, payload: dict) -> dict:
    """Submit one job and wait for its result."""
    executor.submit(0, kind, payload)
    while True:
        done = executor.wait()
        if done:
            return done[0][1]
