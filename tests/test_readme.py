"""The README's first lines are the two set-up commands, and CI runs the second one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    assert block, "README has no shell block"
    assert text.index(block.group(0)) < 400, "the set-up commands must come first"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_readme_starts_with_exactly_two_commands():
    cmds = setup_commands()
    assert len(cmds) == 2, cmds
    main, tests = cmds
    assert "pip install torch==2.13.0" in main and "autorank " in main
    assert "pip install torch==2.13.0" in tests and "pytest" in tests and ".[test]" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_commands()[1] in ci
