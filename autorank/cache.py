"""The factor cache: one factorization per layer (nested methods) or per rank (others).

Keys are content hashes: the method and its version, the layer's configuration,
the bytes of its weight, the calibration statistics and the options that change
the factorization. So the same layer asked for another rank is a slice of a
cached factorization, and a cache on disk is shared safely by separate
processes (a Ray worker and the next, or a re-run of the CLI): entries are
written atomically and read with ``torch.load(weights_only=True)``.

An entry that cannot be written because the disk is full raises
:class:`~autorank.fileio.DiskFullError` ("no space left on DEVICE while writing
PATH"; no partial file is left): a search stops there with that one line and the
same command resumes it once there is space. Any other write failure (a
read-only directory) is a warning and the factorization is used from memory. The
directory is created when the first entry is written, not before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from autorank.fileio import atomic_torch_save, disk_full_error
from autorank.methods._base import BaseMethod, Factors, LayerStats, Rank
from autorank.methods._layers import layer_spec

logger = logging.getLogger("autorank")

__all__ = ["FactorCache", "default_cache", "weight_digest"]

_DIGESTS: dict[int, tuple[weakref.ref, tuple, str]] = {}
_DIGEST_LOCK = threading.Lock()


def weight_digest(t: torch.Tensor) -> str:
    """Content hash of a tensor.

    Memoised per tensor object; the memo is trusted only while the tensor's
    storage pointer, version counter and a cheap fingerprint (its sum and 1024
    elements spread over it) are unchanged, so in-place edits — including through
    ``.data``, which bypasses the version counter — are rehashed. (An edit that
    keeps the sum and misses every sampled element would go unnoticed: clear
    the cache after such surgery, or pass a fresh FactorCache.)
    """
    data = t.detach()
    with torch.no_grad():
        flat = data.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024]
        # one reduction pass plus a spread sample: cheap, and changed by any ordinary edit
        fingerprint = (data.data_ptr(), t._version, float(flat.sum()) if flat.numel() else 0.0,
                       sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())  # raw bytes: numpy has no bfloat16
    key = id(t)
    with _DIGEST_LOCK:
        hit = _DIGESTS.get(key)
        if hit is not None and hit[0]() is t and hit[1] == fingerprint:
            return hit[2]
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{tuple(data.shape)}|{data.dtype}".encode())
    h.update(data.cpu().contiguous().view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    digest = h.hexdigest()
    try:
        ref = weakref.ref(t)
    except TypeError:  # pragma: no cover - tensors support weak references
        return digest
    with _DIGEST_LOCK:
        _DIGESTS[key] = (ref, fingerprint, digest)
        if len(_DIGESTS) > 100_000:
            for k in [k for k, v in _DIGESTS.items() if v[0]() is None]:
                del _DIGESTS[k]
    return digest


class FactorCache:
    """Factorizations in memory (LRU, bounded in bytes) and optionally on disk.

    ``directory``: where entries are shared between processes (None: memory only).
    ``max_bytes``: memory bound of the in-process LRU.
    """

    def __init__(self, directory: Optional[Union[str, os.PathLike]] = None, max_bytes: int = 2 << 30):
        self.directory = Path(directory) if directory is not None else None
        self.max_bytes = int(max_bytes)
        self._mem: "OrderedDict[str, Factors]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.disk_hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ keys
    def key(
        self,
        method: BaseMethod,
        module: nn.Module,
        stats: Optional[LayerStats] = None,
        rank: Optional[Rank] = None,
        options: Optional[dict] = None,
    ) -> str:
        spec = layer_spec(module)
        parts = {
            "method": method.name,
            "version": method.cache_version,
            "spec": {k: v for k, v in asdict(spec).items() if k not in ("bias", "stride", "padding", "padding_mode")},
            "weight": weight_digest(module.weight),
            "stats": None if (stats is None or not method.data_aware) else stats.digest(),
            "options": method.options_key(options),
            "rank": None if method.is_nested(options) else (list(rank) if isinstance(rank, tuple) else rank),
        }
        return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=20).hexdigest()

    # ------------------------------------------------------------------ get
    def get(
        self,
        method: BaseMethod,
        module: nn.Module,
        stats: Optional[LayerStats] = None,
        rank: Optional[Rank] = None,
        options: Optional[dict] = None,
    ) -> Factors:
        """The factors of ``module`` for ``method``: from memory, from disk, or computed and stored."""
        if not method.data_aware:
            stats = None
        k = self.key(method, module, stats, rank, options)
        with self._lock:
            hit = self._mem.get(k)
            if hit is not None:
                self._mem.move_to_end(k)
                self.hits += 1
                return hit
        factors = self._read(k)
        if factors is not None:
            self.disk_hits += 1
        else:
            self.misses += 1
            factors = method.factorize(module, stats, None if method.is_nested(options) else rank, options)
            self._write(k, factors)
        self._remember(k, factors)
        return factors

    def _remember(self, k: str, factors: Factors) -> None:
        size = factors.nbytes()
        with self._lock:
            if k in self._mem:
                return
            self._mem[k] = factors
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._mem) > 1:
                _, old = self._mem.popitem(last=False)
                self._bytes -= old.nbytes()

    def _path(self, k: str) -> Optional[Path]:
        return None if self.directory is None else self.directory / k[:2] / f"{k}.pt"

    def _read(self, k: str) -> Optional[Factors]:
        path = self._path(k)
        if path is None or not path.exists():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            return Factors(dict(blob["tensors"]), json.loads(blob["meta"]))
        except Exception as exc:  # a corrupt or foreign file: recompute, do not crash
            logger.warning("ignoring unreadable factor cache entry %s: %s", path, exc)
            return None

    def _write(self, k: str, factors: Factors) -> None:
        path = self._path(k)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(path, {"tensors": factors.tensors, "meta": json.dumps(factors.meta, default=str)})
        except Exception as exc:
            full = disk_full_error(exc, path)
            if full is not None:
                raise full from None
            # a read-only or vanished directory: recompute next time, do not fail the trial
            logger.warning("could not write factor cache entry %s: %s", path, exc)

    def clear(self) -> None:
        with self._lock:
            self._mem.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._mem)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._mem), "bytes": self._bytes, "hits": self.hits, "disk_hits": self.disk_hits, "misses": self.misses}


_DEFAULT: Optional[FactorCache] = None


def default_cache() -> FactorCache:
    """The process-wide cache used when none is given: memory only, or on disk under ``$AUTORANK_CACHE_DIR/factors``.

    (Other things live beside it in ``$AUTORANK_CACHE_DIR``: ``latency/`` tables, ``models/`` such as the trained demo.)
    """
    global _DEFAULT
    if _DEFAULT is None:
        root = os.environ.get("AUTORANK_CACHE_DIR") or None
        directory = os.path.join(root, "factors") if root else None
        max_bytes = int(os.environ.get("AUTORANK_CACHE_MAX_BYTES", 2 << 30))
        _DEFAULT = FactorCache(directory, max_bytes=max_bytes)
    return _DEFAULT

