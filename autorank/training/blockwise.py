"""Block-wise reconstruction: each block holding decomposed layers trained alone to match the original's.

Between the closed-form re-fit (one layer at a time, linear) and end-to-end
distillation (the whole model, every step a full forward and backward), a block
(a transformer layer, a ResNet basic block; see
:func:`autorank.tasks.distill.feature_blocks`) is trained on its own: its inputs
are recorded as they arrive through the compressed blocks before it (already
reconstructed), its target is the original block's output on the original
model's inputs, and a few steps of Adam on the mean squared error between them
update its decomposed factors (or all its parameters). A step costs one block's
forward and backward instead of the model's, so every block gets many more steps
in the same time; the targets are the original's, so the error the blocks before
it left is compensated (the "asymmetric" target).

Blocks run in eval mode (dropout off, batch-norm statistics frozen). A block whose
loss on the recorded batches ends higher than it started gets its weights back.

References
----------
- Y. Li, R. Gong, X. Tan, Y. Yang, P. Hu, Q. Zhang, F. Yu, W. Wang, S. Gu. BRECQ:
  Pushing the Limit of Post-Training Quantization by Block Reconstruction. ICLR 2021.
- X. Zhang, J. Zou, K. He, J. Sun. Accelerating Very Deep Convolutional Networks
  for Classification and Detection. TPAMI 2016 (asymmetric reconstruction).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from autorank.batches import to_device
from autorank.calibration import as_batches, run_batch
from autorank.errors import TaskError
from autorank.methods._layers import Decomposed
from autorank.tasks.distill import TRAINABLE, feature_blocks, first_tensor
from autorank.training.refit import device_of

logger = logging.getLogger("autorank")

__all__ = ["reconstruct_blocks", "BlockReport", "BlockResult", "DEFAULT_BLOCK_LR"]

#: Adam's learning rate for block-wise reconstruction (measured on MiniLM with augmented inputs, 1050 steps per
#: block: 1e-3 reached 0.933, 3e-4 0.928, 2e-3 0.931; without augmentation, 60 steps per block, 3e-4 beat 1e-4)
DEFAULT_BLOCK_LR = 1e-3
#: recorded block inputs and targets kept per block (bytes; batches beyond are not used)
DEFAULT_CACHE_BYTES = 1 << 30


@dataclass
class BlockResult:
    """One block: its loss (mean squared error against the original's output) before and after, steps, seconds."""

    name: str
    loss_before: float
    loss_after: float
    steps: int
    seconds: float
    batches: int
    kept: bool


@dataclass
class BlockReport:
    blocks: list[BlockResult] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "blocks": [asdict(b) for b in self.blocks]}


class _Stop(Exception):
    pass


def _detached(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, tuple):
        return tuple(_detached(x) for x in v)
    if isinstance(v, list):
        return [_detached(x) for x in v]
    if isinstance(v, dict):
        return {k: _detached(x) for k, x in v.items()}
    return v


def _nbytes(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_nbytes(x) for x in v)
    if isinstance(v, dict):
        return sum(_nbytes(x) for x in v.values())
    return 0


def _call_order(model: nn.Module, batch: Any, names: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """``names`` in the order the forward pass first calls them (never-called ones dropped), and calls per name."""
    order: list[str] = []
    calls: dict[str, int] = {}
    handles = []
    for name in names:
        def hook(_m, _a, name=name):
            if name not in calls:
                order.append(name)
            calls[name] = calls.get(name, 0) + 1
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order, calls


def _run(model: nn.Module, batch: Any) -> None:
    try:
        run_batch(model, batch)
    except _Stop:
        pass


def _outermost(names: list[str]) -> list[str]:
    return [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]


def _record(compressed: nn.Module, original: nn.Module, name: str, batches: list, device, original_device,
            cache_bytes: int, once: bool) -> list[tuple[tuple, dict, torch.Tensor]]:
    """Per batch and call: the compressed block's (args, kwargs) and the original block's output.

    ``once``: the block is called once per forward, so each forward stops right after it.
    """
    student = compressed.get_submodule(name)
    teacher = original.get_submodule(name)
    calls: list[tuple[tuple, dict]] = []
    targets: list[torch.Tensor] = []
    out: list[tuple[tuple, dict, torch.Tensor]] = []
    used = 0

    def pre(_m, args, kwargs):
        calls.append((_detached(args), _detached(kwargs)))
        if once:
            raise _Stop

    def post(_m, _a, o):
        t = first_tensor(o)
        if t is not None:
            targets.append(t.detach().clone())
        if once:
            raise _Stop

    hs = student.register_forward_pre_hook(pre, with_kwargs=True)
    ht = teacher.register_forward_hook(post)
    try:
        with torch.no_grad():
            for batch in batches:
                calls.clear()
                targets.clear()
                _run(compressed, to_device(batch, device))
                _run(original, to_device(batch, original_device))
                if len(calls) != len(targets):
                    raise TaskError(f"block-wise reconstruction: block {name!r} was called {len(calls)} times by the "
                                    f"compressed model and {len(targets)} by the original on the same batch")
                size = sum(_nbytes(c) for c in calls) + sum(_nbytes(t) for t in targets)
                if out and used + size > cache_bytes:
                    break
                used += size
                out.extend((a, k, t.to(device)) for (a, k), t in zip(calls, targets))
    finally:
        hs.remove()
        ht.remove()
    return out


def _block_loss(block: nn.Module, data: list) -> float:
    with torch.no_grad():
        return sum(float(F.mse_loss(first_tensor(block(*a, **k)).float(), t.float())) for a, k, t in data) / max(1, len(data))


def _params(block: nn.Module, trainable: str) -> list[nn.Parameter]:
    if trainable == "all":
        return [p for p in block.parameters() if p.requires_grad]
    seen: set[int] = set()
    out = []
    for m in block.modules():
        if isinstance(m, Decomposed):
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def reconstruct_blocks(
    original: nn.Module,
    compressed: nn.Module,
    inputs: Any,
    *,
    steps: int,
    blocks: Optional[Sequence[str]] = None,
    lr: float = DEFAULT_BLOCK_LR,
    trainable: str = "decomposed",
    time_s: Optional[float] = None,
    max_time_s: Optional[float] = None,
    seed: int = 0,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> BlockReport:
    """Train each block of ``compressed`` alone, in forward order, to reproduce the original's block outputs.

    ``inputs``: model inputs (as for :func:`autorank.training.refit.refit`). ``steps``: Adam
    steps per block (one recorded batch each, drawn at random; a linear warm-up over
    the first 5% then a cosine decay). ``blocks``: module names (default: the blocks
    holding decomposed layers, outermost ones). ``trainable``: ``"decomposed"`` (the
    factors of decomposed layers in the block) or ``"all"``. ``time_s``: a wall-time
    budget: every block gets the same number of steps (at most ``steps``), sized after
    timing the first block's steps and recording so that the whole fits in it (an
    estimate; each block's recording runs the models up to it), fewer for a block
    that starts behind schedule. ``max_time_s``: a hard stop (default ``time_s``). ``original`` is not changed; ``compressed`` is changed
    in place and left in the mode it was in.
    """
    if trainable not in TRAINABLE:
        raise TaskError(f"block-wise reconstruction: trainable={trainable!r}: use one of {', '.join(TRAINABLE)}")
    t0 = time.perf_counter()
    report = BlockReport()
    batches = as_batches(inputs)
    device, original_device = device_of(compressed), device_of(original)
    names = list(blocks) if blocks is not None else feature_blocks(compressed)
    if not names or steps <= 0:
        return report
    was = (original.training, compressed.training)
    original.eval()
    compressed.eval()
    gen = torch.Generator().manual_seed(int(seed))
    try:
        order, calls = _call_order(compressed, to_device(batches[0], device), names)
        names = _outermost(order)
        n_steps = int(steps)  # per block; with a time budget, set from block 0's measured costs
        per_step: Optional[float] = None
        deadline = None if time_s is None else t0 + float(time_s)
        hard = max_time_s if max_time_s is not None else time_s
        hard_deadline = None if hard is None else t0 + float(hard)
        for index, name in enumerate(names):
            tb = time.perf_counter()
            block = compressed.get_submodule(name)
            params = _params(block, trainable)
            data = _record(compressed, original, name, batches, device, original_device, cache_bytes, calls[name] == 1)
            recorded = time.perf_counter() - tb
            if not params or not data:
                continue
            state = {k: v.detach().clone() for k, v in block.state_dict().items()}
            t_loss = time.perf_counter()
            before = _block_loss(block, data)
            loss_time = time.perf_counter() - t_loss
            opt = torch.optim.Adam(params, lr=float(lr))
            done = 0
            block_steps = n_steps
            if index > 0 and deadline is not None and per_step is not None:  # behind schedule: fewer steps
                left_blocks = len(names) - index
                block_steps = int(min(n_steps, max(1, (deadline - time.perf_counter()) / (left_blocks * per_step))))
            t_train = time.perf_counter()
            while done < block_steps:
                if hard_deadline is not None and time.perf_counter() >= hard_deadline:
                    break
                if index == 0 and deadline is not None and done == 5:
                    # equal steps for every block: what fits once every block's recording and its loss
                    # before and after are paid for (a block's recording runs the models up to it: it grows
                    # with depth, ~ recorded·(k+1))
                    per_step = (time.perf_counter() - t_train) / 5
                    n = len(names)
                    left = deadline - time.perf_counter() - recorded * (n * (n + 1) / 2 - 1) - loss_time * (2 * n - 1)
                    n_steps = block_steps = int(min(n_steps, max(5, 5 + left / (per_step * n))))
                frac = done / block_steps
                warm = min(1.0, (done + 1) / max(1.0, 0.05 * block_steps))
                for group in opt.param_groups:
                    group["lr"] = float(lr) * warm * 0.5 * (1.0 + math.cos(math.pi * frac))
                a, k, target = data[int(torch.randint(len(data), (1,), generator=gen))]
                with torch.enable_grad():
                    loss = F.mse_loss(first_tensor(block(*a, **k)).float(), target.float())
                    if not bool(torch.isfinite(loss)):
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                done += 1
            after = _block_loss(block, data)
            kept = math.isfinite(after) and after <= before
            if not kept:
                block.load_state_dict(state)
                after = before
            report.blocks.append(BlockResult(name, before, after, done, time.perf_counter() - tb, len(data), kept))
            logger.debug("block %s: loss %.4g -> %.4g in %d steps", name, before, after, done)
    finally:
        original.train(was[0])
        compressed.train(was[1])
        for p in compressed.parameters():
            p.grad = None
    report.seconds = time.perf_counter() - t0
    return report
