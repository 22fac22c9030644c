"""End-to-end tests of the ``autorank`` command, run as a user types it.

Every command runs in its own process and its own working directory. Starting
Python and importing torch costs a few CPU-seconds per command, so:

- the listing, two successful decompositions, ``--debug`` and one bad input
  run the real console script (or ``python -m autorank.cli``) in a subprocess;
- the other commands run in processes forked, one per command, from a single
  subprocess that has imported ``autorank.cli`` and done nothing else: each
  command still gets a fresh process, its own cwd and real file descriptors 1
  and 2, and the exit status of ``autorank.cli.entry()`` (the console script's
  entry point); only the interpreter start-up is shared.

All of them start together from one module-scoped fixture and the tests then
inspect what came out.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import torch

import autorank
from autorank.zoo import example_input

# ---------------------------------------------------------------------- user files

NET_PY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            x = torch.relu(self.grouped(self.dw(x)))
            return self.fc(self.pool(x).flatten(1))


    def build():
        torch.manual_seed(1234)
        return Net()


    def relu_only():
        return nn.Sequential(nn.ReLU())


    def not_a_module():
        return 42
    """
)

#: an input for Net (it has no built-in example input)
NET_INPUT_SHAPE = (2, 3, 8, 8)

PKG = "userpkg_autorank_cli"  # unique: imported in this test process too

DEMO_PLAN = {
    "layers": {
        "features.0": {"method": "cp", "rank": 3},
        "features.3": {"method": "tucker2", "rank": [16, 32]},
        "features.6": {"method": "spatial-svd", "rank": 0.5},
        "features.9": {"method": "svd", "rank": 0.5},
        "classifier.2": {"method": "svd", "rank": 32},
    }
}

NET_PLAN = {
    "layers": {
        "conv": {"method": "svd", "rank": 0.5},
        "dw": {"method": "spatial-svd", "rank": 2},
        "grouped": {"method": "svd", "rank": 2},
        "fc": {"method": "svd", "rank": 4},
    }
}


def _script() -> list[str]:
    """The installed console script, else ``python -m autorank.cli``."""
    exe = shutil.which("autorank") or str(Path(sys.executable).with_name("autorank"))
    if Path(exe).exists():
        return [exe]
    return [sys.executable, "-m", "autorank.cli"]


MODULE_CMD = [sys.executable, "-m", "autorank.cli"]


def _plan(layers: dict) -> str:
    return json.dumps({"layers": layers})


# ---------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    """One command in its own directory: the files it starts with, and what came out."""

    id: str
    argv: list[str]
    files: dict = field(default_factory=dict)  # relative path -> str or bytes
    culprits: tuple = ()  # substrings the error line must contain
    pythonpath: bool = False
    script: Optional[list[str]] = None
    xfail: str = ""  # a known library bug: the reason
    # filled by the fixture
    cwd: Optional[Path] = None
    before: Optional[dict] = None
    after: Optional[dict] = None
    rc: Optional[int] = None
    stdout: str = ""
    stderr: str = ""


def _net_files(**extra) -> dict:
    files = {"net.py": NET_PY}
    files.update(extra)
    return files


PRECIOUS = b"precious bytes that must survive a failed command\n"

BAD_INPUT = [
    Scenario("unknown-method-in-plan",
             ["decompose", "--model", "net.py:build", "--plan", "plan.json", "-o", "out.pt"],
             _net_files(**{"plan.json": _plan({"conv": {"method": "nosuchmethod", "rank": 2}})}),
             ("nosuchmethod",)),
    Scenario("unknown-method-flag",
             ["decompose", "--model", "demo", "--method", "tucker3x", "--rank", "0.5", "-o", "out.pt"],
             {}, ("tucker3x",)),
    Scenario("unknown-layer",
             ["decompose", "--model", "net.py:build", "--plan", "plan.json", "-o", "out.pt"],
             _net_files(**{"plan.json": _plan({"convv": {"method": "svd", "rank": 2}})}),
             ("convv",)),
    Scenario("rank-zero",
             ["decompose", "--model", "net.py:build", "--plan", "plan.json", "-o", "out.pt"],
             _net_files(**{"plan.json": _plan({"fc": {"method": "svd", "rank": 0}})}),
             ("'fc'", "rank 0")),
    Scenario("rank-negative-flag",
             ["decompose", "--model", "net.py:build", "--method", "svd", "--rank", "-3", "-o", "out.pt"],
             _net_files(), ("-3",)),
    # svd on conv 3->16 3x3: max rank min(16, 27) = 16; --force with an existing file: still untouched
    Scenario("rank-above-max",
             ["decompose", "--model", "net.py:build", "--plan", "plan.json", "-o", "out.pt", "--force"],
             _net_files(**{"plan.json": _plan({"conv": {"method": "svd", "rank": 17}}), "out.pt": PRECIOUS}),
             ("'conv'", "17")),
    Scenario("fraction-above-one",
             ["decompose", "--model", "demo", "--method", "svd", "--rank", "1.5", "-o", "out.pt"],
             {}, ("1.5",)),
    Scenario("spatial-svd-on-linear",
             ["decompose", "--model", "net.py:build", "--plan", "plan.json", "-o", "out.pt"],
             _net_files(**{"plan.json": _plan({"fc": {"method": "spatial-svd", "rank": 2}})}),
             ("'fc'", "spatial-svd")),
    Scenario("tucker2-on-depthwise",
             ["decompose", "--model", "net.py:build", "--plan", "plan.json", "-o", "out.pt"],
             _net_files(**{"plan.json": _plan({"dw": {"method": "tucker2", "rank": [2, 2]}})}),
             ("'dw'", "tucker2")),
    Scenario("cp-on-grouped",
             ["decompose", "--model", "net.py:build", "--plan", "plan.json", "-o", "out.pt"],
             _net_files(**{"plan.json": _plan({"grouped": {"method": "cp", "rank": 2}})}),
             ("'grouped'", "cp")),
    Scenario("plan-not-json",
             ["decompose", "--model", "demo", "--plan", "myplan.json", "-o", "out.pt", "--force"],
             {"myplan.json": '{"layers": {"features.0": {"method": "svd", ', "out.pt": PRECIOUS},
             ("myplan.json",)),
    Scenario("plan-misspelt-key",
             ["decompose", "--model", "demo", "--plan", "plan.json", "-o", "out.pt"],
             {"plan.json": _plan({"features.0": {"method": "svd", "rnak": 2}})},
             ("features.0", "rnak")),
    Scenario("plan-missing",
             ["decompose", "--model", "demo", "--plan", "noplan.json", "-o", "out.pt"],
             {}, ("noplan.json",)),
    Scenario("spec-module-does-not-import",
             ["decompose", "--model", "no_such_pkg_zq.models:build", "--method", "svd", "--rank", "0.5", "-o", "out.pt"],
             {}, ("no_such_pkg_zq",)),
    Scenario("spec-file-raises-on-import",
             ["decompose", "--model", "broken.py:build", "--method", "svd", "--rank", "0.5", "-o", "out.pt"],
             {"broken.py": "import torch\nraise RuntimeError('kaboom in user code')\n"},
             ("broken.py", "kaboom")),
    Scenario("spec-file-missing",
             ["decompose", "--model", "missing_net.py:build", "--method", "svd", "--rank", "0.5", "-o", "out.pt"],
             {}, ("missing_net.py",)),
    Scenario("spec-attribute-missing",
             ["decompose", "--model", "net.py:buidl", "--method", "svd", "--rank", "0.5", "-o", "out.pt"],
             _net_files(), ("buidl",)),
    Scenario("spec-returns-non-module",
             ["decompose", "--model", "net.py:not_a_module", "--method", "svd", "--rank", "0.5", "-o", "out.pt"],
             _net_files(), ("not_a_module", "int")),
    Scenario("output-exists-without-force",
             ["decompose", "--model", "demo", "--method", "svd", "--rank", "0.5", "-o", "out.pt"],
             {"out.pt": PRECIOUS}, ("out.pt", "--force")),
    Scenario("output-directory-missing",
             ["decompose", "--model", "demo", "--method", "svd", "--rank", "0.5", "-o", "nodir/out.pt"],
             {}, ("nodir",)),
    Scenario("nothing-to-decompose",
             ["decompose", "--model", "net.py:relu_only", "--method", "svd", "--rank", "0.5", "-o", "out.pt"],
             _net_files(), ("relu_only", "svd")),
    Scenario("tucker2-unknown-init-option",
             ["decompose", "--model", "demo", "--plan", "plan.json", "-o", "out.pt"],
             {"plan.json": _plan({"features.3": {"method": "tucker2", "rank": [4, 4], "options": {"init": "hoooi"}}})},
             ("hoooi",)),
    Scenario("cp-negative-n-iter-max-option",
             ["decompose", "--model", "demo", "--plan", "plan.json", "-o", "out.pt"],
             {"plan.json": _plan({"features.3": {"method": "cp", "rank": 4, "options": {"n_iter_max": -1}}})},
             ("n_iter_max",)),
    Scenario("calibration-file-missing",
             ["decompose", "--model", "demo", "--method", "svd", "--rank", "0.5", "--calibration", "calib.pt", "-o", "out.pt"],
             {}, ("calib.pt",)),
]

DEBUG = Scenario(
    "debug-shows-traceback",
    ["--debug", "decompose", "--model", "net.py:build", "--plan", "plan.json", "-o", "out.pt"],
    _net_files(**{"plan.json": _plan({"conv": {"method": "svd", "rank": 17}})}),
)

OK_DEMO = Scenario(
    "ok-demo-plan",
    ["decompose", "--model", "demo", "--plan", "plan.json", "-o", "out.pt", "--force", "--json", "-q"],
    {"plan.json": json.dumps(DEMO_PLAN), "out.pt": PRECIOUS},
)
OK_PACKAGE = Scenario(
    "ok-package-spec-uniform",
    ["decompose", "--model", f"{PKG}.models:build", "--method", "svd", "--rank", "0.5", "-o", "small.pt"],
    {f"{PKG}/__init__.py": "", f"{PKG}/models.py": NET_PY},
    pythonpath=True,
    script=MODULE_CMD,
)
OK_FILE = Scenario(
    "ok-file-spec-plan",
    ["decompose", "--model", "models/net.py:build", "--plan", "plan.json", "-o", "out/small.pt", "-q"],
    {"models/net.py": NET_PY, "plan.json": json.dumps(NET_PLAN), "out/.keep": ""},
)
METHODS = Scenario("methods-table", ["methods"])
METHODS_JSON = Scenario("methods-json", ["methods", "--json"], script=MODULE_CMD)

ALL = BAD_INPUT + [DEBUG, OK_DEMO, OK_PACKAGE, OK_FILE, METHODS, METHODS_JSON]


#: what runs through the real console script or ``python -m autorank.cli`` (the rest runs forked, see
#: the module docstring): both entry points, a built-in and a package spec, the interpreter's own
#: traceback under --debug, and one bad input
REAL = {"methods-table", "methods-json", "ok-demo-plan", "ok-package-spec-uniform", "debug-shows-traceback",
        "output-exists-without-force"}

FORK_SERVER = r"""
import json, os, sys, traceback
import autorank.cli as cli

cases = json.loads(open(sys.argv[1]).read())
logs = sys.argv[2]
codes = {}
for case in cases:
    pid = os.fork()
    if pid == 0:  # the child: one command, as the console script would run it
        code = 1
        try:
            os.chdir(case["cwd"])
            for fd, name in ((1, "out"), (2, "err")):
                f = os.open(os.path.join(logs, case["id"] + "." + name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(f, fd)
                os.close(f)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            sys.argv = ["autorank"] + case["argv"]
            try:
                cli.entry()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    codes[case["id"]] = os.waitstatus_to_exitcode(status)
open(os.path.join(logs, "codes.json"), "w").write(json.dumps(codes))
"""


def _snapshot(root: Path) -> dict:
    """Every file under root (hidden ones included) -> sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


def _env(extra_path: Optional[Path] = None) -> dict:
    env = dict(os.environ)
    env.pop("AUTORANK_CACHE_DIR", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # so that "nothing written" can be checked on the whole directory
    env["COLUMNS"] = "240"
    env["OMP_NUM_THREADS"] = "1"
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _prepare(sc: Scenario, root: Path) -> None:
    cwd = root / sc.id
    cwd.mkdir(parents=True)
    for rel, content in sc.files.items():
        p = cwd / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    sc.cwd = cwd
    sc.before = _snapshot(cwd)


def _run(sc: Scenario) -> None:
    proc = subprocess.run(
        (sc.script or _script()) + sc.argv, cwd=sc.cwd, env=_env(sc.cwd if sc.pythonpath else None),
        capture_output=True, text=True, timeout=300,
    )
    sc.rc, sc.stdout, sc.stderr = proc.returncode, proc.stdout, proc.stderr
    sc.after = _snapshot(sc.cwd)


def _run_forked(scs: list[Scenario], root: Path) -> None:
    logs = root / "_logs"
    logs.mkdir()
    (logs / "cases.json").write_text(json.dumps([{"id": sc.id, "cwd": str(sc.cwd), "argv": sc.argv} for sc in scs]))
    proc = subprocess.run(
        [sys.executable, "-c", FORK_SERVER, str(logs / "cases.json"), str(logs)],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"fork server failed:\n{proc.stdout}\n{proc.stderr}"
    codes = json.loads((logs / "codes.json").read_text())
    for sc in scs:
        sc.rc = codes[sc.id]
        sc.stdout = (logs / f"{sc.id}.out").read_text()
        sc.stderr = (logs / f"{sc.id}.err").read_text()
        sc.after = _snapshot(sc.cwd)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Scenario]:
    root = tmp_path_factory.mktemp("cli")
    for sc in ALL:
        _prepare(sc, root)
    forked = [sc for sc in ALL if sc.id not in REAL]
    real = [sc for sc in ALL if sc.id in REAL]
    # the slowest first; the fork server runs its commands one after another
    real.sort(key=lambda sc: not sc.id.startswith("ok-"))
    with ThreadPoolExecutor(3) as pool:
        jobs = [pool.submit(_run_forked, forked, root)] + [pool.submit(_run, sc) for sc in real]
        for job in jobs:
            job.result()
    return {sc.id: sc for sc in ALL}


def _describe(sc: Scenario) -> str:
    return f"$ autorank {' '.join(sc.argv)}\nrc={sc.rc}\n--- stdout\n{sc.stdout}\n--- stderr\n{sc.stderr}"



# ---------------------------------------------------------------------- methods


def test_methods_table_lists_every_method_with_layers_and_reference(runs):
    sc = runs["methods-table"]
    assert sc.rc == 0, _describe(sc)
    names = autorank.methods.available()
    assert {"svd", "spatial-svd"} <= set(names)
    lines = sc.stdout.splitlines()
    for name in names:
        method = autorank.methods.get(name)
        row = [ln for ln in lines if ln.strip("│┃ ").startswith(name + " ")]
        assert row, f"method {name!r} missing from the table:\n{sc.stdout}"
        desc = method.describe()
        assert desc["layers"][0] in row[0], f"{name}: layer type {desc['layers'][0]} not on its row {row[0]!r}"
        # the reference may wrap over several lines: its first word is on the method's first row
        assert desc["reference"].split()[0] in row[0]
    assert "multiply-add" in sc.stdout  # the FLOPs convention is stated wherever FLOPs are shown


def test_methods_json_parses_and_matches_registry(runs):
    sc = runs["methods-json"]
    assert sc.rc == 0, _describe(sc)
    rows = json.loads(sc.stdout)
    by_name = {r["name"]: r for r in rows}
    assert sorted(by_name) == autorank.methods.available()
    assert by_name["svd"]["layers"][0] == "Linear" and "Conv2d" in by_name["svd"]["layers"]
    assert by_name["spatial-svd"]["layers"] == ["Conv2d"]
    for name, r in by_name.items():
        m = autorank.methods.get(name)
        assert r["reference"] == m.reference and r["reference"].strip(), name
        assert len(r["layers"]) == len(m.layer_kinds) >= 1
        assert r["nested"] == m.nested and r["data_aware"] == m.data_aware


# ---------------------------------------------------------------------- successful decompositions


def _check_ok(sc: Scenario) -> None:
    assert sc.rc == 0, _describe(sc)
    assert "Traceback" not in sc.stderr and "error:" not in sc.stderr, _describe(sc)


def test_decompose_builtin_with_plan_file_overwrites_with_force_and_loads_elsewhere(runs):
    sc = runs["ok-demo-plan"]
    _check_ok(sc)
    out = sc.cwd / "out.pt"
    assert out.read_bytes() != PRECIOUS
    summary = json.loads(sc.stdout)
    assert summary["layers"] == len(DEMO_PLAN["layers"])

    x = example_input("demo")
    model = autorank.load_model("demo")
    expected = autorank.decompose(model, DEMO_PLAN, example_inputs=x, cache=autorank.FactorCache())
    loaded = autorank.load(out)  # this test process is not the one that wrote the file
    assert not loaded.training
    assert {k: (v.method, v.rank) for k, v in autorank.plan_of(loaded).layers.items()} == {
        k: (v.method, v.rank) for k, v in autorank.plan_of(expected).layers.items()
    }
    assert summary["params_before"] == sum(p.numel() for p in model.parameters())
    assert summary["params_after"] == sum(p.numel() for p in loaded.parameters()) < summary["params_before"]
    xb = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(xb), expected.eval()(xb), rtol=1e-4, atol=1e-5)
        y0, y1 = model.eval()(x), loaded(x)
    assert summary["relative_output_error"] == pytest.approx(float((y1 - y0).norm() / y0.norm()), rel=1e-3, abs=1e-5)


def test_decompose_package_module_spec_with_uniform_rank(runs, monkeypatch):
    sc = runs["ok-package-spec-uniform"]
    _check_ok(sc)
    assert "decomposed 3 layers" in sc.stdout, _describe(sc)
    monkeypatch.syspath_prepend(str(sc.cwd))
    spec = f"{PKG}.models:build"
    model = autorank.load_model(spec)
    expected = autorank.decompose(model, autorank.Plan.uniform(model, "svd", 0.5), cache=autorank.FactorCache())
    loaded = autorank.load(sc.cwd / "small.pt", trust_spec=True)  # the spec names our own package: opt in
    assert type(loaded).__name__ == "Net" and type(loaded).__module__ == f"{PKG}.models"
    assert sorted(autorank.plan_of(loaded).layers) == ["conv", "fc", "grouped"]  # svd refuses the depthwise conv
    x = torch.randn(NET_INPUT_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected.eval()(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(loaded(x), model.eval()(x), atol=1e-4)  # it was really decomposed


def test_decompose_file_spec_relative_path_into_subdirectory(runs):
    sc = runs["ok-file-spec-plan"]
    _check_ok(sc)
    out = sc.cwd / "out" / "small.pt"
    assert out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []
    model = autorank.load_model(f"{sc.cwd / 'models' / 'net.py'}:build")
    expected = autorank.decompose(model, NET_PLAN, cache=autorank.FactorCache())
    loaded = autorank.load(out, trust_spec=True)  # the spec names our own file: opt in
    plan = autorank.plan_of(loaded)
    assert sorted(plan.layers) == sorted(NET_PLAN["layers"])
    assert plan.layers["fc"].rank == 4 and plan.layers["dw"].method == "spatial-svd"
    x = torch.randn(NET_INPUT_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected.eval()(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "case",
    [pytest.param(sc.id, marks=pytest.mark.xfail(strict=True, reason=sc.xfail)) if sc.xfail else sc.id for sc in BAD_INPUT],
)
def test_bad_input_one_error_line_exit_2_nothing_written(runs, case):
    sc = runs[case]
    assert sc.rc == 2, _describe(sc)
    lines = sc.stderr.splitlines()
    assert len(lines) == 1, _describe(sc)  # one line: no blank line, no warning, no log record
    assert lines[0].startswith("error: "), _describe(sc)
    assert "Traceback" not in sc.stderr
    for culprit in sc.culprits:
        assert culprit in lines[0], f"{culprit!r} not named in {lines[0]!r}"
    # nothing written: every file as before (a pre-existing output byte for byte), no new file, no temp file
    assert sc.after == sc.before, _describe(sc)


def test_debug_shows_traceback(runs):
    sc = runs["debug-shows-traceback"]
    assert sc.rc != 0
    assert "Traceback (most recent call last)" in sc.stderr, _describe(sc)
    assert "RankError" in sc.stderr and "17" in sc.stderr
    assert not (sc.cwd / "out.pt").exists()
