"""Benchmark of the latency estimator against end-to-end measurement of decomposed models.

For each model below:

1. profile it on its example input (``autorank.cost.profile.profile_model``);
2. draw ``--plans`` random plans (seeded): every candidate layer is decomposed
   with probability 0.8 by a method drawn among svd / spatial-svd / tucker2
   (those that apply) at a kept fraction of FLOPs ρ drawn uniformly from
   [0.1, 0.9];
3. fill a :class:`~autorank.cost.latency_table.LatencyTable` with what the plans need
   (``build_table``: base model, dense layers, every (layer, method, rank)),
   each replacement measured alone on its real input shape;
4. estimate each plan's latency from the table
   (``base − Σ dense + Σ replacements``, no model run);
5. build each decomposed model (the methods' skeletons with random weights:
   latency does not depend on the values; ``--real-weights`` builds it with
   ``autorank.decompose`` instead) and measure it end to end, in
   ``--rounds`` rounds interleaved with the base model (median of the rounds),
   so that drift in the machine's speed shows up in both.

Printed per model: the median and 90th percentile of the absolute percentage
error of the estimate against the measurement; the same for the FLOPs proxy
(base latency × kept fraction of FLOPs) for contrast; and the median kept
fraction of FLOPs against the median kept fraction of latency. "drift-corr."
rescales each estimate by (base measured next to the plan) / (base in the
table): it removes the machine's drift between table and measurement, the
remainder is the estimator's own error.

Models:

- ``resnet50``: autorank.zoo's ResNet-50 at 1x3x112x112 (about 0.1 s on one thread);
- ``demo``: the demo CNN at batch 64 (1x8x8 digits);
- ``bert-small``: autorank.zoo's BERT encoder with 4 layers, hidden 384, 6 heads,
  FFN 1536, on 1x128 token ids (a stack of Linears around attention).

``--quick`` (< 1 minute): fewer plans and rounds, ResNet-50 at 64x64.

Torch's thread count is fixed by ``--threads`` (default 1) and recorded. The
clock defaults to ``cpu`` on CPU with one thread: the calling thread's CPU time,
which is the latency on an idle core and leaves out the time the thread waited
for a core while other processes ran (with one thread every kernel runs on the
calling thread). ``--clock wall`` times elapsed time; it is the default
otherwise (several threads, CUDA). On the shared 2-core machine this was
written on, two threads with wall-clock time were unusable: while two other
processes kept both cores busy, every parallel region waited for a descheduled
thread and latencies came out 10-25x the idle-machine figures, varying from run
to run. The load average and a contention probe (the CPU share a single busy
thread gets, 1.00 on an idle core) are recorded.

Usage::

    python benchmarks/bench_latency_estimator.py [--quick] [--device cpu|cuda] [--json out.json]
        [--threads N] [--clock wall|cpu] [--plans N] [--rounds N] [--models resnet50,demo,bert-small]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from autorank import methods as registry
from autorank.cost.latency import build_table, estimate_latency
from autorank.cost.latency_table import LatencyTable, model_signature, random_fill_
from autorank.cost.profile import profile_model
from autorank.cost.timing import Timing, device_name, measure, resolve_device
from autorank.errors import AutorankError
from autorank.models import BertEncoder
from autorank.surgery import decompose, set_submodule
from autorank.zoo import demo, resnet50

METHODS = ("svd", "spatial-svd", "tucker2")
RHO_RANGE = (0.1, 0.9)
P_DECOMPOSE = 0.8


# ---------------------------------------------------------------------- models
def _seeded(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


def model_cases(quick: bool) -> dict[str, tuple[Any, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    res = 64 if quick else 112
    return {
        "resnet50": (resnet50, torch.randn(1, 3, res, res, generator=g)),
        "demo": (demo, torch.randn(64, 1, 8, 8, generator=g)),
        "bert-small": (
            lambda: _seeded(lambda: BertEncoder(layers=4, hidden=384, heads=6, ffn=1536, vocab=1000, max_len=128)),
            torch.randint(0, 1000, (1, 128), generator=g),
        ),
    }


# ---------------------------------------------------------------------- records
@dataclass
class PlanResult:
    plan: dict
    layers: int
    kept_flops: float
    estimate_s: float
    measured_s: float
    base_now_s: float
    error: float
    error_drift_corrected: float
    flops_proxy_error: float
    kept_latency: float


@dataclass
class ModelResult:
    model: str
    input_shape: list
    device: str
    threads: int
    clock: str
    base_s: float
    table_entries: int
    table_measurements: int
    table_build_s: float
    plans: list[PlanResult] = field(default_factory=list)

    def stat(self, attr: str, q: float) -> float:
        return _quantile(sorted(getattr(p, attr) for p in self.plans), q)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


# ---------------------------------------------------------------------- plans
def random_plan(profile, rng: random.Random) -> dict[str, tuple[str, float]]:
    plan = {}
    for name, lp in profile.layers.items():
        ms = [m for m in lp.applicable() if m in METHODS]
        if not ms or not lp.input_shape or rng.random() > P_DECOMPOSE:
            continue
        plan[name] = (rng.choice(ms), round(rng.uniform(*RHO_RANGE), 3))
    return plan


def build_decomposed(model: nn.Module, profile, plan: dict, dev: torch.device) -> nn.Module:
    """The model with each planned layer replaced by its method's skeleton, filled with random weights."""
    new = copy.deepcopy(model)
    for name, (method, rho) in sorted(plan.items(), key=lambda kv: kv[0].count(".")):
        m = registry.get(method)
        rank = profile.concrete_rank(name, method, rho)
        rep = m.build(new.get_submodule(name), None, rank)
        rep.to_empty(device=dev)
        random_fill_(rep)
        set_submodule(new, name, rep)
    return new.eval()


# ---------------------------------------------------------------------- machine
def contention_probe(seconds: float = 0.3) -> float:
    """CPU share a busy single thread gets (1.0 on an idle core; 0.5 when it shares a core with one other)."""
    w0, c0 = time.perf_counter(), time.thread_time()
    x = 0
    while time.perf_counter() - w0 < seconds:
        x += 1
    return (time.thread_time() - c0) / (time.perf_counter() - w0)


# ---------------------------------------------------------------------- one model
def run_model(name: str, factory, x: torch.Tensor, args, table_dir: str, log) -> ModelResult:
    dev = resolve_device(args.device)
    model = factory().eval()
    profile = profile_model(model, x)
    model.to(dev)
    rng = random.Random(f"{args.seed}-{name}")
    plans = [random_plan(profile, rng) for _ in range(args.plans)]
    candidates: dict[str, list] = {}
    for plan in plans:
        for layer, pair in plan.items():
            candidates.setdefault(layer, []).append(pair)
    table = LatencyTable(
        table_dir, device=args.device, threads=args.threads, batch_size=int(x.shape[0]),
        repeats=args.layer_repeats, min_time=args.layer_min_time, clock=args.clock,
    )
    t0 = time.perf_counter()
    build_table(model, profile, candidates, table=table, example_inputs=x)
    build_s = time.perf_counter() - t0
    base_table = table.get_model(model_signature(profile, table.batch_size))
    log(f"{name}: table of {len(table)} entries ({table.measurements} measured) in {build_s:.1f} s; "
        f"base {base_table * 1e3:.2f} ms")
    res = ModelResult(
        model=name, input_shape=list(x.shape), device=device_name(dev), threads=table.threads, clock=args.clock,
        base_s=base_table, table_entries=len(table), table_measurements=table.measurements, table_build_s=build_s,
    )

    def timed(module: nn.Module) -> Timing:
        return measure(module, x, device=dev, warmup=2, repeats=args.e2e_repeats, threads=table.threads,
                       min_time=args.e2e_min_time, clock=args.clock)

    for i, plan in enumerate(plans):
        est = estimate_latency(profile, plan, table)
        if args.real_weights:
            dec = decompose(model.cpu(), {"layers": {k: {"method": m, "rank": r} for k, (m, r) in plan.items()}},
                            example_inputs=x).eval().to(dev)
            model.to(dev)
        else:
            dec = build_decomposed(model, profile, plan, dev)
        bases, decs = [], []
        for _ in range(args.rounds):
            bases.append(timed(model).median)
            decs.append(timed(dec).median)
        del dec
        meas = statistics.median(decs)
        base_now = statistics.median(bases)
        kept_flops = profile.estimate(plan).flops / profile.flops
        est_corr = est * base_now / base_table
        pr = PlanResult(
            plan={k: list(v) for k, v in plan.items()},
            layers=len(plan),
            kept_flops=kept_flops,
            estimate_s=est,
            measured_s=meas,
            base_now_s=base_now,
            error=abs(est - meas) / meas,
            error_drift_corrected=abs(est_corr - meas) / meas,
            flops_proxy_error=abs(base_now * kept_flops - meas) / meas,
            kept_latency=meas / base_now,
        )
        res.plans.append(pr)
        log(f"  plan {i + 1:2d}: {pr.layers:3d} layers, FLOPs {kept_flops:5.1%}, est {est * 1e3:8.2f} ms, "
            f"measured {meas * 1e3:8.2f} ms (base {base_now * 1e3:.2f}), err {pr.error:6.1%}, "
            f"drift-corr. {pr.error_drift_corrected:6.1%}, FLOPs proxy {pr.flops_proxy_error:6.1%}")
    return res


# ---------------------------------------------------------------------- report
def report(results: list[ModelResult], meta: dict) -> str:
    lines = []
    lines.append(
        f"device {meta['device']}, torch {meta['torch']}, {meta['threads']} thread(s), clock {meta['clock']}, "
        f"load average {meta['loadavg_start']} -> {meta['loadavg_end']}, contention probe "
        f"{meta['cpu_share_start']:.2f} -> {meta['cpu_share_end']:.2f} (1.00 = an idle core)"
    )
    hdr = (f"{'model':<11} {'input':<12} {'plans':>5} {'base ms':>8} | {'est. MdAPE':>10} {'p90':>6} "
           f"{'drift-corr.':>11} | {'FLOPs-proxy MdAPE':>17} {'p90':>6} | {'kept FLOPs':>10} {'kept latency':>12}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    all_err, all_corr, all_flops = [], [], []
    for r in results:
        all_err += [p.error for p in r.plans]
        all_corr += [p.error_drift_corrected for p in r.plans]
        all_flops += [p.flops_proxy_error for p in r.plans]
        shape = "x".join(map(str, r.input_shape))
        lines.append(
            f"{r.model:<11} {shape:<12} {len(r.plans):>5} {r.base_s * 1e3:>8.2f} | "
            f"{r.stat('error', 0.5):>10.1%} {r.stat('error', 0.9):>6.1%} {r.stat('error_drift_corrected', 0.5):>11.1%} | "
            f"{r.stat('flops_proxy_error', 0.5):>17.1%} {r.stat('flops_proxy_error', 0.9):>6.1%} | "
            f"{r.stat('kept_flops', 0.5):>10.1%} {r.stat('kept_latency', 0.5):>12.1%}"
        )
    lines.append("-" * len(hdr))
    q = lambda v, p: _quantile(sorted(v), p)  # noqa: E731
    lines.append(
        f"{'overall':<11} {'':<12} {len(all_err):>5} {'':>8} | {q(all_err, 0.5):>10.1%} {q(all_err, 0.9):>6.1%} "
        f"{q(all_corr, 0.5):>11.1%} | {q(all_flops, 0.5):>17.1%} {q(all_flops, 0.9):>6.1%} |"
    )
    lines.append(
        "MdAPE: median absolute percentage error of the estimate vs end-to-end measurement; FLOPs proxy: "
        "base latency x kept FLOPs fraction (fvcore FLOPs, 1 multiply-add = 1 FLOP)."
    )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="< 1 minute: fewer plans and rounds, smaller ResNet input")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--json", help="write every plan's record to this file")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, fixed and recorded (default 1)")
    ap.add_argument(
        "--clock", choices=("wall", "cpu"),
        help="wall: elapsed time; cpu: the calling thread's CPU time (CPU, 1 thread). Default: cpu on CPU with "
        "1 thread (other processes on a shared machine then cost nothing), else wall",
    )
    ap.add_argument("--plans", type=int, help="random plans per model (default 15, quick 4)")
    ap.add_argument("--rounds", type=int, help="interleaved base/decomposed rounds per plan (default 5, quick 3)")
    ap.add_argument("--models", help="comma-separated subset of resnet50,demo,bert-small")
    ap.add_argument("--table-dir", help="latency table directory (default: a fresh temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real-weights", action="store_true",
                    help="build decomposed models with autorank.decompose (real factorizations) instead of random weights")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each plan")
    args = ap.parse_args(argv)
    args.plans = args.plans or (3 if args.quick else 15)
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.layer_repeats = 5 if args.quick else 15
    args.layer_min_time = 0.01 if args.quick else 0.1
    args.e2e_repeats = 4 if args.quick else 8
    args.e2e_min_time = 0.02 if args.quick else 0.2
    logging.basicConfig(level=logging.WARNING)
    try:
        dev = resolve_device(args.device)  # a clear error before any work
    except AutorankError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.clock is None:
        args.clock = "cpu" if (dev.type == "cpu" and args.threads == 1) else "wall"
    torch.manual_seed(args.seed)

    def log(msg: str) -> None:
        if args.verbose:
            print(msg, file=sys.stderr, flush=True)

    cases = model_cases(args.quick)
    names = args.models.split(",") if args.models else list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose among {', '.join(cases)}")
    meta = {
        "device": device_name(dev),
        "torch": torch.__version__,
        "threads": args.threads,
        "clock": args.clock,
        "python": platform.python_version(),
        "quick": args.quick,
        "plans": args.plans,
        "rounds": args.rounds,
        "seed": args.seed,
        "loadavg_start": _loadavg(),
        "cpu_share_start": contention_probe(),
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="autorank-latency-") as tmp:
        table_dir = args.table_dir or tmp
        results = [run_model(n, cases[n][0], cases[n][1], args, table_dir, log) for n in names]
    meta["loadavg_end"] = _loadavg()
    meta["cpu_share_end"] = contention_probe()
    meta["elapsed_s"] = time.perf_counter() - t0
    text = report(results, meta)
    print(text)
    print(f"({meta['elapsed_s']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "report": text, "models": [asdict(r) for r in results]}, f, indent=1)
    return 0


def _loadavg() -> str:
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
