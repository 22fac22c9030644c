"""save / load: round trips in this process and in a separate one, and no pickled code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import autorank
from autorank import FactorCache
from autorank.errors import AutorankError, SaveLoadError
from autorank.methods import Decomposed
from autorank.saving import metadata
from autorank.tasks.demo import demo_architecture

DEMO_PLAN = {
    "layers": {
        "features.0": {"method": "cp", "rank": 3},
        "features.3": {"method": "tucker2", "rank": [8, 16]},
        "features.6": {"method": "spatial-svd", "rank": 0.4},
        "features.9": {"method": "svd", "rank": 0.5},
        "classifier.2": {"method": "svd", "rank": 20},
    }
}

USER_MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Block(nn.Module):  # a plain nn.Module: no autorank base class, no attribute autorank needs
        def __init__(self, c):
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1, groups=2)])
            self.norm = nn.BatchNorm2d(c)

        def forward(self, x):
            return x + self.norm(self.convs[1](torch.relu(self.convs[0](x))))


    class UserNet(nn.Module):
        def __init__(self, width):  # a required argument: its class alone cannot rebuild it
            super().__init__()
            self.stem = nn.Conv2d(3, width, 3, padding=1)
            self.blocks = nn.Sequential(Block(width), Block(width))
            self.heads = nn.ModuleDict({"cls": nn.Linear(width, 5), "aux": nn.Linear(width, 2)})

        def forward(self, x):
            h = self.blocks(torch.relu(self.stem(x))).mean((2, 3))
            return self.heads["cls"](h) + self.heads["aux"](h).sum(1, keepdim=True)


    def build():
        torch.manual_seed(7)
        return UserNet(8)
    """
)

USER_PLAN = {
    "layers": {
        "stem": {"method": "svd", "rank": 4},
        "blocks.0.convs.0": {"method": "tucker2", "rank": [4, 6]},
        "blocks.0.convs.1": {"method": "svd", "rank": 3},  # grouped: per group
        "blocks.1.convs.1": {"method": "spatial-svd", "rank": 0.5},
        "heads.cls": {"method": "svd", "rank": 2},
    }
}


def _trained_demo() -> nn.Module:
    """The demo model: trained, its batch norms folded into the convolutions (biases no initialisation gives)."""
    return autorank.load_model("demo")


def _user_model(tmp_path: Path) -> tuple[str, nn.Module]:
    path = tmp_path / "models" / "user_net.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(USER_MODEL)
    spec = f"{path}:build"
    return spec, autorank.load_model(spec)


def _only_plain_data(obj, where="blob") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str), f"{where}: key {k!r}"
            _only_plain_data(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _only_plain_data(v, f"{where}[{i}]")
    else:
        assert obj is None or type(obj) in (str, int, float, bool, torch.Tensor), f"{where}: {type(obj).__name__}"



# ---------------------------------------------------------------------- round trips


def test_round_trip_in_process_with_every_method_and_buffers(tmp_path):
    model = _trained_demo()
    x = torch.randn(5, 1, 8, 8)
    small = autorank.decompose(model, DEMO_PLAN, example_inputs=x[:1], cache=FactorCache())
    path = autorank.save(small, tmp_path / "small.pt", metadata={"note": "round trip"})
    assert Path(path) == tmp_path / "small.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.pt"]  # written atomically, no leftovers

    loaded = autorank.load(path)
    assert not loaded.training
    assert type(loaded) is type(model)
    assert autorank.plan_of(loaded).to_dict() == autorank.plan_of(small).to_dict()
    assert {n: type(m[0]).__name__ for n, m in loaded.named_modules() if isinstance(m, Decomposed)} == {
        n: type(m[0]).__name__ for n, m in small.named_modules() if isinstance(m, Decomposed)}
    for (k, a), (k2, b) in zip(small.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert not torch.equal(loaded.classifier[4].bias, demo_architecture().classifier[4].bias)  # trained weights came back
    with torch.no_grad():
        assert torch.equal(loaded(x), small.eval()(x))

    info = metadata(path)
    assert info["spec"] == "demo" and info["metadata"] == {"note": "round trip"}
    assert info["plan"] == autorank.plan_of(small).to_dict()

    # a loaded model remembers its spec: saved again, it loads again
    again = autorank.load(autorank.save(loaded, tmp_path / "again.pt"))
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


def test_file_holds_only_plain_data_and_loads_with_weights_only(tmp_path):
    spec, model = _user_model(tmp_path)
    small = autorank.decompose(model, USER_PLAN, cache=FactorCache())
    autorank.save(small, tmp_path / "user.pt")
    blob = torch.load(tmp_path / "user.pt", weights_only=True)
    _only_plain_data(blob)
    assert blob["format"] == "autorank.model"
    assert blob["spec"] == spec  # an absolute file spec: loadable from any working directory
    assert json.loads(blob["plan"]) == autorank.plan_of(small).to_dict()
    assert set(blob["state_dict"]) == set(small.state_dict())
    # buffers too: batch-norm statistics a forward pass in training mode moved away from their initial values
    small.train()
    with torch.no_grad():
        small(torch.randn(4, 3, 10, 7) * 3 + 1)
    autorank.save(small.eval(), tmp_path / "user.pt")
    loaded = autorank.load(tmp_path / "user.pt", trust_spec=True)
    assert not torch.equal(loaded.blocks[0].norm.running_mean, torch.zeros(8))
    assert torch.equal(loaded.blocks[0].norm.running_var, small.blocks[0].norm.running_var)


class _Payload:
    """Unpickling this runs os.mkdir(marker): what weights_only=True must refuse."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_load_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "autorank.model", "version": 1, "spec": "demo", "plan": '{"layers": {}}', "metadata": "{}",
                "state_dict": {"features.0.weight": _Payload(str(marker))}}, evil)
    with pytest.raises(SaveLoadError) as info:
        autorank.load(evil)
    assert "evil.pt" in str(info.value)
    assert not marker.exists()
    # the file really carries code: a pickle load would have run it
    torch.load(evil, weights_only=False)
    assert marker.is_dir()


def test_separate_process_loads_identical_model(tmp_path):
    """Files written here, loaded by a fresh interpreter: identical outputs, and no model object is needed."""
    demo_small = autorank.decompose(_trained_demo(), DEMO_PLAN, cache=FactorCache())
    autorank.save(demo_small, tmp_path / "demo.pt")
    spec, user = _user_model(tmp_path)
    user_small = autorank.decompose(user, USER_PLAN, cache=FactorCache())
    autorank.save(user_small, tmp_path / "user.pt")
    xd, xu = torch.randn(6, 1, 8, 8), torch.randn(3, 3, 10, 7)
    torch.save({"demo": xd, "user": xu}, tmp_path / "inputs.pt")

    script = textwrap.dedent(
        f"""
        import torch, autorank
        torch.set_num_threads({torch.get_num_threads()})
        xs = torch.load("inputs.pt", weights_only=True)
        out = {{}}
        for name in ("demo", "user"):
            # the user's own file spec is code: loading it is an explicit opt-in (the built-in needs none)
            model = autorank.load(name + ".pt", trust_spec=name == "user")
            assert not model.training
            with torch.no_grad():
                out[name] = model(xs[name])
            out[name + "_type"] = type(model).__name__
        torch.save(out, "outputs.pt")
        """
    )
    env = dict(os.environ)
    env.pop("AUTORANK_CACHE_DIR", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = torch.load(tmp_path / "outputs.pt", weights_only=True)
    assert out["demo_type"] == "DigitsCNN" and out["user_type"] == "UserNet"
    with torch.no_grad():
        assert torch.equal(out["demo"], demo_small.eval()(xd))
        assert torch.equal(out["user"], user_small.eval()(xu))


def test_decomposing_a_factor_again_round_trips(tmp_path):
    """A factor of a decomposed layer is itself a layer: decompose it again, save, load."""
    model = autorank.load_model("demo")
    once = autorank.decompose(model, {"layers": {"features.3": {"method": "svd", "rank": 8}}}, cache=FactorCache())
    twice = autorank.decompose(once, {"layers": {"features.3.0": {"method": "spatial-svd", "rank": 4}}}, cache=FactorCache())
    assert sorted(autorank.plan_of(twice).layers) == ["features.3", "features.3.0"]
    loaded = autorank.load(autorank.save(twice, tmp_path / "twice.pt"))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), twice.eval()(x))
        assert not torch.equal(loaded(x), once.eval()(x))


TIED = textwrap.dedent(
    """
    import torch
    from torch import nn


    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.mid = nn.Linear(16, 16)
            self.out = nn.Linear(16, 50, bias=False)
            self.out.weight = self.emb.weight  # tied input and output embeddings

        def forward(self, ids):
            return self.out(torch.relu(self.mid(self.emb(ids))))


    def build():
        torch.manual_seed(3)
        return TiedLM()
    """
)


def test_tied_weights_stay_tied_after_load(tmp_path):
    (tmp_path / "tied.py").write_text(TIED)
    model = autorank.load_model(f"{tmp_path / 'tied.py'}:build")
    assert "tied" in (autorank.candidate_layers(model)["out"][1] or "")
    small = autorank.decompose(model, {"layers": {"mid": {"method": "svd", "rank": 4}}}, cache=FactorCache())
    assert small.out.weight is small.emb.weight
    loaded = autorank.load(autorank.save(small, tmp_path / "tied.pt"), trust_spec=True)  # a file spec: opt in
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids), small.eval()(ids))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in small.parameters())
    assert loaded.out.weight is loaded.emb.weight


# ---------------------------------------------------------------------- models without a spec


def test_model_without_spec_loads_with_model_argument(tmp_path):
    class Local(nn.Module):  # defined in a function: no importable spec
        def __init__(self, width=12):
            super().__init__()
            self.a = nn.Linear(6, width)
            self.b = nn.Linear(width, 4)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = Local()
    small = autorank.decompose(model, {"layers": {"a": {"method": "svd", "rank": 3}}}, cache=FactorCache())
    path = autorank.save(small, tmp_path / "local.pt")
    assert metadata(path)["spec"] is None
    with pytest.raises(SaveLoadError, match=r"model="):
        autorank.load(path)

    fresh = Local()  # other random weights: every value must come from the file
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    loaded = autorank.load(path, model=fresh)
    x = torch.randn(9, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert loaded is not fresh and isinstance(fresh.a, nn.Linear)  # the instance given is left untouched
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Linear(6, 12)

    with pytest.raises(SaveLoadError, match=r"local\.pt.*'a'"):
        autorank.load(path, model=Other())
    with pytest.raises(SaveLoadError, match=r"local\.pt"):
        autorank.load(path, model=Local(width=10))  # same names, other shapes


def test_importable_class_with_no_arguments_is_its_own_spec(tmp_path, monkeypatch):
    pkg = tmp_path / "saveload_userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(USER_MODEL + "\n\nclass Default(UserNet):\n    def __init__(self):\n        super().__init__(6)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from saveload_userpkg.nets import Default, UserNet

    small = autorank.decompose(Default(), {"layers": {"heads.aux": {"method": "svd", "rank": 1}}}, cache=FactorCache())
    path = autorank.save(small, tmp_path / "d.pt")
    assert metadata(path)["spec"] == "saveload_userpkg.nets:Default"
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(SaveLoadError, match=r"trust_spec=True"):  # importing the module is an explicit opt-in
        autorank.load(path)
    with torch.no_grad():
        assert torch.equal(autorank.load(path, trust_spec=True)(x), small.eval()(x))

    # a class with a required argument cannot be rebuilt from its name: load asks for the model
    small = autorank.decompose(UserNet(4), {"layers": {"stem": {"method": "svd", "rank": 2}}}, cache=FactorCache())
    path = autorank.save(small, tmp_path / "u.pt")
    assert metadata(path)["spec"] is None
    with pytest.raises(SaveLoadError, match=r"model="):
        autorank.load(path)
    with torch.no_grad():
        assert torch.equal(autorank.load(path, model=UserNet(4))(x), small.eval()(x))


def test_plain_sequential_saved_without_spec_asks_for_the_model(tmp_path):
    seq = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    small = autorank.decompose(seq, autorank.Plan.uniform(seq, "svd", 2), cache=FactorCache())
    path = autorank.save(small, tmp_path / "seq.pt")
    assert torch.equal(autorank.load(path, model=seq)(torch.ones(2, 8)), small(torch.ones(2, 8)))
    try:
        loaded = autorank.load(path)
    except SaveLoadError as exc:  # it cannot rebuild the layers: it must say how to load it
        assert "model=" in str(exc), str(exc)
    else:
        assert torch.equal(loaded(torch.ones(2, 8)), small(torch.ones(2, 8)))


# ---------------------------------------------------------------------- bad files and paths


def test_load_rejects_what_is_not_an_autorank_file(tmp_path):
    small = autorank.decompose(autorank.load_model("demo"), {"layers": {"features.3": {"method": "svd", "rank": 4}}},
                               cache=FactorCache())
    good = autorank.save(small, tmp_path / "good.pt")
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("hello")
    torch.save({"weight": torch.ones(2)}, tmp_path / "foreign.pt")
    torch.save(small.state_dict(), tmp_path / "state_dict.pt")
    (tmp_path / "adir.pt").mkdir()
    for name in ("missing.pt", "truncated.pt", "text.pt", "foreign.pt", "state_dict.pt", "adir.pt"):
        with pytest.raises(SaveLoadError) as info:
            autorank.load(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value), name
    assert isinstance(SaveLoadError("x"), AutorankError)


def test_save_errors_leave_nothing_behind(tmp_path):
    small = autorank.decompose(autorank.load_model("demo"), {"layers": {"classifier.4": {"method": "svd", "rank": 2}}},
                               cache=FactorCache())
    with pytest.raises(SaveLoadError, match="nodir"):
        autorank.save(small, tmp_path / "nodir" / "m.pt")
    (tmp_path / "taken").mkdir()
    with pytest.raises(SaveLoadError, match="taken"):
        autorank.save(small, tmp_path / "taken")
    with pytest.raises(SaveLoadError):
        autorank.save({"not": "a model"}, tmp_path / "x.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert list((tmp_path / "taken").iterdir()) == []
    # overwriting an existing file replaces it whole
    (tmp_path / "m.pt").write_bytes(b"old")
    autorank.save(small, tmp_path / "m.pt")
    assert autorank.plan_of(autorank.load(tmp_path / "m.pt")).layers["classifier.4"].rank == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "taken"]
