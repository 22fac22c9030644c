"""Recovery benchmark: what re-fitting and the new fine-tuning win back after decomposition.

For each setting (the pretrained MiniLM sentence encoder with the fidelity task on
the shipped corpus's split, ``transformer`` space, at 30% and 50% FLOPs; the digits
demo at 30% FLOPs; a CIFAR-10-shaped ResNet-20 trained here on synthetic data,
``cnn`` space, at 50% FLOPs), the "best member" is the best zero-shot plan of a
short ``autorank.search`` at that budget (seed 0; kept in
``results/bench_recovery_plans.json`` so that reruns use the same plans). Its held-out
score is then measured

- **zero-shot** (data-aware initialisation, no training);
- **re-fit alone** (:func:`autorank.training.refit.refit` on the task's fine-tuning inputs, no gradient step);
- **today's fine-tuning**: ``task.finetune(model, steps)`` as the search runs it, with
  as many steps as fit in the time per plan (the step time is measured first), and the
  zero-shot weights kept if it ends lower (the search's rule);
- **the new recovery**: :func:`autorank.training.recovery.recover` with its default options
  (re-fit, feature distillation, early stopping on the held-out split) and the same
  wall time per plan;

median of 3 seeds (the seed of the fine-tuning; the plan is the same). The gap closed
is ``(score − zero-shot) / (1 − zero-shot)``. ``--ablation [SETTINGS]`` also runs, for one seed,
the recovery with one option changed at a time (the numbers the defaults were chosen
by). Results: ``results/bench_recovery.json`` and ``.md``.

Run: ``python benchmarks/bench_recovery.py`` (``--quick``: one seed, a third of the time
per plan, MiniLM at 50% and the digits only).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import autorank  # noqa: E402
from autorank.plan import Plan  # noqa: E402
from autorank.search import SearchSpace, search  # noqa: E402
from autorank.tasks import ClassificationTask, demo_task, minilm_task  # noqa: E402
from autorank.tasks.demo import cache_root  # noqa: E402
from autorank.training.recovery import RecoveryOptions, recover  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PLANS = RESULTS / "bench_recovery_plans.json"

#: one option changed at a time, against the defaults (``--ablation``)
ABLATIONS: dict[str, dict] = {
    "features 0 (output only)": {"distill": {"features": 0.0}},
    "features 0.5": {"distill": {"features": 0.5}},
    "fine-tune decomposed only": {"distill": {"trainable": "decomposed"}},
    "no augmentation": {"augment": False},
    "no block-wise": {"blockwise": False},
    "block-wise share 0.7": {"blockwise": {"share": 0.7}},
    "block-wise lr 3e-4, decomposed only": {"blockwise": {"lr": 3e-4, "trainable": "decomposed"}},
    "no re-fit": {"refit": False},
    "re-fit last factor only": {"refit": {"low_rank": False}},
    "re-fit ridge 0.01": {"refit": {"ridge": 0.01}},
    "no early stopping": {"early_stopping": False},
}


# ---------------------------------------------------------------------- settings
def _resnet20_setting(steps: int = 400):
    """ResNet-20 (examples/cifar10_resnet20.py) trained ``steps`` steps on its synthetic CIFAR-shaped data, and its task."""
    spec = importlib.util.spec_from_file_location("cifar10_resnet20", ROOT / "examples" / "cifar10_resnet20.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    train_set, val_set = ex.synthetic_cifar(4096, 512, seed=0)
    train = DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(val_set, batch_size=256, shuffle=False)
    model = ex.ResNet20()
    path = cache_root() / "bench-recovery" / f"resnet20-synthetic-{steps}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        ex.pretrain(model, train, steps, seed=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    space = SearchSpace.load("cnn").to_dict()
    space["methods"] = ["none", "svd", "spatial-svd", "tucker2"]
    task = ClassificationTask(train, val, lr=1e-3, name="cifar10-synthetic")
    return model.eval(), task, space


SETTINGS: dict[str, dict[str, Any]] = {
    "minilm-30": {"model": lambda: (autorank.load_model("minilm"), minilm_task(), "transformer"), "budget": "30%flops",
                  "trials": 8, "time_s": 300.0},
    "minilm-50": {"model": lambda: (autorank.load_model("minilm"), minilm_task(), "transformer"), "budget": "50%flops",
                  "trials": 8, "time_s": 300.0},
    "digits-30": {"model": lambda: (autorank.load_model("demo"), demo_task(), "default"), "budget": "30%flops",
                  "trials": 20, "time_s": 20.0},
    "resnet20-50": {"model": _resnet20_setting, "budget": "50%flops", "trials": 12, "time_s": 60.0},
}


def best_plan(name: str, model, task, space, budget: str, trials: int, workdir: Path) -> dict:
    """The best zero-shot plan of a short search (seed 0), cached in ``PLANS``."""
    plans = json.loads(PLANS.read_text()) if PLANS.exists() else {}
    if name in plans:
        return plans[name]
    res = search(model, task, budget=budget, space=space, trials=trials, finetune=0, seed=0,
                 out=workdir / f"search-{name}", measure_latency=False)
    best = max(res.front, key=lambda m: m.score)
    plans[name] = {"plan": best.plan.to_dict(), "zero_shot": best.score, "flops_ratio": best.flops_ratio, "trial": best.trial}
    RESULTS.mkdir(parents=True, exist_ok=True)
    PLANS.write_text(json.dumps(plans, indent=1))
    return plans[name]


# ---------------------------------------------------------------------- the variants
def today(task, model, seconds: float, seed: int, zero: float) -> dict:
    """The search's fine-tuning (task.finetune, fixed steps), with as many steps as fit in ``seconds``."""
    probe = copy.deepcopy(model)  # the step time, without the per-call overhead (optimizer, loader start)
    t0 = time.perf_counter()
    task.finetune(probe, 2, seed=seed)
    t1 = time.perf_counter()
    task.finetune(probe, 12, seed=seed)
    per_step = max(1e-4, ((time.perf_counter() - t1) - (t1 - t0)) / 10)
    steps = max(1, int(seconds / per_step))
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    task.finetune(model, steps, seed=seed)
    spent = time.perf_counter() - t0
    score = task.evaluate(model)
    return {"score": max(score, zero), "finetuned": score, "steps": steps, "seconds": spent}


def new(original, task, model, seconds: float, seed: int, zero: float, options: dict) -> dict:
    t0 = time.perf_counter()
    _, rep = recover(original, model, task, options, time_s=seconds, seed=seed, zero_shot_score=zero)
    ft = rep.finetune or {}
    return {"score": rep.score, "seconds": time.perf_counter() - t0, "refit": rep.refit and rep.refit["score"],
            "refit_seconds": rep.refit and rep.refit["seconds"], "steps": ft.get("steps"), "best_step": ft.get("best_step"),
            "stopped_by": ft.get("stopped_by")}


def refit_alone(original, task, model, zero: float) -> dict:
    t0 = time.perf_counter()
    _, rep = recover(original, model, task, {"early_stopping": False}, steps=0, zero_shot_score=zero)
    return {"score": rep.refit["score"], "kept": rep.refit["kept"], "seconds": time.perf_counter() - t0,
            "refitted": rep.refit["refitted"], "layers": len(rep.refit["layers"])}


def run_setting(name: str, cfg: dict, seeds: list[int], scale: float, ablation: bool, workdir: Path, log: Callable) -> dict:
    model, task, space = cfg["model"]()
    task.setup(model)
    base = task.evaluate(model)
    bp = best_plan(name, model, task, space, cfg["budget"], cfg["trials"], workdir)
    plan = Plan.from_dict(bp["plan"])
    seconds = cfg["time_s"] * scale
    decomposed = autorank.decompose(model, plan, calibration=task.calibration_inputs())
    zero = task.evaluate(decomposed)
    log(f"{name}: original {base:.4f}, best zero-shot plan (trial {bp['trial']}, {bp['flops_ratio']:.1%} FLOPs) {zero:.4f}; "
        f"{seconds:.0f} s per plan")
    out: dict[str, Any] = {"setting": name, "budget": cfg["budget"], "original": base, "zero_shot": zero,
                           "flops_ratio": bp["flops_ratio"], "time_per_plan_s": seconds, "seeds": seeds,
                           "refit": [], "today": [], "new": [], "ablation": {}}
    r = refit_alone(model, task, copy.deepcopy(decomposed), zero)
    out["refit"].append(r)  # deterministic: one run
    log(f"  re-fit alone: {r['score']:.4f} ({r['refitted']}/{r['layers']} layers, {r['seconds']:.1f} s)")
    for seed in seeds:
        t = today(task, copy.deepcopy(decomposed), seconds, seed, zero)
        n = new(model, task, copy.deepcopy(decomposed), seconds, seed, zero, {})
        out["today"].append(t)
        out["new"].append(n)
        log(f"  seed {seed}: today {t['score']:.4f} ({t['steps']} steps, {t['seconds']:.0f} s); new {n['score']:.4f} "
            f"(re-fit {n['refit']:.4f} in {n['refit_seconds']:.0f} s, {n['steps']} steps, best at {n['best_step']}, "
            f"stopped by {n['stopped_by']}, {n['seconds']:.0f} s)")
    if ablation:
        for label, opts in ABLATIONS.items():
            a = new(model, task, copy.deepcopy(decomposed), seconds, seeds[0], zero, opts)
            out["ablation"][label] = a
            log(f"  ablation {label}: {a['score']:.4f} ({a['steps']} steps, {a['seconds']:.0f} s)")
    return out


# ---------------------------------------------------------------------- report
def _med(rows: list[dict], key: str = "score") -> float:
    return statistics.median(r[key] for r in rows)


def _spread(rows: list[dict], key: str = "score") -> float:
    xs = [r[key] for r in rows]
    return max(xs) - min(xs)


def _closed(score: float, zero: float) -> float:
    return (score - zero) / (1.0 - zero) if zero < 1.0 else float("nan")


def table(results: list[dict]) -> str:
    lines = [
        "| setting | original | zero-shot | re-fit alone | today's fine-tuning | new recovery | gap closed: today / new | time per plan |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        z, rf, td, nw = r["zero_shot"], r["refit"][0]["score"], _med(r["today"]), _med(r["new"])
        lines.append(
            f"| {r['setting']} ({r['flops_ratio']:.1%} FLOPs) | {r['original']:.4f} | {z:.4f} | {rf:.4f} "
            f"| {td:.4f} ± {_spread(r['today']):.4f} | **{nw:.4f}** ± {_spread(r['new']):.4f} "
            f"| {_closed(td, z):.0%} / **{_closed(nw, z):.0%}** | {r['time_per_plan_s']:.0f} s |"
        )
    abl = [r for r in results if r["ablation"]]
    if abl:
        lines += ["", "Ablation (seed {}; the defaults with one option changed; score, gap closed):".format(abl[0]["seeds"][0]), ""]
        labels = list(abl[0]["ablation"])
        lines.append("| setting | defaults | " + " | ".join(labels) + " |")
        lines.append("|---|---|" + "---|" * len(labels))
        for r in abl:
            z = r["zero_shot"]
            cells = [f"{a['score']:.4f} ({_closed(a['score'], z):.0%})" for a in r["ablation"].values()]
            d = r["new"][0]["score"]
            lines.append(f"| {r['setting']} | {d:.4f} ({_closed(d, z):.0%}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def floors(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        z, rf = r["zero_shot"], r["refit"][0]
        ok = rf["score"] > z
        out.append(f"{r['setting']}: re-fit alone {z:.4f} -> {rf['score']:.4f}: {'up' if ok else 'NOT up'}")
        if r["setting"] == "minilm-50":
            c = _closed(_med(r["new"]), z)
            out.append(f"{r['setting']}: new recovery closes {c:.0%} of the gap to 1.0 (floor 60%): {'met' if c >= 0.6 else 'NOT met'}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, a third of the time per plan, minilm-50 and digits-30")
    ap.add_argument("--settings", default=None, help=f"comma-separated, among {', '.join(SETTINGS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=None, help="multiply every setting's time per plan by this")
    ap.add_argument("--ablation", nargs="?", const="all", default="",
                    help="also the one-option-changed variants (first seed), for these settings (default: all run)")
    ap.add_argument("--out", default=str(RESULTS), help="output folder")
    ap.add_argument("--stem", default=None, help="file name of the results (default bench_recovery[_quick])")
    args = ap.parse_args(argv)
    names = args.settings.split(",") if args.settings else (["minilm-50", "digits-30"] if args.quick else list(SETTINGS))
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        ap.error(f"unknown setting(s) {unknown}; choose among {list(SETTINGS)}")
    seeds = list(range(1 if args.quick else args.seeds))
    scale = args.scale if args.scale is not None else (1 / 3 if args.quick else 1.0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"recovery options (defaults): {json.dumps(RecoveryOptions().to_dict())}")
    results = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        for name in names:
            ablate = args.ablation == "all" or name in args.ablation.split(",")
            results.append(run_setting(name, SETTINGS[name], seeds, scale, ablate, Path(tmp), log))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("bench_recovery_quick" if args.quick else "bench_recovery")
    load = os.getloadavg()
    meta = {"seconds": time.perf_counter() - t0, "loadavg": load, "threads": torch.get_num_threads(),
            "defaults": RecoveryOptions().to_dict()}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=float))
    md = table(results) + "\n\nFloors:\n" + "\n".join(f"- {f}" for f in floors(results)) + \
        f"\n\n(load average at the end {load[0]:.1f}, {meta['seconds'] / 60:.0f} min in all)\n"
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
