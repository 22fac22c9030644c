"""Which layers of any nn.Module can be decomposed.

Nothing is asked of the user's model: no base class, no attribute. Layers are
found by type (Linear, GPT-2 Conv1D, Conv2d) and excluded, with a reason, when
replacing them would change the model's behaviour:

- a Linear owned by ``nn.MultiheadAttention`` (its weight is read by the fused
  attention function, the module itself is never called);
- a layer whose weight is shared with another module (tied weights);
- a module registered at two places (the same instance reused).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from autorank.methods._layers import layer_kind

__all__ = ["candidate_layers"]


def candidate_layers(model: nn.Module) -> dict[str, tuple[nn.Module, Optional[str]]]:
    """Every Linear / Conv1D / Conv2d by qualified name, with None or the reason it is excluded."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    mha_children: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for child, _ in module.named_modules():
                if child:
                    mha_children.add(f"{name}.{child}" if name else child)
    places: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        places.setdefault(id(module), []).append(name)
    out: dict[str, tuple[nn.Module, Optional[str]]] = {}
    for name, module in model.named_modules():
        if not name or layer_kind(module) is None:
            continue
        reason = None
        others = [p for p in places.get(id(module), []) if p != name]
        if others:
            reason = f"the same module is also used as {others[0]} (shared module)"
        elif name in mha_children:
            reason = "owned by nn.MultiheadAttention, which reads its weight directly"
        else:
            shared = [o for o in owners.get(id(module.weight), []) if o != f"{name}.weight"]
            if shared:
                reason = f"weight is shared with {shared[0]} (tied weights)"
        out[name] = (module, reason)
    return out
