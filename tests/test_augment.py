"""Token replacement (autorank.tasks.augment) and recovery on augmented inputs (the ``augment:`` option)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import autorank
from autorank.errors import AutorankError, TaskError
from autorank.tasks import FidelityTask
from autorank.tasks.augment import TokenReplacement, word_token_ids
from autorank.tasks.distill import FinetuneControl
from autorank.training.recovery import RecoveryError, RecoveryOptions, recover
from tests.search_toys import toy_cnn, toy_task

CLS, SEP, PAD = 1, 2, 0
VOCAB = list(range(40, 60))  # the ids replacements are drawn from


def _batch(n: int = 4, length: int = 9, seed: int = 0, lo: int = 3, hi: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): [CLS] w w ... [SEP] then padding; words in [lo, hi)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, hi, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for row in range(n):
        end = length - row  # row r has r padding positions
        ids[row, 0], ids[row, end - 1] = CLS, SEP
        ids[row, end:], mask[row, end:] = PAD, 0
    return ids, mask


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), length=st.integers(6, 20), fraction=st.floats(0.05, 1.0), seed=st.integers(0, 10**6))
def test_replacement_touches_only_real_words_and_draws_from_the_vocabulary(n, length, fraction, seed):
    ids, mask = _batch(n, length, seed)
    aug = TokenReplacement(VOCAB, keep=[CLS, SEP, PAD])
    new_ids, new_mask = aug((ids, mask), fraction, torch.Generator().manual_seed(seed))
    assert new_ids.shape == ids.shape and new_ids.dtype == ids.dtype and torch.equal(new_mask, mask)
    fixed = (mask == 0) | (ids == CLS) | (ids == SEP)
    assert torch.equal(new_ids[fixed], ids[fixed])  # padding and special tokens never change
    changed = new_ids != ids
    assert bool(torch.isin(new_ids[changed], torch.tensor(VOCAB)).all())  # words are in [3, 40): a change is a draw
    assert int(changed.sum()) <= int((~fixed).sum())


def test_replacement_replaces_about_the_fraction_asked_and_is_seeded():
    ids, mask = _batch(64, 40, 1)
    aug = TokenReplacement(VOCAB, keep=[CLS, SEP, PAD])
    words = int(((mask == 1) & (ids != CLS) & (ids != SEP)).sum())
    for fraction in (0.2, 0.4, 1.0):
        new_ids, _ = aug((ids, mask), fraction, torch.Generator().manual_seed(0))
        share = int((new_ids != ids).sum()) / words
        assert abs(share - fraction) < 0.05, (fraction, share)
    a, _ = aug((ids, mask), 0.4, torch.Generator().manual_seed(3))
    b, _ = aug((ids, mask), 0.4, torch.Generator().manual_seed(3))
    c, _ = aug((ids, mask), 0.4, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(ids, _batch(64, 40, 1)[0])  # the given batch is not changed


def test_replacement_takes_mappings_and_refuses_float_inputs_in_one_line():
    ids, mask = _batch()
    aug = TokenReplacement(VOCAB, keep=[CLS, SEP, PAD])
    out = aug({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}, 1.0,
              torch.Generator().manual_seed(0))
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids"} and not torch.equal(out["input_ids"], ids)
    assert torch.equal(out["attention_mask"], mask)
    with pytest.raises(TaskError) as info:
        aug(torch.randn(2, 5), 0.4, torch.Generator())
    assert "integer token ids" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TaskError, match="fraction"):
        aug((ids, mask), 0.0, torch.Generator())
    with pytest.raises(TaskError, match="empty"):
        TokenReplacement([])


def test_word_token_ids_of_the_minilm_tokenizer_are_whole_words():
    from autorank.tasks.text import minilm_tokenizer

    tok = minilm_tokenizer()
    ids = word_token_ids(tok)
    inverse = {i: w for w, i in tok.get_vocab().items()}
    words = [inverse[i] for i in ids]
    assert len(ids) > 10_000 and not set(ids) & set(tok.all_special_ids)
    assert all(w.isalpha() and len(w) >= 3 and not w.startswith("##") for w in words)
    assert "house" in words and "##ing" not in words and "[MASK]" not in words


# ---------------------------------------------------------------------- the task and the fine-tune
class BagOfWords(nn.Module):
    """Token embeddings, a linear layer, mean-pooled over the attended tokens."""

    def __init__(self, vocab: int = 60, width: int = 12):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.proj = nn.Linear(width, width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.embed(ids)) * mask.unsqueeze(-1)
        return h.sum(1) / mask.sum(1, keepdim=True)


def _text_task(augment: bool = True, **kw) -> FidelityTask:
    train = [_batch(4, 9, s, lo=3, hi=20) for s in range(3)]  # words 3..19 only
    held = [_batch(4, 9, 9, lo=3, hi=60)]
    return FidelityTask(train, held_out=held, metric="cosine", lr=1e-2,
                        augmentation=TokenReplacement(VOCAB, keep=[CLS, SEP, PAD]) if augment else None, **kw)


def test_augmented_inputs_come_only_from_a_task_with_an_augmentation():
    assert _text_task(augment=False).augmented_inputs(5, fraction=0.4) == []
    task = _text_task()
    extra = task.augmented_inputs(5, fraction=0.4, seed=1)
    assert len(extra) == 5 and all(e[0].shape == (4, 9) for e in extra)
    assert any(bool(torch.isin(e[0], torch.tensor(VOCAB)).any()) for e in extra)
    again = task.augmented_inputs(5, fraction=0.4, seed=1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(extra, again))
    with pytest.raises(TaskError, match="augmentation must be a callable"):
        FidelityTask([_batch()], held_out=[_batch()], augmentation="words")


def test_the_finetune_distils_on_extra_inputs_labelled_by_the_teacher():
    torch.manual_seed(0)
    teacher = BagOfWords().eval()
    task = _text_task()
    task.setup(teacher)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.embed.weight.add_(0.5 * torch.randn_like(student.embed.weight))
    unseen = torch.tensor(VOCAB)
    plain, extra = copy.deepcopy(student), copy.deepcopy(student)
    task.finetune(plain, 20, seed=0, control=FinetuneControl(lr=1e-2))
    # without extra inputs the rows of the words never seen do not move; with them they do, toward the teacher's
    assert torch.equal(plain.embed.weight[unseen], student.embed.weight[unseen])
    control = FinetuneControl(lr=1e-2, extra_inputs=task.augmented_inputs(8, fraction=0.8, seed=0))
    task.finetune(extra, 40, seed=0, control=control)
    assert not torch.equal(extra.embed.weight[unseen], student.embed.weight[unseen])
    assert task.evaluate(extra) > task.evaluate(plain)


# ---------------------------------------------------------------------- recovery
class Encoder(nn.Module):
    """Embeddings then two blocks of two linear layers (blocks for the block-wise stage)."""

    def __init__(self, vocab: int = 60, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, 32), nn.GELU(), nn.Linear(32, width)) for _ in range(2))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b(h)
        h = h * mask.unsqueeze(-1)
        return h.sum(1) / mask.sum(1, keepdim=True)


PLAN = {"layers": {f"blocks.{i}.{j}": {"method": "svd", "rank": 3} for i in range(2) for j in (0, 2)}}


def test_recover_adds_the_augmented_batches_to_the_blockwise_stage_and_the_finetune():
    torch.manual_seed(0)
    model = Encoder().eval()
    task = _text_task()
    task.setup(model)
    compressed = autorank.decompose(model, PLAN)
    opts = {"augment": {"batches": 6, "fraction": 0.5}, "early_stopping": False}
    _, rep = recover(model, copy.deepcopy(compressed), task, opts, steps=20)
    assert rep.augment["batches"] == 6 and rep.augment["fraction"] == 0.5
    assert [b["batches"] for b in rep.blockwise["blocks"]] == [3 + 6] * 4  # the task's 3 batches and the 6 made
    assert rep.to_dict()["augment"] == rep.augment
    _, off = recover(model, copy.deepcopy(compressed), task, {**opts, "augment": False}, steps=20)
    assert off.augment is None and [b["batches"] for b in off.blockwise["blocks"]] == [3] * 4
    # a task without augmented_inputs is recovered on its own inputs, the option notwithstanding
    cnn, labelled = toy_cnn(), toy_task()
    labelled.setup(cnn)
    _, rep = recover(cnn, autorank.decompose(cnn, {"layers": {"features.2": {"method": "svd", "rank": 4}}}), labelled,
                     {"augment": {"batches": 4}}, steps=4)
    assert rep.augment is None


@pytest.mark.parametrize("value, culprit", [
    ({"augment": {"fraction": 1.5}}, "training.augment.fraction"),
    ({"augment": {"fraction": 0}}, "training.augment.fraction"),
    ({"augment": {"batches": 0}}, "training.augment.batches"),
    ({"augment": {"batch": 4}}, "batch"),
    ({"augment": "lots"}, "training.augment"),
])
def test_bad_augment_options_name_the_key_in_one_line(value, culprit):
    with pytest.raises(RecoveryError) as info:
        RecoveryOptions.from_dict(value)
    assert culprit in str(info.value) and "\n" not in str(info.value) and isinstance(info.value, AutorankError)


def test_augment_options_round_trip_and_the_blockwise_stage_trains_what_the_distillation_does():
    opts = RecoveryOptions.from_dict({"augment": {"batches": 32, "fraction": 0.25}})
    assert opts.augment.batches == 32 and RecoveryOptions.from_dict(opts.to_dict()) == opts
    assert RecoveryOptions.from_dict({"augment": False}).augment is None
    assert RecoveryOptions.from_dict(None).blockwise_trainable() == "all"
    assert RecoveryOptions.from_dict({"distill": {"trainable": "decomposed"}}).blockwise_trainable() == "decomposed"
    assert RecoveryOptions.from_dict({"distill": {"trainable": "decomposed"},
                                      "blockwise": {"trainable": "all"}}).blockwise_trainable() == "all"


def test_the_front_says_a_member_was_distilled_on_augmented_batches():
    from types import SimpleNamespace

    from autorank.cli.search import _tuned
    from autorank.training.recovery import RecoveryReport
    from autorank.training.stage import recovery_summary

    report = RecoveryReport(zero_shot=0.8, score=0.9, seconds=12.0, augment={"batches": 64, "fraction": 0.4, "seconds": 0.1},
                            blockwise={"score": 0.88, "kept": True}, finetune={"steps": 30, "best_step": 30, "stopped_by": "steps"})
    rec = recovery_summary(report)
    assert rec["augmented_batches"] == 64
    assert _tuned(SimpleNamespace(finetuned=True, recovery=rec)) == "block-wise + 30 steps (+64 augmented batches), 12 s"
    rec.pop("augmented_batches")
    assert _tuned(SimpleNamespace(finetuned=True, recovery=rec)) == "block-wise + 30 steps, 12 s"
