"""Search benchmark: autorank against the rank choices the peers make, at equal trials.

For each model (the digits demo; the pretrained MiniLM sentence encoder with the
fidelity task on the repo's sentences) and each FLOPs budget (30%, 50%, 70%),
with the same number of zero-shot trials:

- uniform ρ for each method alone (SVD-LLM's rule; the largest grid ρ that fits),
- AIMET-style greedy selection (per-layer scores, one threshold by bisection),
- random search (Optuna's RandomSampler, plans repaired to the budget like autorank's),
- autorank (default sampler, warm-started with the baselines above and a Lagrangian allocation).

Reported per budget, as the median over seeds with the spread (max − min):
best zero-shot score within budget, hypervolume of the front (cost ∈ [0, budget],
score above a floor), and the trial at which autorank first beats the best
uniform/greedy baseline. A sampler comparison (TPE, NSGA-II, GP, random; no warm
start) on the demo chose the default sampler.

Scores are zero-shot (data-aware initialisation, no training), so that the
comparison measures the choice of methods and ranks, not the fine-tuning recipe.

Run: ``python benchmarks/bench_search.py`` (``--quick`` for a smaller run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autorank.report import hypervolume_2d  # noqa: E402
from autorank.search import search  # noqa: E402
from autorank.search.allocate import Sensitivity  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _front_points(trials, metric="flops"):
    return [(r["ratios"][metric], r["score"]) for r in trials if r.get("state") == "COMPLETE" and r.get("feasible", True)]


def _best(trials):
    pts = [s for _, s in _front_points(trials)]
    return max(pts) if pts else float("nan")


def _hv(trials, budget, floor):
    return hypervolume_2d(_front_points(trials), budget, floor)


def _spread(xs):
    return (max(xs) - min(xs)) if xs else float("nan")


def run_model(name, model, task, *, budgets, seeds, trials, space, workdir, floor, samplers=False, samplers_only=False):
    out = {"model": name, "trials": trials, "budgets": {}}
    sens = None
    if samplers_only:
        ref = search(model, task, out=workdir / f"{name}-sens", budget=f"{int(budgets[0] * 100)}%flops", space=space, trials=1,
                     finetune=0, measure_latency=False)
        sens = Sensitivity.from_dict(json.loads((ref.run_dir / "sensitivity.json").read_text()))
    for b in ([] if samplers_only else budgets):
        row = {"autorank": [], "random": [], "hv_autorank": [], "hv_random": [], "first_beat": [], "baselines": {}}
        for seed in seeds:
            t0 = time.perf_counter()
            kw = dict(budget=f"{int(b * 100)}%flops", space=space, trials=trials, finetune=0, seed=seed, measure_latency=False)
            ar = search(model, task, out=workdir / f"{name}-{b}-{seed}-ar", sensitivity=sens, **kw)
            if sens is None:
                sens = Sensitivity.from_dict(json.loads((ar.run_dir / "sensitivity.json").read_text()))
            t_ar = time.perf_counter() - t0
            rnd = search(model, task, out=workdir / f"{name}-{b}-{seed}-rnd", sampler="random", warm_start=False, **kw)
            base = {r["origin"]: r["score"] for r in ar.trials if r["origin"] != "sampler" and r.get("state") == "COMPLETE"}
            row["baselines"] = base  # deterministic: the same for every seed
            best_base = max(v for k, v in base.items() if k.startswith("uniform") or k == "greedy")
            first = next((i + 1 for i, r in enumerate(ar.trials) if r.get("state") == "COMPLETE" and r["score"] > best_base), None)
            row["autorank"].append(_best(ar.trials))
            row["random"].append(_best(rnd.trials))
            row["hv_autorank"].append(_hv(ar.trials, b, floor))
            row["hv_random"].append(_hv(rnd.trials, b, floor))
            row["first_beat"].append(first)
            print(f"  {name} {b:.0%} seed {seed}: autorank {row['autorank'][-1]:.4f} random {row['random'][-1]:.4f} "
                  f"best baseline {best_base:.4f} first beat at trial {first} ({t_ar:.0f} s)", flush=True)
        out["budgets"][b] = row
    if samplers:
        # each sampler as autorank runs it (warm start, local moves) and bare (no warm start), first budget
        out["samplers"] = {}
        for b in budgets[:1]:
            for warm in (True, False):
                for smp in ("tpe", "nsga2", "gp", "random"):
                    vals, hvs = [], []
                    for seed in seeds:
                        r = search(model, task, out=workdir / f"{name}-s-{smp}-{b}-{warm}-{seed}", budget=f"{int(b * 100)}%flops",
                                   space=space, trials=trials, finetune=0, seed=seed, sampler=smp, warm_start=warm,
                                   measure_latency=False, sensitivity=sens if warm else None)
                        vals.append(_best(r.trials))
                        hvs.append(_hv(r.trials, b, floor))
                    out["samplers"][f"{smp}|{b}|{'warm' if warm else 'bare'}"] = {"best": vals, "hv": hvs}
                    print(f"  sampler {smp} {b:.0%} {'warm' if warm else 'bare'}: best {statistics.median(vals):.4f} "
                          f"hv {statistics.median(hvs):.4f}", flush=True)
    return out


def table(res) -> str:
    lines = [f"\n**{res['model']}** — {res['trials']} zero-shot trials per search; median over seeds (spread = max − min)\n",
             "| budget | best uniform (method) | greedy (AIMET) | random search | autorank | autorank − best baseline | HV random | HV autorank "
             "| trials to beat best baseline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for b, row in res["budgets"].items():
        base = row["baselines"]
        uni = {k: v for k, v in base.items() if k.startswith("uniform")}
        bu_k = max(uni, key=uni.get) if uni else None
        bu = uni[bu_k] if bu_k else float("nan")
        gr = base.get("greedy", float("nan"))
        best_base = max(bu, gr)
        ar, rn = row["autorank"], row["random"]
        fb = [f for f in row["first_beat"] if f is not None]
        lines.append(
            f"| {float(b):.0%} | {bu:.4f} ({bu_k.split(':')[1] if bu_k else '-'}) | {gr:.4f} | {statistics.median(rn):.4f} ± {_spread(rn):.4f} "
            f"| {statistics.median(ar):.4f} ± {_spread(ar):.4f} | {statistics.median(ar) - best_base:+.4f} "
            f"| {statistics.median(row['hv_random']):.4f} | {statistics.median(row['hv_autorank']):.4f} "
            f"| {statistics.median(fb) if fb else 'never'} ({len(fb)}/{len(row['first_beat'])} seeds) |"
        )
    if "samplers" in res:
        lines.append("\nSampler comparison (median best score / hypervolume; warm = as autorank runs it, bare = sampler alone)")
        lines.append("\n| sampler | budget | start | best | HV |\n|---|---|---|---|---|")
        for key, d in res["samplers"].items():
            smp, b, warm = key.split("|")
            lines.append(f"| {smp} | {float(b):.0%} | {warm} | {statistics.median(d['best']):.4f} ± {_spread(d['best']):.4f} "
                         f"| {statistics.median(d['hv']):.4f} ± {_spread(d['hv']):.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer trials and seeds")
    ap.add_argument("--models", default="demo,minilm")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--minilm-trials", type=int, default=30)
    ap.add_argument("--samplers", action="store_true", help="also compare samplers on the demo")
    ap.add_argument("--samplers-only", action="store_true", help="only the sampler comparison (demo)")
    ap.add_argument("--demo-space", default="default", help="search space for the demo (default; 'all' for every method)")
    ap.add_argument("--budgets", default="0.3,0.5,0.7")
    ap.add_argument("--out", default=str(RESULTS / "search.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(2 if args.quick else args.seeds))
    budgets = [float(b) for b in args.budgets.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="autorank-bench-") as tmp:
        work = Path(tmp)
        if "demo" in args.models:
            from autorank.tasks import demo_task
            from autorank.zoo import load_model

            t = 15 if args.quick else args.trials
            results.append(run_model("digits demo (accuracy)", load_model("demo"), demo_task(), budgets=budgets, seeds=seeds,
                                     trials=t, space=args.demo_space, workdir=work, floor=0.0,
                                     samplers=args.samplers or args.samplers_only, samplers_only=args.samplers_only))
        if "minilm" in args.models:
            from autorank.tasks import minilm_task
            from autorank.zoo import load_model

            t = 12 if args.quick else args.minilm_trials
            task = minilm_task(n_held_out=64, max_length=32)
            results.append(run_model("MiniLM-L6 sentence encoder (cosine fidelity)", load_model("minilm"), task,
                                     budgets=budgets, seeds=seeds, trials=t, space="transformer", workdir=work, floor=0.0))
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    for r in results:
        print(table(r))
    print(f"\nmachine: {os.cpu_count()} cores, torch threads 1; results in {args.out}")


if __name__ == "__main__":
    main()
