"""The registry of decomposition methods.

A new method is one module and one :func:`register` call; the shared contract
tests pick it up from :func:`available`.

>>> import autorank
>>> autorank.methods.available()  # doctest: +SKIP
['cp', 'spatial-svd', 'svd', 'tucker2']
"""

from __future__ import annotations

import difflib
from typing import Optional, Union

from torch import nn

from autorank.errors import UnknownMethodError
from autorank.methods._base import BaseMethod, Factors, LayerStats, dense_cost
from autorank.methods._layers import Cost, Decomposed, LayerSpec, layer_kind, layer_spec
from autorank.methods.btd import BTD
from autorank.methods.cp import CP
from autorank.methods.dcf import DCF
from autorank.methods.spatial_svd import SpatialSVD
from autorank.methods.svd import SVD
from autorank.methods.tr import TR
from autorank.methods.tt import TT
from autorank.methods.tucker2 import Tucker2

__all__ = [
    "BaseMethod",
    "Factors",
    "LayerStats",
    "Cost",
    "Decomposed",
    "LayerSpec",
    "register",
    "unregister",
    "get",
    "available",
    "for_layer",
    "normalize_name",
    "dense_cost",
    "layer_kind",
    "layer_spec",
]

_REGISTRY: dict[str, BaseMethod] = {}
_ALIASES: dict[str, str] = {}


def normalize_name(name: str) -> str:
    """Lowercase, with ``_`` and spaces read as ``-`` (``Spatial_SVD`` -> ``spatial-svd``)."""
    return str(name).strip().lower().replace("_", "-").replace(" ", "-")


def register(method: Union[BaseMethod, type], *, aliases: tuple[str, ...] = (), replace: bool = False) -> BaseMethod:
    """Register a method (an instance or a class with a no-argument constructor).

    The registry accepts the method's :attr:`~BaseMethod.aliases` and ``aliases``
    as other names for it.
    """
    inst = method() if isinstance(method, type) else method
    if not isinstance(inst, BaseMethod):
        raise TypeError(f"{method!r} is not a BaseMethod")
    key = normalize_name(inst.name)
    if not key:
        raise ValueError("a method needs a non-empty name")
    if key in _REGISTRY and not replace:
        raise ValueError(f"method {key!r} is already registered")
    _REGISTRY[key] = inst
    for a in (*inst.aliases, *aliases):
        _ALIASES[normalize_name(a)] = key
    return inst


def unregister(name: str) -> None:
    key = normalize_name(name)
    _REGISTRY.pop(key, None)
    for a in [a for a, k in _ALIASES.items() if k == key]:
        del _ALIASES[a]


def get(name: str) -> BaseMethod:
    """The registered method called ``name``; UnknownMethodError lists the known ones."""
    if isinstance(name, BaseMethod):
        return name
    key = normalize_name(name)
    key = _ALIASES.get(key, key)
    try:
        return _REGISTRY[key]
    except KeyError:
        close = difflib.get_close_matches(key, list(_REGISTRY) + list(_ALIASES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownMethodError(
            f"unknown method {name!r}{hint}; available: {', '.join(available())}"
        ) from None


def available() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_REGISTRY)


def for_layer(module: nn.Module) -> dict[str, Optional[str]]:
    """For every method: None if it applies to ``module``, else the reason it does not."""
    return {name: _REGISTRY[name].applies(module) for name in available()}


def _register_builtins() -> None:
    for cls in (SVD, SpatialSVD, Tucker2, CP, TT, TR, BTD, DCF):
        register(cls)


_register_builtins()
