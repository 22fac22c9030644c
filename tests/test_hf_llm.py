"""Decoder LLMs from a local Hugging Face directory: ``hf:`` specs, the perplexity task,
trials that share the original's parameters, block-wise statistics, the CLI path.

Three random-weight two-layer configurations are built here and saved with
``save_pretrained`` (with a byte-level BPE tokenizer trained on autorank's own
corpus): a Llama-style model with grouped-query attention and tied embeddings
(briefly trained on the corpus, so that its perplexity means something), a GPT-2
(Conv1D projections, tied embeddings) and a Qwen-style model (q/k/v biases,
untied output head).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import autorank  # noqa: E402
from autorank.calibration import collect, find_blocks  # noqa: E402
from autorank.cli import main as cli_main  # noqa: E402
from autorank.errors import ModelSpecError, TaskError  # noqa: E402
from autorank.hf import is_hf_spec, parse_hf_spec, with_dtype  # noqa: E402
from autorank.methods._layers import Decomposed  # noqa: E402
from autorank.plan import Plan  # noqa: E402
from autorank.search.trial import TrialRunner  # noqa: E402
from autorank.surgery import decompose, share_with  # noqa: E402
from autorank.tasks import FidelityTask, PerplexityTask, load_task  # noqa: E402
from autorank.zoo import SPEC_ATTR, example_input, load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "autorank" / "tasks" / "data" / "sentences.txt"
VOCAB = 512
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ---------------------------------------------------------------------- fixtures
def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS.read_text()], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _train(model, ids: torch.Tensor, steps: int = 100, seq: int = 64) -> None:
    """A few Adam steps of next-token training: the model then predicts the corpus far better than chance."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq - 1, (8,), generator=g)
        x = torch.stack([ids[s:s + seq] for s in starts.tolist()])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _configs():
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    return {
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
            hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True, max_position_embeddings=256, **common)),
        "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)),
        "qwen": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
            hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False, max_position_embeddings=256, **common)),
    }


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tok = _tokenizer()
    ids = torch.tensor(tok(CORPUS.read_text())["input_ids"])
    out = {}
    for i, (name, (cls, cfg)) in enumerate(_configs().items()):
        torch.manual_seed(i)
        model = cls(cfg).eval()
        if name == "llama":
            _train(model, ids)
        d = root / name
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def llama(hf_dirs):
    return hf_dirs["llama"]


def _task(spec_dir, **kw) -> PerplexityTask:
    kw = {"seq_len": 64, "held_out": 8, "calibration": 8, "device": "cpu", **kw}
    return PerplexityTask(CORPUS, f"hf:{spec_dir}", **kw)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, model) -> bool:
    b = model.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- hf: specs
def test_hf_spec_is_normalised_with_an_absolute_path_and_a_dtype(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hf_spec("hf:x") and not is_hf_spec("demo") and not is_hf_spec(None)
    p = parse_hf_spec("hf:models/llama?dtype=bf16")
    assert p.path == (tmp_path / "models" / "llama").resolve() and p.dtype == "bfloat16"
    assert p.text() == f"hf:{tmp_path.resolve()}/models/llama?dtype=bfloat16"
    assert with_dtype("hf:m", "float16").endswith("/m?dtype=float16")
    assert with_dtype("hf:m?dtype=float16", None).endswith("?dtype=float16")
    with pytest.raises(ModelSpecError, match="dtype 'int8'"):
        parse_hf_spec("hf:m?dtype=int8")
    with pytest.raises(ModelSpecError, match="unknown option 'revision=main'"):
        parse_hf_spec("hf:m?revision=main")
    with pytest.raises(ModelSpecError, match="no directory"):
        parse_hf_spec("hf:")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen"])
def test_hf_dir_loads_offline_as_the_saved_model(hf_dirs, arch):
    d = hf_dirs[arch]
    model = load_model(f"hf:{d}")
    cls, _ = _configs()[arch]
    assert type(model) is cls and not model.training and model.config.use_cache is False
    assert model.__dict__[SPEC_ATTR] == f"hf:{d.resolve()}?dtype=float32"
    ref = cls.from_pretrained(d).eval()
    x = example_input(f"hf:{d}", (2, 16))
    assert x.dtype == torch.long and x.shape == (2, 16) and int(x.max()) < VOCAB
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x, use_cache=False).logits)
    if arch in ("llama", "gpt2"):  # tied input/output embeddings stay tied
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_hf_dtype_is_loaded_and_recorded(llama):
    model = load_model(f"hf:{llama}?dtype=bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.__dict__[SPEC_ATTR].endswith("?dtype=bfloat16")


def test_hf_errors_are_one_line_and_name_the_culprit(tmp_path, llama):
    with pytest.raises(ModelSpecError, match="directory not found"):
        load_model(f"hf:{tmp_path / 'nosuch'}")
    with pytest.raises(ModelSpecError, match="no config.json"):
        load_model(f"hf:{tmp_path}")
    remote = tmp_path / "remote"
    remote.mkdir()
    cfg = json.loads((llama / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "model_type": "my_custom_lm",
                                                    "auto_map": {"AutoModelForCausalLM": "modeling_x.MyLM"}}))
    (remote / "model.safetensors").write_bytes((llama / "model.safetensors").read_bytes())
    with pytest.raises(ModelSpecError, match="never runs remote code") as err:
        load_model(f"hf:{remote}")
    assert "\n" not in str(err.value)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((llama / "config.json").read_text())
    with pytest.raises(ModelSpecError, match="no weights"):
        load_model(f"hf:{noweights}")
    # weights of the bare decoder saved under a causal-LM config: the head would be random
    partial = tmp_path / "partial"
    bare = transformers.LlamaModel(transformers.LlamaConfig.from_pretrained(llama))
    bare.save_pretrained(partial)
    cfg = json.loads((partial / "config.json").read_text())
    (partial / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}))
    with pytest.raises(ModelSpecError, match="lacks weight 'lm_head.weight'"):
        load_model(f"hf:{partial}")


def test_cli_profile_lists_projections_and_refuses_the_tied_embedding_head(llama, capsys):
    assert cli_main(["profile", "--model", f"hf:{llama}", "--no-latency", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    layers = {row["name"]: row for row in data["layers"]}
    for i in range(2):
        for proj in PROJECTIONS:
            row = layers[f"model.layers.{i}.{proj}"]
            assert row["excluded"] is None and row["methods"]["svd"]["applies"]
    # grouped-query attention: k/v projections narrower than q
    assert layers["model.layers.0.self_attn.k_proj"]["params"] * 2 == layers["model.layers.0.self_attn.q_proj"]["params"]
    assert "tied weights" in layers["lm_head"]["excluded"] and "embed_tokens" in layers["lm_head"]["excluded"]
    assert not any("embed" in n for n in layers)  # embeddings are lookups, never candidates
    assert not any("rotary" in n for n in layers)


# ---------------------------------------------------------------------- the perplexity task
def test_perplexity_task_scores_minus_log_perplexity_on_held_out_windows(llama):
    task = _task(llama)
    n = task.held_out.shape[0] + task.calibration.shape[0] + task.distillation.shape[0]
    assert task.held_out.shape == (8, 64) and task.calibration.shape == (8, 64)
    windows = {tuple(w.tolist()) for w in torch.cat([task.held_out, task.calibration, task.distillation])}
    assert len(windows) == n  # disjoint
    model = load_model(f"hf:{llama}")
    task.setup(model)
    score = task.evaluate(model)
    with torch.no_grad():
        logits = model(task.held_out).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), task.held_out[:, 1:].reshape(-1))
    assert score == pytest.approx(-float(nll), rel=1e-5)
    assert task.perplexity(score) == pytest.approx(task.original_perplexity) and task.original_perplexity < VOCAB / 4  # trained
    assert task.example_inputs().shape == (1, 64) and task.metric == "neg-log-perplexity"
    with torch.no_grad():  # a fraction scores the first windows (batches of task.batch_size)
        first = task.held_out[: task.batch_size]
        logits = model(first).logits
    half = -float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), first[:, 1:].reshape(-1)))
    n = -(-task.held_out.shape[0] // task.batch_size)
    assert task.evaluate(model, fraction=1 / n) == pytest.approx(half, rel=1e-5)
    assert task.fingerprint() == _task(llama).fingerprint()


def test_perplexity_spec_options_and_errors(llama, tmp_path):
    t = load_task(f"perplexity:{CORPUS}?seq_len=32&held_out=4&calibration=2&loss=ce&device=cpu", f"hf:{llama}")
    assert isinstance(t, PerplexityTask) and t.seq_len == 32 and t.held_out.shape[0] == 4 and t.loss == "ce"
    with pytest.raises(TaskError, match="unknown option 'window=3'"):
        load_task(f"perplexity:{CORPUS}?window=3", f"hf:{llama}")
    with pytest.raises(TaskError, match="must be 'hf:DIR'"):
        load_task(f"perplexity:{CORPUS}", "demo")
    with pytest.raises(TaskError, match="text file not found"):
        load_task(f"perplexity:{tmp_path / 'none.txt'}", f"hf:{llama}")
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    with pytest.raises(TaskError, match="need at least 2"):
        load_task(f"perplexity:{short}", f"hf:{llama}")
    with pytest.raises(TaskError, match="no tokenizer files"):
        PerplexityTask(CORPUS, str(tmp_path))
    with pytest.raises(TaskError, match="setup"):
        _task(llama).finetune(load_model(f"hf:{llama}"), 1)


def test_encoder_without_logits_is_refused_by_the_perplexity_task(llama, tmp_path):
    enc = tmp_path / "enc"
    transformers.LlamaModel(transformers.LlamaConfig.from_pretrained(llama)).save_pretrained(enc)
    model = load_model(f"hf:{enc}")
    assert type(model).__name__ == "LlamaModel"  # no causal-LM architecture recorded: AutoModel
    with pytest.raises(TaskError, match="causal language model"):
        _task(llama).setup(model)


# ---------------------------------------------------------------------- sharing
def test_shared_decomposition_shares_untouched_tensors_and_nothing_else(llama):
    model = load_model(f"hf:{llama}")
    plan = Plan.from_dict({"layers": {"model.layers.0.mlp.down_proj": {"method": "svd", "rank": 8},
                                      "model.layers.1.self_attn.k_proj": {"method": "svd", "rank": 8}}})
    before = _state(model)
    shared = decompose(model, plan, share=True)
    copied = decompose(model, plan)
    orig_params = {id(p) for p in model.parameters()}
    kept = [n for n, _ in shared.named_parameters() if "down_proj" not in n and "k_proj" not in n]
    assert kept and all(id(dict(shared.named_parameters())[n]) in orig_params for n in kept)
    assert not any(id(p) in orig_params for p in copied.parameters())
    assert shared.lm_head.weight is shared.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert isinstance(shared.model.layers[0].mlp.down_proj, Decomposed)
    assert not isinstance(model.model.layers[0].mlp.down_proj, Decomposed)  # swapped in the copy only
    shared.train()
    assert not model.training and not model.model.layers[0].training  # own flags
    handle = shared.model.layers[1].register_forward_hook(lambda *a: None)
    assert not model.model.layers[1]._forward_hooks  # own hook dictionaries
    handle.remove()
    x = example_input(f"hf:{llama}", (1, 16))
    with torch.no_grad():
        assert torch.equal(shared.eval()(x).logits, copied.eval()(x).logits)
    assert _same(before, model)
    # a module registered at two places stays one module in the structural copy
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    net.add_module("again", net[0])
    twin = share_with(net, {})
    assert twin[0] is twin.again and twin[0] is not net[0] and twin[0].weight is net[0].weight


def _runner(model, task) -> TrialRunner:
    task.setup(model)
    return TrialRunner(model, task, setup=False)


def test_trials_leave_the_original_bit_identical_and_finetuning_trains_only_factors(llama, tmp_path):
    model = load_model(f"hf:{llama}")
    task = _task(llama, lr=3e-3)
    runner = _runner(model, task)
    before = _state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    plan = Plan.uniform(model, "svd", 0.3, exclude="lm_head").to_dict()
    zs = runner.zero_shot(plan)
    assert "error" not in zs and _same(before, model)
    ft = runner.finetune(plan, 40, seed=0, save_to=str(tmp_path / "ft.pt"))
    assert "error" not in ft, ft.get("error")
    assert _same(before, model)  # the shared original is untouched by training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    # distillation of the factors recovers part of what the rank-30% decomposition lost
    base = runner.base_score()
    assert base > ft["finetuned_score"] > ft["zero_shot_score"] + 0.2 * (base - ft["zero_shot_score"])
    saved = autorank.load(tmp_path / "ft.pt")
    assert len(autorank.plan_of(saved).layers) == 14
    assert task.evaluate(saved) == pytest.approx(ft["score"], abs=1e-5)


def test_a_task_that_trains_everything_gets_a_copy_not_the_original(llama):
    model = load_model(f"hf:{llama}")
    windows = _task(llama).distillation[:8]
    task = FidelityTask([windows[:4], windows[4:]], held_out=[windows[:2]], metric="top1", lr=1e-2)
    runner = _runner(model, task)
    before = _state(model)
    plan = Plan.uniform(model, "svd", 0.5, include="mlp").to_dict()
    res = runner.finetune(plan, 5, seed=0)
    assert "error" not in res, res.get("error")
    assert _same(before, model)


# ---------------------------------------------------------------------- statistics
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen"])
def test_blockwise_statistics_equal_the_full_pass_and_share_identical_inputs(hf_dirs, arch):
    model = load_model(f"hf:{hf_dirs[arch]}")
    assert find_blocks(model)[0] in ("model.layers", "transformer.h")
    batches = [(example_input(f"hf:{hf_dirs[arch]}", (2, 24)) + i) % VOCAB for i in range(3)]
    block = collect(model, batches, blockwise=True)
    full = collect(model, batches, blockwise=False)
    assert block.stats.keys() == full.stats.keys() and block.input_shapes == full.input_shapes
    for name, st in full.stats.items():
        assert block.stats[name].count == st.count
        assert torch.allclose(block.stats[name].gram, st.gram, rtol=1e-10, atol=1e-8), name
    if arch != "gpt2":  # q/k/v read one tensor, so do gate/up: one Gram matrix each
        g = block.stats
        assert g["model.layers.1.self_attn.q_proj"].gram is g["model.layers.1.self_attn.v_proj"].gram
        assert g["model.layers.1.mlp.gate_proj"].gram is g["model.layers.1.mlp.up_proj"].gram
        assert g["model.layers.1.mlp.up_proj"].gram is not g["model.layers.1.mlp.down_proj"].gram
    assert collect(model, batches).stats.keys() == full.stats.keys()  # HF models: block-wise by default


def test_blockwise_statistics_fall_back_when_the_blocks_are_not_a_chain(caplog):
    class Skips(torch.nn.Module):  # every block also sees the embedding: not hidden = block(hidden)
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            h = x
            for b in self.blocks:
                h = b(h) + x
            return h

    model = Skips()
    batches = [torch.randn(4, 8) for _ in range(2)]
    with caplog.at_level("WARNING", logger="autorank"):
        got = collect(model, batches, blockwise=True)
    assert "not a plain chain" in caplog.text
    ref = collect(model, batches, blockwise=False)
    for name, st in ref.stats.items():
        assert torch.equal(got.stats[name].gram, st.gram)


# ---------------------------------------------------------------------- the command line
def _fresh_logits(cases: list[tuple[Path, torch.Tensor]], tmp: Path) -> list[torch.Tensor]:
    """``autorank.load`` of each file in another Python process; its logits on the given ids."""
    jobs = []
    for i, (path, ids) in enumerate(cases):
        torch.save(ids, tmp / f"ids{i}.pt")
        jobs.append((str(path), str(tmp / f"ids{i}.pt"), str(tmp / f"logits{i}.pt")))
    code = textwrap.dedent(f"""
        import torch, autorank
        for path, ids, out in {jobs!r}:
            m = autorank.load(path)
            with torch.no_grad():
                torch.save(m(torch.load(ids, weights_only=True)).logits, out)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return [torch.load(out, weights_only=True) for _, _, out in jobs]


def test_search_perplexity_80_params_exports_and_reloads_in_a_fresh_process(hf_dirs, tmp_path, capsys):
    """The command line on the Llama configuration, the library on GPT-2 and Qwen (bfloat16)."""
    llama = hf_dirs["llama"]
    run = tmp_path / "run"
    code = cli_main(["search", "--model", f"hf:{llama}", "--task", f"perplexity:{CORPUS}?held_out=8&calibration=8",
                     "--seq-len", "64", "--budget", "80%params", "--trials", "4", "--sensitivity-points", "2",
                     "--finetune", "1", "--finetune-steps", "5", "--out", str(run), "-q"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "perplexity" in text and "-log perplexity" in text
    settings = json.loads((run / "settings.json").read_text())
    assert settings["model"]["spec"] == f"hf:{llama.resolve()}?dtype=float32"
    assert settings["space"]["methods"] == ["none", "svd", "tt"] and settings["space"]["align"] == 8  # the llm space
    front = json.loads((run / "front.json").read_text())["front"]
    assert front and all(m["params_ratio"] <= 0.8 + 1e-9 for m in front)
    for m in front:
        assert not any("lm_head" in n or "embed" in n for n in m["plan"]["layers"])
    out = tmp_path / "small.pt"
    assert cli_main(["export", str(run), "--pick", "best", "-o", str(out)]) == 0
    capsys.readouterr()
    here = autorank.load(out)
    assert here.__dict__[SPEC_ATTR] == settings["model"]["spec"]
    ids = _task(llama).held_out[:2]
    with torch.no_grad():
        expected = [here(ids).logits]
    cases = [(out, ids)]
    # the two other decoders through the library (GPT-2 in float32, Qwen in bfloat16); one fresh process checks all three
    for arch, spec in (("gpt2", f"hf:{hf_dirs['gpt2']}"), ("qwen", f"hf:{hf_dirs['qwen']}?dtype=bfloat16")):
        d = hf_dirs[arch]
        result = autorank.search(spec, f"perplexity:{CORPUS}?seq_len=64&held_out=4&calibration=4", budget="80%params",
                                 space="llm", trials=2, warm_start=False, finetune=0, out=tmp_path / arch,
                                 measure_latency=False)
        assert result.front and all(m.params_ratio <= 0.8 + 1e-9 for m in result.front)
        member = result.best
        assert member.plan.layers
        for name in member.plan.layers:  # embeddings and the output head (tied for GPT-2, untied for Qwen) stay dense
            assert "lm_head" not in name and "wte" not in name and "embed" not in name
        path = tmp_path / f"{arch}.pt"
        result.export(member, path)
        ids = example_input(f"hf:{d}", (1, 32))
        with torch.no_grad():
            here = autorank.load(path)
            assert {p.dtype for p in here.parameters()} == {torch.bfloat16 if arch == "qwen" else torch.float32}
            expected.append(here(ids).logits)
        cases.append((path, ids))
    for got, want in zip(_fresh_logits(cases, tmp_path), expected):
        assert torch.equal(got, want)


def test_cli_llm_flags_go_into_the_specs(llama, tmp_path, monkeypatch):
    import argparse

    from autorank.cli.search import _llm_args, default_out

    monkeypatch.chdir(tmp_path)
    (tmp_path / "wiki.txt").write_text("text")
    args = argparse.Namespace(model=f"hf:{llama}", task="perplexity:wiki.txt?held_out=4", dtype="bfloat16", seq_len=256, space=None)
    _llm_args(args)
    assert args.model == f"hf:{llama.resolve()}?dtype=bfloat16"
    assert args.task == f"perplexity:{tmp_path.resolve() / 'wiki.txt'}?held_out=4&seq_len=256"
    assert args.space == "llm"
    assert default_out(args.model, "80%params") == Path("runs") / "llama-80params"
    args = argparse.Namespace(model="demo", task=None, dtype=None, seq_len=None, space=None)
    _llm_args(args)
    assert args.space == "default" and args.model == "demo"


def test_cli_llm_flags_are_checked(llama, capsys):
    assert cli_main(["search", "--model", "demo", "--dtype", "bfloat16", "--budget", "80%params"]) == 2
    assert "--dtype bfloat16: applies to Hugging Face models" in capsys.readouterr().err
    assert cli_main(["search", "--model", f"hf:{llama}", "--task", "demo", "--seq-len", "64", "--budget", "80%params"]) == 2
    assert "applies to the perplexity task" in capsys.readouterr().err
    assert cli_main(["search", "--model", f"hf:{llama}", "--task", f"perplexity:{CORPUS}?seq_len=32", "--seq-len", "64",
                     "--budget", "80%params"]) == 2
    assert "already sets seq_len" in capsys.readouterr().err


# ---------------------------------------------------------------------- memory of a trial
_PROBE = r'''
import gc, json, os, re, sys, tempfile
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from autorank.methods._layers import Decomposed
from autorank.plan import Plan
from autorank.search.trial import TrialRunner
from autorank.tasks import PerplexityTask

def status(key):
    return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

torch.manual_seed(0)
torch.set_num_threads(1)
cfg = LlamaConfig(vocab_size=512, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, tie_word_embeddings=True, max_position_embeddings=256)
model = LlamaForCausalLM(cfg).eval()
model.config.use_cache = False
size = sum(p.numel() * p.element_size() for p in model.parameters())
task = PerplexityTask(sys.argv[1], sys.argv[2], seq_len=64, held_out=4, calibration=8, device="cpu")
task.setup(model)
runner = TrialRunner(model, task, setup=False, cache_dir=tempfile.mkdtemp())
plans = {
    "one layer (a sensitivity probe)": {"model.layers.3.mlp.down_proj": {"method": "svd", "rank": 0.5}},
    "one block at 80%": {f"model.layers.5.{p}": {"method": "svd", "rank": 0.8} for p in
                         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
}
build = runner.build
out = {"model_bytes": size, "trials": []}
for share in (True, False):
    runner.build = lambda plan, share_=share, **_: build(plan, share=share_)
    for label, layers in plans.items():
        for attempt in ("cold", "warm"):
            plan = {"layers": layers}
            gc.collect()
            before = status("VmRSS")
            open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
            res = runner.zero_shot(plan)
            peak = status("VmHWM")
            built = runner.build(Plan.from_dict(plan))
            factors = sum(p.numel() * p.element_size() for m in built.modules() if isinstance(m, Decomposed)
                          for p in m.parameters())
            del built
            out["trials"].append({"plan": label, "share": share, "cache": attempt, "overhead": peak - before,
                                  "factors": factors, "error": res.get("error")})
print(json.dumps(out))
'''


@pytest.mark.slow
def test_a_trial_costs_its_factors_not_a_copy_of_the_model(llama, tmp_path):
    """Peak memory of a trial, measured in a fresh process on a 290 MB Llama-style model.

    Overhead = peak resident memory during ``TrialRunner.zero_shot`` (VmHWM, reset just before)
    minus the resident memory just before (the process already holds the model, the task and the
    calibration statistics); glibc's allocator is told to return every large block to the system at
    once (``MALLOC_MMAP_THRESHOLD_``), so that the resident size follows what is alive. The floor,
    the issue's 1.3x: overhead <= the trial's own new factors + 0.3 x the model's bytes, for a trial
    whose factorizations are in the factor cache (every trial after the first one that meets a
    layer; the first also fills the cache and pays the float64 factorization, reported by
    benchmarks/bench_llm.py). A trial that copies the model fails it (checked: the copy path).
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _PROBE, str(CORPUS), str(llama)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(res.stdout.strip().splitlines()[-1])
    size = data["model_bytes"]
    assert 250e6 < size < 400e6
    for t in data["trials"]:
        assert t["error"] is None, t
        within = t["overhead"] <= t["factors"] + 0.3 * size
        if t["cache"] == "warm":
            assert within == t["share"], (t, size)  # shared trials meet the floor; copying ones do not
