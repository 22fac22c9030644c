"""Every phase survives a real SIGKILL of the driver: the sensitivity table (full and estimated) and the
fine-tuning stage. The same search run again loses at most what was in flight and repeats nothing finished.
(The trials phase has its own kill test in tests/test_search.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autorank.search import search
from autorank.search.executor_base import InProcessExecutor
from autorank.search.warm_start import CHECKPOINT
from tests.search_toys import toy_cnn, toy_task

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import importlib, sys, time
    sys.path.insert(0, {repo!r})
    import torch
    torch.set_num_threads(1)
    trial_mod = importlib.import_module("autorank.search.trial")
    from autorank.search import search
    from tests.search_toys import toy_cnn, toy_task
    slow = {slow_errors!r}
    if slow:  # a slow layer-error job, so that the kill can land in the middle of the estimate's first part
        real = trial_mod.layer_errors
        def layer_errors(*a, **k):
            time.sleep(slow)
            return real(*a, **k)
        trial_mod.layer_errors = layer_errors
    search(toy_cnn(), toy_task(), budget="30%flops", trials={trials}, finetune={finetune}, out={out!r},
           sensitivity_points=4, measure_latency=False, sensitivity_mode={mode!r})
    """
)


class CountingExecutor(InProcessExecutor):
    """In-process, and remembers every job it was given."""

    def __init__(self):
        super().__init__()
        self.jobs: list[tuple[str, dict]] = []
        self.tickets: list = []

    def submit(self, ticket, kind, payload):
        self.jobs.append((kind, payload))
        self.tickets.append(ticket)
        super().submit(ticket, kind, payload)


def _kill_when(tmp_path, out: Path, ready, *, mode="full", trials=4, finetune=0, sleep="0.1", slow_errors=0.0):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(repo=str(REPO), out=str(out), mode=mode, trials=trials, finetune=finetune, slow_errors=slow_errors))
    env = dict(os.environ, AUTORANK_TOY_SLEEP=sleep)
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 150
    try:
        while time.time() < deadline:
            if ready():
                break
            if proc.poll() is not None:
                pytest.fail("search ended before it could be killed: " + proc.stdout.read().decode()[-2000:])
            time.sleep(0.01)
        else:
            pytest.fail("the phase to kill never came")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def _lines(out: Path) -> list[dict]:
    p = out / CHECKPOINT
    if not p.exists():
        return []
    recs = []
    for line in p.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return recs


def _resume(out: Path, **kw):
    ex = CountingExecutor()
    res = search(toy_cnn(), toy_task(), budget="30%flops", out=out, sensitivity_points=4, measure_latency=False, executor=ex, **kw)
    return res, ex


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "estimate"])
def test_sensitivity_probes_killed_midway_are_not_redone(tmp_path, mode):
    out = tmp_path / mode
    _kill_when(tmp_path, out, lambda: sum(r.get("kind") == "probe" for r in _lines(out)) >= 4, mode=mode)
    assert not (out / "sensitivity.json").exists()  # killed inside the phase
    before = [r for r in _lines(out) if r.get("kind") == "probe"]
    assert len(before) >= 4
    done = {(r["layer"], r["method"], r["rho"]) for r in before}
    res, ex = _resume(out, trials=4, finetune=0, sensitivity_mode=mode)
    table = json.loads((out / "sensitivity.json").read_text())
    assert table["mode"] == mode
    assert not (out / CHECKPOINT).exists()  # the finished table replaces its checkpoint
    # the scores measured before the kill are in the table as they were
    for r in before:
        pts = dict(map(tuple, table["scores"][r["layer"]][r["method"]]))
        assert pts[r["rho"]] == r["score"]
    # none of them ran again: every probe after the restart is one that had not finished
    after = [t[1:] for t in ex.tickets if isinstance(t, tuple) and t[0] == "probe"]
    assert after and not set(after) & done, set(after) & done
    if mode == "full":
        in_table = {(n, m, r) for n, ms in table["scores"].items() for m, pts in ms.items() for r, _ in pts}
    else:
        in_table = {(n, m, r) for n, m, r, _ in table["estimate"]["probes"]}
    assert in_table == done | set(after) and len(after) == len(set(after))
    assert len(res.trials) == 4


def test_estimate_errors_killed_midway_are_not_recomputed(tmp_path):
    out = tmp_path / "est"
    _kill_when(tmp_path, out, lambda: sum(r.get("kind") == "errors" for r in _lines(out)) >= 2, mode="estimate", slow_errors=0.3)
    before = {r["layer"]: r["errors"] for r in _lines(out) if r.get("kind") == "errors"}
    assert 2 <= len(before) < 5 and not any(r.get("kind") == "probe" for r in _lines(out))
    res, ex = _resume(out, trials=3, finetune=0, sensitivity_mode="estimate")
    estimated_after = [p["layers"][0]["name"] for k, p in ex.jobs if k == "estimate"]
    assert not set(estimated_after) & set(before), "a layer estimated before the kill was estimated again"
    assert len(set(estimated_after)) + len(before) == 5
    table = json.loads((out / "sensitivity.json").read_text())
    for name, errs in before.items():  # kept as they were
        assert table["estimate"]["errors"][name] == errs


def test_finetuning_killed_midway_keeps_what_finished(tmp_path):
    out = tmp_path / "ft"

    def one_finetuned():
        n = 0
        for p in (out / "trials").glob("*.json") if (out / "trials").exists() else []:
            try:
                n += json.loads(p.read_text()).get("finetune") is not None
            except json.JSONDecodeError:
                pass
        return n >= 1

    _kill_when(tmp_path, out, one_finetuned, mode="estimate", trials=6, finetune=3, sleep="0.3")
    plan = json.loads((out / "finetune.json").read_text())
    assert len(plan["trials"]) == 3
    recs = {n: json.loads((out / "trials" / f"{n:06d}.json").read_text()) for n in plan["trials"]}
    finished = {n: r["finetune"] for n, r in recs.items() if r.get("finetune") is not None}
    assert 1 <= len(finished) < 3
    res, ex = _resume(out, trials=6, finetune=3, sensitivity_mode="estimate")
    tuned_after = [p["metadata"]["trial"] for k, p in ex.jobs if k == "finetune"]
    assert sorted(tuned_after) == sorted(set(plan["trials"]) - set(finished))  # only what had not finished
    assert not [p for k, p in ex.jobs if k in ("zero_shot", "estimate")]  # trials and table: nothing redone
    for n, ft in finished.items():  # kept as it was
        assert json.loads((out / "trials" / f"{n:06d}.json").read_text())["finetune"] == ft
    assert sum(1 for r in res.trials if r.get("finetune")) == 3
