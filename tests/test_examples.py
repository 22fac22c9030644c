"""Every example runs, at its real size (they are small)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decompose_your_model_example(tmp_path):
    out = tmp_path / "small.pt"
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "decompose_your_model.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "loaded == decomposed: True" in res.stdout
    assert out.exists()
    err = float(res.stdout.split("relative output error ")[1].split(";")[0])
    assert 0.0 < err < 0.5
