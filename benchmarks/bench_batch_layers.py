"""Why a factorized ResNet-50 gains less at batch 32 than at batch 1 in eager PyTorch on a CPU: layer by layer.

For the convolution shapes of ResNet-50's four stages at batch 32 (224x224 input), one thread, CPU-time
clock (fastest of 5 calls), side by side in one run:

- a 3x3 convolution against its spatial-SVD and Tucker-2 replacements at ρ ≈ 1/4 of the channels;
- a 1x1 convolution (4C -> C) against its SVD replacement, in the default (NCHW) memory format and in
  channels-last;
- the batch norm + ReLU pass over the same activations, which a factorization does not touch.

Prints the ratios (dense / replacement) next to the FLOP ratios; ``--json`` writes them.

Run: ``python benchmarks/bench_batch_layers.py [--batch 32] [--json benchmarks/results/bench_batch_layers.json]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

STAGES = ((64, 56, 16), (128, 28, 32), (256, 14, 64), (512, 7, 128))  # channels, feature-map side, rank


def cpu_time(m: nn.Module, x: torch.Tensor, n: int = 5) -> float:
    with torch.no_grad():
        m(x)
        best = float("inf")
        for _ in range(n):
            t0 = time.thread_time()
            m(x)
            best = min(best, time.thread_time() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for c, h, r in STAGES:
        x = torch.randn(args.batch, c, h, h)
        dense = nn.Conv2d(c, c, 3, padding=1, bias=False).eval()
        spatial = nn.Sequential(nn.Conv2d(c, r, (3, 1), padding=(1, 0), bias=False), nn.Conv2d(r, c, (1, 3), padding=(0, 1))).eval()
        tucker = nn.Sequential(nn.Conv2d(c, r, 1, bias=False), nn.Conv2d(r, r, 3, padding=1, bias=False), nn.Conv2d(r, c, 1)).eval()
        d, s, t = cpu_time(dense, x), cpu_time(spatial, x), cpu_time(tucker, x)
        row = {"channels": c, "side": h, "rank": r, "conv3x3_ms": d * 1e3, "spatial_svd_speedup": d / s,
               "spatial_svd_flops_ratio": (c * c * 9) / (c * r * 6), "tucker2_speedup": d / t,
               "tucker2_flops_ratio": (c * c * 9) / (2 * c * r + 9 * r * r)}
        for fmt_name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            xi = torch.randn(args.batch, 4 * c, h, h).to(memory_format=fmt)
            one = nn.Conv2d(4 * c, c, 1, bias=False).eval().to(memory_format=fmt)
            svd = nn.Sequential(nn.Conv2d(4 * c, r, 1, bias=False), nn.Conv2d(r, c, 1)).eval().to(memory_format=fmt)
            bn = nn.Sequential(nn.BatchNorm2d(4 * c), nn.ReLU()).eval().to(memory_format=fmt)
            a, b, n = cpu_time(one, xi), cpu_time(svd, xi), cpu_time(bn, xi)
            row[f"conv1x1_{fmt_name}_ms"] = a * 1e3
            row[f"svd_{fmt_name}_speedup"] = a / b
            row[f"bn_relu_{fmt_name}_ms"] = n * 1e3
        row["svd_flops_ratio"] = (4 * c * c) / (r * 5 * c)
        rows.append(row)
        print(f"stage C={c} {h}x{h} rank {r}: 3x3 {d * 1e3:.1f} ms, spatial-svd {row['spatial_svd_speedup']:.2f}x "
              f"(FLOPs {row['spatial_svd_flops_ratio']:.1f}x), tucker2 {row['tucker2_speedup']:.2f}x "
              f"(FLOPs {row['tucker2_flops_ratio']:.1f}x) | 1x1 {4 * c}->{c}: NCHW {row['conv1x1_nchw_ms']:.1f} ms, svd "
              f"{row['svd_nchw_speedup']:.2f}x; channels-last {row['conv1x1_channels_last_ms']:.1f} ms, svd "
              f"{row['svd_channels_last_speedup']:.2f}x (FLOPs {row['svd_flops_ratio']:.1f}x) | batch norm + ReLU on "
              f"its input {row['bn_relu_nchw_ms']:.1f} ms", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"batch": args.batch, "threads": 1, "clock": "cpu", "torch": torch.__version__,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
