"""Benchmark of the executors: framework overhead per trial, and throughput with 2 workers against 1.

A CPU-bound trial: the toy CNN of tests/search_toys.py decomposed by a real
plan, then an ``evaluate`` that does about ``--trial-s`` seconds of real torch
compute (chained 256×256 matmuls, one thread, calibrated on this machine
before the runs). Each executor runs these jobs through the search's executor
interface (``start`` / ``submit`` / ``wait``):

- **overhead per trial** (one job at a time, so one worker busy): wall time from
  ``submit`` to the result coming back from ``wait``, minus the time the runner
  itself spent in decompose + fine-tune + evaluate (its ``time_total_s``).
  Median over the jobs of all repeats. This is what the executor adds per
  trial; the driver's own per-trial work (Optuna ask/tell, SQLite, the trial
  record) is the same for every executor and not counted.
- **throughput**: ``--jobs`` jobs per worker, kept 1 or 2 in flight on an executor
  with 2 workers (interleaved within each repeat, so both see the same machine
  load); trials/hour with 1 and with 2 workers, and their ratio, per repeat; the table shows the median
  over repeats. This machine has 2 cores and is shared with other work: a ratio
  under 2 is contention, not scheduling.
- **start**: seconds for ``start()`` (Ray: connecting / starting a local
  instance, and the workers building their TrialRunners).

Executors: in-process (the default without Ray), Ray actors
(``RayExecutor(engine="actors")``) and Ray Tune (``engine="tune"``). Results go
to ``benchmarks/results/bench_executor[_quick].json`` and a markdown table is
printed (and written next to it).

Usage::

    RAY_AUTH_MODE=token OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_executor.py [--quick]
        [--trial-s S] [--jobs N] [--repeats R] [--engines inprocess,actors,tune]

Default: 10 s trials, under ~8 minutes; ``--quick``: 2 s trials, about 2 minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autorank.search.executor_base import InProcessExecutor  # noqa: E402
from autorank.tasks.base import BaseTask  # noqa: E402
from tests.search_toys import toy_cnn  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PLANS = [  # real plans of the toy CNN (repaired to 30% FLOPs by a search)
    {"features.0": ("spatial-svd", 6), "features.2": ("spatial-svd", 3), "features.4": ("svd", 2), "head.2": ("svd", 1), "head.4": ("svd", 1)},
    {"features.0": ("svd", 3), "features.2": ("tucker2", [8, 8]), "features.4": ("svd", 4), "head.2": ("svd", 8)},
    {"features.2": ("spatial-svd", 8), "features.4": ("spatial-svd", 8), "head.2": ("svd", 4)},
]


class BusyTask(BaseTask):
    """Scores the toy CNN's output fidelity, after ``iters`` chained matmuls of real compute (one thread)."""

    name = "busy"
    metric = "1-relerr"
    default_finetune_steps = 0

    def __init__(self, iters: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 3, 8, 8, generator=g)
        self.a = torch.randn(256, 256, generator=g) / 16
        self.iters = int(iters)
        self.ref = None

    def setup(self, original: nn.Module) -> None:
        with torch.no_grad():
            self.ref = original.eval()(self.x)

    def example_inputs(self):
        return self.x[:1]

    def calibration_inputs(self):
        return [self.x]

    def burn(self, iters: int) -> float:
        y = self.a
        for _ in range(iters):
            y = torch.tanh(y @ self.a)
        return float(y.sum())

    def evaluate(self, model: nn.Module) -> float:
        self.burn(self.iters)
        with torch.no_grad():
            out = model(self.x)
        return float(1 - (out - self.ref).norm() / self.ref.norm())

    def finetune(self, model: nn.Module, steps: int, *, seed: int = 0) -> nn.Module:
        return model


def calibrate(seconds: float) -> int:
    """Iterations of the busy loop that take about ``seconds`` on one thread here."""
    task = BusyTask(0)
    torch.set_num_threads(1)
    n = 50
    while True:
        t0 = time.perf_counter()
        task.burn(n)
        dt = time.perf_counter() - t0
        if dt > 0.5:
            return max(1, int(n * seconds / dt))
        n *= 2


def payload(i: int) -> dict:
    layers = {k: {"method": m, "rank": r} for k, (m, r) in PLANS[i % len(PLANS)].items()}
    return {"plan": {"layers": layers}}


def make_executor(engine: str, workers: int):
    if engine == "inprocess":
        return InProcessExecutor()
    from autorank.search.executor import RayExecutor

    return RayExecutor(workers=workers, cpus_per_trial=1, engine="tune" if engine == "tune" else "actors")


def start(ex, iters: int, cache_dir: str) -> float:
    t0 = time.perf_counter()
    model = toy_cnn()
    task = BusyTask(iters)
    task.setup(model)
    ex.start(model, task, calibrate=None, cache_dir=cache_dir, setup=False)
    return time.perf_counter() - t0


def run_jobs(ex, n: int, in_flight: int) -> tuple[float, list[float], list[dict]]:
    """``n`` jobs, ``in_flight`` at a time: total wall, per-job overheads (wall − time_total_s), results."""
    submitted_at: dict[int, float] = {}
    overheads, results = [], []
    nxt, done = 0, 0
    t0 = time.perf_counter()
    while done < n:
        while nxt < n and nxt - done < in_flight:
            submitted_at[nxt] = time.perf_counter()
            ex.submit(nxt, "zero_shot", payload(nxt))
            nxt += 1
        for ticket, res in ex.wait():
            now = time.perf_counter()
            if "error" in res:
                raise RuntimeError(f"job {ticket} failed: {res['error']}")
            overheads.append(now - submitted_at[ticket] - res["time_total_s"])
            results.append(res)
            done += 1
    return time.perf_counter() - t0, overheads, results


def bench_engine(engine: str, args, iters: int, cache_dir: str, log) -> dict:
    """One executor with 2 workers (in-process: 1); "1 worker" keeps one job in flight, "2 workers" two."""
    out: dict = {"engine": engine, "repeats": []}
    worker_counts = (1,) if engine == "inprocess" else (1, 2)
    ex = make_executor(engine, max(worker_counts))
    try:
        out["start_s"] = start(ex, iters, cache_dir)
        run_jobs(ex, max(worker_counts), max(worker_counts))  # warm-up: first imports and factorizations
        for rep in range(args.repeats):
            row = {}
            for w in worker_counts:  # interleaved, so both see the same machine load
                wall, ov, res = run_jobs(ex, args.jobs * w, w)
                row[f"w{w}"] = {"wall_s": wall, "jobs": len(res), "trials_per_hour": 3600 * len(res) / wall,
                                "overheads_s": ov, "trial_s": statistics.median(r["time_total_s"] for r in res),
                                "pids": sorted({r.get("where", {}).get("pid", os.getpid()) for r in res})}
            if 2 in worker_counts:
                row["ratio"] = row["w2"]["trials_per_hour"] / row["w1"]["trials_per_hour"]
            out["repeats"].append(row)
            log(f"  {engine} repeat {rep + 1}: 1 worker {row['w1']['trials_per_hour']:.0f}/h, median overhead "
                f"{1e3 * statistics.median(row['w1']['overheads_s']):.1f} ms"
                + (f"; 2 workers {row['w2']['trials_per_hour']:.0f}/h (x{row['ratio']:.2f})" if "ratio" in row else ""))
    finally:
        ex.close()
    ov1 = [o for r in out["repeats"] for o in r["w1"]["overheads_s"]]
    out["overhead_median_s"] = statistics.median(ov1)
    out["overhead_p90_s"] = sorted(ov1)[max(0, math.ceil(0.9 * len(ov1)) - 1)]
    out["trial_s"] = statistics.median(r["w1"]["trial_s"] for r in out["repeats"])
    out["tph_1"] = statistics.median(r["w1"]["trials_per_hour"] for r in out["repeats"])
    if 2 in worker_counts:
        out["tph_2"] = statistics.median(r["w2"]["trials_per_hour"] for r in out["repeats"])
        out["ratio_median"] = statistics.median(r["ratio"] for r in out["repeats"])
        out["ratios"] = [r["ratio"] for r in out["repeats"]]
    return out


def table(results: list[dict], trial_s: float) -> str:
    names = {"inprocess": "in-process", "actors": "Ray actors", "tune": "Ray Tune (reuse_actors)"}
    lines = [
        f"Trials of ~{trial_s:.1f} s of one-thread torch compute (median; the trial column shows each executor's, which "
        "moves with the machine's load); overhead = wall per trial − the runner's own time (1 job in flight); "
        "throughput: median over repeats.",
        "",
        "| executor | start (s) | trial (s) | overhead / trial (ms, median) | p90 (ms) | trials/h, 1 worker | trials/h, 2 workers "
        "| 2 vs 1 (median; each repeat) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = f"{r['ratio_median']:.2f}× ({', '.join(f'{x:.2f}' for x in r['ratios'])})" if "ratio_median" in r else "-"
        tph2 = f"{r['tph_2']:.0f}" if "tph_2" in r else "-"
        lines.append(f"| {names[r['engine']]} | {r['start_s']:.1f} | {r['trial_s']:.1f} | {1e3 * r['overhead_median_s']:.1f} | "
                     f"{1e3 * r['overhead_p90_s']:.1f} | {r['tph_1']:.0f} | {tph2} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 s trials, fewer jobs (about 2 minutes)")
    p.add_argument("--trial-s", type=float, help="seconds of compute per trial (default 10; quick 2)")
    p.add_argument("--jobs", type=int, help="jobs per worker per repeat (default 3; quick 4)")
    p.add_argument("--repeats", type=int, help="repeats (default 2; quick 3)")
    p.add_argument("--engines", default="inprocess,actors,tune", help="comma-separated: inprocess, actors, tune")
    p.add_argument("--json", help="where to write the results (default benchmarks/results/bench_executor[_quick].json)")
    args = p.parse_args(argv)
    args.trial_s = args.trial_s or (2.0 if args.quick else 10.0)
    args.jobs = args.jobs or (4 if args.quick else 3)
    args.repeats = args.repeats or (3 if args.quick else 2)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_all = time.perf_counter()
    iters = calibrate(args.trial_s)
    log(f"calibrated: {iters} iterations ≈ {args.trial_s:g} s on one thread")
    import tempfile

    results = []
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        if engine not in ("inprocess", "actors", "tune"):
            p.error(f"unknown engine {engine!r}")
        with tempfile.TemporaryDirectory(prefix="autorank-bench-cache-") as cache_dir:
            log(f"{engine} ...")
            results.append(bench_engine(engine, args, iters, cache_dir, log))
    trial_s = statistics.median(r["trial_s"] for r in results)
    md = table(results, trial_s)
    print(md)
    data = {
        "benchmark": "executor", "quick": args.quick, "trial_s_target": args.trial_s, "iters": iters,
        "jobs_per_worker": args.jobs, "repeats": args.repeats, "results": results,
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "elapsed_s": time.perf_counter() - t_all, "table": md,
    }
    try:
        import ray

        data["machine"]["ray"] = ray.__version__
    except ImportError:  # pragma: no cover
        pass
    target = Path(args.json) if args.json else RESULTS / f"bench_executor{'_quick' if args.quick else ''}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2) + "\n")
    target.with_suffix(".md").write_text(md + "\n")
    log(f"wrote {target} and {target.with_suffix('.md')} ({data['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
