"""Files written atomically: a reader never sees half a file, a failed write leaves the old one.

Every file autorank writes (models, plans, run records, caches, plots) goes
through :func:`atomic_write`: the content is written to a temporary file in the
target's directory, given the mode ``open()`` would have given it, and renamed
over the target (``os.replace``, atomic on POSIX). On any failure the temporary
file is removed and the target is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

from autorank.errors import SaveLoadError

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "FILE_MODE"]

PathLike = Union[str, os.PathLike]


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: mode of the files written here: what ``open()`` would give (mkstemp's temporary files are 0600)
FILE_MODE = 0o666 & ~_read_umask()


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to fill a temporary file beside ``path``, then rename it to ``path``.

    SaveLoadError when ``path`` is a directory or its directory does not exist.
    """
    path = Path(path)
    if path.exists() and path.is_dir():
        raise SaveLoadError(f"output path is a directory: {path}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise SaveLoadError(f"output directory does not exist: {parent}")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
