"""Hugging Face models saved in a local directory: the ``hf:`` model spec.

``hf:PATH`` names a directory written by ``save_pretrained`` (``config.json`` and
the weights, ``*.safetensors`` or ``pytorch_model*.bin``; for the perplexity
task also the tokenizer files). It is loaded offline (``local_files_only``: no
network, no download) and never with ``trust_remote_code``: a model whose
configuration needs code from the directory is refused with one line.

Which class: when the configuration's ``architectures`` names a causal language
model (``…ForCausalLM``, ``…LMHeadModel``), ``AutoModelForCausalLM``; otherwise
``AutoModel`` (the bare encoder or decoder, e.g. a sentence encoder's
``BertModel``). Weights the directory lacks would be random: that is an error,
not a warning.

Options follow a ``?``: ``hf:PATH?dtype=bfloat16`` (``float32``, the default,
``bfloat16`` or ``float16``; ``fp32``/``bf16``/``fp16`` are accepted). The spec
recorded on the loaded model (and by :func:`autorank.save`) is normalised —
absolute path, dtype always written, e.g. ``hf:/data/llama?dtype=bfloat16`` —
so that :func:`autorank.load` rebuilds the architecture from the directory and
the saved plan in another process, with no pickled code.

The loaded model is the Hugging Face model itself, in eval mode, with
``config.use_cache = False`` (a search never generates; the key/value cache
object is not a tensor and breaks FLOPs tracing). Set it back to ``True``
before calling ``generate``.

Llama-, Qwen-, Mistral- and GPT-2-style decoders work as they are: grouped-query
attention (k/v projections narrower than q), gated MLPs (gate/up/down), rotary
embeddings (a buffer, never decomposed) and tied input/output embeddings (the
tied ``lm_head`` is excluded by :func:`autorank.surgery.candidate_layers`, and
the ``llm`` search space keeps every embedding and head dense).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from autorank.errors import ModelSpecError

logger = logging.getLogger("autorank")

__all__ = [
    "HF_PREFIX",
    "DTYPES",
    "HFSpec",
    "is_hf_spec",
    "parse_hf_spec",
    "with_dtype",
    "load_hf_model",
    "load_tokenizer",
    "hf_example_input",
    "is_hf_model",
    "INSTALL_HINT",
]

HF_PREFIX = "hf:"
INSTALL_HINT = "pip install 'autorank[hf]'"
#: the dtypes a ``hf:`` spec accepts
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_OPTIONS = ("dtype",)
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model*.safetensors.index.json")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class HFSpec:
    """A parsed ``hf:`` spec: the directory (absolute) and the dtype name."""

    path: Path
    dtype: str = "float32"

    def text(self) -> str:
        """The normalised spec, as recorded on a loaded model: ``hf:/abs/dir?dtype=NAME``."""
        return f"{HF_PREFIX}{self.path}?dtype={self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def is_hf_spec(spec: Any) -> bool:
    """True for a string starting with ``hf:``."""
    return isinstance(spec, str) and spec.strip().startswith(HF_PREFIX)


def _dtype_name(value: str, spec: str) -> str:
    name = str(value).strip().lower().replace("torch.", "")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ModelSpecError(f"model spec {spec!r}: dtype {value!r} is not one of {', '.join(DTYPES)}")
    return name


def parse_hf_spec(spec: str) -> HFSpec:
    """``hf:PATH[?dtype=NAME]`` → :class:`HFSpec` (the path made absolute; not checked to exist)."""
    if not is_hf_spec(spec):
        raise ModelSpecError(f"model spec {spec!r}: expected 'hf:PATH' (a directory written by save_pretrained)")
    body = spec.strip()[len(HF_PREFIX):]
    options: dict[str, str] = {}
    if "?" in body:
        body, _, query = body.rpartition("?")
        for part in filter(None, query.split("&")):
            key, eq, value = part.partition("=")
            key = key.strip().lower()
            if not eq or key not in _OPTIONS:
                raise ModelSpecError(f"model spec {spec!r}: unknown option {part!r}; expected {' or '.join(k + '=...' for k in _OPTIONS)}")
            options[key] = value.strip()
    if not body.strip():
        raise ModelSpecError(f"model spec {spec!r}: no directory after 'hf:'")
    path = Path(body.strip()).expanduser().resolve()
    return HFSpec(path, _dtype_name(options.get("dtype", "float32"), spec))


def with_dtype(spec: str, dtype: Optional[str]) -> str:
    """``spec`` with its dtype set to ``dtype`` (normalised); ``dtype=None`` only normalises."""
    parsed = parse_hf_spec(spec)
    if dtype is None:
        return parsed.text()
    return HFSpec(parsed.path, _dtype_name(dtype, spec)).text()


def _transformers(spec: str):
    try:
        import transformers
    except ImportError as exc:
        raise ModelSpecError(f"model spec {spec!r}: the transformers package is not installed: {INSTALL_HINT}") from exc
    return transformers


def _quiet(transformers, fn: Callable, *args, **kwargs):
    """Call a transformers loader with its progress bars and info logs off (restored after)."""
    tlog = transformers.utils.logging
    bar = tlog.is_progress_bar_enabled()
    level = tlog.get_verbosity()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    try:
        return fn(*args, **kwargs)
    finally:
        tlog.set_verbosity(level)
        if bar:
            tlog.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_config(parsed: HFSpec, spec: str) -> dict:
    path = parsed.path
    if not path.exists():
        raise ModelSpecError(f"model spec {spec!r}: directory not found: {path}")
    if not path.is_dir():
        raise ModelSpecError(f"model spec {spec!r}: {path} is not a directory (expected one written by save_pretrained)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelSpecError(f"model spec {spec!r}: no config.json in {path} (expected a directory written by save_pretrained)")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSpecError(f"model spec {spec!r}: cannot read {cfg}: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ModelSpecError(f"model spec {spec!r}: {cfg} is not a JSON object")
    return data


def _check_no_remote_code(data: dict, parsed: HFSpec, spec: str, transformers) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = data.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    if data.get("auto_map"):
        raise ModelSpecError(
            f"model spec {spec!r}: its config needs code from the directory (auto_map, model_type {model_type!r}); "
            "autorank never runs remote code (trust_remote_code)"
        )
    raise ModelSpecError(
        f"model spec {spec!r}: model_type {model_type!r} in {parsed.path / 'config.json'} is unknown to "
        f"transformers {transformers.__version__}"
    )


def load_hf_model(spec: str) -> nn.Module:
    """The model of a ``hf:`` spec (see the module docstring), in eval mode, offline.

    Records the normalised spec under :data:`autorank.zoo.SPEC_ATTR` (done by
    :func:`autorank.zoo.load_model`, which calls this).
    """
    parsed = parse_hf_spec(spec)
    data = _read_config(parsed, spec)
    if not any(next(parsed.path.glob(g), None) is not None for g in _WEIGHT_GLOBS):
        raise ModelSpecError(f"model spec {spec!r}: no weights (*.safetensors or pytorch_model*.bin) in {parsed.path}")
    transformers = _transformers(spec)
    _check_no_remote_code(data, parsed, spec, transformers)
    archs = [str(a) for a in (data.get("architectures") or [])]
    causal = any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model, info = _quiet(
            transformers, cls.from_pretrained, str(parsed.path), local_files_only=True, trust_remote_code=False,
            dtype=parsed.torch_dtype, output_loading_info=True,
        )
    except Exception as exc:
        raise ModelSpecError(f"model spec {spec!r}: loading {cls.__name__} from {parsed.path} failed: {_first_line(exc)}") from exc
    missing = sorted((info or {}).get("missing_keys") or [])
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelSpecError(
            f"model spec {spec!r}: {parsed.path} lacks weight {missing[0]!r}{more} of {type(model).__name__} (it would be random)"
        )
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    logger.info("loaded %s from %s (%s, %s parameters)", type(model).__name__, parsed.path, parsed.dtype,
                f"{sum(p.numel() for p in model.parameters()):,}")
    return model.eval()


def _tokenizer_dir(source: Union[str, Path]) -> tuple[Path, str]:
    """The directory holding a tokenizer, from a ``hf:`` spec or a directory."""
    if is_hf_spec(source):
        return parse_hf_spec(str(source)).path, str(source)
    return Path(source).expanduser().resolve(), str(source)


def load_tokenizer(source: Union[str, Path]) -> Any:
    """The tokenizer saved in a model directory (a ``hf:`` spec or the directory), offline."""
    path, spec = _tokenizer_dir(source)
    if not path.is_dir():
        raise ModelSpecError(f"tokenizer {spec!r}: directory not found: {path}")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")):
        raise ModelSpecError(
            f"tokenizer {spec!r}: no tokenizer files in {path}; save one there with tokenizer.save_pretrained({str(path)!r})"
        )
    transformers = _transformers(spec)
    try:
        return _quiet(transformers, transformers.AutoTokenizer.from_pretrained, str(path), local_files_only=True,
                      trust_remote_code=False)
    except Exception as exc:
        raise ModelSpecError(f"tokenizer {spec!r}: loading it from {path} failed: {_first_line(exc)}") from exc


def hf_example_input(spec: str, shape: Optional[tuple[int, ...]] = None, batch: Optional[int] = None) -> torch.Tensor:
    """Seeded random token ids for a ``hf:`` model: shape ``(1, min(128, max positions))`` unless given.

    Read from ``config.json`` only (the model is not loaded).
    """
    parsed = parse_hf_spec(spec)
    data = _read_config(parsed, spec)
    text_cfg = data.get("text_config") if isinstance(data.get("text_config"), dict) else {}
    vocab = int(data.get("vocab_size") or text_cfg.get("vocab_size") or 0)
    if vocab < 1:
        raise ModelSpecError(f"model spec {spec!r}: config.json has no vocab_size: give the input with --input")
    if shape is None:
        limit = data.get("max_position_embeddings") or data.get("n_positions") or text_cfg.get("max_position_embeddings") or 128
        shape = (1, int(min(128, int(limit))))
    shape = tuple(int(s) for s in shape)
    if batch is not None:
        shape = (int(batch),) + shape[1:]
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, shape, generator=g)


def is_hf_model(model: nn.Module) -> bool:
    """True for a ``transformers.PreTrainedModel`` (checked without importing transformers)."""
    for cls in type(model).__mro__:
        if cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers."):
            return True
    return False
