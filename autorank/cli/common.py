"""What every ``autorank`` command shares: the one-line error, the console, argument parsers and formats.

Errors a user can cause print one line (``error: ...``) and exit with code 2
(:data:`EXIT_USAGE`); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from autorank.errors import AutorankError

__all__ = ["CLIError", "EXIT_USAGE", "get_console", "parse_shape", "parse_rank", "check_output", "human", "ms", "pct"]

EXIT_USAGE = 2


class CLIError(AutorankError):
    """Bad command-line input not covered by a library error."""


def get_console(stderr: bool = False):
    """A rich console on stdout (or stderr); piped output gets wide tables rather than rich's 80 columns."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def parse_shape(text: str) -> tuple[int, ...]:
    """``1x3x224x224`` -> (1, 3, 224, 224)."""
    try:
        dims = tuple(int(p) for p in text.lower().replace(",", "x").split("x") if p.strip())
    except ValueError:
        raise CLIError(f"--input {text!r}: expected a shape such as 1x3x224x224") from None
    if not dims or any(d <= 0 for d in dims):
        raise CLIError(f"--input {text!r}: expected positive dimensions such as 1x3x224x224")
    return dims


def parse_rank(text: str):
    """``0.5`` -> ρ, ``16`` -> int, ``16,32`` -> tuple, ``vbmf`` -> keyword."""
    t = text.strip()
    try:
        if "," in t:
            return tuple(int(p) for p in t.split(","))
        if any(c in t for c in ".eE"):
            return float(t)
        return int(t)
    except ValueError:
        if t.isidentifier():
            return t
        raise CLIError(f"--rank {text!r}: expected an integer, integers separated by commas, or a fraction in (0, 1]") from None


def check_output(path: Path, force: bool) -> None:
    """CLIError unless ``path`` can be written (absent, or ``force``; its directory exists)."""
    if path.exists() and not force:
        raise CLIError(f"{path} exists; pass --force to overwrite it")
    if path.exists() and path.is_dir():
        raise CLIError(f"{path} is a directory")
    if not path.parent.exists():
        raise CLIError(f"output directory does not exist: {path.parent}")


def human(n: Optional[float]) -> str:
    """1234567 -> '1.23M' ('?' for None)."""
    if n is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def ms(seconds: Optional[float]) -> str:
    """Seconds as milliseconds for tables ('-' when unknown)."""
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


def pct(x: Optional[float]) -> str:
    """A fraction as a percentage with one decimal ('-' when unknown)."""
    return "-" if x is None else f"{100 * x:.1f}%"
