"""Decompose your own model with a mixed plan, data-aware, then save and load it.

Run: python examples/decompose_your_model.py [--out small.pt]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import autorank


class MyNet(nn.Module):
    """Any nn.Module: autorank asks for no base class and no attribute."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, (3, 5), padding=(1, 2), padding_mode="reflect"), nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.body(torch.relu(self.stem(x)))
        return self.head(x.mean((2, 3)))


def main(out: Path) -> float:
    torch.manual_seed(0)
    model = MyNet().eval()
    # correlated inputs, as real images are: the data-aware SVD uses their statistics
    base = torch.randn(128, 1, 16, 16)
    calib = base.repeat(1, 3, 1, 1) + 0.1 * torch.randn(128, 3, 16, 16)

    for name, (module, _reason) in autorank.candidate_layers(model).items():
        usable = [m for m, why in autorank.methods.for_layer(module).items() if why is None]
        print(f"{name:10s} {type(module).__name__:7s} methods: {', '.join(usable)}")

    plan = autorank.Plan.from_dict({"layers": {
        "body.0": {"method": "tucker2", "rank": 0.4},
        "body.2": {"method": "spatial-svd", "rank": 0.5},
        "head": {"method": "svd", "rank": 8},
    }})
    small = autorank.decompose(model, plan, calibration=calib).eval()
    autorank.save(small, out, spec=None)
    loaded = autorank.load(out, model=MyNet())

    x = calib[:8]
    with torch.no_grad():
        y, y_small, y_loaded = model(x), small(x), loaded(x)
    err = float((y_small - y).norm() / y.norm())
    print(f"params {sum(p.numel() for p in model.parameters())} -> {sum(p.numel() for p in small.parameters())}")
    print(f"relative output error {err:.4f}; loaded == decomposed: {torch.equal(y_loaded, y_small)}")
    return err


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "mynet-small.pt")
    main(p.parse_args().out)
