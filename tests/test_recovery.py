"""Recovery after compression (autorank.training.recovery): options, early stopping, budgets, feature distillation."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autorank
from autorank.errors import AutorankError, TaskError
from autorank.methods._layers import Decomposed
from autorank.tasks import ClassificationTask, FidelityTask
from autorank.tasks.distill import FeatureDistiller, FinetuneControl, feature_blocks, first_tensor
from autorank.training.blockwise import reconstruct_blocks
from autorank.training.recovery import RECOVERY_KEYS, RecoveryError, RecoveryOptions, parse_duration, recover, supports_control
from tests.search_toys import toy_cnn, toy_task


# ---------------------------------------------------------------------- models
class TupleBlock(nn.Module):
    """A residual MLP block returning ``(hidden, aux)``, like a transformer layer returning a tuple."""

    def __init__(self, d: int):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        h = x + self.down(F.gelu(self.up(x)))
        return (h, h.mean())


class TupleNet(nn.Module):
    def __init__(self, d: int = 16, depth: int = 3, classes: int = 5):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList(TupleBlock(d) for _ in range(depth))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h, _ = b(h)
        return self.head(h)


def _tuple_net() -> TupleNet:
    torch.manual_seed(0)
    return TupleNet().eval()


PLAN_TUPLE = {"layers": {f"blocks.{i}.{n}": {"method": "svd", "rank": 3} for i in range(3) for n in ("up", "down")}}


def _fidelity(model: nn.Module, n: int = 6, **kw) -> FidelityTask:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 8, generator=g) for _ in range(n)]
    task = FidelityTask(batches[:-2], held_out=batches[-2:], **kw)
    task.setup(model)
    return task


def _block_error(student: nn.Module, teacher: nn.Module, blocks: list[str], batches) -> float:
    d = FeatureDistiller(student, teacher, blocks)
    total = 0.0
    try:
        with torch.no_grad():
            for b in batches:
                teacher(b)
                t = d.take_teacher()
                student(b)
                total += sum(float(F.mse_loss(d.student_out[k], t[k])) for k in blocks)
                d.student_out.clear()
    finally:
        d.close()
    return total


# ---------------------------------------------------------------------- options
def test_options_defaults_round_trip_and_durations():
    opts = RecoveryOptions.from_dict(None)
    assert opts.refit is not None and opts.distill is not None and opts.early_stopping is not None
    again = RecoveryOptions.from_dict(opts.to_dict())
    assert again == opts
    custom = RecoveryOptions.from_dict({
        "refit": {"ridge": 0.5, "low_rank": False, "batches": 4}, "distill": {"features": 2, "trainable": "decomposed"},
        "early_stopping": False, "finetune_steps": 30, "finetune_time": "2m", "lr": 1e-3,
    })
    assert custom.refit.ridge == 0.5 and not custom.refit.low_rank and custom.refit.batches == 4
    assert custom.distill.features == 2.0 and custom.distill.trainable == "decomposed"
    assert custom.early_stopping is None and custom.finetune_steps == 30 and custom.finetune_time == 120.0
    assert RecoveryOptions.from_dict({"refit": False}).refit is None
    assert RecoveryOptions.from_dict({"blockwise": {"share": 0.25}}).blockwise.share == 0.25
    assert RecoveryOptions.from_dict({"distill": False}).distill.features == 0.0
    assert RecoveryOptions.from_dict(custom.to_dict()) == custom
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300 and parse_duration("1.5h") == 5400
    assert parse_duration(12) == 12.0
    assert set(RECOVERY_KEYS) == set(opts.to_dict())


@pytest.mark.parametrize("value, culprit", [
    ({"refti": True}, "refti"),
    ({"refit": "yes"}, "training.refit"),
    ({"refit": {"ridge": -1}}, "training.refit.ridge"),
    ({"refit": {"batches": 0}}, "training.refit.batches"),
    ({"blockwise": {"share": 1.0}}, "training.blockwise.share"),
    ({"blockwise": {"trainable": "none"}}, "training.blockwise.trainable"),
    ({"distill": {"featurs": 1}}, "featurs"),
    ({"distill": {"features": "lots"}}, "training.distill.features"),
    ({"distill": {"trainable": "some"}}, "training.distill.trainable"),
    ({"distill": {"modules": "("}}, "training.distill.modules"),
    ({"early_stopping": {"every": 0}}, "training.early_stopping.every"),
    ({"early_stopping": {"patience": 1.5}}, "training.early_stopping.patience"),
    ({"early_stopping": {"after": 2}}, "training.early_stopping.after"),
    ({"finetune_steps": -3}, "training.finetune_steps"),
    ({"finetune_time": "5 parsecs"}, "training.finetune_time"),
    ({"finetune_time": 0}, "training.finetune_time"),
    ({"lr": 0}, "training.lr"),
])
def test_bad_options_name_the_key_in_one_line(value, culprit):
    with pytest.raises(RecoveryError) as info:
        RecoveryOptions.from_dict(value)
    msg = str(info.value)
    assert culprit in msg and "\n" not in msg
    assert isinstance(info.value, AutorankError)


# ---------------------------------------------------------------------- feature distillation
def test_feature_blocks_are_the_smallest_list_children_holding_decomposed_layers():
    compressed = autorank.decompose(_tuple_net(), PLAN_TUPLE)
    assert feature_blocks(compressed) == ["blocks.0", "blocks.1", "blocks.2"]
    assert feature_blocks(compressed, r"blocks\.[02]$") == ["blocks.0", "blocks.2"]
    with pytest.raises(TaskError, match="no module"):
        feature_blocks(compressed, "nothing_like_this")
    # a plain Sequential CNN: the decomposed layer itself is the block
    cnn = autorank.decompose(toy_cnn(), {"layers": {"features.2": {"method": "svd", "rank": 4}}})
    assert feature_blocks(cnn) == ["features.2"]
    assert first_tensor((torch.ones(1), 3)) is not None and first_tensor({"a": torch.ones(2)}).shape == (2,)


def test_feature_distillation_on_blocks_returning_tuples():
    model = _tuple_net()
    task = _fidelity(model)
    compressed = autorank.decompose(model, PLAN_TUPLE)
    blocks = feature_blocks(compressed)
    before = _block_error(compressed, model, blocks, task.train_batches)
    plain, feat = copy.deepcopy(compressed), copy.deepcopy(compressed)
    task.finetune(plain, 40, seed=0, control=FinetuneControl(features=0.0, lr=3e-3))
    task.finetune(feat, 40, seed=0, control=FinetuneControl(features=4.0, lr=3e-3))
    after_plain = _block_error(plain, model, blocks, task.train_batches)
    after_feat = _block_error(feat, model, blocks, task.train_batches)
    assert after_feat < before
    assert after_feat < after_plain  # the feature terms are what pulled the blocks toward the teacher's
    assert not any(m._forward_hooks for m in feat.modules())  # hooks removed
    assert not any(m._forward_hooks for m in model.modules())


def test_feature_distillation_on_a_hugging_face_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 60, (8, 10), generator=g),
                "attention_mask": torch.ones(8, 10, dtype=torch.long)} for _ in range(4)]
    task = FidelityTask(batches[:3], held_out=batches[3:], metric="cosine")
    task.setup(model)
    plan = {"layers": {f"encoder.layer.{i}.{n}": {"method": "svd", "rank": 2}
                       for i in range(2) for n in ("intermediate.dense", "output.dense")}}
    compressed = autorank.decompose(model, plan)
    blocks = feature_blocks(compressed)
    assert blocks == ["encoder.layer.0", "encoder.layer.1"]
    before = _hf_block_error(compressed, model, blocks, batches[:3])
    control = FinetuneControl(features=2.0, lr=1e-3, trainable="decomposed")
    tuned = copy.deepcopy(compressed)
    task.finetune(tuned, 30, seed=0, control=control)
    assert control.steps_done == 30 and control.stopped_by == "steps"
    assert _hf_block_error(tuned, model, blocks, batches[:3]) < 0.7 * before
    # block-wise reconstruction replays each BertLayer's call (positional and keyword arguments)
    rep = reconstruct_blocks(model, compressed, batches[:3], steps=30, lr=3e-3)
    assert [b.name for b in rep.blocks] == blocks
    assert all(b.steps == 30 and b.loss_after < b.loss_before for b in rep.blocks)
    assert _hf_block_error(compressed, model, blocks, batches[:3]) < 0.7 * before


def _hf_block_error(student, teacher, blocks, batches) -> float:
    d = FeatureDistiller(student, teacher, blocks)
    total = 0.0
    try:
        with torch.no_grad():
            for b in batches:
                teacher(**b)
                t = d.take_teacher()
                student(**b)
                total += sum(float(F.mse_loss(d.student_out[k], t[k])) for k in blocks)
                d.student_out.clear()
    finally:
        d.close()
    return total


def test_blockwise_reconstruction_lowers_each_blocks_error_or_gives_it_back():
    model = _tuple_net()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 8, generator=g) for _ in range(4)]
    compressed = autorank.decompose(model, PLAN_TUPLE)
    blocks = feature_blocks(compressed)
    before = _block_error(compressed, model, blocks, batches)
    trained = copy.deepcopy(compressed)
    rep = reconstruct_blocks(model, trained, batches, steps=40, lr=3e-3)
    assert [b.name for b in rep.blocks] == blocks and all(b.kept and b.steps == 40 for b in rep.blocks)
    assert all(b.loss_after < b.loss_before for b in rep.blocks)
    assert _block_error(trained, model, blocks, batches) < 0.8 * before
    # only the decomposed factors moved
    for k, v in trained.state_dict().items():
        if ".up." not in k and ".down." not in k:
            assert torch.equal(v, compressed.state_dict()[k]), k
    # an absurd learning rate makes things worse: every block gets its weights back
    spoiled = copy.deepcopy(compressed)
    rep = reconstruct_blocks(model, spoiled, batches, steps=5, lr=1e4)
    assert not any(b.kept for b in rep.blocks)
    assert all(torch.equal(v, compressed.state_dict()[k]) for k, v in spoiled.state_dict().items())


def test_recover_splits_a_step_budget_between_blocks_and_the_end_to_end_finetune():
    model = _tuple_net()
    task = _fidelity(model, lr=3e-3)
    compressed = autorank.decompose(model, PLAN_TUPLE)
    _, report = recover(model, compressed, task, {"refit": False, "blockwise": {"share": 0.25},
                                                  "early_stopping": {"every": 10, "patience": 100}}, steps=40)
    assert [b["steps"] for b in report.blockwise["blocks"]] == [10, 10, 10]
    assert report.finetune["steps"] == 30
    assert report.score >= report.zero_shot


def test_trainable_decomposed_trains_only_the_factors():
    model = _tuple_net()
    task = _fidelity(model)
    compressed = autorank.decompose(model, PLAN_TUPLE)
    before = {k: v.clone() for k, v in compressed.state_dict().items()}
    flags = {n: p.requires_grad for n, p in compressed.named_parameters()}
    task.finetune(compressed, 5, seed=0, control=FinetuneControl(trainable="decomposed", features=1.0, lr=1e-2))
    dec = {n for n, m in compressed.named_modules() if isinstance(m, Decomposed)}
    for k, v in compressed.state_dict().items():
        inside = any(k.startswith(d + ".") for d in dec)
        assert torch.equal(v, before[k]) != inside, k
    assert flags == {n: p.requires_grad for n, p in compressed.named_parameters()}


def test_classification_with_teacher_logits_and_features():
    model = _tuple_net()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=32)
    task = ClassificationTask(train, val, lr=3e-3)
    compressed = autorank.decompose(model, PLAN_TUPLE)
    blocks = feature_blocks(compressed)
    before = _block_error(compressed, model, blocks, [x[:64]])
    control = FinetuneControl(features=2.0, output=1.0, teacher=model)
    task.finetune(compressed, 20, seed=0, control=control)
    assert control.steps_done == 20
    assert _block_error(compressed, model, blocks, [x[:64]]) < before
    with pytest.raises(TaskError, match="teacher"):
        task.finetune(copy.deepcopy(compressed), 2, control=FinetuneControl(features=1.0))
    assert task.training_inputs(2)[0].shape == (16, 8)


def test_plain_finetune_is_unchanged_without_control():
    """The built-in tasks' old recipe is what runs without a control (same weights for the same seed)."""
    model = _tuple_net()
    task = _fidelity(model)
    a, b = autorank.decompose(model, PLAN_TUPLE), autorank.decompose(model, PLAN_TUPLE)
    task.finetune(a, 7, seed=3)
    task.finetune(b, 7, seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    assert supports_control(task) and not supports_control(toy_task())


# ---------------------------------------------------------------------- recover: early stopping, budgets
def test_early_stopping_never_returns_worse_weights_than_it_started_from():
    """A fine-tune that hurts (a huge learning rate) stops on patience and gives back the starting weights."""
    model = _tuple_net()
    task = _fidelity(model, lr=1.0, optimizer="sgd")
    compressed = autorank.decompose(model, PLAN_TUPLE)
    start = task.evaluate(compressed)
    opts = {"refit": False, "blockwise": False, "distill": False, "early_stopping": {"every": 2, "patience": 2, "after": 0}}
    out, report = recover(model, compressed, task, opts, steps=40)
    ft = report.finetune
    assert ft["stopped_by"] in ("patience", "diverged") and ft["steps"] < 40
    assert any(score is None or score < start for _, score in ft["evaluations"][1:])  # it got worse while training
    assert ft["best_step"] == 0
    assert task.evaluate(out) == pytest.approx(start, abs=1e-12)
    assert report.score == pytest.approx(start, abs=1e-12)


def test_early_stopping_keeps_the_best_evaluated_weights():
    model = _tuple_net()
    task = _fidelity(model, lr=3e-3)
    compressed = autorank.decompose(model, PLAN_TUPLE)
    start = task.evaluate(compressed)
    out, report = recover(model, compressed, task, {"refit": False, "blockwise": False,
                                                    "early_stopping": {"every": 5, "patience": 3, "after": 0}}, steps=30)
    ft = report.finetune
    best = max(s for _, s in ft["evaluations"])
    assert report.score == best >= start
    assert task.evaluate(out) == pytest.approx(best, abs=1e-9)
    assert [s for s, _ in ft["evaluations"]] == list(range(0, ft["steps"] + 1, 5))


def test_patience_waits_until_the_share_of_the_budget_given():
    """A fine-tune that only hurts (noise added to the weights): with ``after: 0.5`` it still runs half its
    steps before patience stops it; with ``after: 0`` patience stops it at once; the start weights come back."""
    model = toy_cnn().eval()
    task = toy_task()
    task.setup(model)

    def hurt(m, steps, *, seed=0):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * steps * torch.randn_like(p))
        return m

    task.finetune = hurt
    for after, expected in ((0.5, 20), (0.0, 4)):
        compressed = autorank.decompose(model, {"layers": {"features.2": {"method": "svd", "rank": 4}}})
        start = task.evaluate(compressed)
        opts = {"refit": False, "blockwise": False, "early_stopping": {"every": 2, "patience": 2, "after": after}}
        out, report = recover(model, compressed, task, opts, steps=40)
        ft = report.finetune
        assert ft["stopped_by"] == "patience" and ft["steps"] == expected, (after, ft["steps"])
        assert ft["best_step"] == 0 and task.evaluate(out) == pytest.approx(start, abs=1e-12)


def test_user_task_is_wrapped_in_chunks_with_early_stopping():
    model = toy_cnn().eval()
    task = toy_task()
    task.setup(model)
    compressed = autorank.decompose(model, {"layers": {"features.2": {"method": "svd", "rank": 4}}})
    start = task.evaluate(compressed)
    calls = []
    inner = task.finetune

    def finetune(m, steps, *, seed=0):
        calls.append((steps, seed))
        return inner(m, steps, seed=seed)

    task.finetune = finetune
    out, report = recover(model, compressed, task, {"refit": False, "blockwise": False,
                                                    "early_stopping": {"every": 3, "patience": 5}}, steps=9)
    assert calls == [(3, 0), (3, 1), (3, 2)]
    assert report.finetune["steps"] == 9 and report.finetune["distill"] is None
    assert report.score >= start and task.evaluate(out) == pytest.approx(report.score, abs=1e-12)


def test_refit_stage_in_recover_and_its_report():
    model = _tuple_net()
    task = _fidelity(model)
    compressed = autorank.decompose(model, PLAN_TUPLE)
    zero = task.evaluate(compressed)
    out, report = recover(model, compressed, task, {"early_stopping": False}, steps=0)
    assert report.blockwise is None
    assert report.finetune is None
    r = report.refit
    assert r["kept"] == (r["score"] >= zero) and len(r["layers"]) == 6
    assert report.score == (r["score"] if r["kept"] else zero) >= zero
    assert task.evaluate(out) == pytest.approx(report.score, abs=1e-12)
    d = report.to_dict()
    assert set(d) == {"zero_shot", "score", "seconds", "refit", "blockwise", "finetune", "augment"}


def test_time_budget_stops_the_finetune():
    model = _tuple_net()
    task = _fidelity(model)
    compressed = autorank.decompose(model, PLAN_TUPLE)
    torch.optim.Adam([nn.Parameter(torch.zeros(1))])  # the first optimizer of a process costs seconds of imports
    t0 = time.perf_counter()
    _, report = recover(model, compressed, task, {"refit": False, "early_stopping": {"every": 10, "patience": 1000}},
                        time_s=1.5)
    elapsed = time.perf_counter() - t0
    ft = report.finetune
    assert ft["stopped_by"] == "time" and ft["budget_steps"] is None
    assert ft["steps"] > 2  # it trained until the time was up (over 10 steps on an idle core; 6 on a loaded 2-core VM)
    assert elapsed < 1.5 + 1.5  # the budget, plus at most one evaluation and the restore
    assert all(b["steps"] > 0 for b in report.blockwise["blocks"]) and report.finetune["seconds"] < 1.5
    with pytest.raises(RecoveryError, match="time_s"):
        recover(model, compressed, task, time_s=-1)
