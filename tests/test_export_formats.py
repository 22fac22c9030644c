"""export_model: pt / onnx / torchscript files that load back, reproduce the model, and describe themselves."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import autorank
import autorank.export as export_module
from autorank.cache import FactorCache
from autorank.errors import AutorankError, ExportError
from autorank.export import ExportReport, Tolerance, _compare, default_tolerance, export_model, sidecar_path
from autorank.models import BertEncoder, DigitsCNN

ATOL, RTOL = 1e-4, 1e-3  # the documented float32 tolerance, used to compare what we load back


def tiny_encoder() -> nn.Module:
    """A BERT-like encoder small enough for tests (token ids in, pooled vector out)."""
    torch.manual_seed(1)
    return BertEncoder(layers=2, hidden=32, heads=4, ffn=64, vocab=100, max_len=16)


def narrow_cnn() -> nn.Module:
    return DigitsCNN(width=8)


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    """The demo CNN with SVD, Tucker-2 and spatial-SVD layers and non-trivial batch-norm statistics."""
    model = autorank.load_model("demo")
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # eval and train mode now give different outputs
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    plan = {"layers": {
        "features.3": {"method": "tucker2", "rank": [8, 16]},
        "features.6": {"method": "spatial-svd", "rank": 0.5},
        "features.9": {"method": "svd", "rank": 12},
        "classifier.2": {"method": "svd", "rank": 0.5},
    }}
    return autorank.decompose(model, plan, example_inputs=torch.randn(1, 1, 8, 8), cache=FactorCache()).eval()


@pytest.fixture(scope="module")
def encoder() -> nn.Module:
    model = autorank.load_model(f"{Path(__file__).resolve()}:tiny_encoder")
    plan = {"layers": {"layers.0.query": {"method": "svd", "rank": 8}, "layers.1.intermediate": {"method": "svd", "rank": 0.5}}}
    return autorank.decompose(model, plan, cache=FactorCache()).eval()


def _reload(fmt: str, path: Path):
    """A callable running the exported file with its own runtime (numpy or torch in, numpy out)."""
    if fmt == "pt":
        model = autorank.load(path, trust_spec=True)  # the test's own spec (a file): an explicit opt-in
        return lambda x: model(x).detach().numpy()
    if fmt == "torchscript":
        model = torch.jit.load(str(path))
        return lambda x: model(x).detach().numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ---------------------------------------------------------------------- every format reproduces the model


@pytest.mark.parametrize("fmt", ["pt", "onnx", "torchscript"])
def test_decomposed_cnn_round_trips(cnn, tmp_path, fmt):
    x = torch.randn(3, 1, 8, 8)
    path = tmp_path / f"cnn.{fmt}"
    meta = {"trial": 7, "metrics": {"accuracy": 0.93}, "run": "runs/demo"}
    report = export_model(cnn, path, format=fmt, example_inputs=x, metadata=meta)

    assert isinstance(report, ExportReport) and report.format == fmt and report.checked
    assert report.path == path and report.sidecar == tmp_path / f"cnn.{fmt}.json"
    assert report.bytes == path.stat().st_size
    assert report.tolerance == Tolerance(ATOL, RTOL)
    assert report.max_abs_diff is not None and report.max_abs_diff <= ATOL
    assert _files(tmp_path) == [f"cnn.{fmt}", f"cnn.{fmt}.json"]  # no temporary left behind

    # loaded back by the format's own runtime, on another batch (of another size): same outputs as PyTorch
    run = _reload(fmt, path)
    x2 = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = cnn(x2).numpy()
    np.testing.assert_allclose(run(x2), expected, atol=ATOL, rtol=RTOL)
    if fmt == "onnx":
        assert report.dynamic_batch is True

    side = json.loads(report.sidecar.read_text())
    assert side["format"] == fmt and side["file"] == path.name and side["bytes"] == report.bytes
    assert side["torch"] == torch.__version__
    assert side["metadata"] == meta
    assert side["plan"] == autorank.plan_of(cnn).to_dict()
    assert side["plan"]["layers"]["features.3"] == {"method": "tucker2", "rank": [8, 16]}
    assert side["inputs"][0]["shape"] == [3, 1, 8, 8] and side["inputs"][0]["dtype"] == "float32"
    assert side["outputs"] == [{"shape": [3, 10], "dtype": "float32"}]
    assert side["check"]["checked"] is True
    assert side["check"]["max_abs_diff"] == report.max_abs_diff
    assert side["check"]["tolerance"] == {"atol": ATOL, "rtol": RTOL}


@pytest.mark.parametrize("fmt", ["pt", "onnx", "torchscript"])
def test_transformer_with_token_ids_round_trips(encoder, tmp_path, fmt):
    ids = torch.randint(0, 100, (2, 9))
    report = export_model(encoder, tmp_path / f"enc.{fmt}", format=fmt, example_inputs=ids)
    assert report.checked and report.max_abs_diff <= ATOL
    ids2 = torch.randint(0, 100, (4, 9))
    with torch.no_grad():
        expected = encoder(ids2).numpy()
    np.testing.assert_allclose(_reload(fmt, report.path)(ids2), expected, atol=ATOL, rtol=RTOL)
    side = json.loads(report.sidecar.read_text())
    assert side["inputs"][0]["dtype"] == "int64" and side["inputs"][0]["shape"] == [2, 9]
    if fmt == "onnx":
        assert side["export"]["dynamic_batch"] is True
        import onnx

        proto = onnx.load(str(report.path))
        assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_export_uses_eval_mode_and_restores_modes(cnn, tmp_path):
    x = torch.randn(4, 1, 8, 8)
    cnn.train()
    cnn.features[1].eval()  # a submodule in its own mode must keep it
    try:
        report = export_model(cnn, tmp_path / "m.ts", format="torchscript", example_inputs=x)
        assert cnn.training and not cnn.features[1].training and cnn.features[4].training
    finally:
        cnn.eval()
    with torch.no_grad():
        np.testing.assert_allclose(_reload("torchscript", report.path)(x), cnn(x).numpy(), atol=ATOL, rtol=RTOL)


def test_builtin_spec_supplies_example_inputs_and_pt_without_spec_checks_weights(tmp_path):
    demo = autorank.decompose(autorank.load_model("demo"), {"layers": {"classifier.4": {"method": "svd", "rank": 3}}},
                              cache=FactorCache())
    report = export_model(demo, tmp_path / "demo.ts", format="torchscript")
    assert json.loads(report.sidecar.read_text())["inputs"][0]["shape"] == [1, 1, 8, 8]

    class Local(nn.Module):  # no spec: the pt check compares the weights read back
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    small = autorank.decompose(Local(), {"layers": {"a": {"method": "svd", "rank": 2}}}, cache=FactorCache())
    report = export_model(small, tmp_path / "local.pt", example_inputs=torch.randn(2, 6))
    side = json.loads(report.sidecar.read_text())
    assert report.checked and report.max_abs_diff is None and "weights" in side["check"]["method"]
    x = torch.randn(3, 6)
    assert torch.equal(autorank.load(report.path, model=Local())(x), small(x))
    with pytest.raises(ExportError, match=r"x\.onnx.*example_inputs"):
        export_model(small, tmp_path / "x.onnx", format="onnx")


def test_pt_with_a_spec_that_builds_another_architecture_is_refused(tmp_path):
    narrow = autorank.decompose(DigitsCNN(width=8), {"layers": {"classifier.2": {"method": "svd", "rank": 4}}},
                                cache=FactorCache())
    # DigitsCNN() with no arguments is 32 wide: its class is no spec for this narrow one
    with pytest.raises(ExportError, match=r"bad\.pt.*DigitsCNN.*spec="):
        export_model(narrow, tmp_path / "bad.pt", example_inputs=torch.randn(1, 1, 8, 8))
    assert _files(tmp_path) == []
    report = export_model(narrow, tmp_path / "good.pt", example_inputs=torch.randn(1, 1, 8, 8),
                          spec=f"{Path(__file__).resolve()}:narrow_cnn")
    assert report.max_abs_diff == 0.0 and "autorank.load" in json.loads(report.sidecar.read_text())["check"]["method"]


def test_onnx_weights_beyond_the_protobuf_limit_go_to_an_external_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "_ONNX_EXTERNAL_DATA_BYTES", 0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    report = export_model(model, tmp_path / "ext.onnx", format="onnx", example_inputs=torch.randn(2, 4))
    assert _files(tmp_path) == ["ext.onnx", "ext.onnx.data", "ext.onnx.json"]
    assert [p.name for p in report.files] == ["ext.onnx", "ext.onnx.data", "ext.onnx.json"]
    assert report.bytes == (tmp_path / "ext.onnx").stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    assert json.loads(report.sidecar.read_text())["export"]["external_data"] == "ext.onnx.data"
    x = torch.randn(3, 4)
    with torch.no_grad():
        np.testing.assert_allclose(_reload("onnx", report.path)(x), model(x).numpy(), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------- refusing, failing cleanly


def test_no_overwrite_without_force(cnn, tmp_path):
    x = torch.randn(2, 1, 8, 8)
    path = tmp_path / "m.ts"
    export_model(cnn, path, format="torchscript", example_inputs=x, metadata={"v": 1})
    before = path.read_bytes(), sidecar_path(path).read_bytes()
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ExportError, match=r"m\.ts exists.*force"):
        export_model(other, path, format="torchscript", example_inputs=x)
    assert (path.read_bytes(), sidecar_path(path).read_bytes()) == before
    assert _files(tmp_path) == ["m.ts", "m.ts.json"]

    # the sidecar alone is protected as well
    lone = tmp_path / "lone.ts"
    sidecar_path(lone).write_text("{}")
    with pytest.raises(ExportError, match=r"lone\.ts\.json exists"):
        export_model(other, lone, format="torchscript", example_inputs=x)
    assert not lone.exists() and sidecar_path(lone).read_text() == "{}"

    report = export_model(other, path, format="torchscript", example_inputs=x, force=True, metadata={"v": 2})
    assert path.read_bytes() != before[0]
    with torch.no_grad():
        np.testing.assert_allclose(_reload("torchscript", path)(x), other(x).numpy(), atol=ATOL, rtol=RTOL)
    assert json.loads(report.sidecar.read_text())["metadata"] == {"v": 2}


def test_file_appearing_during_the_export_is_not_replaced(tmp_path, monkeypatch):
    path = tmp_path / "m.ts"
    real_save = torch.jit.save

    def save_then_someone_writes(module, f, *args, **kwargs):
        real_save(module, f, *args, **kwargs)
        path.write_text("someone else's")  # appears after the up-front check, before the file is moved in

    monkeypatch.setattr(torch.jit, "save", save_then_someone_writes)
    with pytest.raises(ExportError, match=r"m\.ts exists"):
        export_model(nn.Linear(4, 2), path, format="torchscript", example_inputs=torch.randn(2, 4))
    assert path.read_text() == "someone else's"
    assert _files(tmp_path) == ["m.ts"]


def test_unknown_format_and_bad_arguments(cnn, tmp_path):
    with pytest.raises(ExportError) as info:
        export_model(cnn, tmp_path / "m.tflite", format="tflite", example_inputs=torch.randn(1, 1, 8, 8))
    assert "tflite" in str(info.value) and all(f in str(info.value) for f in ("pt", "onnx", "torchscript"))
    assert isinstance(info.value, AutorankError)
    with pytest.raises(ExportError, match="example_inputs"):
        export_model(cnn, tmp_path / "m.ts", format="torchscript", example_inputs={"x": 1})
    with pytest.raises(ExportError, match="does not exist"):
        export_model(cnn, tmp_path / "nodir" / "m.pt", example_inputs=torch.randn(1, 1, 8, 8))
    assert _files(tmp_path) == []


class Broken(nn.Module):
    """Fails when called at all (``always``) or only while being traced or exported."""

    def __init__(self, always: bool):
        super().__init__()
        self.always = always
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        if self.always or torch.jit.is_tracing() or torch.compiler.is_exporting():
            raise RuntimeError("broken forward")
        return self.lin(x)


class Drifting(nn.Module):
    """Adds how often it was called: whatever is exported is a snapshot that differs from later calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        self.calls += 1
        return self.lin(x) + float(self.calls)


@pytest.mark.parametrize("fmt", ["pt", "onnx", "torchscript"])
def test_model_that_raises_leaves_no_file(tmp_path, fmt):
    x = torch.randn(2, 4)
    with pytest.raises(ExportError, match=rf"m\.{fmt}.*broken forward"):
        export_model(Broken(always=True), tmp_path / f"m.{fmt}", format=fmt, example_inputs=x)
    if fmt == "torchscript":  # the forward runs, the exporter fails half way (for onnx: see the mismatch test)
        with pytest.raises(ExportError, match=rf"cannot export .*m\.{fmt} as {fmt}.*broken forward"):
            export_model(Broken(always=False), tmp_path / f"m.{fmt}", format=fmt, example_inputs=x)
    assert _files(tmp_path) == []


def test_writer_failing_half_way_leaves_no_file(tmp_path, monkeypatch):
    def half_then_fail(module, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch.jit, "save", half_then_fail)
    with pytest.raises(ExportError, match=r"m\.ts.*disk full"):
        export_model(nn.Linear(4, 2), tmp_path / "m.ts", format="torchscript", example_inputs=torch.randn(2, 4))
    assert _files(tmp_path) == []


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_mismatch_raises_and_writes_nothing(tmp_path, fmt):
    x = torch.randn(2, 4)
    with pytest.raises(ExportError, match=rf"m\.{fmt}: the exported {fmt} model differs.*max abs diff"):
        export_model(Drifting(), tmp_path / f"m.{fmt}", format=fmt, example_inputs=x)
    assert _files(tmp_path) == []
    if fmt == "torchscript":  # a tolerance wide enough accepts the same drift
        report = export_model(Drifting(), tmp_path / "m.torchscript", format=fmt, example_inputs=x, atol=100.0)
        assert report.tolerance.atol == 100.0 and 0.5 < report.max_abs_diff < 100


def test_missing_onnxruntime_says_what_to_install(cnn, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(ExportError, match=r"onnxruntime.*pip install 'autorank\[export\]'"):
        export_model(cnn, tmp_path / "m.onnx", format="onnx", example_inputs=torch.randn(1, 1, 8, 8))
    assert _files(tmp_path) == []


# ---------------------------------------------------------------------- the tolerance rule


def test_tolerance_rule():
    assert default_tolerance(torch.float32) == Tolerance(1e-4, 1e-3)
    assert default_tolerance(torch.int64) == Tolerance(0.0, 0.0)
    ref = [torch.tensor([1.0, -10.0, 0.0, float("nan")])]
    ok = _compare(ref, [np.array([1.0005, -10.009, 5e-5, np.nan], dtype=np.float32)], None, None)
    assert ok.ok and ok.max_abs == pytest.approx(0.009, rel=1e-3) and ok.max_rel == pytest.approx(0.0009, rel=1e-3)
    assert not _compare(ref, [np.array([1.0, -10.02, 0.0, np.nan], dtype=np.float32)], None, None).ok  # 0.02 > 1e-4 + 1e-2
    assert not _compare(ref, [np.array([1.0, -10.0, 2e-4, np.nan], dtype=np.float32)], None, None).ok  # 2e-4 > atol at 0
    assert not _compare(ref, [np.array([1.0, -10.0, 0.0, 1.0], dtype=np.float32)], None, None).ok  # NaN vs a number
    assert _compare(ref, [np.array([1.0, -10.0, 2e-4, np.nan], dtype=np.float32)], 1e-3, None).ok
    assert not _compare(ref, [np.zeros(3, dtype=np.float32)], None, None).ok  # shape
    assert not _compare(ref, [], None, None).ok  # count
    ints = [torch.tensor([3, 4])]
    assert _compare(ints, [np.array([3, 4])], None, None).ok and not _compare(ints, [np.array([3, 5])], None, None).ok
