"""The study's storage: Optuna's journal in the run directory, kept in memory and written through in batches.

SQLite cost the driver about 2 s per ask on a ResNet-50-sized space (README), and
Optuna's own ``JournalFileBackend`` takes a file lock, writes and fsyncs once per
operation — 108 parameters are 108 operations per trial. :class:`RunJournal` is a
journal backend in the same file format (one JSON operation per line, as
``JournalFileBackend`` writes it), so ``optuna-dashboard RUN/study.journal`` and
``JournalStorage(JournalFileBackend("RUN/study.journal"))`` read it as it is; but
the search is its only writer (one driver per run directory), so it keeps every
operation in memory and appends the new lines in one write per :meth:`RunJournal.batch`.

The driver flushes a batch of asks before it writes their trial records or
submits their jobs, and writes a trial's record before telling the study its
result (:mod:`autorank.search.study`): a driver killed at any point leaves the
journal at least as new as the records it has written, and the resume logic
recovers the rest. A torn last line (killed in mid-write) is cut off on reopening.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

from optuna.storages import JournalStorage
from optuna.storages.journal import BaseJournalBackend

logger = logging.getLogger("autorank")

__all__ = ["RunJournal", "journal_storage"]


class RunJournal(BaseJournalBackend):
    """An Optuna journal backend: the whole log in memory, appended to ``path`` at the end of each batch.

    Outside a :meth:`batch`, every append is written at once. ``fsync``: also
    force each write to disk (survives a machine crash, not only a killed process).
    """

    def __init__(self, path: Union[str, os.PathLike], *, fsync: bool = False):
        self.path = Path(path)
        self.fsync = fsync
        self._logs: list[dict[str, Any]] = []
        self._pending: list[str] = []
        self._depth = 0
        self.writes = 0
        if self.path.exists():
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                self._logs.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good += len(line)
        if good < len(data):  # a torn or corrupt tail: cut it off so that the next append starts a clean line
            logger.warning("study journal %s: dropping %d bytes of an unfinished last write", self.path, len(data) - good)
            with open(self.path, "r+b") as f:
                f.truncate(good)

    # ------------------------------------------------------------------ BaseJournalBackend
    def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
        return self._logs[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self._logs.extend(logs)
        self._pending.extend(json.dumps(log, separators=(",", ":")) for log in logs)
        if self._depth == 0:
            self.flush()

    # ------------------------------------------------------------------ batches
    def flush(self) -> None:
        """Append the operations not yet on disk, in one write."""
        if not self._pending:
            return
        text = "\n".join(self._pending) + "\n"
        with open(self.path, "ab") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        self._pending.clear()
        self.writes += 1

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Hold the writes of the block (nested blocks join the outer one) and append them together at its end."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.flush()

    def __len__(self) -> int:
        return len(self._logs)


def journal_storage(path: Union[str, os.PathLike]) -> tuple[JournalStorage, RunJournal]:
    """An Optuna storage over the run's journal file, and its backend (for :meth:`RunJournal.batch`)."""
    backend = RunJournal(path)
    return JournalStorage(backend), backend
