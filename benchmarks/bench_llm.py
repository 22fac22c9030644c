"""LLM-scale benchmark: per-layer search against SVD-LLM's uniform rule, and the memory of a trial.

Part 1 — ``minilm``: the pretrained all-MiniLM-L6-v2 (the only pretrained
transformer the package registries ship here), its cosine-fidelity task on the
repo's sentences. Budgets keep 80%, 60% and 40% of the parameters of the
decomposable projections (the 36 attention and FFN Linears; embeddings, which
are 53% of MiniLM's parameters, stay dense; for a LLaMA-7B the projections are
96% of the model, so there this equals the LLM papers' "20/40/60% compression").
Each budget is given to autorank as an absolute ``params<=N``. Side by side:

- uniform data-aware SVD, SVD-LLM's rule (Wang et al. 2024): every projection at
  the same kept fraction (rank = fraction of the layer's parameters), whitened by
  the calibration Gram matrix;
- autorank's per-layer search (svd or tensor train or dense per projection, the
  ``transformer`` space, ranks aligned to 8), ``--trials`` zero-shot trials, the
  best plan within budget.

Both zero-shot, then both distilled from the original with the same recipe
(``--steps`` optimizer steps of the task's fine-tuning, same seed).

Part 2 — ``memory``: a random-weight Llama-style model of about 1.1 B parameters
(TinyLlama's shape: hidden 2048, FFN 5632, 22 layers, 32 heads, 4 key/value
heads, vocabulary 32000; bfloat16) on the CPU with the perplexity task. For a
single-layer plan (what each probe of the sensitivity phase is) and a one-block
plan at 80%, cold (factorization computed) and warm (factors cached): the
trial's overhead = peak resident memory during ``TrialRunner.zero_shot`` minus
the resident memory just before it (the process holding the model, task and
statistics), against the model's bytes, and the time of the trial; shared trials
(autorank now) against trials that copy the model (``share=False``, as before).
The process runs with ``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc returns
freed blocks at once and the resident size follows what is alive.

Run: ``python benchmarks/bench_llm.py minilm`` / ``memory`` / ``all`` (``--quick``: smaller).
Results: ``benchmarks/results/bench_llm_*.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
CORPUS = ROOT / "autorank" / "tasks" / "data" / "sentences.txt"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:  # pragma: no cover
        return "?"


# ====================================================================== part 1: MiniLM
def minilm(trials: int, steps: int, fractions: list[float]) -> dict:
    from autorank.candidates import candidate_layers
    from autorank.cost.profile import profile_model
    from autorank.plan import Plan
    from autorank.search import SearchSpace, search
    from autorank.search.trial import TrialRunner
    from autorank.tasks import load_task
    from autorank.zoo import load_model

    model = load_model("minilm")
    task = load_task("minilm", "minilm")
    task.setup(model)
    space = SearchSpace.load("transformer")
    profile = profile_model(model, task.example_inputs())
    projections = list(space.choices(profile))
    cands = candidate_layers(model)
    proj_params = sum(sum(p.numel() for p in cands[n][0].parameters()) for n in projections)
    total = profile.params
    runner = TrialRunner(model, task, calibrate=projections, cache_dir=tempfile.mkdtemp(prefix="bench-llm-cache-"))
    base = runner.base_score()
    out = {"model": "minilm (all-MiniLM-L6-v2)", "task": "cosine fidelity, 128 held-out sentences", "params": total,
           "projection_params": proj_params, "projections": len(projections), "base_score": base, "trials": trials,
           "finetune_steps": steps, "rows": []}
    sens_file = None
    for frac in fractions:
        limit = int(total - proj_params + frac * proj_params)
        budget = f"params<={limit}"
        t0 = time.perf_counter()
        # uniform data-aware SVD (SVD-LLM's rule): the same kept fraction in every projection
        uniform = Plan.from_dict({"layers": {n: {"method": "svd", "rank": frac} for n in projections}})
        u_cost = profile.estimate(uniform)
        u_zs = runner.zero_shot(uniform.to_dict())
        u_ft = runner.finetune(uniform.to_dict(), steps, seed=0)
        # autorank's per-layer search under the same parameter count
        run = Path(tempfile.mkdtemp(prefix=f"bench-llm-minilm-{int(frac * 100)}-"))
        res = search(model, task, budget=budget, space=space, trials=trials, finetune=0, out=run, seed=0,
                     measure_latency=False, sensitivity=sens_file)
        sens_file = sens_file or (run / "sensitivity.json")
        feasible = [r for r in res.trials if r.get("state") == "COMPLETE" and r.get("feasible", True)]
        best = max(feasible, key=lambda r: r["score"])
        s_ft = runner.finetune(best["plan"], steps, seed=0)
        row = {
            "kept_projection_params": frac, "budget": budget, "budget_share_of_model": limit / total,
            "uniform_svd": {"params_ratio": u_cost.params / total, "zero_shot": u_zs["score"],
                            "distilled": u_ft.get("finetuned_score"), "error": u_zs.get("error") or u_ft.get("error")},
            "search": {"params_ratio": best["ratios"]["params"], "zero_shot": best["score"], "distilled": s_ft.get("finetuned_score"),
                       "plan": best["summary"], "origin": best.get("origin"), "error": s_ft.get("error")},
            "time_s": time.perf_counter() - t0,
        }
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    return out


def minilm_table(data: dict) -> str:
    lines = [f"MiniLM (22.7 M parameters, {data['projections']} projections = {data['projection_params'] / 1e6:.1f} M), "
             f"cosine fidelity (original 1.0), {data['trials']} trials, distillation {data['finetune_steps']} steps",
             "", "| projections kept | model params | uniform SVD zero-shot | search zero-shot | uniform SVD distilled | search distilled | search plan |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        u, s = r["uniform_svd"], r["search"]
        f = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        lines.append(f"| {100 * r['kept_projection_params']:.0f}% | {100 * r['budget_share_of_model']:.1f}% (uniform {100 * u['params_ratio']:.1f}%, "
                     f"search {100 * s['params_ratio']:.1f}%) | {f(u['zero_shot'])} | {f(s['zero_shot'])} | {f(u['distilled'])} | "
                     f"{f(s['distilled'])} | {s['plan']} |")
    return "\n".join(lines)


# ====================================================================== part 2: memory of a trial at 1 B
def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _tokenizer_dir() -> str:
    """A byte-level BPE (512 tokens) trained on the corpus, saved to a temporary directory (random weights need no more)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS.read_text()], trainer)
    d = tempfile.mkdtemp(prefix="bench-llm-tok-")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(d)
    return d


def memory(layers: int, hidden: int, ffn: int, heads: int, kv: int, vocab: int, seq_len: int) -> dict:
    import transformers

    from autorank.methods._layers import Decomposed
    from autorank.plan import Plan
    from autorank.search.trial import TrialRunner
    from autorank.tasks import PerplexityTask

    rss0 = _status("VmRSS")
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False,
                                   max_position_embeddings=2048)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = transformers.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    build_s = time.perf_counter() - t0
    task = PerplexityTask(CORPUS, _tokenizer_dir(), seq_len=seq_len, held_out=4, calibration=8, batch_size=4, device="cpu")
    mid = layers // 2
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    plans = {
        "one layer (a sensitivity probe): q_proj at rho 0.5": {f"model.layers.{mid}.self_attn.q_proj": {"method": "svd", "rank": 0.5}},
        "one block, 7 projections at rho 0.8": {f"model.layers.{mid}.{p}": {"method": "svd", "rank": 0.8} for p in projections},
    }
    calibrate = sorted({n for layers_ in plans.values() for n in layers_})
    t0 = time.perf_counter()
    task.setup(model)
    runner = TrialRunner(model, task, calibrate=calibrate, setup=False, cache_dir=tempfile.mkdtemp(prefix="bench-llm-mem-"))
    setup_s = time.perf_counter() - t0
    gc.collect()
    held = _status("VmRSS")
    out = {"config": {"layers": layers, "hidden": hidden, "ffn": ffn, "heads": heads, "kv_heads": kv, "vocab": vocab,
                      "dtype": "bfloat16", "seq_len": seq_len, "held_out_windows": 4},
           "params": n_params, "model_bytes": size, "rss_before_model": rss0, "rss_holding_model": held,
           "build_s": build_s, "setup_s": setup_s, "base_score": runner.base_score(), "trials": []}
    build = runner.build
    for share in (True, False):
        runner.build = lambda plan, share_=share, **_: build(plan, share=share_)
        for label, layers_ in plans.items():
            plan = {"layers": layers_}
            for attempt in ("cold", "warm"):
                if not share and attempt == "cold":
                    continue  # the factor cache is already warm: only the copy differs
                gc.collect()
                before = _status("VmRSS")
                Path("/proc/self/clear_refs").write_text("5")
                t = time.perf_counter()
                res = runner.zero_shot(plan)
                elapsed = time.perf_counter() - t
                peak = _status("VmHWM")
                built = build(Plan.from_dict(plan), share=True)
                factors = sum(p.numel() * p.element_size() for m in built.modules() if isinstance(m, Decomposed) for p in m.parameters())
                del built
                row = {"plan": label, "share": share, "cache": attempt, "overhead_bytes": peak - before, "factor_bytes": factors,
                       "peak_bytes": peak, "overhead_x_model": (peak - before) / size, "peak_above_start_x_model": (peak - rss0) / size,
                       "time_s": elapsed, "time_decompose_s": res.get("time_decompose_s"), "time_evaluate_s": res.get("time_evaluate_s"),
                       "score": res.get("score"), "error": res.get("error")}
                out["trials"].append(row)
                print(json.dumps(row), flush=True)
    runner.build = build
    return out


def memory_table(data: dict) -> str:
    c = data["config"]
    gib = 2 ** 30
    lines = [f"Llama-style, random weights, {data['params'] / 1e9:.2f} B parameters ({c['layers']} layers, hidden {c['hidden']}, "
             f"FFN {c['ffn']}, {c['heads']} heads / {c['kv_heads']} KV heads, vocabulary {c['vocab']}), {c['dtype']}: "
             f"{data['model_bytes'] / gib:.2f} GiB; CPU; perplexity on {c['held_out_windows']} windows of {c['seq_len']} tokens",
             "", "| plan | trial | factor cache | overhead (peak − before) | of which new factors | overhead / model | time (decompose + evaluate) |",
             "|---|---|---|---|---|---|---|"]
    for t in data["trials"]:
        lines.append(f"| {t['plan']} | {'shared' if t['share'] else 'copy'} | {t['cache']} | {t['overhead_bytes'] / gib:.3f} GiB | "
                     f"{t['factor_bytes'] / gib:.3f} GiB | {t['overhead_x_model']:.3f}x | {t['time_s']:.1f} s "
                     f"({t['time_decompose_s'] or 0:.1f} + {t['time_evaluate_s'] or 0:.1f}) |")
    lines.append("")
    lines.append(f"process resident size holding the model, task and statistics: {(data['rss_holding_model'] - data['rss_before_model']) / gib:.2f} GiB "
                 f"above the interpreter with its imports ({(data['rss_holding_model'] - data['rss_before_model']) / data['model_bytes']:.2f}x the model)")
    return "\n".join(lines)


# ====================================================================== main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("minilm", "memory", "all"))
    ap.add_argument("--quick", action="store_true", help="smaller: fewer trials and steps, a 4-layer model")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    if args.part in ("memory", "all") and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # re-run with glibc told to give large blocks back at once (the resident size then follows live memory)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        return subprocess.call([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env)
    load_before = _uptime()
    if args.part in ("minilm", "all"):
        data = minilm(10 if args.quick else args.trials, 10 if args.quick else args.steps, [0.8, 0.6, 0.4])
        data["uptime_before"], data["uptime_after"] = load_before, _uptime()
        (RESULTS / f"bench_llm_minilm{suffix}.json").write_text(json.dumps(data, indent=2))
        table = minilm_table(data) + f"\n\nmachine load: before {data['uptime_before']}; after {data['uptime_after']}\n"
        (RESULTS / f"bench_llm_minilm{suffix}.md").write_text(table)
        print(table)
    if args.part in ("memory", "all"):
        shape = dict(layers=4, hidden=1024, ffn=2816, heads=16, kv=4, vocab=32000, seq_len=128) if args.quick else \
            dict(layers=22, hidden=2048, ffn=5632, heads=32, kv=4, vocab=32000, seq_len=128)
        data = memory(**shape)
        data["uptime_before"], data["uptime_after"] = load_before, _uptime()
        (RESULTS / f"bench_llm_memory{suffix}.json").write_text(json.dumps(data, indent=2))
        table = memory_table(data) + f"\n\nmachine load: before {data['uptime_before']}; after {data['uptime_after']}\n"
        (RESULTS / f"bench_llm_memory{suffix}.md").write_text(table)
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
