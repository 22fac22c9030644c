"""The CLI called in this process, as the trust and fault tests call it, and their one-line error check."""

from __future__ import annotations

from pathlib import Path


def run_main(*args: str, cwd: Path, capsys, monkeypatch):
    """``autorank ARGS`` in this process from ``cwd``: (exit code, stdout, stderr)."""
    from autorank.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        rc = main(list(args))
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 2
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(rc: int, err: str, *needles: str) -> str:
    """Exit code 2, the last line an ``error:`` naming every needle, no traceback; returns that line."""
    assert rc == 2, (rc, err[-2000:])
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]
