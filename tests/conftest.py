"""Shared fixtures and the catalogue of layer kinds the method contract runs over."""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

torch.set_num_threads(1)  # tests check behaviour, not speed; one thread avoids oversubscription
# Ray reads this when imported; every process of a test cluster needs it (docs/DESIGN.md, "Ray on these machines")
os.environ.setdefault("RAY_AUTH_MODE", "token")


#: the tests that start Ray (a local instance, a two-node cluster): run one after another on one worker
RAY_TESTS = ("tests/test_ray.py::", "tests/test_ray_latency.py::",
             "tests/test_trust.py::test_the_local_ray_instance_listens_on_loopback_only")


def pytest_xdist_make_scheduler(config, log):
    """Each test file on one worker (as ``--dist loadfile``), and every test that starts Ray on one worker too.

    The Ray tests share a cross-process lock (:func:`ray_exclusive`): spread over two workers, one of them
    waited for the other's cluster (two minutes of an idle core in a 17-minute suite). As one unit they run
    one after another on one worker while the other worker runs the rest. (xdist's own ``loadgroup`` does
    not group with pytest 9, whose node ids it can no longer rename.) A Ray test missing from
    :data:`RAY_TESTS` still runs correctly, under the lock.
    """
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class RayTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "ray" if nodeid.startswith(RAY_TESTS) else nodeid.split("::", 1)[0]

    return RayTogether(config, log)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def gpt2_conv1d_class():
    """transformers' GPT-2 Conv1D when installed, else a faithful copy of it (same name, same layout)."""
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except Exception:  # pragma: no cover - transformers is in the test extra

        class Conv1D(nn.Module):
            def __init__(self, nf: int, nx: int):
                super().__init__()
                self.nf = nf
                self.weight = nn.Parameter(torch.empty(nx, nf))
                self.bias = nn.Parameter(torch.zeros(nf))
                nn.init.normal_(self.weight, std=0.02)

            def forward(self, x):
                size_out = x.size()[:-1] + (self.nf,)
                x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
                return x.view(size_out)

        return Conv1D


@dataclass(frozen=True)
class LayerCase:
    """A layer kind with an odd configuration and an input for it."""

    id: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]

    def build(self) -> tuple[nn.Module, torch.Tensor]:
        g = torch.Generator().manual_seed(zlib.crc32(self.id.encode()))
        layer = self.make()
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        x = torch.randn(self.input_shape, generator=g)
        return layer, x


def _conv1d(nx, nf):
    return lambda: gpt2_conv1d_class()(nf, nx)


LAYER_CASES: list[LayerCase] = [
    LayerCase("linear-13x9-3d-input", lambda: nn.Linear(13, 9), (2, 5, 13)),
    LayerCase("linear-nobias-9x20", lambda: nn.Linear(9, 20, bias=False), (7, 9)),
    LayerCase("conv1d-gpt2-7x11", _conv1d(7, 11), (2, 4, 7)),
    LayerCase("conv-3x3-stride2", lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1), (2, 6, 11, 9)),
    LayerCase("conv-3x5-dilation2-nobias", lambda: nn.Conv2d(5, 8, (3, 5), dilation=2, padding=(2, 4), bias=False), (1, 5, 13, 10)),
    LayerCase("conv-1x3-reflect", lambda: nn.Conv2d(4, 6, (1, 3), padding=(0, 1), padding_mode="reflect"), (2, 4, 7, 9)),
    LayerCase("conv-5x3-stride-2x1-replicate", lambda: nn.Conv2d(5, 7, (5, 3), stride=(2, 1), padding=(2, 1), padding_mode="replicate"), (1, 5, 12, 7)),
    LayerCase("conv-grouped3-circular", lambda: nn.Conv2d(6, 9, 3, groups=3, padding=1, padding_mode="circular"), (2, 6, 8, 10)),
    LayerCase("conv-depthwise-x2-stride2", lambda: nn.Conv2d(4, 8, 3, groups=4, stride=2, padding=1), (2, 4, 9, 8)),
    LayerCase("conv-same-padding", lambda: nn.Conv2d(8, 8, 3, padding="same"), (1, 8, 6, 5)),
    LayerCase("conv-2x2-stride-1x2-nopad", lambda: nn.Conv2d(3, 7, 2, stride=(1, 2)), (2, 3, 9, 11)),
    LayerCase("conv-1x1", lambda: nn.Conv2d(12, 5, 1), (2, 12, 4, 3)),
]


def fvcore_flops(module: nn.Module, x: torch.Tensor) -> int:
    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("fvcore").setLevel(logging.ERROR)
        f = FlopCountAnalysis(module, (x,))
        f.unsupported_ops_warnings(False)
        f.uncalled_modules_warnings(False)
        return int(f.total())


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def ray_exclusive():
    """One Ray-using test module at a time across the xdist workers (a cross-process file lock).

    test_ray.py ends with ``ray stop --force`` and checks that no raylet is left; a
    cluster another worker started meanwhile would be stopped under it, or counted.
    """
    path = os.path.join(tempfile.gettempdir(), f"autorank-tests-ray-{os.getuid()}.lock")
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
