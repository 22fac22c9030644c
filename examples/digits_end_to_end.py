"""End to end on the built-in demo: search, pick, export (.pt and .onnx), load, compare, time.

What it shows
    1. ``autorank.search`` on the built-in ``demo`` model (a small CNN trained on
       scikit-learn's 8x8 digits, no download) with its built-in accuracy task,
       under a FLOPs budget (default ``30%flops``: at most 30% of the original's
       FLOPs; one multiply-add counts as one FLOP, as in fvcore);
    2. the Pareto front (accuracy against cost), and ``result.pick("best")``;
    3. ``result.export`` of that model as ``.pt`` (autorank's weights-only file) and
       ``.onnx`` (checked against PyTorch by onnxruntime while exporting);
    4. ``autorank.load`` of the ``.pt`` file, whose outputs must equal the front
       member's model exactly;
    5. the latency of the original and of the loaded compressed model, measured
       with ``autorank.cost.timing.measure`` on one thread and the same inputs
       (batches of 1 and 32 digits), and their ratio.

Run
    python examples/digits_end_to_end.py                  # 30 trials, 3 fine-tuned (about a minute on 2 CPU cores)
    python examples/digits_end_to_end.py --budget 50%params --trials 60
    python examples/digits_end_to_end.py --small          # a few trials, a few fine-tuning steps (seconds)

The run directory (study, trial records, front.json, pareto.png/html, weights)
goes to ``--out`` (default ``runs/digits_end_to_end``); running the same command
again resumes it. The exported files are written into that directory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import autorank
from autorank.cost.timing import measure
from autorank.tasks import demo_task


def print_front(result) -> None:
    print(f"front ({len(result.front)} members; original {result.cost_metric}: 100%, "
          f"score {result.base_score:.4f}; FLOPs count one multiply-add as one FLOP):")
    print(f"  {'trial':>5}  {'score':>7}  {'0-shot':>7}  {'tuned':>5}  {'FLOPs':>6}  {'params':>6}  plan")
    for m in result.front:
        print(f"  {m.trial:>5}  {m.score:7.4f}  {m.zero_shot_score:7.4f}  {'yes' if m.finetuned else 'no':>5}  "
              f"{m.flops_ratio:6.1%}  {m.params_ratio:6.1%}  {m.summary}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", default="30%flops", help="hardware budget, e.g. 30%%flops, 50%%params (default 30%%flops)")
    p.add_argument("--trials", type=int, default=30, help="zero-shot trials (default 30)")
    p.add_argument("--finetune", type=int, default=3, help="how many promising plans to fine-tune (default 3)")
    p.add_argument("--finetune-steps", type=int, default=100, help="fine-tuning steps per plan (default 100)")
    p.add_argument("--out", type=Path, default=Path("runs/digits_end_to_end"), help="run directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true",
                   help="tiny run for tests: 5 trials, 1 plan fine-tuned for 10 steps (plain fine-tuning: no re-fit, no block-wise stage)")
    args = p.parse_args(argv)
    sensitivity_points, training = 4, None
    if args.small:
        args.trials, args.finetune, args.finetune_steps, sensitivity_points = 5, 1, 10, 2
        training = {"refit": False, "blockwise": False}  # the recovery's two data-driven stages took half the run

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = autorank.load_model("demo")  # trained once per machine (a few seconds), then cached
    task = demo_task()
    result = autorank.search(
        model, task, budget=args.budget, space="default", trials=args.trials, out=args.out,
        finetune=args.finetune, finetune_steps=args.finetune_steps, seed=args.seed,
        sensitivity_points=sensitivity_points, measure_latency=False, training=training,
    )
    print(f"search: {len(result.trials)} trials in {time.perf_counter() - t0:.1f} s, run directory {result.run_dir}")
    print_front(result)

    best = result.pick("best")
    print(f"best: trial {best.trial}, accuracy {best.score:.4f} (original {result.base_score:.4f}), "
          f"FLOPs {best.flops_ratio:.1%}, params {best.params_ratio:.1%}")
    print("plan: " + ", ".join(f"{name}={lp.method}:{lp.rank}" for name, lp in best.plan.layers.items()))

    # ---- export: .pt (autorank.load) and .onnx (any ONNX runtime); both are checked while exporting
    pt_path = Path(result.run_dir) / "best.pt"
    onnx_path = Path(result.run_dir) / "best.onnx"
    rep_pt = result.export(best, pt_path, format="pt", force=True)
    print(f"exported {rep_pt.path} ({rep_pt.bytes} bytes)")
    try:
        rep_onnx = result.export(best, onnx_path, format="onnx", force=True)
        print(f"exported {rep_onnx.path} ({rep_onnx.bytes} bytes, onnxruntime max abs diff {rep_onnx.max_abs_diff:.2e})")
    except autorank.AutorankError as exc:  # onnx / onnxruntime not installed: say so, go on
        print(f"onnx export skipped: {exc}")

    # ---- load the .pt in a fresh model and compare with the front member's model
    loaded = autorank.load(pt_path)  # the file records the model spec ("demo"): no model= needed
    member_model = result.build(best)
    x = task.calibration_inputs()[0][:32]  # 32 real digits
    with torch.no_grad():
        same = torch.equal(loaded(x), member_model(x))
        acc = float((loaded(x).argmax(1) == model(x).argmax(1)).float().mean())
    print(f"loaded == front member: {same}")
    print(f"agreement with the original on 32 digits: {acc:.2%}")

    # ---- latency, one thread, the same inputs for both models (median of repeated timings)
    # at batch 1 this tiny CNN is dominated by per-layer overheads; at batch 32 the saved FLOPs show
    repeats = 10 if args.small else 30
    for xb in (x[:1], x):
        t_orig = measure(model, xb, threads=1, warmup=5, repeats=repeats)
        t_small = measure(loaded, xb, threads=1, warmup=5, repeats=repeats)
        print(f"latency (1 thread, batch {len(xb)}): original {t_orig.median * 1e3:.3f} ms, "
              f"compressed {t_small.median * 1e3:.3f} ms, ratio {t_small.median / t_orig.median:.2f}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
