"""What identifies a model and a task in a run directory (a resumed search must have the same)."""

from __future__ import annotations

import hashlib
from typing import Any, Optional

from torch import nn

from autorank.cache import weight_digest
from autorank.zoo import SPEC_ATTR

__all__ = ["model_identity", "task_identity"]


def model_identity(model: nn.Module) -> dict[str, Any]:
    """Spec, class, parameter count and a digest of the weights."""
    h = hashlib.blake2b(digest_size=8)
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(weight_digest(v.detach()).encode() if v.is_floating_point() else str(v.tolist()).encode()[:256])
    return {
        "spec": model.__dict__.get(SPEC_ATTR),
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "params": sum(p.numel() for p in model.parameters()),
        "weights": h.hexdigest(),
    }


def task_identity(task: Any, spec: Optional[str]) -> dict[str, Any]:
    """The task's spec and its fingerprint (class, name, metric, data digests where it has them)."""
    fp = task.fingerprint() if hasattr(task, "fingerprint") else {"class": f"{type(task).__module__}.{type(task).__qualname__}"}
    return {"spec": spec, **fp}
