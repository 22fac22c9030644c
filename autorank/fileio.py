"""Files written atomically: a reader never sees half a file, a failed write leaves the old one.

Every file autorank writes (models, plans, run records, caches, plots) goes
through :func:`atomic_write`: the content is written to a temporary file in the
target's directory, given the mode ``open()`` would have given it, and renamed
over the target (``os.replace``, atomic on POSIX). On any failure the temporary
file is removed and the target is left as it was.

A full disk is one error, :class:`DiskFullError`: "no space left on DEVICE while
writing PATH" (DEVICE: the mount point and the filesystem holding PATH). Tensors
are written through a Python file object (:func:`atomic_torch_save`), so that
``ENOSPC`` reaches us as the ``OSError`` it is rather than as torch's
``inline_container.cc ... unexpected pos`` message; :func:`disk_full_error`
recognises the other shapes a full disk takes (SQLite's "database or disk is
full", an ``OSError`` wrapped by a library) for callers that write through
someone else's code.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from autorank.errors import SaveLoadError

__all__ = [
    "atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_torch_save", "FILE_MODE",
    "DiskFullError", "disk_full_error", "device_of",
]

PathLike = Union[str, os.PathLike]

#: errno values that mean "the filesystem is full" (space or quota)
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
#: messages of libraries that report a full disk without an errno
_FULL_MESSAGES = ("no space left on device", "database or disk is full", "disk quota exceeded")
#: torch's writer when a plain ``torch.save(obj, path)`` hits a full disk
_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "pytorchstreamwriter failed")


class DiskFullError(SaveLoadError):
    """The filesystem ran out of space (or quota) while autorank wrote a file; nothing partial is left.

    ``path``: the file being written; ``device``: where it lives (mount point and filesystem).
    """

    def __init__(self, path: PathLike, device: Optional[str] = None):
        self.path = Path(path)
        self.device = device or device_of(path)
        super().__init__(errno.ENOSPC, f"no space left on {self.device} while writing {self.path}")

    def __str__(self) -> str:  # OSError would print "[Errno 28] ..."
        return f"no space left on {self.device} while writing {self.path}"

    def __reduce__(self):  # crosses process boundaries (Ray workers) intact
        return (DiskFullError, (str(self.path), self.device))

    @classmethod
    def from_message(cls, message: str) -> "DiskFullError":
        """The error a worker reported as text (``DiskFullError: no space left on D while writing P``)."""
        m = re.search(r"no space left on (.+?) while writing (.+)$", message.strip())
        return cls(m.group(2), m.group(1)) if m else cls(message or "?", "the disk")


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: mode of the files written here: what ``open()`` would give (mkstemp's temporary files are 0600)
FILE_MODE = 0o666 & ~_read_umask()


def device_of(path: PathLike) -> str:
    """The mount point holding ``path`` and its filesystem, e.g. ``/mnt/data (tmpfs)``; best effort."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        dev = os.stat(p).st_dev
        mount = p
        while mount != mount.parent and os.stat(mount.parent).st_dev == dev:
            mount = mount.parent
    except OSError:
        return str(p)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[1].replace("\\040", " ") == str(mount):
                    return f"{mount} ({fields[2]})"
    except OSError:
        pass
    return str(mount)


def _free_bytes(path: PathLike) -> Optional[int]:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def disk_full_error(exc: BaseException, path: PathLike) -> Optional[DiskFullError]:
    """A :class:`DiskFullError` for ``path`` when ``exc`` (or what caused it) is a full disk, else None."""
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFullError):
            return e
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return DiskFullError(getattr(e, "filename", None) or path)
        text = str(e).lower()
        if any(m in text for m in _FULL_MESSAGES):
            return DiskFullError(path)
        if any(m in text for m in _TORCH_WRITE_FAILED):
            free = _free_bytes(path)
            if free is not None and free < (1 << 20):
                return DiskFullError(path)
        e = e.__cause__ or e.__context__
    return None


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to fill a temporary file beside ``path``, then rename it to ``path``.

    SaveLoadError when ``path`` is a directory or its directory does not exist;
    :class:`DiskFullError` when the filesystem is full (the temporary file is removed).
    """
    path = Path(path)
    if path.exists() and path.is_dir():
        raise SaveLoadError(f"output path is a directory: {path}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise SaveLoadError(f"output directory does not exist: {parent}")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        full = disk_full_error(exc, path)
        if full is not None:
            raise full from None
        raise
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        full = disk_full_error(exc, path) if isinstance(exc, Exception) else None
        if full is not None and full is not exc:
            raise DiskFullError(path, full.device) from None
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_torch_save(path: PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically, through a Python file so that a full disk is an ``ENOSPC``."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)
