"""``autorank search``, ``autorank front`` and ``autorank export``: the user's path from a model to a chosen file."""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from autorank.cli.common import CLIError, get_console, pct
from autorank.hf import is_hf_spec, with_dtype
from autorank.search.executor import RayExecutor
from autorank.search.latency import DRIFT_WARNING
from autorank.search.result import SearchResult
from autorank.search.rundir import RunDir, RunDirLockedError
from autorank.search.space import SearchSpace
from autorank.search.study import search
from autorank.zoo import load_model

__all__ = ["add_commands"]

SEARCH_EXAMPLES = """examples:
  autorank search --budget 30%flops                       # the built-in digits CNN, a few minutes on a CPU
  autorank search --model demo --budget 50%params --trials 80 --out runs/demo50
  autorank search --model minilm --budget 40%flops --space transformer
  autorank search --model mymodel.py:build --task mytask.py:make_task --budget latency<=4ms
  autorank search --model hf:path/to/llama --task perplexity:wiki.txt --budget 80%params --dtype bfloat16 --seq-len 256
  autorank search --budget 30%flops --address auto --workers 8 --gpus-per-trial 0.5   # on a Ray cluster
  autorank search --budget 50%latency --device cpu --threads 2                        # latency on this CPU, 2 threads
  autorank search --budget latency<=4ms --device cuda --batch-size 32 --address auto \
      --resources '{"accelerator_type:A100": 0.01}'        # latency table and front measured on an A100 node

The same command run again resumes the run directory (no finished trial is redone).
FLOPs follow fvcore's convention: one multiply-add = one FLOP."""

FRONT_EXAMPLES = """examples:
  autorank front runs/demo-30flops
  autorank front runs/demo-30flops --json"""

EXPORT_EXAMPLES = """examples:
  autorank export runs/demo-30flops --pick best -o demo.pt
  autorank export runs/demo-30flops --pick smallest --min-score 0.95 -o demo.onnx --format onnx
  autorank export runs/demo-30flops --trial 12 -o demo.ts --format torchscript --force
  autorank export runs/mine --pick best -o mine.pt --model mymodel.py:build   # the architecture, from you
  autorank export runs/mine --pick best -o mine.pt --trust-spec              # ...or from the run (runs its code)

A run directory's own module:callable / file.py:callable specs are code: they are
imported only with --trust-spec (built-in and hf: models need nothing)."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "", text.replace("%", "").replace("<=", "-").replace(",", "-")).strip("-.") or "run"


def default_out(model: str, budget: str) -> Path:
    from autorank.hf import is_hf_spec, parse_hf_spec

    if is_hf_spec(model):
        return Path("runs") / f"{_slug(parse_hf_spec(model).path.name)}-{_slug(budget)}"
    stem = Path(model.split(":")[0]).stem if (":" in model or model.endswith(".py")) else model
    return Path("runs") / f"{_slug(stem)}-{_slug(budget)}"


def _ms(s: Optional[float]) -> str:
    return "-" if not s else f"{s * 1e3:.3g} ms"


# ---------------------------------------------------------------------- search
class _Progress:
    """Rich progress: trials done/total, running, failed, elapsed, remaining, front size, best score."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.task = None
        self.phase = None

    def __enter__(self):
        if not self.quiet:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                console=get_console(stderr=True), transient=False)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, e: dict[str, Any]) -> None:
        if self.bar is None:
            return
        phase = e.get("phase")
        names = {"profile": "profiling", "latency": "latency table", "sensitivity": "layer sensitivity",
                 "trials": "trials", "finetune": "fine-tuning", "front": "measuring the front", "done": "done"}
        if phase != self.phase and phase in ("latency", "sensitivity", "trials", "finetune", "front"):
            self.phase = phase
            self.task = self.bar.add_task(names[phase], total=e.get("total") or 1, info="")
        if self.task is None or phase not in ("latency", "sensitivity", "trials", "finetune", "front"):
            return
        info = ""
        if phase == "trials":
            best = e.get("best_score")
            info = (f"running {e.get('running', 0)} · failed {e.get('failed', 0)} · front {e.get('front_size', 0)}"
                    + (f" · best {best:.4g}" if best is not None else ""))
        elif phase == "finetune" and e.get("trial") is not None:
            info = f"trial {e['trial']}"
        self.bar.update(self.task, completed=e.get("done", 0), total=e.get("total") or 1, info=info)


def _llm_args(args) -> None:
    """``--dtype`` into a ``hf:`` model spec, ``--seq-len`` into a ``perplexity:`` task spec, the ``llm`` space by default for ``hf:``."""
    hf = is_hf_spec(args.model)
    if args.dtype is not None:
        if not hf:
            raise CLIError(f"--dtype {args.dtype}: applies to Hugging Face models (--model hf:DIR), not {args.model!r}")
        args.model = with_dtype(args.model, args.dtype)
    if (args.task or "").startswith("perplexity:"):  # the file made absolute: workers may run elsewhere
        body, sep, query = args.task[len("perplexity:"):].partition("?")
        args.task = f"perplexity:{Path(body).expanduser().resolve()}{sep}{query}"
    if args.seq_len is not None:
        if args.seq_len < 2:
            raise CLIError(f"--seq-len {args.seq_len}: expected a number of tokens >= 2")
        if not (args.task or "").startswith("perplexity:"):
            raise CLIError(f"--seq-len {args.seq_len}: applies to the perplexity task (--task perplexity:FILE)")
        if "seq_len=" in args.task.rpartition("?")[2]:
            raise CLIError("--seq-len: the task spec already sets seq_len")
        args.task += ("&" if "?" in args.task else "?") + f"seq_len={args.seq_len}"
    if args.space is None:
        args.space = "llm" if hf else "default"


def cmd_search(args) -> int:
    _llm_args(args)
    out = Path(args.out) if args.out else default_out(args.model, args.budget)
    console = get_console()
    if not args.json:
        console.print(f"autorank search: model [bold]{args.model}[/], budget [bold]{args.budget}[/], "
                      f"{args.trials} trials, run directory [bold]{out}[/]"
                      + (" (resuming)" if (out / "settings.json").exists() else ""))
    executor = None
    if args.address or args.workers > 1 or args.gpus_per_trial or args.resources:
        executor = RayExecutor(address=args.address, workers=args.workers, cpus_per_trial=args.cpus_per_trial,
                               gpus_per_trial=args.gpus_per_trial, resources=_resources(args.resources))
    space = SearchSpace.load(args.space)
    if args.bn_between_factors:
        space.training["bn_between_factors"] = True
    if args.force_reg:
        space.training["force_regularization"] = {"steps": 50, "strength": 0.05}
    if args.fixed_point is not None:
        if args.fixed_point not in (4, 8):
            raise CLIError(f"--fixed-point {args.fixed_point}: expected 8 or 4 (bits)")
        space.training["fixed_point"] = args.fixed_point
    training = _training(args.training)
    if args.no_refit:
        training["refit"] = False
    if args.no_augment:
        training["augment"] = False
    t0 = time.perf_counter()
    with _Progress(args.quiet or args.json) as prog:
        result = search(
            args.model, args.task, budget=args.budget, space=space, trials=args.trials, out=out, seed=args.seed,
            sampler=args.sampler, finetune=args.finetune, finetune_steps=args.finetune_steps, finetune_time=args.finetune_time,
            training=training,
            warm_start=not args.no_warm_start, sensitivity_points=args.sensitivity_points, executor=executor, progress=prog,
            cache_dir=args.cache_dir, sensitivity_mode=args.sensitivity, device=args.device, batch_size=args.batch_size,
            threads=args.threads, align=_align(args.align), memory_format="channels_last" if args.channels_last else None,
            latency_rounds=args.latency_rounds,
        )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    _print_front(result, console)
    console.print(f"\n{len(result.trials)} trials in {time.perf_counter() - t0:.0f} s; "
                  f"wasted on infeasible or failed plans: {result.wasted_fraction:.0%}")
    console.print(f"run directory: {result.run_dir}")
    _print_plots(result.files, console)
    console.print(f"study: {RunDir(result.run_dir).dashboard_command()}")
    if result.front:
        console.print(f"export one: autorank export {result.run_dir} --pick best -o model.pt")
    return 0


def _print_plots(files, console) -> None:
    """Name the plots that were written (and only those: a plot that failed is not listed)."""
    plots = [str(p) for p in files if str(p).endswith((".png", ".html")) and Path(p).exists()]
    if plots:
        console.print("plot: " + " and ".join(plots))
    else:
        console.print("plot: none written (see the warning above)")


def _resources(text: Optional[str]) -> Optional[dict]:
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise CLIError(f"--resources {text!r}: expected a JSON object of numbers, e.g. '{{\"accelerator_type:A100\": 0.01}}'")
    return data


def _training(text: Optional[str]) -> dict:
    """``--training '{refit: false, distill: {features: 0}}'``: a YAML mapping laid over the space's training block."""
    if not text:
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CLIError(f"--training {text!r}: not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CLIError(f"--training {text!r}: expected a mapping such as '{{refit: false, finetune_time: 5m}}'")
    return data


def _tuned(m) -> str:
    """How a front member was recovered, in a few words: steps and seconds, or no."""
    if not m.finetuned:
        return "no"
    r = m.recovery or {}
    steps, secs = r.get("steps"), r.get("seconds")
    stages = [name for name, key in (("re-fit", "refit"), ("block-wise", "blockwise")) if (r.get(key) or {}).get("kept")]
    text = " + ".join(stages + ([] if steps is None else [f"{steps} steps"])) or "yes"
    if r.get("augmented_batches"):
        text += f" (+{r['augmented_batches']} augmented batches)"
    if secs is not None:
        text += f", {secs:.0f} s"
    if r.get("stopped_by") == "patience":
        text += ", stopped early"
    if r.get("kept_zero_shot"):
        text += " (zero-shot kept)"
    return text


def _is_perplexity(result) -> bool:
    """Whether the run's task scores −log perplexity (then the front also shows the perplexity, exp(−score))."""
    try:
        settings = json.loads((Path(result.run_dir) / "settings.json").read_text())
    except (OSError, ValueError):
        return False
    task = settings.get("task") if isinstance(settings, dict) else None
    return isinstance(task, dict) and task.get("metric") == "neg-log-perplexity"


def _align(text: Optional[str]):
    if text is None:
        return "auto"
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text in ("auto", "device", "none"):
        return text
    raise CLIError(f"--align {text!r}: expected auto, device, none or a multiple such as 8")


def _speedup(m) -> str:
    if not m.speedup:
        return "-"
    return f"{m.speedup:.2f}x" + (" [red]over budget[/]" if m.latency_breach else "")


def _print_front(result, console) -> None:
    base = result.base_score
    ppl = _is_perplexity(result)
    scored = f"base score {base:.4g}" + (f" = -log perplexity {math.exp(-base):.4g}" if ppl else "")
    t = Table(title=f"Pareto front — budget {result.budget} ({scored}; FLOPs: one multiply-add = one FLOP)")
    for col in ("trial", "methods", "score") + (("perplexity",) if ppl else ()) + ("FLOPs", "params", "latency", "speed-up",
                                                                                     "fine-tuned", "origin"):
        t.add_column(col, overflow="fold")
    for m in result.front:
        extra = (f"{math.exp(-m.score):.4g}",) if ppl else ()
        t.add_row(str(m.trial), m.summary, f"{m.score:.4g}", *extra, pct(m.flops_ratio), pct(m.params_ratio),
                  _ms(m.latency_measured_s), _speedup(m), _tuned(m), m.origin)
    console.print(t)
    lat = result.latency or {}
    if result.original_latency_s:
        where = lat.get("measured_on") or {}
        node = where.get("node_ip") or where.get("host")
        n = lat.get("threads_used") or lat.get("threads")
        threads = f"{n} thread{'' if n == 1 else 's'}" if n else "default threads"
        if lat.get("memory_format") == "channels_last":
            threads += ", channels-last"
        console.print(f"original model latency: {_ms(result.original_latency_s)}; every latency measured end to end, side by side, "
                      f"on {lat.get('device_name') or lat.get('device', '?')} ({lat.get('device', '?')}, batch {lat.get('batch_size', 1)}, "
                      f"{threads}{', node ' + str(node) if node else ''}; {lat.get('statistic', 'median')} of the timed samples); "
                      "speed-up = original / member, the median of the per-round ratios")
    drift = lat.get("drift")
    if drift is not None and abs(drift) > DRIFT_WARNING:
        console.print(f"[yellow]the original measured {abs(drift):.0%} {'slower' if drift > 0 else 'faster'} here than when the "
                      "latency estimate was calibrated: the machine's speed changed, and measured latencies may differ from the "
                      "estimates by as much[/]")
    share = lat.get("cpu_share")
    if share is not None and share < 0.8 and (lat.get("threads_used") or 1) > 1:
        console.print(f"[yellow]the machine was busy while measuring (a probe thread got {share:.0%} of a core): latencies "
                      f"with {lat.get('threads_used')} threads include waiting for cores; --threads 1 measures more steadily[/]")
    for o in result.over_budget:
        ratio = (f"{100 * o['latency_measured_s'] / o['original_latency_s']:.1f}% of the original's latency"
                 if o.get("latency_measured_s") and o.get("original_latency_s") else "over the budget")
        console.print(f"[yellow]trial {o['trial']} left the front: measured end to end at {ratio} "
                      f"(budget {result.budget}); the trials it had dominated were measured instead[/]")
    breaching = [m.trial for m in result.front if m.latency_breach]
    if breaching:
        console.print(f"[yellow]re-measured over the latency budget (never picked by --pick): trial(s) "
                      f"{', '.join(map(str, breaching))}[/]")


# ---------------------------------------------------------------------- front
def cmd_front(args) -> int:
    result = SearchResult.load(args.run)
    console = get_console()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_front(result, console)
    # redraw the plots only when no search holds the directory (that search writes them itself)
    lock = RunDir(result.run_dir).lock()
    try:
        lock.acquire(command="autorank front")
    except RunDirLockedError:
        if not args.json:
            console.print(f"a search is running in {result.run_dir}; it writes front.json and the plots itself")
        return 0
    try:
        files = result.write()
    finally:
        lock.release()
    if not args.json:
        _print_plots(files, console)
    return 0


# ---------------------------------------------------------------------- export
def _fraction(text: Optional[str], flag: str) -> Optional[float]:
    if text is None:
        return None
    t = text.strip().rstrip("%")
    try:
        v = float(t)
    except ValueError:
        raise CLIError(f"{flag} {text!r}: expected a percentage such as 30%") from None
    v = v / 100 if text.strip().endswith("%") or v > 1 else v
    if not 0 < v <= 1:
        raise CLIError(f"{flag} {text!r}: expected a percentage in (0, 100]")
    return v


def _seconds(text: Optional[str]) -> Optional[float]:
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9.]+)\s*(us|ms|s)\s*", text)
    if not m:
        raise CLIError(f"--max-latency {text!r}: expected a time such as 2ms, 500us or 0.01s")
    return float(m[1]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m[2]]


def cmd_export(args) -> int:
    if args.trial is None and args.pick is None:
        raise CLIError("choose a front member with --trial N or --pick smallest|best|knee")
    if args.pick is not None and args.pick not in ("smallest", "best", "knee"):
        raise CLIError(f"--pick {args.pick!r}: expected smallest, best or knee")
    target = Path(args.output)
    if target.exists() and not args.force:
        raise CLIError(f"{target} exists; pass --force to overwrite it")
    result = SearchResult.load(args.run, trust_spec=args.trust_spec)
    if args.model:
        result.model = load_model(args.model)  # the architecture from the command line: the user's own spec
    member = result.pick(args.pick, trial=args.trial, max_flops=_fraction(args.max_flops, "--max-flops"),
                         max_params=_fraction(args.max_params, "--max-params"),
                         max_latency=_seconds(args.max_latency), min_score=args.min_score)
    report = result.export(member, target, format=args.format, force=args.force)
    console = get_console()
    console.print(f"exported trial {member.trial} ({member.summary}; score {member.score:.4g}, "
                  f"FLOPs {pct(member.flops_ratio)}, params {pct(member.params_ratio)}) to {report.path} "
                  f"[{args.format}]; metadata in {report.sidecar}")
    if report.checked and report.max_abs_diff is not None:
        console.print(f"checked against PyTorch: max abs difference {report.max_abs_diff:.2e} (tolerance {report.tolerance})")
    if (result.latency or {}).get("memory_format") == "channels_last":
        console.print("its latency was measured in channels-last: serve it so, model.to(memory_format=torch.channels_last) "
                      "and inputs x.contiguous(memory_format=torch.channels_last)")
    return 0


# ---------------------------------------------------------------------- parser
def add_commands(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("search", help="search per-layer methods and ranks under a budget; returns a Pareto front",
                       epilog=SEARCH_EXAMPLES, formatter_class=fmt)
    s.add_argument("--model", default="demo", metavar="SPEC",
                   help="built-in (demo, minilm, resnet50, bert-base), package.module:callable, file.py:callable "
                        "or hf:DIR (a Hugging Face model saved in a local directory) (default: demo)")
    s.add_argument("--task", metavar="SPEC", help="how to score and fine-tune: demo, minilm, perplexity:FILE.txt (causal LMs), "
                                                  "package.module:callable or file.py:callable (default: the built-in model's own task)")
    s.add_argument("--budget", required=True, help="e.g. 30%%flops, 50%%params, flops<=1.2G, latency<=4ms (comma-separated: all hold)")
    s.add_argument("--space", metavar="NAME|FILE", help="search space: default, cnn, transformer, llm or a YAML file "
                                                      "(default: llm for hf: models, else default)")
    s.add_argument("--trials", type=int, default=40, help="zero-shot trials in total, warm-start plans included (default 40)")
    s.add_argument("--finetune", type=int, default=4, metavar="K", help="recover (re-fit, fine-tune) the K most promising plans (default 4; 0: none)")
    s.add_argument("--finetune-steps", type=int, metavar="N", help="optimizer steps per recovered plan (default: the space's "
                                                                   "training.finetune_steps, else the task's)")
    s.add_argument("--finetune-time", metavar="DURATION", help="wall time per recovered plan, e.g. 90s, 5m, 1h (re-fit and "
                                                               "block-wise included; with it alone, steps are unbounded)")
    s.add_argument("--training", metavar="YAML", help="recovery and training options laid over the space's training: block, "
                                                      "e.g. '{refit: false, distill: {features: 0, trainable: decomposed}, "
                                                      "early_stopping: {every: 25, patience: 5}}' (README, Recovery after compression)")
    s.add_argument("--no-refit", action="store_true", help="no closed-form re-fit of the decomposed layers before fine-tuning")
    s.add_argument("--no-augment", action="store_true",
                   help="recover on the task's own inputs only (no augmented ones, such as the minilm task's word replacement)")
    s.add_argument("--out", metavar="DIR", help="run directory (default runs/MODEL-BUDGET); an existing one is resumed")
    s.add_argument("--seed", type=int, default=0, help="the same seed gives the same plans (default 0)")
    s.add_argument("--sampler", default="tpe", choices=("tpe", "nsga2", "gp", "random"), help="Optuna sampler (default tpe)")
    s.add_argument("--no-warm-start", action="store_true", help="skip the sensitivity table and the baseline plans")
    s.add_argument("--sensitivity-points", type=int, default=4, metavar="N",
                   help="kept fractions probed per layer and method for the sensitivity table (default 4)")
    s.add_argument("--bn-between-factors", action="store_true",
                   help="fine-tune with batch norm between the factors, folded back before saving (Tai et al. 2015)")
    s.add_argument("--force-reg", action="store_true",
                   help="pull each planned layer toward its low-rank subspace before decomposing (Wen et al. 2017)")
    s.add_argument("--fixed-point", type=int, metavar="BITS", help="factors in fixed point (8), learned in fine-tuning, stored as int8")
    s.add_argument("--address", metavar="ADDR", help="Ray cluster to run trials on: auto, HOST:PORT (default: this process)")
    s.add_argument("--workers", type=int, default=1, help="concurrent trials (Ray workers; default 1)")
    s.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial on Ray (default 1)")
    s.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial on Ray, fractions allowed (default 0)")
    s.add_argument("--resources", metavar="JSON", help="custom Ray resources per trial, e.g. '{\"accelerator_type:A100\": 0.01}'")
    s.add_argument("--cache-dir", metavar="DIR", help="factor cache shared by the workers of a node (default RUN/factor-cache)")
    s.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="with --model hf:DIR: the dtype the model is loaded and searched in (default float32)")
    s.add_argument("--seq-len", type=int, metavar="N", help="with --task perplexity:FILE: tokens per window (default 128)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.add_argument("--sensitivity", default="auto", choices=("auto", "estimate", "full"),
                   help="layer sensitivity table: estimate (layer output errors from one pass over the calibration "
                        "batches, calibrated by a few evaluations), full (every probe evaluated) or auto (default: full "
                        "where its evaluations would take at most 30 s, else estimate)")
    s.add_argument("--device", metavar="DEV", help="where latency is measured (budget, table, front): cpu, cuda, cuda:N "
                                                   "(default: the task's device); on Ray, a node with it")
    s.add_argument("--batch-size", type=int, metavar="B", help="batch size of every latency measurement (default 1)")
    s.add_argument("--threads", type=int, metavar="T", help="CPU threads of every latency measurement (default: the target "
                                                            "machine's physical cores)")
    s.add_argument("--channels-last", action="store_true",
                   help="measure every latency with the models' 4-D weights and inputs in channels-last (NHWC), the layout "
                        "a CNN is fastest in on a CPU; deploy the picked model the same way")
    s.add_argument("--latency-rounds", type=int, metavar="N",
                   help="interleaved rounds of the latency calibration and of the front's re-measurement (default 5; "
                        "more: steadier estimates and speed-ups on a noisy machine, for proportionally more time)")
    s.add_argument("--align", metavar="MODE", help="rank alignment: auto (to the device's measured latency steps under a "
                                                   "latency budget; default), device (under any budget), none, or a multiple such as 8")
    s.set_defaults(func=cmd_search)

    f = sub.add_parser("front", help="show a run's Pareto front and write pareto.png / pareto.html", epilog=FRONT_EXAMPLES,
                       formatter_class=fmt)
    f.add_argument("run", metavar="RUN", help="run directory of `autorank search`")
    f.add_argument("--json", action="store_true", help="machine-readable output")
    f.set_defaults(func=cmd_front)

    e = sub.add_parser("export", help="write a chosen front member as .pt, ONNX or TorchScript", epilog=EXPORT_EXAMPLES,
                       formatter_class=fmt)
    e.add_argument("run", metavar="RUN", help="run directory of `autorank search`")
    e.add_argument("--trial", type=int, help="the front member with this trial number")
    e.add_argument("--pick", help="smallest, best or knee (among members meeting the --max/--min limits)")
    e.add_argument("--max-flops", metavar="PCT", help="at most this share of the original FLOPs, e.g. 30%%")
    e.add_argument("--max-params", metavar="PCT", help="at most this share of the original parameters")
    e.add_argument("--max-latency", metavar="TIME", help="measured latency at most, e.g. 2ms")
    e.add_argument("--min-score", type=float, help="score at least")
    e.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the model")
    e.add_argument("--format", default="pt", choices=("pt", "onnx", "torchscript"), help="file format (default pt)")
    e.add_argument("--force", action="store_true", help="overwrite an existing file")
    e.add_argument("--model", metavar="SPEC", help="rebuild the architecture from this spec (yours) instead of the run's")
    e.add_argument("--trust-spec", action="store_true",
                   help="allow the run's own module:callable / file.py:callable model and task specs to be imported "
                        "(they run code; like Hugging Face's trust_remote_code)")
    e.set_defaults(func=cmd_export)
