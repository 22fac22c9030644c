"""What a user cares about most: the compressed model's measured speed-up over the original, eager and ONNX.

For each model and batch size below, four searches run on the CPU (``--threads``, 2 by default), each with
its own run directory but one shared factor cache and latency table:

- budgets ``30%flops`` and ``50%latency``;
- device-aware rank alignment (``align="device"``: ranks moved to the top of their measured latency step on
  this CPU) and the fixed multiple of 8 it replaces (``align=8``).

Every search re-measures its front on the target (the original and every member side by side, interleaved
rounds, the speed-up the median of the per-round ratios: see ``autorank.search.latency``). From each front the benchmark reports:

- the best member (highest score among those whose re-measured latency keeps the budget) and its measured
  speed-up over the original in PyTorch eager mode, and as ONNX under onnxruntime (both models exported at
  the batch size and timed side by side, interleaved, with ``--threads`` intra-op threads);
- the same in eager PyTorch with every batch norm folded into the convolution before it, in both models, and
  (for a CNN) also in channels-last memory format
  (``autorank.fold_batch_norms``; at batch 32 on a CPU an unfolded batch norm is a pass over the
  activations as costly as the convolution it follows, and a factorization cannot remove it);
- the fastest member's eager speed-up;
- the latency estimate against the re-measurement, over every member: the median absolute error of the
  estimated speed-up (estimate / estimated original against measurement / measured original: the machine's
  drift between the table and the front cancels out) and of the absolute estimate; the floor's median also
  counts the members measured over a latency budget, which left the front (their estimates missed too);
- how many members break the budget when re-measured.

Models (random weights; the score is label-free fidelity, the cosine of the outputs with the original's on
random inputs, zero-shot): the ResNet-50-shaped built-in at 1x3x224x224 (svd, spatial-svd, tucker2) and the
BERT-base-shaped built-in at sequence length 128 (svd; the pooler stays dense). ρ grid 0.05, 0.1 … 0.6 (the
default space stops at 0.1; at batch 1 on a CPU, operators a factorization cannot remove — batch norm, activations,
additions — keep a ResNet-50 above half its latency unless the convolutions keep less than 10% of their FLOPs).

Floors (the issue's): at ``50%latency`` every front member within budget when re-measured and the median
error of the estimate at most 10%; at ``30%flops`` the best member at least 1.8x faster than the original
at batch 32 and 1.5x at batch 1, eager.

``--fold-bn``: compress each model's inference form, its batch norms folded into the convolutions before
them first (:func:`autorank.fold_batch_norms`; what the demo ships, and AIMET's first step): the original and
every member are then timed without the batch-norm passes no factorization removes.

``--quick``: ResNet-50 at 112x112 and BERT-base at sequence length 32, batches 1 and 8, fewer trials and a
coarser ρ grid (minutes, not the figures of record).

Usage::

    python benchmarks/bench_speedup.py [--quick] [--models resnet50,bert-base] [--batches 1,32]
        [--budgets 30%flops,50%latency] [--aligns device,8] [--threads 2] [--clock wall|cpu] [--trials N] [--device cpu]
        [--fold-bn] [--channels-last]
        [--json benchmarks/results/bench_speedup.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autorank import Plan  # noqa: E402
from autorank.bn_folding import fold_batch_norms  # noqa: E402
from autorank.cost.budget import BudgetError  # noqa: E402
from autorank.cost.latency import batch_inputs, estimate_latency  # noqa: E402
from autorank.cost.latency_table import LatencyTable  # noqa: E402
from autorank.cost.profile import profile_model  # noqa: E402
from autorank.cost.timing import device_name  # noqa: E402
from autorank.export import export_model  # noqa: E402
from autorank.search import search  # noqa: E402
from autorank.search.latency import LatencyTarget  # noqa: E402
from autorank.tasks.fidelity import FidelityTask  # noqa: E402
from autorank.zoo import example_input, load_model  # noqa: E402

MODELS = {  # spec, input shape (batch 1) of the full run, of --quick, search space
    "resnet50": ("resnet50", (1, 3, 224, 224), (1, 3, 112, 112), {"methods": ["svd", "spatial-svd", "tucker2"]}),
    "bert-base": ("bert-base", (1, 128), (1, 32), {"methods": ["svd"], "layers": {"exclude": ["pooler"]}}),
}


def contention_probe(seconds: float = 0.3) -> float:
    """CPU share a busy single thread gets (1.0 on an idle core; 0.5 when it shares a core with one other)."""
    w0, c0 = time.perf_counter(), time.thread_time()
    x = 0
    while time.perf_counter() - w0 < seconds:
        x += 1
    return (time.thread_time() - c0) / (time.perf_counter() - w0)


def fidelity_task(spec: str, shape: tuple[int, ...], n: int) -> FidelityTask:
    """Cosine with the original's outputs on ``n`` random held-out inputs; two random batches to calibrate."""
    g = torch.Generator().manual_seed(0)

    def batch(k: int) -> torch.Tensor:
        s = (k,) + tuple(shape[1:])
        return torch.randint(0, 1000, s, generator=g) if example_input(spec).dtype == torch.long else torch.randn(s, generator=g)

    return FidelityTask([batch(n), batch(n)], held_out=[batch(1), batch(n)], metric="cosine", name=f"{spec}-fidelity")


def _paired(times: dict[str, list[float]]) -> dict[str, Any]:
    """Fastest sample of each model, and the speed-up as the median of the per-round ratios (paired by round, as
    the search measures its front: :func:`autorank.cost.timing.measure_paired`)."""
    ratios = [o / c for o, c in zip(times["original"], times["compressed"]) if c > 0]
    return {"original_s": min(times["original"]), "compressed_s": min(times["compressed"]),
            "speedup": statistics.median(ratios)}


def onnx_speedup(original: torch.nn.Module, small: torch.nn.Module, x: torch.Tensor, threads: int, rounds: int,
                 work: Path, clock: str = "wall") -> dict[str, Any]:
    """Both models exported to ONNX at ``x``'s batch size and timed side by side under onnxruntime (fastest sample).

    ``clock="cpu"`` (one thread: onnxruntime then runs every kernel on the calling thread) times the thread's CPU time.
    """
    import onnxruntime as ort

    timer = time.thread_time if clock == "cpu" else time.perf_counter

    times: dict[str, list[float]] = {"original": [], "compressed": []}
    sessions = {}
    for name, model in (("original", original), ("compressed", small)):
        path = work / f"{name}-{x.shape[0]}.onnx"
        export_model(model, path, format="onnx", example_inputs=(x,), force=True, check=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {n: {sessions[n].get_inputs()[0].name: x.numpy()} for n in sessions}
    for s in sessions:  # warm-up
        sessions[s].run(None, feed[s])
    for i in range(rounds):
        for name in (("original", "compressed") if i % 2 == 0 else ("compressed", "original")):
            samples, t_end = [], time.perf_counter() + 0.3
            while len(samples) < 3 or (time.perf_counter() < t_end and len(samples) < 50):
                t0 = timer()
                sessions[name].run(None, feed[name])
                samples.append(timer() - t0)
            times[name].append(min(samples))
    return _paired(times)


def folded_speedup(original: torch.nn.Module, small: torch.nn.Module, x: torch.Tensor, threads: int, rounds: int,
                   clock: str = "wall", channels_last: bool = False) -> dict[str, Any]:
    """Both models in eager PyTorch with every batch norm folded into the convolution (or linear) before it
    (:func:`autorank.fold_batch_norms`: what any inference deployment does; the factorizations' last
    convolution absorbs the batch norm after it just as the dense one does), timed side by side;
    ``channels_last``: both models' weights and the input in channels-last (NHWC) memory format as well.

    In eager mode a batch norm is a pass of its own over the activations, which at batch 32 on a CPU costs
    about as much as the convolution before it and is untouched by a factorization: this column measures what
    the compression changes once that pass is gone from both models. In PyTorch's default NCHW layout a CPU
    convolution also moves its input to the blocked layout oneDNN computes in and back, a pass a factorized
    layer pays once per factor; channels-last avoids it."""
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    models = {"original": fold_batch_norms(original)[0], "compressed": fold_batch_norms(small)[0]}
    if channels_last:
        models = {n: m.to(memory_format=torch.channels_last) for n, m in models.items()}
        x = x.contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {n: [] for n in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            m(x)
        for i in range(rounds):
            for name in (("original", "compressed") if i % 2 == 0 else ("compressed", "original")):
                samples, t_end = [], time.perf_counter() + 0.3
                while len(samples) < 3 or (time.perf_counter() < t_end and len(samples) < 50):
                    t0 = timer()
                    models[name](x)
                    samples.append(timer() - t0)
                times[name].append(min(samples))
    return _paired(times)


def speedup_error(estimate: float, estimated_original: float, measured: float, measured_original: float) -> float:
    """How far the estimated share of the original's latency is from the measured one, relative to the measured."""
    est_ratio, meas_ratio = estimate / estimated_original, measured / measured_original
    return abs(est_ratio - meas_ratio) / meas_ratio


def run_config(key: str, spec: str, model: torch.nn.Module, task: FidelityTask, shape, space: dict, batch: int, budget: str,
               align, args, work: Path, sens_path: dict, log) -> dict[str, Any]:
    out = work / f"{key}-b{batch}-{budget.replace('%', '')}-align{align}"
    t0 = time.perf_counter()
    try:
        target = LatencyTarget.make(args.device, batch, args.threads, clock=args.clock, memory_format=args.memory_format,
                                    rounds=args.latency_rounds)
        res = search(model, task, budget=budget, space=space, trials=args.trials, finetune=0, sensitivity_points=2, out=out,
                     cache_dir=str(work / "factor-cache"), latency_target=target, align=align, sensitivity=sens_path.get(key),
                     seed=0)
    except BudgetError as exc:  # e.g. a latency budget below what the cheapest plan reaches on this device
        log(f"  {key} b{batch} {budget} align={align}: {exc}")
        return {"model": key, "input": list(shape), "batch": batch, "budget": budget, "align": str(align),
                "unreachable": str(exc), "best": None, "front": [], "front_size": 0, "breaches": 0, "original_s": None,
                "fastest_speedup": None, "median_speedup_estimate_error": None, "median_absolute_estimate_error": None}
    elapsed = time.perf_counter() - t0
    if (Path(res.run_dir) / "sensitivity.json").exists():
        sens_path.setdefault(key, Path(res.run_dir) / "sensitivity.json")
    x1 = example_input(spec, shape)
    prof = profile_model(model, x1)
    table = LatencyTable(None, device=args.device, threads=args.threads, batch_size=batch, statistic="min", clock=args.clock,
                         memory_format=args.memory_format)
    base_est = None
    try:
        from autorank.cost.latency_table import model_signature

        base_est = table.get_model(model_signature(prof, batch))
    except Exception:  # pragma: no cover
        pass
    members = []
    for m in res.front:
        est = None
        if base_est:
            try:
                est = estimate_latency(prof, m.plan, table, model=model)
            except Exception as exc:  # a rank the table lacks and cannot measure
                log(f"  estimate failed for trial {m.trial}: {exc}")
        row = {"trial": m.trial, "summary": m.summary, "score": m.score, "flops_ratio": m.flops_ratio,
               "params_ratio": m.params_ratio, "measured_s": m.latency_measured_s, "speedup": m.speedup,
               "breach": m.latency_breach, "estimated_s": est}
        if est and m.latency_measured_s and res.original_latency_s:
            row["speedup_estimate_error"] = speedup_error(est, base_est, m.latency_measured_s, res.original_latency_s)
            row["absolute_estimate_error"] = abs(est - m.latency_measured_s) / m.latency_measured_s
        members.append(row)
    best = res.best
    fastest = max(res.front, key=lambda m: m.speedup or 0) if res.front else None
    onnx = None
    folded = channels_last = None
    if best is not None:
        xb = batch_inputs(x1, batch)[0]
        torch.set_num_threads(args.threads)
        try:
            folded = folded_speedup(model.eval(), res.build(best, model).eval(), xb, args.threads, args.onnx_rounds, args.clock,
                                    channels_last=args.memory_format == "channels_last")
        except Exception as exc:  # pragma: no cover - a model fx cannot trace is a finding, not a crash
            folded = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        if x1.dim() == 4:  # a CNN: the same in channels-last
            try:
                channels_last = folded_speedup(model.eval(), res.build(best, model).eval(), xb, args.threads, args.onnx_rounds,
                                               args.clock, channels_last=True)
            except Exception as exc:  # pragma: no cover
                channels_last = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if best is not None and not args.no_onnx:
        try:
            onnx = onnx_speedup(model.eval(), res.build(best, model).eval(), xb, args.threads, args.onnx_rounds, out, args.clock)
        except Exception as exc:  # pragma: no cover - an exporter limitation is a finding, not a crash
            onnx = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    errs = [r["speedup_estimate_error"] for r in members if "speedup_estimate_error" in r]
    abs_errs = [r["absolute_estimate_error"] for r in members if "absolute_estimate_error" in r]
    # members measured over a latency budget left the front: their estimates missed too, and count in the error
    records = {r["number"]: r for r in res.trials}
    left_out = []
    for o in res.over_budget:
        lo = {k: o.get(k) for k in ("trial", "summary", "latency_measured_s", "original_latency_s")}
        rec = records.get(o.get("trial"))
        if base_est and rec is not None and o.get("latency_measured_s") and o.get("original_latency_s"):
            try:
                est = estimate_latency(prof, Plan.from_dict(rec["plan"]), table, model=model)
                lo.update(estimated_s=est, speedup_estimate_error=speedup_error(est, base_est, o["latency_measured_s"],
                                                                                o["original_latency_s"]))
            except Exception as exc:  # pragma: no cover - a rank the table lacks and cannot measure
                log(f"  estimate failed for trial {o.get('trial')}: {exc}")
        left_out.append(lo)
    all_errs = errs + [lo["speedup_estimate_error"] for lo in left_out if "speedup_estimate_error" in lo]
    info = json.loads((Path(res.run_dir) / "latency.json").read_text()) if (Path(res.run_dir) / "latency.json").exists() else {}
    row = {
        "model": key, "input": list(shape), "batch": batch, "budget": budget, "align": str(align), "elapsed_s": elapsed,
        "memory_format": args.memory_format,
        "original_s": res.original_latency_s, "front": members, "front_size": len(res.front),
        "breaches": sum(1 for m in res.front if m.latency_breach),
        # members measured over the latency budget and left out of the front (the trials they dominated measured instead)
        "left_out": left_out,
        "best": None if best is None else {"trial": best.trial, "summary": best.summary, "score": best.score,
                                           "flops_ratio": best.flops_ratio, "speedup": best.speedup,
                                           "onnx": onnx, "folded": folded, "channels_last": channels_last},
        "fastest_speedup": fastest.speedup if fastest is not None else None,
        "median_speedup_estimate_error": statistics.median(errs) if errs else None,
        # over every member measured: the front's and those that left it
        "median_speedup_estimate_error_all": statistics.median(all_errs) if all_errs else None,
        "median_absolute_estimate_error": statistics.median(abs_errs) if abs_errs else None,
        "ranks_moved": info.get("ranks_moved"), "refused": sum(len(v) for v in (info.get("refused") or {}).values()),
        # the original at the front against the original beside the calibration's plans (> 0: slower at the front)
        "drift": (res.latency or {}).get("drift"),
    }
    b = row["best"] or {}
    log(f"  {key} b{batch} {budget} align={align}: {len(res.front)} members, best {b.get('summary')} "
        f"FLOPs {b.get('flops_ratio', 0):.1%} speed-up eager {b.get('speedup') or 0:.2f}x "
        f"bn-folded {((b.get('folded') or {}).get('speedup') or 0):.2f}x onnx {((b.get('onnx') or {}).get('speedup') or 0):.2f}x; "
        f"fastest {row['fastest_speedup'] or 0:.2f}x; "
        f"estimate error (speed-up) {row['median_speedup_estimate_error'] if errs else float('nan'):.1%}; "
        f"breaches {row['breaches']}; left the front {len(row['left_out'])}; "
        f"original drifted {row['drift'] if row['drift'] is not None else float('nan'):+.1%} since the calibration; {elapsed:.0f} s")
    return row


def floors(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        b = r["best"] or {}
        if r.get("unreachable"):
            out.append({"what": f"{r['model']} b{r['batch']} {r['budget']} align {r['align']}: reachable", "value": "no", "ok": False})
            continue
        if r["budget"].endswith("latency"):
            ok_budget = r["breaches"] == 0
            err = r.get("median_speedup_estimate_error_all", r["median_speedup_estimate_error"])
            out.append({"what": f"{r['model']} b{r['batch']} {r['budget']} align {r['align']}: every member within budget",
                        "value": f"{r['front_size'] - r['breaches']}/{r['front_size']}", "ok": ok_budget})
            out.append({"what": f"{r['model']} b{r['batch']} {r['budget']} align {r['align']}: median estimate error <= 10% "
                                "(every member measured, left the front or not)",
                        "value": None if err is None else f"{err:.1%}", "ok": err is not None and err <= 0.10})
        elif r["budget"] == "30%flops":
            need = 1.8 if r["batch"] >= 32 else 1.5
            sp = b.get("speedup") or 0.0
            layout = " (channels-last target)" if r.get("memory_format") == "channels_last" else ""
            out.append({"what": f"{r['model']} b{r['batch']} 30%flops align {r['align']}: best member >= {need}x eager{layout}",
                        "value": f"{sp:.2f}x", "ok": sp >= need if r["batch"] in (1, 32) else None})
            fold = (b.get("folded") or {}).get("speedup")
            if fold is not None:
                out.append({"what": f"{r['model']} b{r['batch']} 30%flops align {r['align']}: best member >= {need}x eager, "
                                    "batch norm folded in both models",
                            "value": f"{fold:.2f}x", "ok": fold >= need if r["batch"] in (1, 32) else None})
            cl = (b.get("channels_last") or {}).get("speedup")
            if cl is not None:
                out.append({"what": f"{r['model']} b{r['batch']} 30%flops align {r['align']}: best member >= {need}x eager, "
                                    "batch norm folded, channels-last, in both models",
                            "value": f"{cl:.2f}x", "ok": cl >= need if r["batch"] in (1, 32) else None})
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"bench_speedup on {meta['device_name']}, {meta['threads']} threads, {meta['clock']} clock, "
             f"{meta.get('memory_format', 'contiguous')} layout (the search's target and the eager columns), "
             f"{meta.get('latency_rounds', 5)} rounds in the calibration and the front's measurement; "
             f"load average {meta['loadavg_start']} -> {meta['loadavg_end']}, contention probe "
             f"{meta['cpu_share_start']:.2f} -> {meta['cpu_share_end']:.2f} (1.00 = an idle core)", "",
             "| model | batch | budget | align | original | best member | FLOPs | speed-up eager | eager, BN folded | "
             "eager, folded, channels-last | speed-up ONNX | fastest | "
             "est. error (speed-up) | with those that left | est. error (abs.) | members over budget | left the front |",
             "|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = r["best"] or {}
        if r.get("unreachable"):
            lines.append(f"| {r['model']} | {r['batch']} | {r['budget']} | {r['align']} | unreachable: "
                         f"{r['unreachable'].split(': ', 1)[-1]} |||||||||||||")
            continue
        onnx = (b.get("onnx") or {}).get("speedup")
        fold = (b.get("folded") or {}).get("speedup")
        cl = (b.get("channels_last") or {}).get("speedup")
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['budget']} | {r['align']} | {fmt(r['original_s'] and r['original_s'] * 1e3, '.2f')} ms | "
            f"{b.get('summary', '-')} | {fmt(b.get('flops_ratio'), '.1%')} | {fmt(b.get('speedup'), '.2f')}x | {fmt(fold, '.2f')}x | "
            f"{fmt(cl, '.2f')}x | {fmt(onnx, '.2f')}x | "
            f"{fmt(r['fastest_speedup'], '.2f')}x | {fmt(r['median_speedup_estimate_error'], '.1%')} | "
            f"{fmt(r.get('median_speedup_estimate_error_all'), '.1%')} | "
            f"{fmt(r['median_absolute_estimate_error'], '.1%')} | {r['breaches']}/{r['front_size']} | {len(r.get('left_out') or [])} |")
    lines += ["", "| floor | value | met |", "|---|---:|---|"]
    for f in meta["floors"]:
        lines.append(f"| {f['what']} | {f['value']} | {'yes' if f['ok'] else ('n/a' if f['ok'] is None else 'NO')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="resnet50,bert-base")
    ap.add_argument("--batches")
    ap.add_argument("--budgets", default="50%latency,30%flops")
    ap.add_argument("--aligns", default="device,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                    help="cpu: the measuring thread's CPU time (with --threads 1): what a machine shared with other jobs can measure")
    ap.add_argument("--trials", type=int)
    ap.add_argument("--onnx-rounds", type=int, default=5)
    ap.add_argument("--latency-rounds", type=int, default=5,
                    help="interleaved rounds of the search's latency calibration and front re-measurement (autorank search --latency-rounds)")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--fold-bn", action="store_true",
                    help="compress the models' inference form: batch norms folded first (autorank.bn_folding), as the demo is")
    ap.add_argument("--channels-last", dest="memory_format", action="store_const", const="channels_last", default="contiguous",
                    help="the search measures (and the eager columns time) both models with 4-D weights and inputs in "
                         "channels-last (NHWC): `autorank search --channels-last`")
    ap.add_argument("--work", help="directory for run directories and caches (default: a temporary one)")
    ap.add_argument("--json", help="write the results here (default benchmarks/results/bench_speedup[_quick].json)")
    args = ap.parse_args()
    args.trials = args.trials or (6 if args.quick else 24)
    batches = [int(b) for b in (args.batches or ("1,8" if args.quick else "1,32")).split(",")]
    aligns = [int(a) if a.isdigit() else a for a in args.aligns.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-speedup-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("AUTORANK_CACHE_DIR", str(work / "cache"))
    logging.basicConfig(level=logging.WARNING)
    out_json = Path(args.json or ROOT / "benchmarks" / "results" / f"bench_speedup{'_quick' if args.quick else ''}.json")

    def log(msg: str) -> None:
        print(msg, flush=True)

    meta = {"device": args.device, "device_name": device_name(args.device), "threads": args.threads, "clock": args.clock,
            "quick": args.quick, "fold_bn": args.fold_bn, "memory_format": args.memory_format,
            "trials": args.trials, "latency_rounds": args.latency_rounds, "torch": torch.__version__, "loadavg_start": os.getloadavg(),
            "cpu_share_start": contention_probe(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    log(f"bench_speedup: {meta['device_name']}, {args.threads} threads, load {meta['loadavg_start']}, work {work}")
    rows = []
    sens: dict[str, Path] = {}
    for key in args.models.split(","):
        spec, full, quick, space = MODELS[key]
        shape = quick if args.quick else full
        rho = [0.05, 0.1, 0.2, 0.4, 0.6] if args.quick else [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
        space = {**space, "rho": rho}
        model = load_model(spec).eval()
        if args.fold_bn:
            model, pairs = fold_batch_norms(model)
            log(f"  {key}: {len(pairs)} batch norms folded")
        task = fidelity_task(spec, shape, 2 if args.quick else 4)
        for batch in batches:
            for budget in args.budgets.split(","):
                for align in aligns:
                    rows.append(run_config(key, spec, model, task, shape, space, batch, budget, align, args, work, sens, log))
                    out_json.parent.mkdir(parents=True, exist_ok=True)
                    out_json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    meta.update(loadavg_end=os.getloadavg(), cpu_share_end=contention_probe(), floors=floors(rows))
    out_json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    md = markdown(rows, meta)
    out_json.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
