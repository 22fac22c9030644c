"""Compress a Hugging Face ``transformers`` model (BERT or GPT-2) with a label-free fidelity task.

What it shows
    - any Hugging Face model goes to ``autorank.search`` as a plain ``nn.Module``:
      a small wrapper, :class:`HFHiddenStates`, makes ``model(input_ids,
      attention_mask)`` return ``last_hidden_state`` (padding positions zeroed), so
      that tuple batches ``(input_ids, attention_mask)`` work everywhere (the task,
      calibration, FLOPs counting, export);
    - ``--arch bert``: a ``BertModel`` built from a ``BertConfig`` (2 layers, hidden
      128, 2 heads, FFN 512; random weights, no download), or pretrained weights with
      ``--model-name NAME`` (e.g. ``bert-base-uncased``; needs internet once);
    - ``--arch gpt2``: a ``GPT2Model`` from a ``GPT2Config`` (same sizes). GPT-2's
      projections are ``transformers.pytorch_utils.Conv1D`` (a Linear with a
      transposed weight); autorank decomposes them like Linear layers, and the
      example prints them among the decomposed layers;
    - a :class:`autorank.FidelityTask` with ``metric="cosine"``: per sequence, the
      cosine similarity between the compressed and the original model's hidden
      states (the original scores 1.0); fine-tuning distils from the original;
    - the ``transformer`` search space (``search_spaces/transformer.yaml``: the
      projections, with the methods listed there, ranks aligned to 8),
      the front, the decomposed layers of the best plan, and its export as ``.pt``,
      loaded back with ``autorank.load(path, model=...)``.

Inputs
    Token-id batches: the English sentences shipped with autorank, tokenized, when a
    tokenizer is at hand (``--model-name``'s own; for the random BERT, the offline
    MiniLM tokenizer, same uncased WordPiece vocabulary, if ``autorank[minilm]`` is
    installed); otherwise, and with ``--inputs random``, seeded random token ids.

    With random weights the scores say little about a real model (in the random
    BERT each freshly initialised layer adds little to the residual stream, so its
    hidden states barely move whatever is decomposed); the point here is the
    mechanics. Use ``--model-name`` for a real model.

Run
    python examples/huggingface_transformers.py --arch bert            # 30 trials (under a minute on 2 CPU cores)
    python examples/huggingface_transformers.py --arch gpt2
    python examples/huggingface_transformers.py --arch gpt2 --small    # tiny run for tests (about 20 s)
    # pretrained (downloads once; BERT-base's 72 projections take tens of minutes on a 2-core CPU):
    python examples/huggingface_transformers.py --arch bert --model-name bert-base-uncased --budget 60%flops

FLOPs count one multiply-add as one FLOP (fvcore's convention). The run directory
goes to ``--out`` (default ``runs/huggingface_<arch>``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import autorank


# ---------------------------------------------------------------------- the wrapper
class HFHiddenStates(nn.Module):
    """``forward(input_ids, attention_mask=None)`` -> ``last_hidden_state``, zero at padding positions.

    Hugging Face models take keyword arguments and return a ``ModelOutput``; this
    wrapper gives positional arguments and a plain tensor, which every part of
    autorank (tasks, FLOPs counting, ONNX/TorchScript export) accepts. The wrapped
    model is ``self.hf``, so its layers are named ``hf.<name>``.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return states * attention_mask.unsqueeze(-1).to(states.dtype)


def build_model(arch: str, model_name: Optional[str], seed: int) -> tuple[nn.Module, Any]:
    """``(HF model, tokenizer or None)``: pretrained from ``model_name``, else a small random one from a config."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if model_name:
        model = transformers.AutoModel.from_pretrained(model_name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_name)
        if tokenizer.pad_token is None:  # GPT-2 has none; any token works, the mask hides it
            tokenizer.pad_token = tokenizer.eos_token
        return model.eval(), tokenizer
    torch.manual_seed(seed)
    if arch == "bert":
        tokenizer = _minilm_tokenizer()
        config = transformers.BertConfig(
            vocab_size=tokenizer.vocab_size if tokenizer is not None else 30522, hidden_size=128, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=512, max_position_embeddings=128,
        )
        return transformers.BertModel(config, add_pooling_layer=False).eval(), tokenizer
    vocab = 4096  # random token ids only (GPT-2's BPE tokenizer is not available offline)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=128, n_layer=2, n_head=2,
                                     bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    return transformers.GPT2Model(config).eval(), None


def _minilm_tokenizer():
    try:
        from autorank.tasks.text import minilm_tokenizer

        return minilm_tokenizer()
    except autorank.AutorankError:
        return None


# ---------------------------------------------------------------------- inputs
def text_batches(tokenizer, sentences: list[str], batch_size: int, max_length: int = 48) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def random_batches(n_batches: int, batch_size: int, seq_len: int, vocab: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        mask = torch.ones_like(ids)
        lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=g)  # some padding, as in real batches
        mask[torch.arange(seq_len)[None, :] >= lengths[:, None]] = 0
        out.append((ids, mask))
    return out


def print_front(result) -> None:
    print(f"front ({len(result.front)} members; original: 100% FLOPs, cosine {result.base_score:.4f}; "
          "FLOPs count one multiply-add as one FLOP):")
    print(f"  {'trial':>5}  {'cosine':>7}  {'0-shot':>7}  {'tuned':>5}  {'FLOPs':>6}  {'params':>6}  plan")
    for m in result.front:
        print(f"  {m.trial:>5}  {m.score:7.4f}  {m.zero_shot_score:7.4f}  {'yes' if m.finetuned else 'no':>5}  "
              f"{m.flops_ratio:6.1%}  {m.params_ratio:6.1%}  {m.summary}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("bert", "gpt2"), default="bert", help="model family (default bert)")
    p.add_argument("--model-name", help="pretrained Hugging Face model to load instead (e.g. bert-base-uncased, gpt2)")
    p.add_argument("--inputs", choices=("auto", "text", "random"), default="auto",
                   help="tokenized sentences (text) or random token ids; auto: text when a tokenizer is available")
    p.add_argument("--budget", default="50%flops", help="hardware budget (default 50%%flops)")
    p.add_argument("--trials", type=int, default=30, help="zero-shot trials (default 30)")
    p.add_argument("--finetune", type=int, default=2, help="how many promising plans to fine-tune (default 2)")
    p.add_argument("--finetune-steps", type=int, default=50, help="distillation steps per plan (default 50)")
    p.add_argument("--out", type=Path, help="run directory (default runs/huggingface_<arch>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="tiny run for tests: 5 trials, 1 plan distilled for 5 steps, fewer inputs")
    args = p.parse_args(argv)
    out = args.out or Path(f"runs/huggingface_{args.arch}")
    n_train, n_held, batch_size, sensitivity_points = 160, 64, 16, 2
    if args.small:
        args.trials, args.finetune, args.finetune_steps = 5, 1, 5
        n_train, n_held = 48, 32

    t0 = time.perf_counter()
    hf, tokenizer = build_model(args.arch, args.model_name, args.seed)
    model = HFHiddenStates(hf).eval()
    use_text = args.inputs == "text" or (args.inputs == "auto" and tokenizer is not None)
    if use_text:
        if tokenizer is None:
            sys.exit(f"--inputs text: no tokenizer for --arch {args.arch} without --model-name; use --inputs random")
        from autorank.tasks.text import corpus_sentences

        sentences = corpus_sentences()[: n_train + n_held]
        train = text_batches(tokenizer, sentences[:n_train], batch_size)
        held = text_batches(tokenizer, sentences[n_train:], batch_size)
        what = f"{len(sentences)} tokenized sentences"
    else:
        vocab = hf.config.vocab_size
        train = random_batches(n_train // batch_size, batch_size, 32, vocab, args.seed)
        held = random_batches(n_held // batch_size, batch_size, 32, vocab, args.seed + 1)
        what = f"{n_train + n_held} random token-id sequences"
    print(f"{type(hf).__name__} ({sum(p.numel() for p in hf.parameters())} parameters"
          f"{', ' + args.model_name if args.model_name else ', random weights'}), inputs: {what}")

    task = autorank.FidelityTask(train, held_out=held, metric="cosine", lr=5e-4, name=f"{args.arch}-fidelity")
    result = autorank.search(
        model, task, budget=args.budget, space="transformer", trials=args.trials, out=out,
        finetune=args.finetune, finetune_steps=args.finetune_steps, seed=args.seed,
        sensitivity_points=sensitivity_points, measure_latency=False,
    )
    print(f"search: {len(result.trials)} trials in {time.perf_counter() - t0:.1f} s, run directory {result.run_dir}")
    print_front(result)

    best = result.pick("best")
    print(f"best: trial {best.trial}, cosine {best.score:.4f}, FLOPs {best.flops_ratio:.1%}, params {best.params_ratio:.1%}")
    modules = dict(model.named_modules())
    kinds = sorted({type(modules[n]).__name__ for n in best.plan.layers})
    print(f"decomposed layers of the best plan ({len(best.plan.layers)}, {' and '.join(kinds)}):")
    width = max((len(n) for n in best.plan.layers), default=0)
    for name, lp in best.plan.layers.items():
        print(f"  {name:{width}s}  {type(modules[name]).__name__:7s} {lp.method} rank {lp.rank}")

    # ---- export and load back (a script's wrapper class has no importable spec: pass the architecture)
    example = task.example_inputs()
    pt_path = Path(result.run_dir) / "best.pt"
    rep = result.export(best, pt_path, format="pt", force=True, example_inputs=example)
    loaded = autorank.load(pt_path, model=model)
    with torch.no_grad():
        same = torch.equal(loaded(*held[0]), result.build(best)(*held[0]))
    print(f"exported {rep.path} ({rep.bytes} bytes); loaded == front member: {same}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0 if same else 1


if __name__ == "__main__":
    logging.getLogger("transformers").setLevel(logging.ERROR)
    sys.exit(main())
