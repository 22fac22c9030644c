"""Analytic plan cost vs fvcore tracing, on the ResNet-50-shaped model.

The search checks and repairs thousands of candidate plans, so their cost must
come from formulas, not tracing. Prints the median time to evaluate one full
plan analytically (memo cold: first sight of each (layer, method, rank); warm:
repeated choices, as in a search over a ρ grid), the time of one fvcore trace of
the decomposed model, their ratio, and checks that both give the same count.

    python benchmarks/bench_cost_model.py [--plans 2000] [--model resnet50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

import autorank
from autorank.cost.flops import count_flops
from autorank.cost.profile import profile_model
from autorank.zoo import example_input

GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def random_plans(profile, n: int, seed: int = 0, methods=("svd", "spatial-svd", "tucker2", "cp"), continuous=False):
    rng = random.Random(seed)
    names = [name for name, lp in profile.layers.items() if lp.applicable()]
    plans = []
    for _ in range(n):
        plan = {}
        for name in names:
            usable = [m for m in profile.layers[name].applicable() if m in methods]
            if usable and rng.random() < 0.9:
                rho = round(rng.uniform(0.01, 1.0), 12) if continuous else rng.choice(GRID)
                plan[name] = (rng.choice(usable), rho)
        plans.append(plan)
    return plans


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--plans", type=int, default=2000)
    ap.add_argument("--traces", type=int, default=3, help="fvcore traces of decomposed models to time")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(2)

    model = autorank.load_model(args.model).eval()
    x = example_input(args.model)
    t0 = time.perf_counter()
    profile = profile_model(model, x)
    t_profile = time.perf_counter() - t0
    layers = sum(1 for lp in profile.layers.values() if lp.applicable())

    # one-time: per (layer, method), the costs along the rank path
    t0 = time.perf_counter()
    for name, lp in profile.layers.items():
        for m in lp.applicable():
            profile.estimate({name: (m, 0.5)})
    t_tables = time.perf_counter() - t0
    # every ρ new (continuous values, never memoised) ...
    fresh = random_plans(profile, args.plans, continuous=True)
    # ... and a ρ grid, as a search space gives (memoised after first sight)
    grid = random_plans(profile, args.plans)
    cold, warm = [], []
    for plan in fresh:
        t = time.perf_counter()
        profile.estimate(plan)
        cold.append(time.perf_counter() - t)
    for plan in grid + grid:
        t = time.perf_counter()
        profile.estimate(plan)
        warm.append(time.perf_counter() - t)
    warm = warm[len(grid):]

    trace_times, exact = [], True
    for plan in random_plans(profile, args.traces, seed=1, methods=("svd", "spatial-svd", "tucker2")):
        small = autorank.decompose(model, {"layers": {n: {"method": m, "rank": r} for n, (m, r) in plan.items()}},
                                   example_inputs=x)
        t = time.perf_counter()
        traced = count_flops(small, x)
        trace_times.append(time.perf_counter() - t)
        exact &= traced == profile.estimate(plan).flops

    res = {
        "model": args.model,
        "layers_in_plan": layers,
        "profile_s": t_profile,
        "rank_tables_s": t_tables,
        "estimate_cold_ms_median": 1e3 * statistics.median(cold),
        "estimate_warm_ms_median": 1e3 * statistics.median(warm),
        "estimate_warm_ms_p99": 1e3 * sorted(warm)[int(0.99 * (len(warm) - 1))],
        "fvcore_trace_s_median": statistics.median(trace_times),
        "speedup_vs_fvcore_warm": statistics.median(trace_times) / statistics.median(warm),
        "analytic_equals_fvcore": exact,
    }
    print(f"model {args.model}: {layers} decomposable layers; profile (one fvcore trace + shapes) {t_profile:.2f} s")
    print(f"per-layer rank tables (once per profile): {t_tables:.2f} s")
    print(f"analytic cost of one full plan: median {res['estimate_cold_ms_median']:.3f} ms with every ρ new, "
          f"{res['estimate_warm_ms_median']:.3f} ms on a ρ grid (memoised), p99 {res['estimate_warm_ms_p99']:.3f} ms")
    print(f"fvcore trace of a decomposed model: median {res['fvcore_trace_s_median']:.2f} s "
          f"-> analytic is {res['speedup_vs_fvcore_warm']:.0f}x faster")
    print(f"analytic == fvcore on {args.traces} decomposed models: {exact}")
    print(f"floor (< 1 ms per full plan): {'PASS' if res['estimate_cold_ms_median'] < 1 else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
