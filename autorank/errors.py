"""Errors a user can cause.

Every error raised because of user input (a plan, a rank, a model spec, a file)
is a subclass of :class:`AutorankError`; its message names the layer, value or
file at fault in one line. The CLI prints that line and exits with code 2.
"""

from __future__ import annotations

__all__ = [
    "AutorankError",
    "UnknownMethodError",
    "UnknownLayerError",
    "RankError",
    "RankTooLargeError",
    "NotApplicableError",
    "PlanError",
    "ModelSpecError",
    "CalibrationError",
    "SaveLoadError",
    "TaskError",
    "ExportError",
    "TrainingError",
    "SearchError",
]


class AutorankError(Exception):
    """Base class of every error a user of autorank can cause."""


class UnknownMethodError(AutorankError, KeyError):
    """A method name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownLayerError(AutorankError, KeyError):
    """A plan names a module that the model does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RankError(AutorankError, ValueError):
    """A rank that is not valid for a layer and method (<= 0, too large, wrong type)."""


class RankTooLargeError(RankError):
    """A rank whose factorization would need more memory or time than allowed."""


class NotApplicableError(AutorankError, ValueError):
    """A method asked for a layer it does not apply to."""


class PlanError(AutorankError, ValueError):
    """A malformed plan (JSON structure, types)."""


class ModelSpecError(AutorankError, ValueError):
    """A model spec that cannot be imported or does not return an nn.Module."""


class CalibrationError(AutorankError, ValueError):
    """Calibration inputs that cannot be used."""


class SaveLoadError(AutorankError, OSError):
    """A file that cannot be written or read as an autorank model."""


class ExportError(AutorankError):
    """A model that cannot be exported, or whose exported file does not reproduce it.

    Raised for an unknown format, a target file that exists (without ``force``),
    missing optional packages (``pip install 'autorank[export]'``), an exporter
    failure, or an exported file whose outputs differ from PyTorch's beyond the
    stated tolerance. The message names the file.
    """


class TaskError(AutorankError, ValueError):
    """A task that cannot be loaded or used: a bad task spec, a task object missing a method,
    data that does not fit the model, or model outputs that are NaN or not tensors."""


class TrainingError(AutorankError, RuntimeError):
    """A training-time method asked of a model it cannot apply to (e.g. folding into a frozen layer)."""


class SearchError(AutorankError, ValueError):
    """A search that cannot start (bad arguments, nothing to search)."""
