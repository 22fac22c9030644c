"""The run directory: one folder per search, resumable, used by one search at a time.

::

    RUN/
      .lock              while a search runs: its PID, host and start time (see RunLock)
      settings.json      what identifies the run (model, task, budget, space, seed, sampler) and its sizes
      study.journal      the Optuna study (Optuna's journal format; `optuna-dashboard RUN/study.journal`;
                         runs made before it keep their SQLite study.db)
      baseline.json      the original model's score
      sensitivity.json   per-layer zero-shot scores (warm start and repair)
      trials/000012.json one record per trial: plan, metrics, timings, error, where it ran
      weights/000012.pt  fine-tuned weights of the promising plans (autorank.save format)
      front.json         the Pareto front (with every member's latency re-measured on the target)
      latency-table.json the per-layer latency table of the target (a copy; see search/latency.py)
      latency.json       on what device and node the table was measured, what alignment and the break-even did
      pareto.png, pareto.html

Running the same command again continues the study; a different model, task,
budget, space, seed or sampler in an existing run directory is refused, and so
is a latency table measured on another device or configuration
(:class:`autorank.search.latency.LatencyTableMismatch`).

What is read back is checked, because a run directory is a file like any other:
every path it records must resolve inside it (:meth:`RunDir.inside`), and a trial
record whose plan names an unknown method, a layer name that is not a module path
(or, when the model is known, not one of its searched layers), or a path outside
the run is refused with one line naming the file (:meth:`RunDir.trial_records`).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Collection, Optional, Union

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from autorank import methods as registry
from autorank.errors import AutorankError, UnknownMethodError
from autorank.fileio import atomic_write_text
from autorank.search.journal import RunJournal, journal_storage

try:  # POSIX advisory locks; elsewhere the lock file's PID and host are all there is
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("autorank")

__all__ = ["RunDir", "RunDirError", "RunDirLockedError", "RunLock", "IDENTITY_KEYS", "LOCK_NAME", "TRIAL_STATES"]

#: settings that must match to resume a run
IDENTITY_KEYS = ("model", "task", "budget", "space", "seed", "sampler")
_FORMAT = "autorank-run"
#: the lock file of a run directory
LOCK_NAME = ".lock"
#: states a trial record may be in
TRIAL_STATES = ("RUNNING", "COMPLETE", "FAIL", "INTERRUPTED")
#: a module path: dotted names of submodules (``layer1.0.conv2``)
_MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


class RunDirError(AutorankError, ValueError):
    """A run directory that cannot be used (missing, not a run, of another search, or holding invalid records)."""


class RunDirLockedError(RunDirError):
    """Another search holds the run directory (the message names its PID and host)."""


# ---------------------------------------------------------------------- the lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


class RunLock:
    """One search per run directory: ``RUN/.lock`` holds the owner's PID, host and start time.

    The lock is an advisory ``flock`` on that file, held for as long as the search
    runs: the kernel drops it when the owner exits or is killed, so a lock left by a
    dead search is stale by construction and taken over (and logged). Where the
    filesystem has no ``flock``, the PID and host in the file decide: a PID on this
    host that no longer runs is stale; a live one, or one on another host, is not.
    Readers (`autorank front`, `autorank export`) never need the lock.
    """

    def __init__(self, run_dir: Union[str, Path]):
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self._fd: Optional[int] = None
        self.created_dir = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def owner(self) -> Optional[dict[str, Any]]:
        """What the lock file says about its owner (None: no lock file, or unreadable)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _describe(self, owner: Optional[dict]) -> str:
        if not owner:
            return "another process"
        what = f"pid {owner.get('pid')} on host {owner.get('host')}"
        if owner.get("started"):
            what += f", since {owner['started']}"
        if owner.get("command"):
            what += f" ({str(owner['command'])[:120]})"
        return what

    def acquire(self, command: Optional[str] = None) -> "RunLock":
        """Take the lock or raise :class:`RunDirLockedError` naming the owner. Creates the directory if needed."""
        if self._fd is not None:
            return self
        if not self.dir.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            self.created_dir = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._lock_fd(fd):
                    raise RunDirLockedError(
                        f"run directory {self.dir} is in use by another search ({self._describe(self.owner())}); "
                        "wait for it to finish, or use another --out"
                    )
                # the file may have been removed (released) between our open and our lock: retry on the new one
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
            except BaseException:
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                raise
            break
        previous = self.owner()
        if previous and previous.get("pid") not in (None, os.getpid()):
            logger.warning("run directory %s: taking over a stale lock of %s (that search is no longer running)",
                           self.dir, self._describe(previous))
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": command or " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _lock_fd(self, fd: int) -> bool:
        """True when ``fd`` is now locked by us; False when a live owner holds it."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        # no flock here: decide from the recorded owner
        owner = self.owner()
        if not owner or owner.get("pid") == os.getpid():
            return True
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) and not _pid_alive(owner["pid"]):
            return True
        return False

    def release(self) -> None:
        """Drop the lock and remove the lock file (only ours: the file is removed while still locked)."""
        if self._fd is None:
            return
        try:
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        try:
            os.close(self._fd)  # closing drops the flock
        finally:
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------- the directory
class RunDir:
    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)

    # ------------------------------------------------------------------ paths
    @property
    def settings_path(self) -> Path:
        return self.path / "settings.json"

    @property
    def storage_url(self) -> str:
        """The SQLite study of runs made before the journal (``study.db``)."""
        return f"sqlite:///{(self.path / 'study.db').resolve()}"

    @property
    def journal_path(self) -> Path:
        return self.path / "study.journal"

    def storage(self) -> tuple[Any, Optional[RunJournal]]:
        """The study's storage and, for the journal, its backend (batches of writes; see :mod:`autorank.search.journal`).

        A run directory that holds a SQLite ``study.db`` and no journal (made by an
        earlier autorank) keeps its SQLite study, so that it resumes as it was.
        """
        if (self.path / "study.db").exists() and not self.journal_path.exists():
            return self.storage_url, None
        return journal_storage(self.journal_path)

    def dashboard_command(self) -> str:
        """How to watch the study in optuna-dashboard."""
        if (self.path / "study.db").exists() and not self.journal_path.exists():
            return f"optuna-dashboard {self.storage_url}"
        return f"optuna-dashboard {self.journal_path}"

    def load_study(self, study_name: str = "autorank") -> optuna.Study:
        """The run's Optuna study, read as optuna-dashboard reads it (Optuna's own journal file backend)."""
        if (self.path / "study.db").exists() and not self.journal_path.exists():
            storage: Any = self.storage_url
        else:
            storage = JournalStorage(JournalFileBackend(str(self.journal_path)))
        return optuna.load_study(study_name=study_name, storage=storage)

    def trial_path(self, number: int) -> Path:
        return self.path / "trials" / f"{number:06d}.json"

    def weights_path(self, number: int) -> Path:
        return self.path / "weights" / f"{number:06d}.pt"

    def lock(self) -> RunLock:
        """The run directory's lock (not yet taken: call ``acquire()`` or use it as a context manager)."""
        return RunLock(self.path)

    def inside(self, rel: Any, source: Union[str, Path]) -> Path:
        """``rel`` (as recorded in ``source``) resolved inside the run directory; RunDirError if it points elsewhere.

        Recorded paths are relative (``weights/000012.pt``); an absolute path, ``..``
        or a symbolic link leading out of the run directory is refused.
        """
        if not isinstance(rel, str) or not rel.strip():
            raise RunDirError(f"{source}: expected a path relative to the run directory, got {rel!r}")
        p = Path(rel)
        if p.is_absolute():
            raise RunDirError(f"{source}: path {rel!r} is absolute; a run directory records paths inside itself only")
        root = self.path.resolve()
        full = (root / p).resolve()
        if full != root and root not in full.parents:
            raise RunDirError(f"{source}: path {rel!r} leads outside the run directory {self.path}")
        return full

    # ------------------------------------------------------------------ settings
    @classmethod
    def open_existing(cls, path: Union[str, Path]) -> "RunDir":
        """A run directory that must already hold a search (for `front` and `export`)."""
        rd = cls(path)
        if not rd.path.exists():
            raise RunDirError(f"run directory not found: {rd.path}")
        if not rd.path.is_dir():
            raise RunDirError(f"{rd.path} is not a directory")
        if not rd.settings_path.exists():
            raise RunDirError(f"{rd.path} is not an autorank run directory (no settings.json)")
        rd.settings()
        return rd

    def settings(self) -> dict[str, Any]:
        try:
            data = json.loads(self.settings_path.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise RunDirError(f"cannot read {self.settings_path}: {_first_line(exc)}") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise RunDirError(f"{self.settings_path} is not an autorank run's settings file")
        return data

    def check(self, settings: dict[str, Any]) -> bool:
        """Whether ``settings`` can use this directory (True: it resumes a run); writes nothing.

        RunDirError when ``--out`` is a file, holds another search, or is a non-empty
        directory that is not a run directory.
        """
        settings = {"format": _FORMAT, **settings}
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} exists and is not a directory")
        if self.settings_path.exists():
            old = self.settings()
            for key in IDENTITY_KEYS:
                if _norm(old.get(key)) != _norm(settings.get(key)):
                    raise RunDirError(
                        f"run directory {self.path} holds a search with a different {key} "
                        f"({_short(old.get(key))} there, {_short(settings.get(key))} now); use another --out"
                    )
            return True
        if self.path.exists() and any(p.name != LOCK_NAME for p in self.path.iterdir()):
            raise RunDirError(f"--out {self.path} exists, is not empty and is not an autorank run directory")
        return False

    def prepare(self, settings: dict[str, Any]) -> bool:
        """Create the directory for ``settings``, or check it matches. Returns True when resuming."""
        resuming = self.check(settings)
        settings = {"format": _FORMAT, **settings}
        if resuming:
            old = self.settings()
            merged = {**old, **{k: v for k, v in settings.items() if k not in IDENTITY_KEYS}}
            atomic_write_text(self.settings_path, json.dumps(merged, indent=2, sort_keys=True) + "\n")
            return True
        for sub in ("trials", "weights"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.settings_path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
        return False

    # ------------------------------------------------------------------ records
    def write_json(self, name: str, data: Any) -> Path:
        p = self.path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")
        return p

    def read_json(self, name: str) -> Optional[Any]:
        """The JSON file ``name`` of the run (None when absent); RunDirError naming it when it is not JSON."""
        p = self.path / name
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise RunDirError(f"{p} cannot be read as JSON ({_first_line(exc)}); remove it or use another --out") from None

    # ------------------------------------------------------------------ checkpoints of the phases
    def append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        """Append one record to ``name`` (JSON lines), flushed: a phase's checkpoint as it goes.

        A driver killed mid-write leaves at most a torn last line, which
        :meth:`read_jsonl` skips.
        """
        p = self.path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, default=_jsonable) + "\n"
        with open(p, "ab") as f:
            if f.tell() > 0:  # a torn last line (killed mid-write) must not swallow this record
                with open(p, "rb") as r:
                    r.seek(-1, 2)
                    if r.read(1) != b"\n":
                        line = "\n" + line
            f.write(line.encode("utf-8"))
            f.flush()

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        """The complete records of a JSON-lines checkpoint (a torn or foreign line is skipped)."""
        p = self.path / name
        if not p.exists():
            return []
        out = []
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def remove(self, name: str) -> None:
        try:
            (self.path / name).unlink()
        except FileNotFoundError:
            pass

    def write_trial(self, number: int, record: dict[str, Any]) -> None:
        """One trial's record, compact JSON (written twice per trial: kept cheap for a driver feeding many workers)."""
        p = self.trial_path(number)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, json.dumps(record, separators=(",", ":"), default=_jsonable) + "\n")

    def read_trial(self, number: int) -> Optional[dict[str, Any]]:
        rec = self.read_json(f"trials/{number:06d}.json")
        if rec is not None:
            self.check_record(number, rec, self.trial_path(number))
        return rec

    def trial_records(self, layers: Optional[Collection[str]] = None) -> dict[int, dict[str, Any]]:
        """Every trial record, checked (see :meth:`check_record`); ``layers``: the searched layers, when known."""
        out = {}
        for p in sorted((self.path / "trials").glob("*.json")):
            if not re.fullmatch(r"[0-9]+", p.stem):
                raise RunDirError(f"{p}: not a trial record name (trials/NNNNNN.json); remove it or use another --out")
            rec = self.read_json(f"trials/{p.name}")
            self.check_record(int(p.stem), rec, p, layers)
            out[int(p.stem)] = rec
        return out

    def check_record(self, number: int, rec: Any, source: Union[str, Path], layers: Optional[Collection[str]] = None) -> None:
        """RunDirError, one line naming ``source``, unless ``rec`` is a trial record autorank could have written.

        Checked: its number and state; the plan and choice (known methods; layer names
        that are module paths, and among ``layers`` when given); the numbers the front
        is built from; every path (inside the run directory).
        """
        def bad(what: str) -> RunDirError:
            return RunDirError(f"trial record {source} is invalid: {what}; remove it or use another --out")

        if not isinstance(rec, dict):
            raise bad(f"expected a JSON object, got {type(rec).__name__}")
        if "number" in rec and (rec["number"] != number or isinstance(rec["number"], bool)):
            raise bad(f"'number' is {rec['number']!r}, the file name says {number}")
        state = rec.get("state", "RUNNING")
        if state not in TRIAL_STATES:
            raise bad(f"unknown state {state!r}")
        plan = rec.get("plan")
        if plan is not None:
            if not isinstance(plan, dict) or not isinstance(plan.get("layers", {}), dict):
                raise bad("'plan' must be an object with 'layers'")
            for name, entry in plan.get("layers", {}).items():
                method = entry.get("method") if isinstance(entry, dict) else None
                self._check_layer(name, method, layers, bad, allow_none=False)
        choice = rec.get("choice")
        if choice is not None:
            if not isinstance(choice, dict):
                raise bad("'choice' must be an object")
            for name, c in choice.items():
                if not isinstance(c, list) or len(c) != 2 or not _number(c[1]) or not 0 < float(c[1]) <= 1:
                    raise bad(f"choice of layer {name!r} must be [method, rho] with rho in (0, 1], got {c!r}")
                self._check_layer(name, c[0], layers, bad, allow_none=True)
        if state == "COMPLETE":
            if not _number(rec.get("score")):
                raise bad(f"a finished trial needs a numeric 'score', got {rec.get('score')!r}")
            for key in ("costs", "ratios"):
                d = rec.get(key)
                if not isinstance(d, dict) or not all(isinstance(k, str) and _number(v) for k, v in d.items()) \
                        or not {"flops", "params"} <= set(d):
                    raise bad(f"a finished trial needs '{key}' with numeric flops and params")
        ft = rec.get("finetune")
        if ft is not None and not isinstance(ft, dict):
            raise bad("'finetune' must be an object")
        if ft and ft.get("score") is not None and not _number(ft["score"]):
            raise bad(f"fine-tuned score {ft['score']!r} is not a number")
        for where, value in (("weights", rec.get("weights")), ("finetune.weights", (ft or {}).get("weights"))):
            if value is not None:
                try:
                    self.inside(value, source)
                except RunDirError:
                    raise bad(f"'{where}' {value!r} is not a path inside the run directory") from None

    @staticmethod
    def _check_layer(name: Any, method: Any, layers: Optional[Collection[str]], bad, allow_none: bool) -> None:
        if not isinstance(name, str) or not _MODULE_PATH.fullmatch(name):
            raise bad(f"layer name {name!r} is not a module path (such as 'layer1.0.conv2')")
        if layers is not None and name not in layers:
            raise bad(f"layer {name!r} is not one of the model's searched layers")
        if not isinstance(method, str):
            raise bad(f"layer {name!r}: method {method!r} is not a method name")
        if allow_none and method == "none":
            return
        try:
            registry.get(method)
        except UnknownMethodError:
            raise bad(f"layer {name!r}: unknown method {method!r}") from None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def _jsonable(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v, sort_keys=True, default=_jsonable))


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True, default=_jsonable)
    return text if len(text) <= 80 else text[:77] + "..."
