"""The run directory: one folder per search, resumable.

::

    RUN/
      settings.json      what identifies the run (model, task, budget, space, seed, sampler) and its sizes
      study.journal      the Optuna study (Optuna's journal format; `optuna-dashboard RUN/study.journal`;
                         runs made before it keep their SQLite study.db)
      sensitivity.json   per-layer zero-shot scores (warm start and repair)
      trials/000012.json one record per trial: plan, metrics, timings, error, where it ran
      weights/000012.pt  fine-tuned weights of the promising plans (autorank.save format)
      front.json         the Pareto front
      pareto.png, pareto.html

Running the same command again continues the study; a different model, task,
budget, space, seed or sampler in an existing run directory is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from autorank.errors import AutorankError
from autorank.fileio import atomic_write_text
from autorank.search.journal import RunJournal, journal_storage

__all__ = ["RunDir", "RunDirError", "IDENTITY_KEYS"]

#: settings that must match to resume a run
IDENTITY_KEYS = ("model", "task", "budget", "space", "seed", "sampler")
_FORMAT = "autorank-run"


class RunDirError(AutorankError, ValueError):
    """A run directory that cannot be used (missing, not a run, or of another search)."""


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
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(f"cannot read {self.settings_path}: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise RunDirError(f"{self.settings_path} is not an autorank run's settings file")
        return data

    def prepare(self, settings: dict[str, Any]) -> bool:
        """Create the directory for ``settings``, or check it matches. Returns True when resuming."""
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
            merged = {**old, **{k: v for k, v in settings.items() if k not in IDENTITY_KEYS}}
            atomic_write_text(self.settings_path, json.dumps(merged, indent=2, sort_keys=True) + "\n")
            return True
        if self.path.exists() and any(self.path.iterdir()):
            raise RunDirError(f"--out {self.path} exists, is not empty and is not an autorank run directory")
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
        p = self.path / name
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None

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
        return self.read_json(f"trials/{number:06d}.json")

    def trial_records(self) -> dict[int, dict[str, Any]]:
        out = {}
        for p in sorted((self.path / "trials").glob("*.json")):
            try:
                out[int(p.stem)] = json.loads(p.read_text())
            except (ValueError, OSError, json.JSONDecodeError):
                continue
        return out


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
