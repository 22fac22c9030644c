"""Recovery in the search: the space's training block, the CLI, the fine-tuning budget and the front's record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autorank
from autorank.errors import AutorankError
from autorank.search import SearchResult, SearchSpace, SpaceError, search
from autorank.search.trial import TrialRunner
from autorank.tasks import FidelityTask
from autorank.training.recovery import RecoveryError, recover
from tests.search_toys import toy_cnn, toy_task

REPO = Path(__file__).resolve().parents[1]
FAST = dict(sensitivity_points=2, measure_latency=False)
PLAN = {"layers": {"features.2": {"method": "svd", "rank": 4}}}


# ---------------------------------------------------------------------- the space's training block
def test_space_takes_the_recovery_keys_and_checks_them():
    space = SearchSpace.load({"methods": ["svd"], "training": {"refit": False, "finetune_time": "5m",
                                                               "early_stopping": {"every": 5, "patience": 2}}})
    assert space.training == {"refit": False, "finetune_time": "5m", "early_stopping": {"every": 5, "patience": 2}}
    assert SearchSpace.load(space.to_dict()).training == space.training  # round trip
    for bad, culprit in (({"refit": "yes"}, "training.refit"), ({"finetune_time": "5 parsecs"}, "training.finetune_time"),
                         ({"distill": {"trainable": "some"}}, "training.distill.trainable"),
                         ({"early_stopping": {"after": 3}}, "training.early_stopping.after")):
        with pytest.raises(SpaceError) as err:
            SearchSpace.load({"methods": ["svd"], "training": bad})
        assert culprit in str(err.value) and "\n" not in str(err.value)


def test_with_training_lays_overrides_over_the_space():
    space = SearchSpace.load({"methods": ["svd"], "training": {"refit": False, "bn_between_factors": True}})
    merged = space.with_training({"refit": {"ridge": 0.5}, "finetune_steps": 7})
    assert merged.training == {"refit": {"ridge": 0.5}, "bn_between_factors": True, "finetune_steps": 7}
    assert space.training["refit"] is False  # the original space is not changed
    with pytest.raises(SpaceError, match="blockwise.share"):
        space.with_training({"blockwise": {"share": 2}})


# ---------------------------------------------------------------------- sharing with the original
class _SharingFidelity(FidelityTask):
    finetune_preserves_original = True


def test_a_trial_shares_the_original_only_when_recovery_trains_the_decomposed_layers_only():
    runner = TrialRunner.__new__(TrialRunner)
    runner.task = _SharingFidelity(torch.randn(8, 3, 8, 8))
    assert not runner._finetune_shares(None)  # the default distillation trains every parameter: a copy
    assert runner._finetune_shares({"distill": {"trainable": "decomposed"}})
    assert not runner._finetune_shares({"distill": {"trainable": "decomposed"}, "blockwise": {"trainable": "all"}})
    runner.task = toy_task()  # a task whose fine-tune may change anything: never shared
    assert not runner._finetune_shares({"distill": {"trainable": "decomposed"}})


def test_recover_refuses_to_train_parameters_shared_with_the_original():
    model = toy_cnn().eval()
    task = FidelityTask(torch.randn(16, 3, 8, 8))
    task.setup(model)
    shared = autorank.decompose(model, PLAN, share=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecoveryError, match="shares parameters"):
        recover(model, shared, task, {"blockwise": False}, steps=4)
    out, report = recover(model, shared, task, {"blockwise": False, "distill": {"trainable": "decomposed"}}, steps=4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched
    assert report.score >= report.zero_shot


# ---------------------------------------------------------------------- the search
def test_search_recovers_the_promising_plans_and_the_front_says_how(tmp_path):
    res = search(toy_cnn(), toy_task(), budget="30%flops", trials=6, finetune=2, finetune_steps=8, out=tmp_path / "a", **FAST)
    tuned = [m for m in res.front if m.finetuned]
    assert tuned, "no fine-tuned member on the front"
    for m in tuned:
        rec = m.recovery
        assert rec["refit"]["layers"] >= 1 and "kept" in rec["refit"]  # the closed-form re-fit ran on its layers
        assert rec["blockwise"] is not None and rec["seconds"] > 0 and rec["score"] >= rec["zero_shot"] - 1e-12
        assert rec["steps"] <= 8 and rec["stopped_by"] in ("steps", "patience", "time")
    saved = json.loads((tmp_path / "a" / "front.json").read_text())
    assert [m["recovery"] for m in saved["front"]] == [m.recovery for m in res.front]
    assert SearchResult.load(tmp_path / "a").front[0].recovery == res.front[0].recovery


def test_training_overrides_switch_stages_off(tmp_path):
    res = search(toy_cnn(), toy_task(), budget="30%flops", trials=6, finetune=1, finetune_steps=6, out=tmp_path / "b",
                 training={"refit": False, "blockwise": False, "early_stopping": False}, **FAST)
    tuned = [m for m in res.front if m.finetuned]
    assert tuned
    for m in tuned:
        assert "refit" not in m.recovery and "blockwise" not in m.recovery
        assert m.recovery["steps"] == 6 and m.recovery["stopped_by"] == "steps"  # no early stop: the whole budget
    settings = json.loads((tmp_path / "b" / "settings.json").read_text())
    assert settings["space"]["training"] == {"refit": False, "blockwise": False, "early_stopping": False}
    with pytest.raises(AutorankError, match="training.refit"):
        search(toy_cnn(), toy_task(), budget="30%flops", trials=2, out=tmp_path / "c", training={"refit": 3}, **FAST)
    assert not (tmp_path / "c").exists()


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "autorank.cli", "search", "--model", "tests.search_toys:toy_cnn", "--task",
           "tests.search_toys:toy_task", "--budget", "30%flops", "--trials", "4", "--sensitivity-points", "2", "-q", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_cli_finetune_time_and_training_reach_the_trials(tmp_path):
    out = tmp_path / "run"
    p = _cli(tmp_path, "--finetune", "1", "--finetune-time", "3s", "--training", "{blockwise: false}", "--no-refit",
             "--no-augment", "--out", str(out))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    settings = json.loads((out / "settings.json").read_text())
    assert {k: settings["space"]["training"][k] for k in ("refit", "blockwise", "augment")} == dict.fromkeys(
        ("refit", "blockwise", "augment"), False)
    assert settings["finetune_time_s"] == 3.0 and settings["finetune_steps"] is None  # a time alone: steps unbounded
    records = [json.loads(f.read_text()) for f in (out / "trials").glob("*.json")]
    ft = [r["finetune"] for r in records if r.get("finetune")]
    assert len(ft) == 1 and ft[0]["time_s"] == 3.0 and ft[0]["steps"] is None
    rec = ft[0]["recovery"]
    assert "refit" not in rec and "blockwise" not in rec and rec["stopped_by"] in ("time", "patience")
    assert "fine-tuned" in p.stdout and " s" in p.stdout


@pytest.mark.parametrize("args,needle", [
    (("--training", "[1, 2]"), "--training"),
    (("--training", "{refit: maybe}"), "training.refit"),
    (("--training", "{augment: {fraction: 3}}"), "training.augment.fraction"),
    (("--finetune-time", "5 parsecs"), "finetune_time"),
])
def test_cli_bad_recovery_options_get_one_line_and_exit_2(tmp_path, args, needle):
    out = tmp_path / "run"
    p = _cli(tmp_path, *args, "--out", str(out))
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert not out.exists()
