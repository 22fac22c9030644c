"""``autorank methods``, ``plan``, ``profile`` and ``decompose``: the library without the search."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autorank import methods
from autorank.candidates import candidate_layers
from autorank.cli.common import CLIError, check_output, get_console, human, ms, parse_rank, parse_shape
from autorank.cost.budget import check_reachable, parse_budget, smallest_reachable
from autorank.cost.flops import count_flops
from autorank.cost.latency import batch_inputs
from autorank.cost.latency_table import layer_signature, model_signature, with_batch
from autorank.cost.profile import profile_model
from autorank.errors import CalibrationError, PlanError
from autorank.fileio import atomic_write_text
from autorank.plan import Plan
from autorank.saving import save
from autorank.search.latency import LatencyTarget, profile_table
from autorank.search.space import SearchSpace
from autorank.specs import is_safe_spec
from autorank.surgery import decompose, resolve_plan
from autorank.zoo import example_input, load_model

__all__ = ["add_commands", "EPILOG_MAIN"]


EPILOG_MAIN = """examples:
  autorank search --budget 30%flops
  autorank front runs/demo-30flops
  autorank export runs/demo-30flops --pick best -o demo-small.pt
  autorank methods
  autorank plan --model demo
  autorank profile --model demo
  autorank profile --model demo --latency --threads 2
  autorank decompose --model demo --method tucker2 --rank 0.5 -o demo-small.pt
  autorank decompose --model mypkg.models:build --plan plan.json --input 1x3x224x224 -o small.pt
"""


def cmd_methods(args) -> int:
    rows = [methods.get(n).describe() for n in methods.available()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="autorank methods", show_lines=False)
    for col in ("method", "layers", "replacement", "rank (or ρ)", "data-aware", "reference"):
        table.add_column(col, overflow="fold")
    for r in rows:
        cells = (r["name"], ", ".join(r["layers"]), r["structure"], r["rank_format"], "yes" if r["data_aware"] else "no", r["reference"])
        table.add_row(*(escape(c) for c in cells))
    console = get_console()
    console.print(table)
    console.print("A rank is the method's own, or a float ρ in (0, 1]: keep about ρ of the layer's FLOPs "
                  "(fvcore's convention: one multiply-add = one FLOP). `--json` gives details and options.")
    return 0


def _load_model_and_input(args):
    model = load_model(args.model)
    shape = parse_shape(args.input) if getattr(args, "input", None) else None
    return model, example_input(args.model, shape)


def _load_calibration(path: str) -> torch.Tensor:
    p = Path(path)
    if not p.exists():
        raise CalibrationError(f"calibration file not found: {p}")
    try:
        if p.suffix == ".npy":
            return torch.from_numpy(np.load(p, allow_pickle=False))
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CalibrationError(f"cannot read calibration file {p}: {str(exc).splitlines()[0]}") from None
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return list(obj)
    raise CalibrationError(f"calibration file {p}: expected a tensor or a list of tensors, got {type(obj).__name__}")


def _fvcore_flops(model, x) -> Optional[int]:
    try:
        return count_flops(model, x)
    except Exception as exc:  # tracing can fail on exotic models: the summary then omits it
        logging.getLogger("autorank").debug("fvcore could not count FLOPs: %s", exc)
        return None


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _make_plan(args, model):
    if args.plan and args.method:
        raise CLIError("give either --plan FILE or --method/--rank, not both")
    if args.plan:
        return Plan.load(args.plan)
    if not args.method or args.rank is None:
        raise CLIError("give a plan: --plan plan.json, or --method NAME --rank R for every eligible layer")
    options = {"align": args.align} if getattr(args, "align", None) else None
    plan = Plan.uniform(model, args.method, parse_rank(args.rank), include=args.include, exclude=args.exclude, options=options)
    if not plan.layers:
        raise PlanError(f"no layer of model {args.model!r} can be decomposed with {args.method!r} (see `autorank plan --model {args.model}`)")
    return plan


def cmd_plan(args) -> int:
    """Write (or print) a uniform plan: a starting point to edit."""
    model, _ = _load_model_and_input(args)
    if args.method:
        plan = _make_plan(args, model)
    else:
        cands = candidate_layers(model)
        if not any(r is None for _, r in cands.values()):
            raise PlanError(f"model {args.model!r} has no layer autorank can decompose (Linear, Conv1D, Conv2d)")
        table = Table(title=f"decomposable layers of {args.model}")
        for col in ("layer", "type", "shape", "methods that apply", "excluded because"):
            table.add_column(col, overflow="fold")
        for name, (module, reason) in cands.items():
            ok = [n for n, why in methods.for_layer(module).items() if why is None] if reason is None else []
            spec = methods.layer_spec(module)
            table.add_row(name, type(module).__name__, spec.describe(), ", ".join(ok) or "-", reason or "")
        get_console().print(table)
        return 0
    text = plan.to_json() + "\n"
    if args.output:
        out = Path(args.output)
        check_output(out, args.force)
        atomic_write_text(out, text)
        get_console(stderr=True).print(f"wrote a plan of {len(plan)} layers to {out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_decompose(args) -> int:
    out = Path(args.output)
    check_output(out, args.force)
    model, x = _load_model_and_input(args)
    plan = _make_plan(args, model)
    calibration = _load_calibration(args.calibration) if args.calibration else None
    resolve_plan(model, plan)  # fail fast on a bad plan, before any work

    err = get_console(stderr=True)
    t0 = time.perf_counter()
    with Progress(TextColumn("decomposing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=err, transient=True, disable=args.quiet) as bar:
        task = bar.add_task("", total=len(plan))
        small = decompose(
            model, plan, calibration=calibration, example_inputs=x,
            progress=lambda done, total, name: bar.update(task, completed=done, description=name),
        )
    elapsed = time.perf_counter() - t0
    save(small, out, metadata={"command": "decompose", "plan_source": args.plan or f"uniform {args.method} {args.rank}"})

    summary = {"output": str(out), "layers": len(plan), "seconds": round(elapsed, 3),
               "params_before": _params(model), "params_after": _params(small)}
    if x is not None:
        model.eval(), small.eval()
        with torch.no_grad():
            y0, y1 = model(x), small(x)
        if isinstance(y0, torch.Tensor) and isinstance(y1, torch.Tensor):
            summary["relative_output_error"] = float((y1 - y0).norm() / y0.norm().clamp_min(1e-12))
        summary["flops_before"] = _fvcore_flops(model, x)
        summary["flops_after"] = _fvcore_flops(small, x)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    console = get_console()
    used = ", ".join(f"{n} x{c}" for n, c in plan.methods_used().items())
    console.print(f"decomposed {len(plan)} layers ({used}) in {elapsed:.2f}s -> [bold]{out}[/bold]")
    console.print(f"params: {human(summary['params_before'])} -> {human(summary['params_after'])} "
                  f"({100 * summary['params_after'] / max(1, summary['params_before']):.1f}%)")
    if summary.get("flops_before"):
        fb, fa = summary["flops_before"], summary["flops_after"]
        pct = f" ({100 * fa / fb:.1f}%)" if fa else ""
        console.print(f"FLOPs (fvcore, 1 multiply-add = 1 FLOP) on input {tuple(x.shape)}: {human(fb)} -> {human(fa)}{pct}")
    if "relative_output_error" in summary:
        console.print(f"relative output error on the example input: {summary['relative_output_error']:.4f}")
    if is_safe_spec(args.model):
        console.print(f"load it with: autorank.load({str(out)!r})")
    else:  # the file records your spec; loading rebuilds the architecture by running it, so that is an opt-in
        console.print(f"load it with: autorank.load({str(out)!r}, trust_spec=True) (its spec {args.model} runs your code)")
    return 0


def cmd_profile(args) -> int:
    """One row per candidate layer: shape, FLOPs, params, latency, methods and break-even ranks (FLOPs and latency)."""
    budget = parse_budget(args.budget) if args.budget else None
    model, x = _load_model_and_input(args)
    if x is None:
        raise CLIError(f"model {args.model!r} is not built in: give its input shape with --input, e.g. 1x3x224x224")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size {args.batch_size}: expected a positive integer")
    bs = args.batch_size or int(x.shape[0])
    xb = batch_inputs(x, bs)[0] if args.batch_size else x
    prof = profile_model(model, xb)
    if not any(lp.applicable() for lp in prof.layers.values()):
        raise PlanError(f"model {args.model!r} has no layer any method can decompose")
    err = get_console(stderr=True)
    table = None
    if not args.no_latency:
        target = LatencyTarget.make(args.device, bs, args.threads, model=model,
                                    memory_format="channels_last" if args.channels_last else "contiguous",
                                    rounds=5 if args.latency_rounds is None else args.latency_rounds)
        space = SearchSpace.load(args.space) if args.latency else None
        with _table_progress(err, args.json, f"measuring latency on {args.device}") as progress:
            table, base_prof, break_even = profile_table(model, x, target, space=space, progress=progress)
        base_batch = int(base_prof.input_shape[0])
        prof.latency = table.get_model(model_signature(base_prof, bs))
        for name, lp in prof.layers.items():
            if lp.input_shape:
                shape = with_batch(base_prof.layers[name].input_shape, bs, base_batch)
                lp.latency = table.get(layer_signature(lp.spec, shape, type_name=lp.type), shape)
            lp.latency_break_even = dict(break_even.get(name, {}))
    data = prof.to_dict()
    data["model"] = args.model
    if table is not None:
        data["device"], data["threads"] = table.device_name, table.threads
        data["latency_table"] = {"path": str(table.path), "entries": len(table), "new_measurements": table.measurements,
                                 "statistic": table.statistic, "memory_format": table.memory_format}
    if budget is not None:
        data["budget"] = {"text": budget.text(), "words": budget.describe(), "smallest_reachable": smallest_reachable(prof)}
        check_reachable(budget, prof, latency=prof.latency)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    table_ = Table(title=f"profile of {escape(args.model)} on input {tuple(xb.shape)}", show_lines=False)
    for col, just in (("layer", "left"), ("type", "left"), ("shape", "left"), ("FLOPs", "right"), ("params", "right"),
                      ("latency", "right"), ("methods (break-even rank)", "left")):
        table_.add_column(col, justify=just, overflow="fold")
    for lp in prof.layers.values():
        d = lp.to_dict()
        if lp.excluded:
            methods_text = f"excluded: {lp.excluded}"
        else:
            parts = []
            for m, info in d["methods"].items():
                if info["applies"]:
                    be = info["break_even_rank"]
                    text = f"≤{be}" if be is not None else "never cheaper"
                    if "latency_break_even_rank" in info:
                        lb = info["latency_break_even_rank"]
                        text += f"; latency ≤{lb}" if lb is not None else "; never faster"
                    text = f"{m} ({text})"
                    if info.get("refused_from_rank") is not None:  # e.g. CP-ALS too slow above a rank
                        text += f" [refused from rank {info['refused_from_rank']}: {info['refusal']}]"
                    parts.append(text)
            reasons = sorted({info["reason"] for info in d["methods"].values() if not info["applies"]})
            methods_text = ", ".join(parts) or ("none: " + "; ".join(reasons))
        table_.add_row(escape(lp.name), lp.type, lp.spec.describe(), human(lp.dense.flops), human(lp.dense.params),
                       ms(lp.latency), escape(methods_text))
    table_.add_section()
    table_.add_row("[bold]total (model)[/bold]", "", "", human(prof.flops), human(prof.params), ms(prof.latency), "")
    console = get_console()
    console.print(table_)
    console.print("FLOPs: fvcore convention, one multiply-add = one FLOP. Break-even rank: above it the "
                  "decomposition costs more FLOPs than the dense layer"
                  + ("; latency break-even: the largest measured rank faster than the dense layer on this device"
                     " (a search under a latency budget offers nothing above it)." if args.latency else "."))
    if table is not None:
        layout = ", channels-last" if table.memory_format == "channels_last" else ""
        console.print(f"latency: {table.statistic} of the timed samples on {escape(table.device_name)}, {table.threads} thread(s), "
                      f"batch {bs}{layout}; table {escape(str(table.path))} ({len(table)} entries, {table.measurements} measured now; "
                      "a search on the same target reads it)")
    if budget is not None:
        reach = data["budget"]["smallest_reachable"]
        console.print(f"budget {budget.text()}: {budget.describe()}; smallest reachable: "
                      f"{100 * reach['flops'] / prof.flops:.1f}% FLOPs, {100 * reach['params'] / prof.params:.1f}% params")
    return 0


@contextlib.contextmanager
def _table_progress(err, quiet: bool, text: str):
    """A progress bar for the latency table (nothing with --json)."""
    if quiet:
        yield None
        return
    with Progress(TextColumn(text), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task(text, total=1)

        def update(done, total, what):
            bar.update(task, completed=done, total=total)

        yield update


def add_commands(sub) -> None:
    """The library commands' parsers, added to ``sub`` (the ``autorank`` subparsers)."""
    m = sub.add_parser("methods", help="list the decomposition methods", epilog="examples:\n  autorank methods\n  autorank methods --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=cmd_methods)

    def model_args(sp):
        sp.add_argument("--model", default="demo", metavar="SPEC",
                        help="built-in name (demo, resnet50, bert-base), package.module:callable or file.py:callable (default: demo)")
        sp.add_argument("--input", metavar="SHAPE", help="example input shape, e.g. 1x3x224x224 (built-ins know theirs)")

    def plan_args(sp):
        sp.add_argument("--plan", metavar="FILE", help="plan JSON: {\"layers\": {name: {\"method\": ..., \"rank\": ...}}}")
        sp.add_argument("--method", help="one method for every eligible layer (see `autorank methods`)")
        sp.add_argument("--rank", help="with --method: int rank, 'r1,r2', or fraction of FLOPs kept in (0, 1], e.g. 0.5")
        sp.add_argument("--include", metavar="REGEX", help="with --method: only layers whose name matches")
        sp.add_argument("--exclude", metavar="REGEX", help="with --method: skip layers whose name matches")
        sp.add_argument("--align", type=int, metavar="N", help="with a fractional --rank: round ranks down to multiples of N (8 or 16 for GPUs)")

    pl = sub.add_parser("plan", help="list decomposable layers, or write a uniform plan to edit",
                        epilog="examples:\n  autorank plan --model demo\n  autorank plan --model demo --method svd --rank 0.5 -o plan.json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(pl)
    plan_args(pl)
    pl.add_argument("-o", "--output", metavar="FILE", help="write the plan here (default: print it)")
    pl.add_argument("--force", action="store_true", help="overwrite an existing output file")
    pl.set_defaults(func=cmd_plan)

    pr = sub.add_parser("profile", help="per-layer FLOPs, params, latency, applicable methods and break-even ranks",
                        epilog="examples:\n  autorank profile\n  autorank profile --model mymodel.py:build --input 1x3x224x224 --json\n"
                               "  autorank profile --model resnet50 --no-latency --budget 30%flops",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(pr)
    pr.add_argument("--device", default="cpu", help="where to measure latency: cpu, cuda, cuda:N (default cpu)")
    pr.add_argument("--batch-size", type=int, help="batch size for the measurement (default: the input's)")
    pr.add_argument("--threads", type=int, help="CPU threads during measurement (default: the machine's physical cores, as a search)")
    pr.add_argument("--channels-last", action="store_true",
                    help="measure with 4-D weights and inputs in channels-last (NHWC), as `autorank search --channels-last`")
    pr.add_argument("--latency", action="store_true",
                    help="also measure every replacement of the search space's grid and show each method's latency break-even "
                         "rank (the search reads the same table)")
    pr.add_argument("--space", default="default", metavar="NAME|FILE", help="with --latency: the search space (default: default)")
    pr.add_argument("--latency-rounds", type=int, metavar="N",
                    help="with --latency: interleaved rounds of the latency calibration (default 5), as `autorank search --latency-rounds`")
    pr.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    pr.add_argument("--budget", help="also check a budget, e.g. 30%%flops or flops<=1.2G,latency<=4ms")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.set_defaults(func=cmd_profile)

    d = sub.add_parser("decompose", help="decompose a model by a plan and save it",
                       epilog="examples:\n" + "\n".join(ln for ln in EPILOG_MAIN.splitlines() if "decompose" in ln) + "\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(d)
    plan_args(d)
    d.add_argument("--calibration", metavar="FILE", help="inputs (.pt tensor or list of tensors, or .npy) for data-aware initialisation")
    d.add_argument("-o", "--output", required=True, metavar="FILE", help="where to save the decomposed model (.pt)")
    d.add_argument("--force", action="store_true", help="overwrite an existing output file")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_decompose)
