"""`autorank search` → `front` → `export` → load, as a user types them; and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autorank

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "autorank.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_inproc(*args: str, cwd: Path, capsys, monkeypatch) -> subprocess.CompletedProcess:
    """The same argv through ``autorank.cli.main`` in this process (no interpreter start-up: fast)."""
    from autorank.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        rc = main(list(args))
    except SystemExit as exc:  # argparse: --help, usage errors
        rc = exc.code if isinstance(exc.code, int) else 2
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), rc, out.out, out.err)


def assert_one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[-1], (n, lines[-1])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One real search on the demo, as a user types it (small: 6 trials, one fine-tuning)."""
    home = tmp_path_factory.mktemp("user")
    # plain fine-tuning (no re-fit, no block-wise stage: half of this run's time; tests/test_recovery*.py cover them)
    p = run_cli("search", "--budget", "30%flops", "--trials", "6", "--finetune", "1", "--finetune-steps", "20",
                "--sensitivity-points", "2", "--no-refit", "--training", "{blockwise: false}", "-q", cwd=home)
    assert p.returncode == 0, p.stderr[-3000:]
    run = home / "runs" / "demo-30flops"
    return home, run, p


def test_search_prints_the_front_and_writes_the_run_directory(demo_run):
    home, run, p = demo_run
    assert "Pareto front" in p.stdout and "budget 30%flops" in p.stdout
    assert str(Path("runs") / "demo-30flops") in p.stdout
    front = json.loads((run / "front.json").read_text())
    assert front["front"], "empty front"
    for m in front["front"]:
        assert m["flops_ratio"] <= 0.30 + 1e-9
        assert not Path(m["weights"]).is_absolute() and (run / m["weights"]).exists()  # relative: the run dir can move
    assert (run / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<html" in (run / "pareto.html").read_text().lower()
    assert len(list((run / "trials").glob("*.json"))) == 6


def test_search_again_resumes_and_adds_only_the_missing_trials(demo_run):
    home, run, _ = demo_run
    before = {p.name: p.read_text() for p in (run / "trials").glob("*.json")}
    p = run_cli("search", "--budget", "30%flops", "--trials", "7", "--finetune", "1", "--finetune-steps", "20",
                "--sensitivity-points", "2", "--no-refit", "--training", "{blockwise: false}", "-q", cwd=home)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(resuming)" in p.stdout
    after = {q.name: q.read_text() for q in (run / "trials").glob("*.json")}
    assert len(after) == 7
    for name, text in before.items():
        old, new = json.loads(text), json.loads(after[name])
        assert old["choice"] == new["choice"] and old["score"] == new["score"]


def test_front_command_table_json_and_plots(demo_run):
    home, run, _ = demo_run
    (run / "pareto.png").unlink()
    p = run_cli("front", str(run), cwd=home)
    assert p.returncode == 0, p.stderr
    assert "Pareto front" in p.stdout and "fine-tuned" in p.stdout
    assert (run / "pareto.png").exists()
    j = run_cli("front", str(run), "--json", cwd=home)
    data = json.loads(j.stdout)
    assert data["budget"] == "30%flops" and data["front"]


@pytest.mark.parametrize("fmt, suffix", [("pt", ".pt"), ("onnx", ".onnx"), ("torchscript", ".ts")])
def test_export_each_format_loads_and_matches(demo_run, fmt, suffix):
    home, run, _ = demo_run
    out = home / f"best-{fmt}{suffix}"
    p = run_cli("export", str(run), "--pick", "best", "-o", str(out), "--format", fmt, cwd=home)
    assert p.returncode == 0, p.stderr[-3000:]
    assert out.exists()
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["plan"]["layers"] and side["metadata"]["source_run"].endswith("demo-30flops")
    front = json.loads((run / "front.json").read_text())["front"]
    best = max(front, key=lambda m: m["score"])
    ref = autorank.load(run / best["weights"]).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        want = ref(x)
    if fmt == "pt":
        got = autorank.load(out)(x)
    elif fmt == "torchscript":
        got = torch.jit.load(str(out))(x)
    else:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        got = torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
    torch.testing.assert_close(got.detach(), want, atol=1e-4, rtol=1e-3)
    # no overwrite without --force: bytes unchanged, exit 2
    before = out.read_bytes()
    again = run_cli("export", str(run), "--pick", "best", "-o", str(out), "--format", fmt, cwd=home)
    assert_one_line_error(again, str(out), "--force")
    assert out.read_bytes() == before


def test_exported_model_is_smaller_and_the_plan_is_the_front_members(demo_run):
    home, run, _ = demo_run
    out = home / "small.pt"
    p = run_cli("export", str(run), "--pick", "smallest", "-o", str(out), cwd=home)
    assert p.returncode == 0, p.stderr
    model = autorank.load(out)
    original = autorank.load_model("demo")
    assert sum(q.numel() for q in model.parameters()) < sum(q.numel() for q in original.parameters())
    meta = json.loads(Path(str(out) + ".json").read_text())
    front = json.loads((run / "front.json").read_text())["front"]
    smallest = min(front, key=lambda m: m["cost_ratio"])
    assert meta["metadata"]["trial"] == smallest["trial"]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["search", "--budget", "30%flops", "--model", "nosuch.module:build", "--trials", "2"], ["nosuch.module"]),
        (["search", "--budget", "1%flops", "--trials", "2"], ["1%flops", "cannot be met"]),
        (["search", "--budget", "30%bananas", "--trials", "2"], ["bananas"]),
        (["search", "--budget", "30%flops", "--space", "nosuch"], ["nosuch"]),
        (["search", "--budget", "30%flops", "--task", "tests.search_toys:ToyCNN"], ["tests.search_toys:ToyCNN"]),
        (["search", "--budget", "30%flops", "--trials", "0"], ["trials"]),
        (["search", "--budget", "50%latency", "--latency-rounds", "0", "--trials", "2"], ["latency rounds", "0"]),
        (["profile", "--latency", "--latency-rounds", "-3"], ["latency rounds", "-3"]),
        (["front", "does-not-exist"], ["does-not-exist"]),
        (["export", "does-not-exist", "--pick", "best", "-o", "x.pt"], ["does-not-exist"]),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(tmp_path, args, needles, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    p = run_inproc(*args, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert_one_line_error(p, *needles)


def test_bad_input_as_a_separate_process(tmp_path):
    """The same one-line error and exit code from the installed command's entry point."""
    assert_one_line_error(run_cli("search", "--budget", "30%bananas", cwd=tmp_path), "bananas")
    assert_one_line_error(run_cli("front", "nowhere", cwd=tmp_path), "nowhere")


def test_export_bad_pick_and_unmeetable_constraint(demo_run, tmp_path, capsys, monkeypatch):
    _, run, _ = demo_run
    cli = lambda *a: run_inproc(*a, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)  # noqa: E731
    assert_one_line_error(cli("export", str(run), "--pick", "fastest", "-o", "x.pt"), "fastest")
    assert_one_line_error(cli("export", str(run), "--pick", "best", "--min-score", "1.5", "-o", "x.pt"), "nearest", "trial")
    assert not (tmp_path / "x.pt").exists()
    assert_one_line_error(cli("export", str(run), "-o", "x.pt"), "--pick")


def test_front_of_a_run_without_a_finished_trial(tmp_path, capsys, monkeypatch):
    from autorank.search import RunDir

    RunDir(tmp_path / "r").prepare({"model": "m", "task": "t", "budget": "30%flops", "space": {}, "seed": 0, "sampler": "tpe"})
    assert_one_line_error(run_inproc("front", str(tmp_path / "r"), cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch), "no front yet")


def test_a_different_budget_in_an_existing_run_directory_is_refused(demo_run):
    home, run, _ = demo_run
    p = run_cli("search", "--budget", "50%flops", "--out", str(run), "--trials", "2", cwd=home)
    assert_one_line_error(p, "budget", "another --out")


def test_every_command_help_shows_examples(tmp_path, capsys, monkeypatch):
    for cmd in ("search", "front", "export", "decompose", "profile", "plan", "methods"):
        p = run_inproc(cmd, "--help", cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
        assert p.returncode == 0 and "examples:" in p.stdout, cmd


def test_training_time_options_from_the_command_line(tmp_path):
    """--fixed-point 8 --bn-between-factors: the fine-tuned member is stored with int8 factors, BN folded away."""
    out = tmp_path / "fp"
    p = run_cli("search", "--model", "tests.search_toys:toy_cnn", "--task", "tests.search_toys:toy_task", "--budget", "30%flops",
                "--trials", "4", "--finetune", "1", "--sensitivity-points", "2", "--fixed-point", "8", "--bn-between-factors",
                "--out", str(out), "-q", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["space"]["training"] == {"bn_between_factors": True, "fixed_point": 8}
    tuned = [json.loads(q.read_text()) for q in (out / "trials").glob("*.json")]
    tuned = [r for r in tuned if r.get("finetune")]
    assert tuned and "error" not in tuned[0]["finetune"], tuned[0].get("finetune")
    from autorank.saving import read

    blob = read(out / tuned[0]["finetune"]["weights"])
    dtypes = {v.dtype for v in blob["state_dict"].values()}
    assert torch.int8 in dtypes
    assert not any("running_mean" in k for k in blob["state_dict"])  # the BNs were folded back
    bad = run_cli("search", "--model", "tests.search_toys:toy_cnn", "--task", "tests.search_toys:toy_task", "--budget", "30%flops",
                  "--fixed-point", "3", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert_one_line_error(bad, "--fixed-point")
