"""CP-ALS on every 3×3 convolution of a torchvision-shaped ResNet-18, at every CP probe ρ of a search space.

The model is ResNet-18 as torchvision builds it (He et al. 2016: BasicBlocks
[2, 2, 2, 2], torchvision's module names, its Kaiming-normal fan-out init,
seeded; torchvision itself is not needed), on a 1×3×224×224 input. For every
3×3 convolution and every ρ of ``probe_rhos(space.rhos, 4)`` (the values the
search's sensitivity probes ask for; space ``cnn`` by default), the CP rank is
``cp.rank_for(layer, ρ, input_shape)`` and:

- **new**: :func:`autorank.methods.cp.cp_als` with the method's default options
  (HOSVD-slice initialisation, ALS with line search, float32, work bound
  ``max_gflop``): wall and CPU seconds (CPU: all threads of the process),
  sweeps run and allowed, relative kernel error of the initialisation and of
  the fit, relative output error ‖f̂(x) − f(x)‖ / ‖f(x)‖ of the built
  replacement on a random N(0, 1) input of the layer's shape, and the error
  after each sweep (the error-vs-sweeps curve);
- **old** (``--old``): the previous implementation, TensorLy ``parafac`` (SVD
  init, 100 sweeps, tol 1e-6, float64), in a child process stopped after
  ``--old-timeout`` seconds, on the layers matching ``--old-layers``;
- refused ranks (:meth:`CP.rank_refusal`) are listed with the reason, not run.

Prints a table and writes ``benchmarks/results/bench_cp.json``; the machine is
shared, so the load (``uptime``) before and after is recorded with the times.

Usage::

    python benchmarks/bench_cp.py [--space cnn] [--layers REGEX] [--old] [--old-layers REGEX]
                                  [--old-timeout 60] [--threads 2] [--out benchmarks/results/bench_cp.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autorank import methods  # noqa: E402
from autorank.cost.profile import profile_model  # noqa: E402
from autorank.methods import layer_spec  # noqa: E402
from autorank.methods._base import Factors  # noqa: E402
from autorank.methods.cp import DEFAULT_MAX_GFLOP, DEFAULT_N_ITER_MAX, DEFAULT_TOL, cp_als, cp_fit_gflop, reconstruct  # noqa: E402
from autorank.search.allocate import probe_rhos  # noqa: E402
from autorank.search.space import SearchSpace  # noqa: E402


# ---------------------------------------------------------------------- the model
class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: 3×3 conv, BN, ReLU, 3×3 conv, BN, (1×1 conv, BN) shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class ResNet18(nn.Module):
    """ResNet-18 with torchvision's layer names and initialisation (He et al. CVPR 2016), random weights."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cfg, inplanes = [(64, 1), (128, 2), (256, 2), (512, 2)], 64
        for i, (planes, stride) in enumerate(cfg, 1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(seed: int = 0) -> ResNet18:
    torch.manual_seed(seed)
    return ResNet18().eval()


# ---------------------------------------------------------------------- the old implementation (TensorLy)
def old_cp_als(tensor, rank: int, n_iter_max: int = 100, tol: float = 1e-6):
    """autorank's CP-ALS before this change: TensorLy parafac, SVD init, seed 0, float64, unit norm."""
    import warnings

    import numpy as np
    import tensorly as tl
    from tensorly.decomposition import parafac

    tl.set_backend("numpy")
    t = np.ascontiguousarray(tensor, dtype=np.float64)
    norm = float(np.linalg.norm(t))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        (weights, factors), errors = parafac(t / norm, rank=rank, init="svd", n_iter_max=n_iter_max, tol=tol,
                                             random_state=0, normalize_factors=False, return_errors=True)
    factors = [np.asarray(f, dtype=np.float64) for f in factors]
    factors[0] = factors[0] * (np.asarray(weights, dtype=np.float64) * norm)[None, :]
    return factors, len(errors)


def _old_child(conn, weight, rank: int, threads: int) -> None:
    torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    factors, sweeps = old_cp_als(weight, rank)
    conn.send((factors, sweeps, time.perf_counter() - t0, time.process_time() - c0))
    conn.close()


def run_old(weight: torch.Tensor, rank: int, timeout: float, threads: int) -> Optional[dict]:
    """The old fit in a child process; None when it did not finish within ``timeout`` seconds."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_old_child, args=(child, weight.double().numpy(), rank, threads), daemon=True)
    p.start()
    child.close()
    got = parent.poll(timeout)
    if not got:
        p.kill()
        p.join()
        return None
    factors, sweeps, wall, cpu = parent.recv()
    p.join()
    return {"factors": [torch.from_numpy(f) for f in factors], "sweeps": sweeps, "wall_s": wall, "cpu_s": cpu}


# ---------------------------------------------------------------------- measuring
def _factors(fs, rank: int) -> Factors:
    a, b, h, w = (f.to(dtype=torch.float64, device="cpu") for f in fs)
    return Factors({"u_out": a, "u_in": b, "k_h": h, "k_w": w}, {"rank": rank})


def _kernel_error(weight: torch.Tensor, fs) -> float:
    rec = reconstruct([f.to(torch.float64) for f in fs])
    return float((rec - weight.double()).norm() / weight.double().norm())


def _output_error(conv: nn.Conv2d, fs, rank: int, x: torch.Tensor) -> float:
    cp = methods.get("cp")
    rep = cp.build(conv, _factors(fs, rank), rank)
    with torch.no_grad():
        y, y2 = conv(x), rep(x)
    return float((y2 - y).norm() / y.norm())


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default="cnn", help="search space whose rho grid gives the probes (default cnn)")
    ap.add_argument("--layers", default="", help="regex: only these layers (default every 3x3 conv)")
    ap.add_argument("--old", action="store_true", help="also run the old TensorLy path")
    ap.add_argument("--old-layers", default=r"^layer1\.0\.conv1$|^layer4\.0\.conv1$",
                    help="regex: the layers the old path runs on (it is slow)")
    ap.add_argument("--old-timeout", type=float, default=60.0, help="seconds before an old fit is stopped (default 60)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_cp.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    load_before = _uptime()
    model = resnet18()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    prof = profile_model(model, x)
    space = SearchSpace.load(args.space)
    rhos = probe_rhos(space.rhos, 4)
    cp = methods.get("cp")
    named = dict(model.named_modules())
    rows: list[dict[str, Any]] = []
    header = (f"{'layer':16s} {'shape':>10s} {'rho':>5s} {'rank':>5s} | {'new s':>6s} {'cpu s':>6s} {'sw':>4s} "
              f"{'init err':>8s} {'err':>7s} {'out err':>7s} | {'old s':>7s} {'sw':>4s} {'err':>7s} {'out err':>7s}")
    print(f"load before: {load_before}")
    print(header)
    print("-" * len(header))
    for name, lp in prof.layers.items():
        conv = named[name]
        if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (3, 3) or (args.layers and not re.search(args.layers, name)):
            continue
        spec = layer_spec(conv)
        weight = conv.weight.detach()
        g = torch.Generator().manual_seed(1)
        xin = torch.randn(lp.input_shape, generator=g)
        for rho in rhos:
            rank = cp.rank_for(spec, rho, lp.input_shape)
            row: dict[str, Any] = {"layer": name, "shape": f"{spec.in_channels}->{spec.out_channels}",
                                   "input_shape": list(lp.input_shape), "rho": rho, "rank": rank,
                                   "gflop_estimate": sum(cp_fit_gflop(tuple(weight.shape), rank))}
            why = cp.rank_refusal(spec, rank, lp.input_shape)
            if why is not None:
                row["refused"] = why
                rows.append(row)
                print(f"{name:16s} {row['shape']:>10s} {rho:5.2f} {rank:5d} | refused: {why}")
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            fit = cp_als(weight, rank, n_iter_max=DEFAULT_N_ITER_MAX, tol=DEFAULT_TOL, max_gflop=DEFAULT_MAX_GFLOP)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            row["new"] = {"wall_s": wall, "cpu_s": cpu, "sweeps": fit.sweeps, "sweep_limit": fit.sweep_limit,
                          "converged": fit.converged, "init_error": fit.init_error, "rel_error": fit.rel_error,
                          "kernel_error_check": _kernel_error(weight, fit.factors),
                          "output_error": _output_error(conv, fit.factors, rank, xin), "errors": fit.errors}
            old_txt = ""
            if args.old and re.search(args.old_layers, name):
                old = run_old(weight, rank, args.old_timeout, args.threads)
                if old is None:
                    row["old"] = {"timeout_s": args.old_timeout}
                    old_txt = f"{'>' + format(args.old_timeout, 'g'):>7s} {'':>4s} {'':>7s} {'':>7s}"
                else:
                    row["old"] = {"wall_s": old["wall_s"], "cpu_s": old["cpu_s"], "sweeps": old["sweeps"],
                                  "rel_error": _kernel_error(weight, old["factors"]),
                                  "output_error": _output_error(conv, old["factors"], rank, xin)}
                    o = row["old"]
                    old_txt = f"{o['wall_s']:7.1f} {o['sweeps']:4d} {o['rel_error']:7.4f} {o['output_error']:7.4f}"
            n = row["new"]
            print(f"{name:16s} {row['shape']:>10s} {rho:5.2f} {rank:5d} | {wall:6.1f} {cpu:6.1f} {fit.sweeps:4d} "
                  f"{fit.init_error:8.4f} {fit.rel_error:7.4f} {n['output_error']:7.4f} | {old_txt}", flush=True)
            rows.append(row)
    load_after = _uptime()
    ran = [r for r in rows if "new" in r]
    both = [r for r in ran if "old" in r and "wall_s" in r["old"]]
    summary = {
        "probes": len(rows),
        "refused": sum("refused" in r for r in rows),
        "new_max_wall_s": max((r["new"]["wall_s"] for r in ran), default=None),
        "new_total_wall_s": sum(r["new"]["wall_s"] for r in ran),
        "new_under_20s": all(r["new"]["wall_s"] < 20 for r in ran),
        "old_timeouts": sum("timeout_s" in r.get("old", {}) for r in rows),
        "old_over_new_wall_median": (sorted(r["old"]["wall_s"] / r["new"]["wall_s"] for r in both)[len(both) // 2]
                                     if both else None),
        "new_minus_old_error_max": max((r["new"]["rel_error"] - r["old"]["rel_error"] for r in both), default=None),
    }
    print(f"load after: {load_after}")
    print(json.dumps(summary, indent=1))
    out = {
        "what": "CP-ALS per 3x3 conv of a torchvision-shaped ResNet-18 (random Kaiming fan-out weights) at the "
                f"CP probe rhos of space {args.space!r}",
        "space": args.space, "probe_rhos": rhos, "threads": args.threads,
        "options": {"n_iter_max": DEFAULT_N_ITER_MAX, "tol": DEFAULT_TOL, "max_gflop": DEFAULT_MAX_GFLOP},
        "old": {"run": args.old, "layers": args.old_layers, "timeout_s": args.old_timeout,
                "what": "TensorLy parafac, SVD init, n_iter_max 100, tol 1e-6, float64"},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "load_before": load_before, "load_after": load_after},
        "summary": summary,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
