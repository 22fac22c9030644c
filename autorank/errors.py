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
