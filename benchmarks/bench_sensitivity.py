"""Sensitivity benchmark: the estimated table (new default) against the full table (``--sensitivity full``).

For each model — the pretrained MiniLM (``transformer`` space, 50% FLOPs, the
fidelity task of bench_search.py: 64 held-out sentences, 32 tokens) and the
digits demo (``cnn`` space, 30% FLOPs) — and each seed, the same search runs
twice side by side, interleaved (the order alternates between seeds): once with
the estimated sensitivity table, once with the full one. Reported, median over
seeds:

- time to the first trial (the whole warm-up: profile, base score, sensitivity
  table, first zero-shot trial) and its ratio full / estimate;
- time to a front that beats every baseline — uniform ρ per method and the
  AIMET-style greedy plan of the *full* table (the baselines' own scores, the
  same for both runs) — meaning: best feasible score at least the best baseline's
  and hypervolume at least the baselines' own; and its ratio;
- best score and hypervolume at equal trials;
- how well the estimate ranks (layer, ρ) against the full table: Spearman's
  correlation per method between the drops of the full table and (a) the raw
  estimate (propagated output error, before any evaluation), (b) the calibrated
  table the search uses, at the full table's probe points.

Run: ``python benchmarks/bench_sensitivity.py`` (``--quick``: one seed, fewer trials).
Results: benchmarks/results/bench_sensitivity.json and .md.
"""

from __future__ import annotations

import argparse
import importlib
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
from autorank.search.sensitivity import spearman  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _points(trials):
    return [(r["ratios"]["flops"], r["score"]) for r in trials if r.get("state") == "COMPLETE" and r.get("feasible", True)]


def one_run(model, task, *, mode, seed, trials, space, budget, out):
    times: list[float] = []
    t0 = time.perf_counter()

    def progress(e):
        if e.get("phase") == "trials":
            times.append(time.perf_counter() - t0)

    res = search(model, task, budget=f"{int(budget * 100)}%flops", space=space, trials=trials, finetune=0, seed=seed,
                 out=out, measure_latency=False, sensitivity_mode=mode, progress=progress)
    recs = sorted(res.trials, key=lambda r: r["number"])  # in-process: trials finish in their order
    table = json.loads((Path(res.run_dir) / "sensitivity.json").read_text())
    return {"mode": mode, "seed": seed, "first_trial_s": times[0] if times else float("nan"), "finish_s": times,
            "trials": recs, "table": table, "total_s": time.perf_counter() - t0}


def time_to_beat(run, baselines, budget):
    """Seconds until the front of the trials finished so far beats every baseline (None: never)."""
    best_base = max(s for _, s in baselines)
    hv_base = hypervolume_2d(baselines, budget, 0.0)
    pts = []
    for r, t in zip(run["trials"], run["finish_s"]):
        if r.get("state") == "COMPLETE" and r.get("feasible", True):
            pts.append((r["ratios"]["flops"], r["score"]))
        if pts and max(s for _, s in pts) >= best_base - 1e-12 and hypervolume_2d(pts, budget, 0.0) >= hv_base - 1e-12:
            return t
    return None


def agreement(est_table, full_table):
    """Spearman per method between the full table's drops and the estimate's (raw errors; calibrated table)."""
    base = full_table["base"]
    sens = Sensitivity.from_dict(est_table)
    errors = est_table["estimate"]["errors"]
    out = {}
    methods = sorted({m for ms in full_table["scores"].values() for m in ms})
    for m in methods:
        pts = [(n, r, s) for n, ms in full_table["scores"].items() for r, s in ms.get(m, [])]
        raw = []
        for n, r, _ in pts:
            e = next((e for rr, e in errors.get(n, {}).get(m, []) if abs(rr - r) < 1e-9), None)
            raw.append(e if e is not None else float("inf"))
        drops = [base - s for _, _, s in pts]
        out[m] = {"points": len(pts), "raw": spearman(raw, drops),
                  "calibrated": spearman([sens.drop(n, (m, r)) for n, r, _ in pts], drops)}
    return out


def run_model(name, model, task, *, space, budget, trials, seeds, work, results=None, save=None):
    rows: list = []
    entry = {"model": name, "space": space, "budget": budget, "trials": trials, "rows": rows}
    if results is not None:
        results.append(entry)
    for i, seed in enumerate(seeds):
        order = ("estimate", "full") if i % 2 == 0 else ("full", "estimate")
        got = {}
        for mode in order:
            got[mode] = one_run(model, task, mode=mode, seed=seed, trials=trials, space=space, budget=budget,
                                out=work / f"{name}-{seed}-{mode}")
            print(f"  {name} seed {seed} {mode}: first trial {got[mode]['first_trial_s']:.1f} s, "
                  f"total {got[mode]['total_s']:.0f} s", flush=True)
        full, est = got["full"], got["estimate"]
        baselines = [(r["ratios"]["flops"], r["score"]) for r in full["trials"]
                     if (r["origin"].startswith("uniform:") or r["origin"] == "greedy") and r.get("state") == "COMPLETE"
                     and r.get("feasible", True)]
        row = {"seed": seed, "baselines": baselines}
        for mode, run in got.items():
            pts = _points(run["trials"])
            row[mode] = {
                "first_trial_s": run["first_trial_s"], "total_s": run["total_s"],
                "time_to_beat_s": time_to_beat(run, baselines, budget),
                "best": max(s for _, s in pts), "hv": hypervolume_2d(pts, budget, 0.0),
                "table_s": run["table"].get("time_s"),
                "evaluations": (len(run["table"]["estimate"]["probes"]) if mode == "estimate"
                                else sum(len(p) for ms in run["table"]["scores"].values() for p in ms.values())),
                "origins_best": max((r for r in run["trials"] if r.get("state") == "COMPLETE" and r.get("feasible", True)),
                                    key=lambda r: r["score"])["origin"],
            }
        if i == 0:
            row["agreement"] = agreement(est["table"], full["table"])
        rows.append(row)
        if save is not None:
            save()
        print(f"  {name} seed {seed}: first trial {full['first_trial_s'] / est['first_trial_s']:.1f}x sooner; "
              f"beat baselines at {row['estimate']['time_to_beat_s']} s (estimate) vs {row['full']['time_to_beat_s']} s (full); "
              f"best {row['estimate']['best']:.4f} vs {row['full']['best']:.4f}", flush=True)
    return entry


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def table_md(res) -> str:
    rows = res["rows"]
    lines = [f"\n**{res['model']}** — `{res['space']}` space, {res['budget']:.0%} FLOPs, {res['trials']} zero-shot trials, "
             f"median over {len(rows)} seed(s)\n",
             "| | estimate (default) | full | full / estimate |", "|---|---|---|---|"]

    def ratio(key):
        r = [row["full"][key] / row["estimate"][key] for row in rows if row["full"][key] and row["estimate"][key]]
        return f"{_med(r):.1f}×" if r else "–"

    for key, label, fmt in (("first_trial_s", "time to first trial (s)", "{:.0f}"),
                            ("time_to_beat_s", "time to a front beating every baseline (s)", "{:.0f}"),
                            ("evaluations", "zero-shot evaluations in the table", "{:.0f}"),
                            ("best", "best score", "{:.4f}"), ("hv", "hypervolume", "{:.4f}")):
        e, f = _med([r["estimate"][key] for r in rows]), _med([r["full"][key] for r in rows])
        rr = ratio(key) if key in ("first_trial_s", "time_to_beat_s", "evaluations") else "–"
        lines.append(f"| {label} | {fmt.format(e) if e is not None else 'never'} | {fmt.format(f) if f is not None else 'never'} | {rr} |")
    ag = rows[0].get("agreement", {})
    if ag:
        lines.append("\nSpearman's correlation with the full table's drops, per method (its probe points):\n")
        lines.append("| method | points | raw estimate (no evaluation) | calibrated table |\n|---|---|---|---|")
        for m, a in ag.items():
            lines.append(f"| {m} | {a['points']} | {a['raw']:.3f} | {a['calibrated']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, fewer trials")
    ap.add_argument("--models", default="minilm,demo")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "bench_sensitivity.json"))
    ap.add_argument("--per-role", type=int, default=None,
                    help="layers of each role probed for the estimate's per-layer scale (default: the library's)")
    args = ap.parse_args()
    if args.per_role is not None:
        importlib.import_module("autorank.search.sensitivity").CALIBRATION_PER_ROLE = args.per_role
    torch.set_num_threads(1)
    seeds = list(range(1 if args.quick else args.seeds))
    results = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="autorank-bench-sens-") as tmp:
        work = Path(tmp)
        if "minilm" in args.models:
            from autorank.tasks import minilm_task
            from autorank.zoo import load_model

            run_model("MiniLM-L6 (cosine fidelity)", load_model("minilm"), minilm_task(n_held_out=64, max_length=32),
                      space="transformer", budget=0.5, trials=12 if args.quick else 30, seeds=seeds, work=work, results=results,
                      save=lambda: _write(args, results, load_before))
        if "demo" in args.models:
            from autorank.tasks import demo_task
            from autorank.zoo import load_model

            run_model("digits demo (accuracy)", load_model("demo"), demo_task(), space="cnn", budget=0.3,
                      trials=15 if args.quick else 40, seeds=seeds, work=work, results=results,
                      save=lambda: _write(args, results, load_before))
    md = _write(args, results, load_before)
    print(md)


def _write(args, results, load_before) -> str:
    """Results so far (written after each model: a long run keeps what it measured)."""
    sensitivity_module = importlib.import_module("autorank.search.sensitivity")
    meta = {"load_before": load_before, "load_after": os.getloadavg(), "cores": os.cpu_count(), "quick": args.quick,
            "per_role": sensitivity_module.CALIBRATION_PER_ROLE}
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    md = "\n".join(table_md(r) for r in results) + f"\n\nmachine: {os.cpu_count()} cores, load {meta['load_before']} → {meta['load_after']}\n"
    Path(args.out).with_suffix(".md").write_text(md)
    return md


if __name__ == "__main__":
    main()
