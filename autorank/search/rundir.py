"""The run directory: one folder per search, resumable.

::

    RUN/
      settings.json      what identifies the run (model, task, budget, space, seed, sampler) and its sizes
      study.db           the Optuna study (SQLite; `optuna-dashboard sqlite:///RUN/study.db`)
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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from autorank.errors import AutorankError
from autorank.fileio import atomic_write_text

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
        return f"sqlite:///{(self.path / 'study.db').resolve()}"

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

    def write_trial(self, number: int, record: dict[str, Any]) -> None:
        self.write_json(f"trials/{number:06d}.json", record)

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
