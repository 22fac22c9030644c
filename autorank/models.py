"""The architectures autorank ships: the demo CNN, a ResNet-50-shaped CNN and a BERT-base-shaped encoder.

Plain ``nn.Module`` classes with torchvision's and BERT's layer names (torchvision
is not a dependency). :func:`seeded` builds any of them with fixed random
weights. Which of them a model spec names, and how the demo's trained weights are
obtained, is :mod:`autorank.zoo`'s business.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsCNN", "Bottleneck", "ResNet", "EncoderLayer", "BertEncoder", "seeded"]


class DigitsCNN(nn.Module):
    """A CNN for 8×8 grayscale digits (scikit-learn's ``load_digits``), 10 classes.

    The 8×8 image is first resized to ``8·upsample`` pixels a side (bilinear,
    inside the model, so callers feed the digits as they are), then four 3×3
    convolutions (``width`` → 2·width → 2·width with stride 2 → 4·width), each
    followed by a batch norm and a ReLU, global average pooling and two linear
    layers. ``batch_norm=False`` puts an ``nn.Identity`` where each batch norm was
    (same layer names): the inference form, into which a trained model's batch
    norms are folded (:func:`autorank.factor_layers.fold_batch_norm`).

    The defaults (``width=96``, ``upsample=2``: 16×16 feature maps, 107 MFLOPs per
    image) make the convolutions, not the framework's per-operator overhead, the
    bulk of the latency on a CPU, so that a decomposition that removes FLOPs also
    removes time, on one thread and on two. Measured on a 2-core machine (OpenMP's
    default wait policy): the demo (inference form, width 96) takes 1.9-2.4 ms on
    one thread and 1.3-1.7 ms on two. On two threads every operator is a parallel
    region (tens of microseconds at batch 1), so what a factorization cannot
    remove (the first convolution, activations, pooling, the classifier) weighs
    more: the 64-wide demo with its batch norms (1.0 ms) could not reach
    ``--budget 50%latency --threads 2`` (cheapest plan 47% estimated + 8% reserve);
    96 wide and folded, its cheapest plan is about 42% + 4%.

    ``latency_threads = 1``: the demo is served at batch 1 on one CPU thread, and a
    latency budget measures it so (``--threads`` overrides it; with
    ``OMP_WAIT_POLICY=PASSIVE`` every operator on two threads waits for a
    sleeping thread and two threads run slower than one).
    """

    #: the CPU threads this model is deployed with (see autorank.search.latency.declared_threads)
    latency_threads = 1

    def __init__(self, width: int = 96, num_classes: int = 10, upsample: int = 2, batch_norm: bool = True):
        super().__init__()
        w = width
        self.upsample = int(upsample)

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if batch_norm else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), norm(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), norm(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), norm(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), norm(4 * w), nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 4 * w), nn.ReLU(), nn.Linear(4 * w, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample > 1:
            x = F.interpolate(x, scale_factor=self.upsample, mode="bilinear", align_corners=False)
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
        # in place, as torchvision's Bottleneck: at batch 32 a new tensor per activation and per sum
        # costs a pass over the activations each (13% and 11% of an eager forward on a CPU)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return F.relu(out, inplace=True)


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
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
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


def seeded(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``factory()`` under torch seed ``seed``; the caller's random state is left as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return factory()
    finally:
        torch.random.set_rng_state(state)
