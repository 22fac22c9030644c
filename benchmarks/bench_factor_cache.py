"""Benchmark of the factor cache: factorize once, then build whole plans at new ranks.

For the built-in ResNet-50-shaped and BERT-base-shaped models (random weights,
``autorank.zoo``) and every method that applies to some of their layers:

- **cold**: ``autorank.decompose(model, plan_A)`` with no factorization of that
  method in the cache: every eligible layer is factorized once, at a random
  per-layer kept fraction ρ (rank vector A);
- **warm**: with the same cache, ``decompose`` at new random rank vectors
  (a new ρ per layer each repeat, drawn from [0.1, 0.9], seeded); every layer
  is then a slice of a cached factorization. Median over repeats;
- **ratio** cold / median warm;
- **mixed** (ResNet-50): the whole-model plan a search trial would propose,
  every eligible layer randomly assigned among svd / spatial-svd / tucker2
  (where applicable) at a random ρ; a new assignment and ρ vector each repeat,
  built from the warm cache. Its "cold" is estimated as the sum of the per-layer
  cold times (measured during the cold runs) of the (layer, method) pairs it uses.

Floors (from the issue): warm at least 50x faster than cold; a new rank vector
for ResNet-50 with the SVD family + Tucker-2 (the mixed plan) under 1 s on 2
CPU cores. They are printed as PASS/FAIL; the exit code is 0 either way
(benchmarks report, tests check).

``cp`` is not nested: it is cached per rank, so a new rank vector is a new
CP-ALS run for every layer. Its "warm" case is the *same* rank vector again
(cache hits only). CP-ALS on ResNet-50 takes minutes per layer on 2 cores, so it
runs only when ``--methods`` names it, and then on the first ``--cp-layers``
3x3 convolutions only.

Ranks are fractions ρ resolved on each method's nominal input shape (no
example inputs, so no forward pass in the timings). All timings are wall-clock
(``time.perf_counter``), ``torch.set_num_threads(--threads)``, garbage collected
before each timed call. The machine load average is recorded because shared
machines make CPU timings noisy.

Usage::

    python benchmarks/bench_factor_cache.py [--quick] [--json out.json]
        [--methods svd,spatial-svd,tucker2,cp] [--repeats N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import logging
import os
import platform
import pstats
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

import autorank
from autorank import FactorCache, LayerPlan, Plan
from autorank import methods as registry

MODELS = ("resnet50", "bert-base")
DEFAULT_METHODS = ("svd", "spatial-svd", "tucker2")
MIXED_FAMILY = ("svd", "spatial-svd", "tucker2")
RHO_RANGE = (0.1, 0.9)
RATIO_FLOOR = 50.0
MIXED_FLOOR_S = 1.0

#: --quick: only these layers (qualified-name regex) are decomposed; the models keep their full shape
QUICK_INCLUDE = {
    "resnet50": r"^(conv1|layer1\.\d+\.conv\d|layer1\.0\.downsample\.0)$",
    "bert-base": r"^layers\.0\.",
}


# ---------------------------------------------------------------------- records
@dataclass
class Row:
    model: str
    method: str
    layers: int
    cold_s: float
    warm_s: list[float]
    warm_case: str  # "new rank vectors" or "same rank vector"
    cold_misses: int
    warm_misses: int
    note: str = ""
    slowest_layers: list[tuple[str, float]] = field(default_factory=list)

    @property
    def warm_median(self) -> float:
        return statistics.median(self.warm_s)

    @property
    def ratio(self) -> float:
        return self.cold_s / self.warm_median if self.warm_median > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["warm_median_s"] = self.warm_median
        d["ratio"] = self.ratio
        return d


@dataclass
class Mixed:
    model: str
    layers: int
    methods: dict[str, int]
    warm_s: list[float]
    cold_est_s: float
    warm_misses: int
    note: str = ""

    @property
    def warm_median(self) -> float:
        return statistics.median(self.warm_s)

    @property
    def ratio(self) -> float:
        return self.cold_est_s / self.warm_median if self.warm_median > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["warm_median_s"] = self.warm_median
        d["ratio_est"] = self.ratio
        return d


@dataclass
class Floor:
    name: str
    value: float
    threshold: float
    unit: str
    passed: bool
    note: str = ""


# ---------------------------------------------------------------------- helpers
def log(console, msg: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}")


def eligible(model: torch.nn.Module, method: str, include: Optional[str]) -> list[str]:
    """Qualified names of the layers ``method`` applies to (Plan.uniform's choice)."""
    return list(Plan.uniform(model, method, 0.5, include=include).layers)


def random_plan(names: list[str], method: str, rng: random.Random) -> Plan:
    return Plan({n: LayerPlan(method, rng.uniform(*RHO_RANGE)) for n in names})


def timed_decompose(model, plan: Plan, cache: FactorCache, per_layer: Optional[dict] = None) -> tuple[float, int, int]:
    """Seconds for one ``decompose``, and the cache hits and misses it caused."""
    before = cache.stats()
    marks: list[tuple[str, float]] = []

    def progress(done: int, total: int, name: str) -> None:
        marks.append((name, time.perf_counter()))

    gc.collect()
    t0 = time.perf_counter()
    out = autorank.decompose(model, plan, cache=cache, progress=progress if per_layer is not None else None)
    elapsed = time.perf_counter() - t0
    del out
    after = cache.stats()
    if per_layer is not None:
        prev = t0
        for name, t in marks:
            per_layer[name] = t - prev
            prev = t
    return elapsed, after["hits"] - before["hits"], after["misses"] - before["misses"]


def first_3x3_convs(model: torch.nn.Module, names: list[str], n: int) -> list[str]:
    out = []
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) == (3, 3):
            out.append(name)
        if len(out) == n:
            break
    return out


# ---------------------------------------------------------------------- the benchmark
def bench_method(
    console, model, model_name: str, method: str, names: list[str], cache: FactorCache,
    repeats: int, seed: int, per_layer: dict, note: str,
) -> Row:
    m = registry.get(method)
    nested = bool(m.is_nested(None)) if callable(getattr(m, "is_nested", None)) else bool(m.nested)
    rng = random.Random(f"{seed}:{model_name}:{method}:A")
    plan_a = random_plan(names, method, rng)
    log(console, f"{model_name} / {method}: cold, factorizing {len(names)} layers ...")
    layer_times: dict[str, float] = {}
    cold, _, cold_misses = timed_decompose(model, plan_a, cache, layer_times)
    for name, t in layer_times.items():
        per_layer[(name, method)] = t
    log(console, f"{model_name} / {method}: cold {cold:.2f} s ({cold_misses} factorizations)")
    warm: list[float] = []
    warm_misses = 0
    for i in range(repeats):
        if nested:
            plan = random_plan(names, method, random.Random(f"{seed}:{model_name}:{method}:{i}"))
        else:
            plan = plan_a  # cached per rank: only the same rank vector is a cache hit
        t, _, misses = timed_decompose(model, plan, cache)
        warm.append(t)
        warm_misses += misses
    case = "new rank vectors" if nested else "same rank vector"
    if not nested:
        note = (note + "; " if note else "") + "not nested (cached per rank): warm = same rank vector again"
    if warm_misses:
        note = (note + "; " if note else "") + f"warm builds missed the cache {warm_misses} times (factorized again)"
    slow = sorted(layer_times.items(), key=lambda kv: -kv[1])[:3]
    row = Row(model_name, method, len(names), cold, warm, case, cold_misses, warm_misses, note, slow)
    log(console, f"{model_name} / {method}: warm median {row.warm_median:.3f} s, cold/warm {row.ratio:.0f}x")
    return row


def bench_mixed(
    console, model, model_name: str, names_by_method: dict[str, list[str]], cache: FactorCache,
    repeats: int, seed: int, per_layer: dict, note: str, profile: bool,
) -> tuple[Mixed, Optional[str]]:
    options: dict[str, list[str]] = {}
    for method in MIXED_FAMILY:
        for name in names_by_method[method]:
            options.setdefault(name, []).append(method)
    order = list(options)
    warm: list[float] = []
    misses_total = 0
    cold_est: list[float] = []
    counts: dict[str, int] = {}
    plans = []
    for i in range(repeats):
        rng = random.Random(f"{seed}:{model_name}:mixed:{i}")
        layers = {}
        for name in order:
            method = rng.choice(options[name])
            layers[name] = LayerPlan(method, rng.uniform(*RHO_RANGE))
        plans.append(Plan(layers))
    log(console, f"{model_name} / mixed: {len(order)} layers, {repeats} new method+rank vectors from the warm cache ...")
    for plan in plans:
        t, _, misses = timed_decompose(model, plan, cache)
        warm.append(t)
        misses_total += misses
        cold_est.append(sum(per_layer[(n, lp.method)] for n, lp in plan.layers.items()))
        for lp in plan.layers.values():
            counts[lp.method] = counts.get(lp.method, 0) + 1
    counts = {k: round(v / repeats, 1) for k, v in sorted(counts.items())}
    if misses_total:
        note = (note + "; " if note else "") + f"missed the cache {misses_total} times"
    mixed = Mixed(model_name, len(order), counts, warm, statistics.median(cold_est), misses_total, note)
    log(console, f"{model_name} / mixed: warm median {mixed.warm_median:.3f} s")
    report = None
    if profile:
        prof = cProfile.Profile()
        gc.collect()
        prof.enable()
        autorank.decompose(model, plans[0], cache=cache)
        prof.disable()
        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf)
        st.sort_stats("cumulative").print_stats(30)
        st.sort_stats("tottime").print_stats(20)
        report = buf.getvalue()
    return mixed, report


def run(args) -> dict[str, Any]:
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    torch.set_num_threads(args.threads)
    logging.getLogger("autorank").setLevel(logging.WARNING)

    methods = [registry.normalize_name(m) for m in args.methods.split(",") if m.strip()]
    known = registry.available()
    for m in methods:
        registry.get(m)  # UnknownMethodError names the known ones
    methods = [registry.get(m).name for m in methods]
    skipped: list[str] = []
    if "cp" in known and "cp" not in methods:
        skipped.append("cp: skipped (not nested, CP-ALS takes minutes per ResNet-50 layer); add it with --methods ...,cp")
    notices: list[str] = []
    if args.quick:
        for model_name, rx in QUICK_INCLUDE.items():
            notices.append(f"--quick: {model_name} keeps its full architecture but only layers matching {rx!r} are decomposed")

    rows: list[Row] = []
    mixed_rows: list[Mixed] = []
    profiles: dict[str, str] = {}
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    for model_name in args.models.split(","):
        model_name = model_name.strip()
        model = autorank.load_model(model_name)
        model.eval()
        include = QUICK_INCLUDE.get(model_name) if args.quick else None
        cache = FactorCache()  # one per model; keys name the method, so each method's cold run misses on every layer
        per_layer: dict[tuple[str, str], float] = {}
        names_by_method: dict[str, list[str]] = {}
        for method in methods:
            names = eligible(model, method, include)
            note = ""
            if not names:
                skipped.append(f"{model_name} / {method}: applies to no layer of this model")
                continue
            if method == "cp":
                total = len(names)
                names = first_3x3_convs(model, names, args.cp_layers)
                if not names:
                    skipped.append(f"{model_name} / cp: no 3x3 convolution among its {total} eligible layers")
                    continue
                note = f"first {len(names)} of {total} eligible layers (3x3 convs: {', '.join(names)})"
            if include is not None:
                note = (note + "; " if note else "") + "quick subset"
            names_by_method[method] = names
            rows.append(bench_method(console, model, model_name, method, names, cache, args.repeats, args.seed, per_layer, note))
        if all(m in names_by_method for m in MIXED_FAMILY):
            note = "quick subset" if include is not None else ""
            mixed, prof = bench_mixed(
                console, model, model_name, names_by_method, cache, args.repeats, args.seed, per_layer, note, args.profile
            )
            mixed_rows.append(mixed)
            if prof:
                profiles[model_name] = prof
        elif model_name == "resnet50":
            skipped.append("resnet50 / mixed: needs svd, spatial-svd and tucker2 in --methods")
        del model, cache
        gc.collect()
    total_s = time.perf_counter() - t_start

    floors: list[Floor] = []
    for r in rows:
        floors.append(Floor(
            f"{r.model} / {r.method}: warm build >= {RATIO_FLOOR:.0f}x faster than factorizing afresh",
            r.ratio, RATIO_FLOOR, "x", r.ratio >= RATIO_FLOOR,
            r.note if "warm =" in r.note else "; ".join(x for x in (r.note, f"warm = {r.warm_case}") if x),
        ))
    for m in mixed_rows:
        floors.append(Floor(
            f"{m.model} / mixed svd+spatial-svd+tucker2: warm build >= {RATIO_FLOOR:.0f}x faster than factorizing afresh",
            m.ratio, RATIO_FLOOR, "x", m.ratio >= RATIO_FLOOR, "cold estimated from per-layer cold times",
        ))
        if m.model == "resnet50":
            floors.append(Floor(
                f"resnet50 / mixed svd+spatial-svd+tucker2: new rank vector < {MIXED_FLOOR_S:g} s on {args.threads} threads",
                m.warm_median, MIXED_FLOOR_S, "s", m.warm_median < MIXED_FLOOR_S,
                "quick subset of layers: indicative only" if m.note else "",
            ))

    return {
        "meta": {
            "torch": torch.__version__,
            "autorank": autorank.__version__,
            "python": platform.python_version(),
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "quick": args.quick,
            "repeats": args.repeats,
            "seed": args.seed,
            "rho_range": list(RHO_RANGE),
            "methods": methods,
            "loadavg_start": list(load_start),
            "loadavg_end": list(os.getloadavg()),
            "total_s": total_s,
            "notices": notices,
        },
        "rows": rows,
        "mixed": mixed_rows,
        "floors": floors,
        "skipped": skipped,
        "profiles": profiles,
    }


# ---------------------------------------------------------------------- output
def _fmt_s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def print_report(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=max(160, Console().width))
    meta = res["meta"]
    table = Table(title="Factor cache: cold factorization vs warm whole-plan build")
    for col, just in [
        ("model", "left"), ("method", "left"), ("layers", "right"), ("cold (s)", "right"),
        ("warm median (s)", "right"), ("warm min–max (s)", "right"), ("cold / warm", "right"),
        ("warm case", "left"), ("note", "left"),
    ]:
        table.add_column(col, justify=just)
    for r in res["rows"]:
        table.add_row(
            r.model, r.method, str(r.layers), _fmt_s(r.cold_s), f"{r.warm_median:.3f}",
            f"{min(r.warm_s):.3f}–{max(r.warm_s):.3f}", f"{r.ratio:,.0f}×", r.warm_case, r.note,
        )
    for m in res["mixed"]:
        table.add_row(
            m.model, "mixed*", str(m.layers), f"~{_fmt_s(m.cold_est_s)}", f"{m.warm_median:.3f}",
            f"{min(m.warm_s):.3f}–{max(m.warm_s):.3f}", f"~{m.ratio:,.0f}×", "new methods + ranks", m.note,
        )
    console.print(table)
    for m in res["mixed"]:
        mix = ", ".join(f"{k} {v:g}" for k, v in m.methods.items())
        console.print(
            f"* {m.model} mixed: every eligible layer gets a random method among svd / spatial-svd / tucker2 "
            f"(where applicable) and a random ρ, new each repeat (layers per method, average: {mix}); "
            "its cold time is the sum of the per-layer cold times of the (layer, method) pairs used."
        )
    la0, la1 = meta["loadavg_start"], meta["loadavg_end"]
    console.print(
        f"torch {meta['torch']}, {meta['threads']} threads, {meta['cpu_count']} CPUs, repeats {meta['repeats']}, "
        f"seed {meta['seed']}, ρ ~ U{tuple(meta['rho_range'])} per layer; "
        f"load average {la0[0]:.1f} at start, {la1[0]:.1f} at end; total {meta['total_s']:.0f} s"
    )
    busy = max(la0[0], la1[0])
    if busy > 0.5 * (meta["cpu_count"] or 1):
        console.print(
            f"[yellow]the machine was busy (load average up to {busy:.1f} on {meta['cpu_count']} CPUs): other processes "
            "competed for the cores, so these timings are pessimistic and noisy; rerun on an idle machine[/yellow]"
        )
    for n in meta["notices"]:
        console.print(f"[yellow]{n}[/yellow]")
    for s in res["skipped"]:
        console.print(f"[dim]{s}[/dim]")
    slow = [(r.model, r.method, r.slowest_layers) for r in res["rows"] if r.slowest_layers]
    if slow:
        console.print("slowest layers to factorize (cold, s):")
        for model, method, layers in slow:
            console.print(f"  {model} / {method}: " + ", ".join(f"{n} {t:.2f}" for n, t in layers))
    console.print()
    if meta["quick"]:
        console.print("[yellow]--quick: floors are shown for information only (a subset of layers, while the "
                      "warm build still copies the whole model), not checked[/yellow]")
    for f in res["floors"]:
        verdict = "PASS" if f.passed else "FAIL"
        if meta["quick"]:
            tag = f"INFO (would {verdict})"
        else:
            tag = "[green]PASS[/green]" if f.passed else "[red]FAIL[/red]"
        val = f"{f.value:,.0f}×" if f.unit == "x" else f"{f.value:.3f} s"
        extra = f" ({f.note})" if f.note else ""
        console.print(f"{tag} {f.name}: {val}{extra}")
    for model, text in res["profiles"].items():
        console.print(f"\n[bold]cProfile of one warm mixed build on {model}[/bold]")
        console.print(text, markup=False)


def markdown_table(res: dict[str, Any]) -> str:
    """The results table in GitHub markdown (for the README)."""
    lines = [
        "| model | method | layers | cold (s) | warm median (s) | warm min–max (s) | cold / warm | warm case |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        case = r.warm_case + (f" ({r.note})" if r.note else "")
        lines.append(
            f"| {r.model} | {r.method} | {r.layers} | {_fmt_s(r.cold_s)} | {r.warm_median:.3f} | "
            f"{min(r.warm_s):.3f}–{max(r.warm_s):.3f} | {r.ratio:,.0f}× | {case} |"
        )
    for m in res["mixed"]:
        case = "new methods + ranks" + (f" ({m.note})" if m.note else "")
        lines.append(
            f"| {m.model} | mixed svd/spatial-svd/tucker2 | {m.layers} | ~{_fmt_s(m.cold_est_s)} | {m.warm_median:.3f} | "
            f"{min(m.warm_s):.3f}–{max(m.warm_s):.3f} | ~{m.ratio:,.0f}× | {case} |"
        )
    return "\n".join(lines)


def to_json(res: dict[str, Any]) -> dict[str, Any]:
    return {
        "meta": res["meta"],
        "rows": [r.to_json() for r in res["rows"]],
        "mixed": [m.to_json() for m in res["mixed"]],
        "floors": [asdict(f) for f in res["floors"]],
        "skipped": res["skipped"],
    }


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="decompose a subset of layers of each model (under a minute); fewer repeats")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods (default: %(default)s; add cp explicitly)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated built-in models (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None, help="warm builds per case (default 5, 3 with --quick)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cp-layers", type=int, default=1, help="cp: benchmark only the first N 3x3 convs (default: %(default)s)")
    p.add_argument("--profile", action="store_true", help="cProfile one warm mixed build and print the hot spots")
    p.add_argument("--markdown", action="store_true", help="also print the table in GitHub markdown")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    res = run(args)
    print_report(res)
    if args.markdown:
        print()
        print(markdown_table(res))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(to_json(res), fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
