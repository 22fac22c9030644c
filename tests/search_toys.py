"""Small, fast models and tasks for search tests (importable as ``tests.search_toys:...`` specs)."""

from __future__ import annotations

import math
import os
import time

import torch
from torch import nn

from autorank.tasks.base import BaseTask, call


class ToyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def toy_cnn() -> nn.Module:
    g = torch.random.get_rng_state()
    torch.manual_seed(1)
    try:
        m = ToyCNN()
        # give the weights some low-rank structure, like trained nets have, so that rank matters smoothly
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    w = mod.weight.reshape(mod.weight.shape[0], -1)
                    u, s, vh = torch.linalg.svd(w, full_matrices=False)
                    s = s * torch.exp(-torch.arange(len(s), dtype=s.dtype) / 30)
                    mod.weight.copy_(((u * s) @ vh).reshape_as(mod.weight))
        return m
    finally:
        torch.random.set_rng_state(g)


class ToyFidelity(BaseTask):
    """1 − relative output error against the original's, on fixed random inputs; distillation fine-tuning.

    Environment knobs for fault tests: AUTORANK_TOY_SLEEP (seconds per evaluate),
    AUTORANK_TOY_FAIL_METHOD (raise when a layer uses this method),
    AUTORANK_TOY_NAN_METHOD (return NaN when a layer uses it).
    """

    name = "toy-fidelity"
    metric = "1-relerr"
    default_finetune_steps = 10

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 3, 8, 8, generator=g)
        self.train_x = torch.randn(64, 3, 8, 8, generator=g)
        self.ref = None
        self.original = None

    def setup(self, original: nn.Module) -> None:
        self.original = original
        with torch.no_grad():
            self.ref = original.eval()(self.x)

    def example_inputs(self):
        return self.x[:1]

    def calibration_inputs(self):
        return [self.train_x[:32], self.train_x[32:]]

    def _methods(self, model):
        return {getattr(m, "method", None) for m in model.modules()}

    def evaluate(self, model: nn.Module) -> float:
        sleep = float(os.environ.get("AUTORANK_TOY_SLEEP", "0") or 0)
        if sleep:
            time.sleep(sleep)
        used = self._methods(model)
        fail, nan = os.environ.get("AUTORANK_TOY_FAIL_METHOD"), os.environ.get("AUTORANK_TOY_NAN_METHOD")
        if fail and fail in used:
            raise RuntimeError("toy failure for method " + fail)
        if nan and nan in used:
            return math.nan
        with torch.no_grad():
            out = call(model.eval(), self.x)
        # 1 - relative error of the outputs against the original's: 1 for the original, lower as they drift
        return float(1 - (out - self.ref).norm() / self.ref.norm())

    def finetune(self, model: nn.Module, steps: int, *, seed: int = 0) -> nn.Module:
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(self.train_x), (16,), generator=g)
            with torch.no_grad():
                target = self.original(self.train_x[idx])
            loss = torch.nn.functional.mse_loss(model(self.train_x[idx]), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval()


def toy_task() -> ToyFidelity:
    return ToyFidelity()
