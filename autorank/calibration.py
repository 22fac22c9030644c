"""Input statistics of layers (Gram matrices), collected with forward hooks.

The data-aware methods minimise ‖WX − W′X‖ on calibration inputs; all they need
of X is its Gram matrix ``Σ x xᵀ`` over the rows the layer sees (tokens for a
Linear, unfolded patches for a convolution), accumulated in float64.

Layers that read the very same input tensor (a transformer's q/k/v projections,
its gate/up projections) get the Gram matrix computed once per batch, and, when
they saw the same inputs in every batch, share one tensor in the result.

Block by block
--------------
For a Hugging Face model (or with ``blockwise=True``), :func:`collect` runs the
model one transformer block at a time, as SVD-LLM does for LLaMA: the inputs
of the first block are captured (the model stops there), then each block is run
on its stored inputs with hooks on its own layers only, its outputs become the
next block's inputs, and its statistics are finished before the next block
starts. Only one block's statistics and activations are being built at a time,
and with ``device=`` each block is moved there for its turn (a model kept on the
CPU calibrated on a GPU, one block at a time). The result is checked on the
first batch against an ordinary forward pass (the last block's input must agree);
a model whose blocks are not a plain chain falls back to the ordinary collection.
Layers outside the blocks are collected by an ordinary pass (hooks on those only).

References: X. Wang, Y. Zheng, Z. Wan, M. Zhang. "SVD-LLM: Truncation-aware
Singular Value Decomposition for Large Language Model Compression." arXiv
2403.07378, 2024 (layer-wise calibration of decoder blocks).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from autorank.errors import CalibrationError
from autorank.hf import is_hf_model
from autorank.methods._base import LayerStats
from autorank.methods._layers import LayerSpec, layer_kind, layer_spec

logger = logging.getLogger("autorank")

__all__ = ["Calibration", "collect", "record_input_shapes", "as_batches", "find_blocks", "run_batch"]

#: largest Gram matrix side collected per group (larger layers are skipped with a warning)
MAX_GRAM_SIDE = 16384


@dataclass
class Calibration:
    """Per-layer input statistics: ``stats[name]`` and the input shape each layer saw."""

    stats: dict[str, LayerStats] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.stats

    def get(self, name: str) -> Optional[LayerStats]:
        return self.stats.get(name)


def as_batches(inputs: Any) -> list:
    """Calibration inputs as a list of batches: a tensor, a tuple of tensors, or an iterable of those.

    A DataLoader yielding ``(x, y)`` pairs is read as inputs ``x``.
    """
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, dict):
        return [inputs]
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        # a list of batches of one tensor each, unless the shapes say it is one multi-input batch
        if isinstance(inputs, tuple):
            return [inputs]
        return list(inputs)
    try:
        batches = list(inputs)
    except TypeError:
        raise CalibrationError(
            f"calibration inputs must be a tensor, a list of tensors or an iterable of batches, got {type(inputs).__name__}"
        ) from None
    out = []
    for b in batches:
        if isinstance(b, (list, tuple)) and len(b) == 2 and isinstance(b[0], torch.Tensor) and isinstance(b[1], torch.Tensor) and b[1].dim() <= 1:
            out.append(b[0])  # (inputs, labels)
        else:
            out.append(b)
    if not out:
        raise CalibrationError("calibration inputs are empty")
    return out


def run_batch(model: nn.Module, batch) -> None:
    """Call ``model`` on one calibration batch: a dict as keywords, a list/tuple as positional arguments."""
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (list, tuple)):
        model(*batch)
    else:
        model(batch)


def _rows(module: nn.Module, spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer multiplies by its weight: (groups, rows, d), float64."""
    if not spec.is_conv:
        return x.detach().reshape(1, -1, spec.in_channels).to(torch.float64)
    x = x.detach()
    padding = spec.padding
    if spec.padding_mode != "zeros":
        ph, pw = spec.padding
        x = F.pad(x, (pw, pw, ph, ph), mode=spec.padding_mode)
        padding = (0, 0)
    cols = F.unfold(x.to(torch.float64), spec.kernel_size, dilation=spec.dilation, padding=padding, stride=spec.stride)
    # cols: (B, C*kh*kw, L), channel-major like the weight's (C/g, kh, kw) flattening
    b, d_all, L = cols.shape
    g = spec.groups
    cols = cols.reshape(b, g, d_all // g, L).permute(1, 0, 3, 2).reshape(g, b * L, d_all // g)
    return cols


@dataclass
class _Stats(LayerStats):
    """LayerStats whose digest (a hash of the whole Gram matrix, asked by the factor cache at
    every trial) is computed once."""

    _digest: Optional[str] = field(default=None, repr=False, compare=False)

    def digest(self) -> str:
        if self._digest is None:
            self._digest = super().digest()
        return self._digest


def _gram_side(spec: LayerSpec) -> int:
    return spec.in_channels if not spec.is_conv else spec.in_per_group * spec.kernel_size[0] * spec.kernel_size[1]


class _Grams:
    """Forward hooks accumulating the input Gram matrix of some layers.

    Per forward pass (``begin``/``end``), an input tensor read by several Linear
    layers is turned into rows and multiplied once; layers that read the same
    tensor in every pass end up sharing one accumulated matrix (``finish``).
    The per-pass memo holds the input only by a weak reference: its entry (and
    the batch's Gram matrix) goes as soon as the model drops the activation.
    """

    def __init__(self, named: dict[str, nn.Module], names: Sequence[str], cal: Calibration):
        self.cal = cal
        self.modules = {n: named[n] for n in names}
        self.specs = {n: layer_spec(m) for n, m in self.modules.items()}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.partners: dict[str, set[str]] = {}
        # per pass: id(input) -> (weak reference to the input, its version counter, gram, rows, the layers that read it)
        self._memo: dict[int, tuple[weakref.ref, int, torch.Tensor, int, list[str]]] = {}
        self._groups: list[list[str]] = []  # per pass: the layers that read one memoised input
        self._handles: list = []

    def attach(self) -> "_Grams":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def begin(self) -> None:
        self._memo = {}
        self._groups = []

    def end(self) -> None:
        called: set[str] = set()
        for names in self._groups:
            group = set(names)
            called |= group
            for n in names:
                self.partners[n] = group if n not in self.partners else (self.partners[n] & group)
        # a layer that read no memoised input in this pass (or was not called) shares with nobody
        for n in list(self.partners):
            if n not in called and n in self.counts:
                self.partners[n] = {n}
        self._memo = {}
        self._groups = []

    def _forget(self, key: int) -> Callable[[weakref.ref], None]:
        def drop(_ref) -> None:
            self._memo.pop(key, None)

        return drop

    def _hook(self, name: str):
        spec = self.specs[name]

        def hook(mod, args, _out):
            x = args[0]
            if name not in self.cal.input_shapes:
                self.cal.input_shapes[name] = tuple(x.shape)
            key = None if spec.is_conv else id(x)
            hit = self._memo.get(key) if key is not None else None
            if hit is not None and hit[0]() is x and hit[1] == x._version and hit[2].shape[-1] == spec.in_channels:
                _, _, gram, rows, names = hit
                names.append(name)
                shared = True
            else:
                r = _rows(mod, spec, x)
                gram, rows, shared = r.transpose(1, 2) @ r, r.shape[1], False
                del r
                if key is not None:
                    names = [name]
                    self._groups.append(names)
                    self._memo[key] = (weakref.ref(x, self._forget(key)), x._version, gram, rows, names)
            if name in self.sums:
                self.sums[name] += gram
            else:  # the first pass: a gram another layer also starts from is copied, never aliased
                self.sums[name] = gram.clone() if shared else gram
            self.counts[name] = self.counts.get(name, 0) + rows

        return hook

    def finish(self, to: Optional[torch.device] = None) -> dict[str, LayerStats]:
        """The statistics, moved to ``to`` if given; partners share one tensor."""
        out: dict[str, LayerStats] = {}
        done: dict[str, torch.Tensor] = {}
        for name, gram in self.sums.items():
            rep = None
            for other in sorted(self.partners.get(name, {name})):
                if other in done and self.counts.get(other) == self.counts[name] and name in self.partners.get(other, ()):
                    rep = other
                    break
            if rep is not None:
                gram = done[rep]
            elif to is not None:
                gram = gram.to(to)
            done[name] = gram
            out[name] = _Stats(gram=gram, count=self.counts[name], input_shape=self.cal.input_shapes.get(name))
        self.sums = {}
        return out


def _eligible(named: dict[str, nn.Module], layers: Optional[Sequence[str]]) -> list[str]:
    if layers is None:
        layers = [n for n, m in named.items() if layer_kind(m) is not None]
    out, skipped = [], []
    for name in layers:
        module = named.get(name)
        if module is None or layer_kind(module) is None:
            continue
        if _gram_side(layer_spec(module)) > MAX_GRAM_SIDE:
            skipped.append(name)
            continue
        out.append(name)
    if skipped:
        logger.warning("calibration skipped %d layer(s) whose Gram matrix would exceed %d: %s", len(skipped), MAX_GRAM_SIDE, ", ".join(skipped[:5]))
    return out


def find_blocks(model: nn.Module) -> Optional[tuple[str, nn.ModuleList]]:
    """The model's chain of transformer blocks: the ``nn.ModuleList`` of two or more modules of one
    class holding the most parameters (``model.layers`` of a Llama, ``transformer.h`` of a GPT-2), or None."""
    best: Optional[tuple[str, nn.ModuleList, int]] = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(c) for c in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > 0 and (best is None or size > best[2]):
                best = (name, module, size)
    return None if best is None else (best[0], best[1])


def collect(
    model: nn.Module,
    inputs: Any,
    layers: Optional[Sequence[str]] = None,
    *,
    max_batches: Optional[int] = None,
    blockwise: Optional[bool] = None,
    device: Union[str, torch.device, None] = None,
) -> Calibration:
    """Run ``model`` on ``inputs`` and accumulate, per layer, the Gram matrix of its inputs.

    ``layers``: qualified names to collect (default: every Linear, Conv1D and Conv2d).
    The model is run in eval mode under ``torch.no_grad()`` and left as it was.
    ``blockwise``: collect one transformer block at a time (see the module
    docstring); ``None`` (default): for Hugging Face models. ``device``: with
    ``blockwise``, where each block runs (it is moved there for its turn and back;
    the statistics end up on the model's device).
    """
    batches = as_batches(inputs)
    if max_batches is not None:
        batches = batches[:max_batches]
    named = dict(model.named_modules())
    wanted = _eligible(named, layers)
    use_blocks = is_hf_model(model) if blockwise is None else bool(blockwise)
    if use_blocks:
        found = find_blocks(model)
        if found is None:
            if blockwise:
                raise CalibrationError(f"blockwise calibration: {type(model).__name__} has no chain of blocks (an nn.ModuleList of one class)")
        else:
            cal = _collect_blockwise(model, batches, wanted, found, device)
            if cal is not None:
                return cal
    cal = Calibration()
    _collect_full(model, batches, named, wanted, cal)
    return cal


def _collect_full(model: nn.Module, batches: list, named: dict[str, nn.Module], names: Sequence[str], cal: Calibration) -> None:
    grams = _Grams(named, names, cal).attach()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                grams.begin()
                run_batch(model, batch)
                grams.end()
    except Exception as exc:  # the user's inputs do not fit the model
        raise CalibrationError(f"running the model on the calibration inputs failed: {type(exc).__name__}: {exc}") from exc
    finally:
        grams.detach()
        model.train(was_training)
    cal.stats.update(grams.finish())


class _Stop(Exception):
    """Raised by a pre-hook to end a forward pass at a block (its inputs are captured)."""


def _capture(model: nn.Module, block: nn.Module, batch) -> Optional[tuple[tuple, dict]]:
    """The (args, kwargs) ``block`` is called with when ``model`` runs ``batch`` (the pass stops there)."""
    got: list = []

    def pre(_mod, args, kwargs):
        got.append((tuple(args), dict(kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        run_batch(model, batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got[0] if got else None


def _move(x: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_move(v, device) for v in x)
    if isinstance(x, list):
        return [_move(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    return x


def _hidden(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _with_hidden(call: tuple[tuple, dict], h: torch.Tensor) -> Optional[tuple[tuple, dict]]:
    args, kwargs = call
    if args:
        return (h,) + tuple(args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": h}
    return None


def _collect_blockwise(model, batches: list, wanted: list[str], found: tuple[str, nn.ModuleList],
                       device: Union[str, torch.device, None]) -> Optional[Calibration]:
    """Statistics block by block (module docstring); None when the model is not a plain chain of its blocks."""
    prefix, blocks = found
    named = dict(model.named_modules())
    cal = Calibration()
    home = next((p.device for p in model.parameters()), torch.device("cpu"))
    target = torch.device(device) if device is not None else None
    block_prefixes = [f"{prefix}.{i}." if prefix else f"{i}." for i in range(len(blocks))]
    inside = [[n for n in wanted if n.startswith(bp)] for bp in block_prefixes]
    outside = [n for n in wanted if not any(n.startswith(bp) for bp in block_prefixes)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            calls = []
            for batch in batches:
                c = _capture(model, blocks[0], batch)
                if c is None:
                    logger.info("block-wise calibration: %s.0 was not called; collecting in one pass", prefix)
                    return None
                calls.append(c)
            last_input = None
            for i, block in enumerate(blocks):
                grams = _Grams(named, inside[i], cal).attach()
                if target is not None:
                    block.to(target)
                try:
                    nxt = []
                    for call in calls:
                        args, kwargs = _move(call, target)
                        grams.begin()
                        h = _hidden(block(*args, **kwargs))
                        grams.end()
                        if h is None:
                            logger.info("block-wise calibration: block %d returned no tensor; collecting in one pass", i)
                            return None
                        step = _with_hidden(call, h.to(home) if target is not None else h)
                        if step is None:
                            logger.info("block-wise calibration: cannot tell block %d's hidden-state argument; collecting in one pass", i)
                            return None
                        nxt.append(step)
                        if i == len(blocks) - 2 and last_input is None:
                            last_input = step
                finally:
                    grams.detach()
                    if target is not None:
                        block.to(home)
                cal.stats.update(grams.finish(home))
                calls = nxt
            # check on the first batch: the last block's input from an ordinary forward pass
            reference = _capture(model, blocks[-1], batches[0])
            if reference is None or last_input is None or not _agree(reference, last_input):
                logger.warning("block-wise calibration: the blocks of %s are not a plain chain; collecting in one pass", type(model).__name__)
                return None
    except CalibrationError:
        raise
    except Exception as exc:
        raise CalibrationError(f"running the model on the calibration inputs failed: {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
    if outside:
        _collect_full(model, batches, named, outside, cal)
    return cal


def _agree(reference: tuple[tuple, dict], got: tuple[tuple, dict]) -> bool:
    a = reference[0][0] if reference[0] else reference[1].get("hidden_states")
    b = got[0][0] if got[0] else got[1].get("hidden_states")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return False
    a, b = a.detach().double(), b.detach().to(a.device).double()
    return bool(torch.linalg.vector_norm(a - b) <= 1e-3 * torch.linalg.vector_norm(a) + 1e-12)


def record_input_shapes(model: nn.Module, inputs: Any, layers: Optional[Iterable[str]] = None) -> dict[str, tuple[int, ...]]:
    """The input shape each layer sees on one forward pass of ``inputs`` (no statistics)."""
    batches = as_batches(inputs)[:1]
    named = dict(model.named_modules())
    wanted = set(layers) if layers is not None else {n for n, m in named.items() if layer_kind(m) is not None}
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in wanted:
        module = named.get(name)
        if module is None:
            continue

        def hook(_mod, args, name=name):
            shapes.setdefault(name, tuple(args[0].shape))

        handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                run_batch(model, batch)
    except Exception as exc:
        raise CalibrationError(f"running the model on the example inputs failed: {type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes


Inputs = Union[torch.Tensor, Sequence[torch.Tensor], Iterable]
