"""Driver benchmark: can one search driver keep 64 workers busy on a ResNet-50-sized space?

The search runs for real — profile, cost model, warm start, Optuna asks with the
constant liar, repair to the budget, trial records, tells, local moves, the
study's journal — on the ResNet-50-shaped model with the default space (53
decomposable layers, 106 parameters), but the trials run on *simulated workers*
(:class:`SimulatedExecutor`, a :class:`~autorank.search.executor_base.BaseExecutor`):
a job "runs" for ``trial_s`` seconds of wall time on one of ``workers`` slots and
returns a score computed from its plan, so that 64 workers can be imitated on a
2-core machine. Two measurements:

1. **driver-limited** — trials that return at once: the driver's own time per
   trial (ask + repair + records + tell, from ``driver.json``; median over
   windows of the run, the last one ending at trial N) and the trials per second
   one driver sustains;
2. **utilisation** — the same run directory resumed with ``trial_s`` = 10 s
   trials on 64 simulated workers: busy worker-seconds / (64 × wall time) over
   the resumed trials (so, at trial N and beyond).

Run: ``python benchmarks/bench_driver.py`` (N = 2000; ``--quick``: N = 300,
utilisation over 2 rounds of 64 trials of 2 s). Results: benchmarks/results/bench_driver.json.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autorank.search import search  # noqa: E402
from autorank.search.allocate import Sensitivity  # noqa: E402
from autorank.search.executor_base import BaseExecutor  # noqa: E402
from autorank.tasks.base import BaseTask  # noqa: E402
from autorank.zoo import load_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


class SimulatedExecutor(BaseExecutor):
    """``workers`` simulated workers: each job holds a slot for ``trial_s`` seconds of wall time.

    The score of a plan is ``1 − Σ_layer s_layer · (1 − rank/full)²`` with a fixed
    per-layer sensitivity ``s_layer`` (so the sampler has something to learn);
    the empty plan scores 1. Busy intervals are kept for the utilisation.
    """

    name = "simulated"

    def __init__(self, workers: int, trial_s: float, sens: dict[str, float], full_rank: dict[str, int]):
        self.concurrency = workers
        self.trial_s = float(trial_s)
        self.sens, self.full_rank = sens, full_rank
        self._heap: list[tuple[float, int, Any, dict]] = []
        self._seq = 0
        self.busy: list[tuple[float, float]] = []

    def start(self, model, task, **kwargs) -> None:
        pass

    def _score(self, payload: dict) -> dict:
        layers = (payload.get("plan") or {}).get("layers") or {}
        drop = 0.0
        for name, lp in layers.items():
            r = lp["rank"][0] if isinstance(lp["rank"], list) else lp["rank"]
            drop += self.sens.get(name, 0.01) * (1 - min(1.0, r / self.full_rank.get(name, r))) ** 2
        return {"score": 1.0 - drop, "time_total_s": self.trial_s}

    def submit(self, ticket, kind, payload) -> None:
        now = time.perf_counter()
        res = self._score(payload) if kind == "zero_shot" else {"error": f"simulated workers run zero_shot only, not {kind}"}
        self._seq += 1
        heapq.heappush(self._heap, (now + self.trial_s, self._seq, ticket, res))
        self.busy.append((now, now + self.trial_s))

    def wait(self) -> list:
        now = time.perf_counter()
        if self._heap and self._heap[0][0] > now:  # block briefly, like a worker pool's wait
            time.sleep(min(0.005, self._heap[0][0] - now))
            now = time.perf_counter()
        out = []
        while self._heap and self._heap[0][0] <= now:
            _, _, ticket, res = heapq.heappop(self._heap)
            out.append((ticket, res))
        return out

    def has_results(self) -> bool:
        return bool(self._heap) and self._heap[0][0] <= time.perf_counter()

    def running(self) -> int:
        return len(self._heap)

    def close(self) -> None:
        pass


class ShapeTask(BaseTask):
    """Only what the driver needs of a task: the input shape (the simulated workers score the plans)."""

    name = "shape-only"
    metric = "simulated"

    def example_inputs(self):
        return torch.zeros(1, 3, 224, 224)

    def calibration_inputs(self):
        return [torch.zeros(1, 3, 224, 224)]


def _synthetic_sensitivity(model, choices_names: list[str]) -> tuple[Sensitivity, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    s = {n: float(0.002 + 0.02 * torch.rand(1, generator=g)) for n in choices_names}
    sens = Sensitivity(1.0)
    for n, v in s.items():
        for m in ("svd", "spatial-svd", "tucker2"):
            sens.scores.setdefault(n, {})[m] = [(r, 1.0 - v * (1 - r) ** 2) for r in (0.1, 0.3, 0.5, 0.7, 0.9)]
    return sens, s


def run(out: Path, *, trials: int, workers: int, trial_s: float, model, sens: Sensitivity, s: dict, full: dict) -> dict:
    ex = SimulatedExecutor(workers, trial_s, s, full)
    marks: dict[str, Optional[float]] = {"first": None, "last": None}

    def progress(e):
        if e.get("phase") == "trials":
            t = time.perf_counter()
            marks["first"] = marks["first"] or t
            marks["last"] = t

    t0 = time.perf_counter()
    search(model, ShapeTask(), budget="30%flops", trials=trials, finetune=0, out=out, executor=ex, sensitivity=sens,
           measure_latency=False, progress=progress)
    wall = time.perf_counter() - t0
    d = json.loads((out / "driver.json").read_text())["driver_s"]
    return {"executor": ex, "wall_s": wall, "first": marks["first"], "last": marks["last"], "driver_s": {int(k): v for k, v in d.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--trial-s", type=float, default=10.0)
    ap.add_argument("--util-rounds", type=int, default=5, help="trials per worker in the utilisation run")
    ap.add_argument("--out", default=str(RESULTS / "bench_driver.json"))
    args = ap.parse_args()
    if args.quick:
        args.trials, args.trial_s, args.util_rounds = 300, 2.0, 2
    torch.set_num_threads(1)
    model = load_model("resnet50")
    from autorank.cost.profile import profile_model
    from autorank.search.space import SearchSpace

    prof = profile_model(model, torch.zeros(1, 3, 224, 224))
    choices = SearchSpace.load("default").choices(prof)
    sens, s = _synthetic_sensitivity(model, list(choices))
    full = {n: min(lp.spec.out_per_group, lp.spec.in_per_group * lp.spec.kernel_size[0] * lp.spec.kernel_size[1])
            for n, lp in ((n, prof.layers[n]) for n in choices)}
    print(f"space: {len(choices)} layers, {2 * len(choices)} parameters; machine load {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="autorank-bench-driver-") as tmp:
        out = Path(tmp) / "run"
        a = run(out, trials=args.trials, workers=args.workers, trial_s=0.0, model=model, sens=sens, s=s, full=full)
        per = [a["driver_s"][k] for k in sorted(a["driver_s"])]
        win = max(1, min(100, len(per) // 5))
        windows = {f"{i + 1}-{i + win}": statistics.median(per[i:i + win]) for i in range(0, len(per) - win + 1, max(win, len(per) // 10))}
        last = statistics.median(per[-win:])
        rate = (args.trials - 1) / (a["last"] - a["first"]) if a["last"] and a["first"] and a["last"] > a["first"] else float("nan")
        print(f"driver-limited: {args.trials} trials, median driver time per trial {1e3 * statistics.median(per):.1f} ms, "
              f"last {win} trials {1e3 * last:.1f} ms; {rate:.1f} trials/s", flush=True)
        util_trials = args.trials + args.workers * args.util_rounds
        b = run(out, trials=util_trials, workers=args.workers, trial_s=args.trial_s, model=model, sens=sens, s=s, full=full)
        busy = b["executor"].busy
        t_a, t_b = min(x for x, _ in busy), max(y for _, y in busy)
        util = sum(y - x for x, y in busy) / (args.workers * (t_b - t_a))
        per_b = [b["driver_s"][k] for k in sorted(b["driver_s"]) if k >= args.trials]
        print(f"utilisation: {args.workers} workers, {args.trial_s:g} s trials, trials {args.trials}-{util_trials}: "
              f"{100 * util:.1f}% (driver time per trial there: median {1e3 * statistics.median(per_b):.1f} ms)", flush=True)
        journal_mb = (out / "study.journal").stat().st_size / 1e6
    res = {
        "space_layers": len(choices), "parameters": 2 * len(choices), "trials": args.trials, "workers": args.workers,
        "driver_ms_median": 1e3 * statistics.median(per), "driver_ms_last_window": 1e3 * last, "window": win,
        "driver_ms_windows": {k: 1e3 * v for k, v in windows.items()}, "trials_per_s_driver_limited": rate,
        "trial_s": args.trial_s, "utilisation": util, "util_trials": [args.trials, util_trials],
        "driver_ms_during_utilisation": 1e3 * statistics.median(per_b), "journal_mb": journal_mb,
        "load": os.getloadavg(), "quick": args.quick,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
