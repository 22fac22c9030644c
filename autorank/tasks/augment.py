"""More distillation inputs from a few: token replacement for label-free text tasks.

A fidelity task distils the original model into the compressed one on the user's own
inputs only, and a few hundred sentences are not enough: on the pretrained MiniLM at
50% of the FLOPs, the recovery fits its 278 distillation sentences to a cosine of 0.98
but reaches 0.91 on held-out ones, and the same recovery trained on the held-out
sentences themselves reaches 0.97 on them. What it misses is the words it never saw.
:class:`TokenReplacement` makes new inputs from the given ones by replacing a fraction of
their tokens with words drawn at random from the tokenizer's whole vocabulary: the
sentences keep their length, padding and special tokens, and the teacher labels them
(its outputs are the targets), so no text from outside is needed.

A task that holds one (:class:`~autorank.tasks.FidelityTask`'s ``augmentation``; the
``minilm`` task's) gives :func:`autorank.training.recovery.recover` such batches for the
block-wise stage and the end-to-end distillation (the ``augment:`` recovery option).

Measured (``benchmarks/bench_recovery.py``; README, "Recovery after compression"):
random words with 40% of the tokens replaced beat sentences spliced from the corpus and
tokens drawn from its own unigram distribution (no gain), and out-of-domain text (the
Python documentation's sentences; lower than without).

References
----------
- X. Jiao et al. TinyBERT: Distilling BERT for Natural Language Understanding. Findings
  of EMNLP 2020 (data augmentation by word replacement for task distillation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch

from autorank.errors import TaskError

__all__ = ["TokenReplacement", "word_token_ids", "DEFAULT_FRACTION"]

#: share of a sentence's tokens replaced (measured on MiniLM: 0.4 beat 0.2, 0.6 and 1.0)
DEFAULT_FRACTION = 0.4


def word_token_ids(tokenizer: Any, *, min_length: int = 3) -> list[int]:
    """The ids of the tokenizer's vocabulary entries that are whole alphabetic words of at least ``min_length`` letters.

    (No word pieces such as ``##ing``, no punctuation, digits or special tokens: what replaces a
    token should read as a word of the language.)
    """
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    ids = sorted(i for w, i in vocab.items() if w.isalpha() and len(w) >= min_length and i not in special)
    if not ids:
        raise TaskError(f"token replacement: the tokenizer's vocabulary has no alphabetic word of {min_length}+ letters")
    return ids


class TokenReplacement:
    """New token-id batches from given ones: a ``fraction`` of each sentence's real tokens replaced by random ``vocabulary`` ids.

    A batch is ``(input_ids, attention_mask, ...)`` (a tuple or list, the ids first) or a
    mapping with ``input_ids`` (and ``attention_mask``). Only positions with attention
    mask 1 whose id is not in ``keep`` (the special tokens: ``[CLS]``, ``[SEP]``...) are
    replaced; everything else is returned as it was. The result is a new batch; the
    given one is not changed.
    """

    def __init__(self, vocabulary: Sequence[int], *, keep: Sequence[int] = ()):
        vocab = torch.as_tensor(list(vocabulary), dtype=torch.long)
        if vocab.numel() == 0:
            raise TaskError("token replacement: the vocabulary to draw from is empty")
        self.vocabulary = vocab
        self.keep = torch.as_tensor(sorted(set(int(k) for k in keep)), dtype=torch.long)

    def __call__(self, batch: Any, fraction: float, generator: torch.Generator) -> Any:
        if not 0.0 < float(fraction) <= 1.0:
            raise TaskError(f"token replacement: fraction must be in (0, 1], got {fraction!r}")
        ids, mask = _ids_and_mask(batch)
        can = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        if self.keep.numel():
            can &= ~torch.isin(ids, self.keep.to(ids.device))
        hit = (torch.rand(ids.shape, generator=generator) < float(fraction)).to(ids.device) & can
        draws = self.vocabulary[torch.randint(len(self.vocabulary), ids.shape, generator=generator)].to(ids.device, ids.dtype)
        return _with_ids(batch, torch.where(hit, draws, ids))


def _ids_and_mask(batch: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(batch, Mapping):
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    elif isinstance(batch, (tuple, list)) and batch:
        ids = batch[0]
        mask = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
    else:
        ids, mask = batch, None
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TaskError("token replacement needs batches of integer token ids (a tensor, (input_ids, attention_mask, ...) "
                        f"or a mapping with input_ids), got {type(ids).__name__}"
                        + (f" of {ids.dtype}" if isinstance(ids, torch.Tensor) else ""))
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        mask = None
    return ids, mask


def _with_ids(batch: Any, ids: torch.Tensor) -> Any:
    if isinstance(batch, Mapping):
        return {**batch, "input_ids": ids}
    if isinstance(batch, (tuple, list)):
        return type(batch)([ids, *batch[1:]]) if isinstance(batch, list) else (ids, *batch[1:])
    return ids
