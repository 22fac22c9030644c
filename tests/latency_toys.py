"""A model whose layers sit on both sides of the latency break-even on a CPU, and a fidelity task for it.

Importable as ``tests.latency_toys:wide_mlp`` / ``tests.latency_toys:mlp_task`` (model and task specs for the
CLI and for Ray workers). At batch 1, the two 1024-wide linears are memory-bound: a rank-r factorization reads a
fraction of the weights and runs several times faster. The two narrow ones (1024->8, 8->8) take microseconds:
replacing one linear by two only adds a call, so every factorization of them is slower than the dense layer.
"""

from __future__ import annotations

import torch
from torch import nn

from autorank.tasks.fidelity import FidelityTask

#: the input the model and its task use
INPUT_SHAPE = (1, 512)
#: the layers every factorization of which is slower than the dense layer on a CPU, and those it speeds up
SLOW_LAYERS = ("4", "6")
FAST_LAYERS = ("0", "2")


def wide_mlp() -> nn.Module:
    g = torch.random.get_rng_state()
    torch.manual_seed(3)
    try:
        return nn.Sequential(
            nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 8), nn.ReLU(), nn.Linear(8, 8)
        ).eval()
    finally:
        torch.random.set_rng_state(g)


def mlp_task() -> FidelityTask:
    """Cosine of a compressed model's outputs with the original's, on fixed random inputs (no labels)."""
    g = torch.Generator().manual_seed(0)
    held_out = [torch.randn(1, 512, generator=g)] + [torch.randn(16, 512, generator=g)]
    train = [torch.randn(16, 512, generator=g) for _ in range(2)]
    return FidelityTask(train, held_out=held_out, metric="cosine", name="mlp-fidelity")


#: the input of the CNN below
CNN_INPUT_SHAPE = (1, 3, 16, 16)


def wide_cnn() -> nn.Module:
    """Two 128-wide 3x3 convolutions at 16x16 (38 MFLOPs each): a low-rank factorization of them is faster in either layout."""
    g = torch.random.get_rng_state()
    torch.manual_seed(5)
    try:
        return nn.Sequential(
            nn.Conv2d(3, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
        ).eval()
    finally:
        torch.random.set_rng_state(g)


def cnn_task() -> FidelityTask:
    g = torch.Generator().manual_seed(0)
    held_out = [torch.randn(*CNN_INPUT_SHAPE, generator=g), torch.randn(8, 3, 16, 16, generator=g)]
    train = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]
    return FidelityTask(train, held_out=held_out, metric="cosine", name="cnn-fidelity")
