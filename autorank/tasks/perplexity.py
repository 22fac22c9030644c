"""Label-free next-token perplexity on a text file, for causal language models.

The text is tokenised once with the model's own tokenizer (``tokenizer(text)``,
as the LLM compression papers evaluate WikiText-2) and cut into consecutive
windows of ``seq_len`` tokens (the tail that does not fill one is dropped). The
windows are shuffled with ``seed`` and split three ways: ``held_out`` windows
scored by :meth:`PerplexityTask.evaluate`, ``calibration`` windows for the
data-aware initialisation, and the rest for distillation (when no window is
left, distillation reuses the calibration windows).

The score is **−log perplexity**, the negated mean next-token cross-entropy (in
nats) over every predicted token of the held-out windows: higher is better, and
``perplexity = exp(−score)`` (:meth:`PerplexityTask.perplexity`). The original
model's perplexity is recorded by ``setup`` (``original_perplexity``).

Fine-tuning (``finetune``) distils from the original: the KL divergence between
the original's and the model's next-token distributions at every position
(``loss="kl"``, temperature ``temperature``; Hinton et al. 2015), or plain
next-token cross-entropy on the text (``loss="ce"``). With ``train="factors"``
(default) only the parameters of the decomposed layers are trained; everything
else is frozen for the duration and left bit-for-bit as it was, which is what
lets the search's trials share the original's parameters instead of copying the
model (``finetune_preserves_original``). ``train="all"`` trains a private copy
of the whole model.

Spec (``--task perplexity:FILE``): ``perplexity:FILE[?key=value&...]`` with keys
``seq_len``, ``held_out``, ``calibration``, ``batch_size``, ``device``
(``auto``: ``cuda`` when available), ``loss``, ``train``, ``lr``, ``steps``
(default fine-tuning steps), ``seed``; the tokenizer is the model's (the model
spec must be ``hf:DIR``, or pass ``tokenizer=``).

References
----------
- G. Hinton, O. Vinyals, J. Dean. "Distilling the Knowledge in a Neural Network." arXiv 1503.02531, 2015.
- X. Wang, Y. Zheng, Z. Wan, M. Zhang. "SVD-LLM: Truncation-aware Singular Value Decomposition for
  Large Language Model Compression." arXiv 2403.07378, 2024 (perplexity on WikiText-2 windows).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import random
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from autorank.errors import AutorankError, TaskError
from autorank.hf import is_hf_spec, load_tokenizer
from autorank.methods._layers import Decomposed
from autorank.tasks.base import BaseTask, OptimizerSpec, held_out_part, make_schedule, primary_output, seeded

logger = logging.getLogger("autorank")

__all__ = ["PerplexityTask", "perplexity_task", "PERPLEXITY_PREFIX"]

PERPLEXITY_PREFIX = "perplexity:"
#: logits turned into float32 at a time when scoring: 2^22 elements (16 MiB), whatever the vocabulary
_CHUNK_ELEMENTS = 1 << 22
_SPEC_KEYS = {
    "seq_len": int, "held_out": int, "calibration": int, "batch_size": int, "device": str, "loss": str,
    "train": str, "lr": float, "steps": int, "seed": int, "temperature": float,
}


def _resolve_device(device: str) -> str:
    d = str(device or "auto").strip().lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PerplexityTask(BaseTask):
    """Next-token perplexity of a causal LM on a text file (see the module docstring).

    ``file``: a UTF-8 text file. ``tokenizer``: a Hugging Face tokenizer, or a
    ``hf:DIR`` spec / directory holding one. ``seq_len``: tokens per window.
    ``held_out`` / ``calibration``: numbers of windows (default: a quarter of the
    windows each, at most 32 and 16). ``batch_size``: windows per forward pass.
    ``loss``: ``"kl"`` (distil from the original) or ``"ce"`` (the text's own
    next tokens). ``train``: ``"factors"`` (only the decomposed layers) or
    ``"all"`` (a copy of the whole model).
    """

    name = "perplexity"
    metric = "neg-log-perplexity"

    def __init__(
        self,
        file: Union[str, Path],
        tokenizer: Any,
        *,
        seq_len: int = 128,
        held_out: Optional[int] = None,
        calibration: Optional[int] = None,
        batch_size: int = 4,
        device: str = "auto",
        loss: str = "kl",
        train: str = "factors",
        lr: float = 1e-4,
        optimizer: OptimizerSpec = "adam",
        temperature: float = 1.0,
        steps: int = 100,
        seed: int = 0,
    ):
        path = Path(file).expanduser()
        if not path.is_file():
            raise TaskError(f"perplexity task: text file not found: {path}")
        for key, value, least in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1), ("steps", steps, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise TaskError(f"perplexity task: {key} must be an integer >= {least}, got {value!r}")
        loss, train = str(loss).lower(), str(train).lower()
        if loss not in ("kl", "ce"):
            raise TaskError(f"perplexity task: loss {loss!r}: use 'kl' (distil from the original) or 'ce' (next tokens of the text)")
        if train not in ("factors", "all"):
            raise TaskError(f"perplexity task: train {train!r}: use 'factors' (only the decomposed layers) or 'all'")
        if not (lr > 0 and temperature > 0):
            raise TaskError(f"perplexity task: lr and temperature must be positive, got lr={lr!r}, temperature={temperature!r}")
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TaskError(f"perplexity task: cannot read {path} as UTF-8 text: {_first_line(exc)}") from None
        if isinstance(tokenizer, (str, Path)):
            try:
                tokenizer = load_tokenizer(tokenizer)
            except AutorankError as exc:
                raise TaskError(f"perplexity task: {exc}") from None
        if not callable(tokenizer):
            raise TaskError(f"perplexity task: tokenizer must be a Hugging Face tokenizer or a 'hf:DIR' spec, got {type(tokenizer).__name__}")
        ids = _tokenize(tokenizer, text, path)
        n = ids.numel() // seq_len
        if n < 2:
            raise TaskError(
                f"perplexity task: {path} has {ids.numel()} tokens, {n} window(s) of seq_len {seq_len}: "
                "need at least 2 (a longer text or a smaller seq_len)"
            )
        windows = ids[: n * seq_len].reshape(n, seq_len)
        order = list(range(n))
        random.Random(seed).shuffle(order)
        n_held = min(32, max(1, n // 4)) if held_out is None else int(held_out)
        if not 1 <= n_held < n:
            raise TaskError(f"perplexity task: held_out must be between 1 and {n - 1} windows ({path}: {n} windows of {seq_len}), got {held_out!r}")
        rest = n - n_held
        n_cal = min(16, max(1, n // 4), rest) if calibration is None else int(calibration)
        if not 1 <= n_cal <= rest:
            raise TaskError(f"perplexity task: calibration must be between 1 and {rest} windows, got {calibration!r}")
        held = windows[order[:n_held]]
        cal = windows[order[n_held:n_held + n_cal]]
        distil = windows[order[n_held + n_cal:]]
        if distil.shape[0] == 0:
            logger.info("perplexity task: no window left for distillation; it reuses the %d calibration windows", n_cal)
            distil = cal
        self.file = path.resolve()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.tokenizer_name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
        self.vocab_size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.tokens = int(ids.numel())
        self.held_out = held
        self.calibration = cal
        self.distillation = distil
        self.device = _resolve_device(device)
        self.loss, self.train = loss, train
        self.lr, self.optimizer, self.temperature = float(lr), optimizer, float(temperature)
        self.default_finetune_steps = int(steps)
        self.seed = int(seed)
        self.original_perplexity: Optional[float] = None
        self._teacher: Optional[nn.Module] = None

    # ------------------------------------------------------------------ what the search asks
    @property
    def finetune_preserves_original(self) -> bool:
        """True: ``finetune`` writes only to the decomposed layers (``train="factors"``) or to a private
        copy (``train="all"``), so a trial's model may share the original's other parameters."""
        return True

    def fingerprint(self) -> dict:
        return {
            **super().fingerprint(), "file": str(self.file), "sha256": self.sha256, "tokenizer": self.tokenizer_name,
            "seq_len": self.seq_len, "windows": [int(self.held_out.shape[0]), int(self.calibration.shape[0]), int(self.distillation.shape[0])],
            "seed": self.seed, "loss": self.loss, "train": self.train,
        }

    def _batches(self, windows: torch.Tensor) -> list[torch.Tensor]:
        return [windows[i:i + self.batch_size] for i in range(0, windows.shape[0], self.batch_size)]

    def example_inputs(self) -> torch.Tensor:
        """One held-out window, shape ``(1, seq_len)``, on ``device``."""
        return self.held_out[:1].to(self.device)

    def calibration_inputs(self) -> list:
        """The calibration windows in batches of ``batch_size``, on ``device``."""
        return [b.to(self.device) for b in self._batches(self.calibration)]

    @staticmethod
    def perplexity(score: float) -> float:
        """The perplexity a score stands for: ``exp(−score)``."""
        return math.exp(-float(score))

    # ------------------------------------------------------------------ setup and scoring
    def setup(self, original: nn.Module) -> None:
        """Keep a reference to the original (the distillation teacher; never copied) and record its perplexity."""
        _to(original, self.device)
        embeddings = original.get_input_embeddings() if callable(getattr(original, "get_input_embeddings", None)) else None
        vocab = getattr(embeddings, "num_embeddings", None)
        top = max(int(w.max()) for w in (self.held_out, self.calibration, self.distillation))
        if vocab is not None and top >= vocab:
            raise TaskError(f"{self.name}: the tokenizer gives token id {top}, the model's vocabulary has {vocab} entries: "
                            "not the model's tokenizer")
        self._teacher = original
        score = self._score(original, "the original model")
        self.original_perplexity = self.perplexity(score)
        logger.info("%s: original perplexity %.4g on %d held-out windows of %d tokens", self.name,
                    self.original_perplexity, self.held_out.shape[0], self.seq_len)

    def _logits(self, model: nn.Module, ids: torch.Tensor, where: str) -> torch.Tensor:
        raw = model(ids)
        if isinstance(raw, dict) and not isinstance(raw.get("logits"), torch.Tensor):
            raise TaskError(f"{self.name}: {where} returns no logits (keys {sorted(raw.keys())}): perplexity needs a causal language model")
        out = primary_output(raw, where=f"{self.name}: {where}")
        if out.dim() != 3 or tuple(out.shape[:2]) != tuple(ids.shape):
            raise TaskError(
                f"{self.name}: {where} gives an output of shape {tuple(out.shape)} for windows {tuple(ids.shape)}: "
                "expected next-token logits (batch, tokens, vocabulary)"
            )
        return out

    def _score(self, model: nn.Module, what: str, fraction: float = 1.0) -> float:
        batches = self._batches(self.held_out)
        if fraction != 1.0:
            batches = batches[: held_out_part(len(batches), fraction, f"{self.name}: evaluate")]
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for i, batch in enumerate(batches):
                    ids = batch.to(self.device)
                    logits = self._logits(model, ids, f"{what} on held-out batch {i}")
                    pred = logits[:, :-1].reshape(-1, logits.shape[-1])
                    target = ids[:, 1:].reshape(-1)
                    rows = max(1, _CHUNK_ELEMENTS // pred.shape[1])
                    for r in range(0, pred.shape[0], rows):
                        total += float(F.cross_entropy(pred[r:r + rows].float(), target[r:r + rows], reduction="sum"))
                    count += target.numel()
                    del logits, pred
        finally:
            model.train(was_training)
        if not math.isfinite(total):
            raise TaskError(f"{self.name}: the cross-entropy of {what} on the held-out windows is {total}")
        return -total / count

    def evaluate(self, model: nn.Module, *, fraction: float = 1.0) -> float:
        """−log perplexity on the held-out windows (higher is better; the model's weights are not changed);
        ``fraction``: on the first ``ceil(fraction · n)`` of the ``n`` held-out batches."""
        _to(model, self.device)
        return self._score(model, "the model", fraction)

    # ------------------------------------------------------------------ fine-tuning
    def finetune(self, model: nn.Module, steps: int, *, seed: int = 0) -> nn.Module:
        """Distil from the original (or learn the text) for ``steps`` optimizer steps; the model in eval mode.

        ``train="factors"``: only the parameters of :class:`~autorank.methods._layers.Decomposed`
        layers are trained, the others have ``requires_grad`` off for the duration (restored
        after) and are never written. ``train="all"``: a copy of ``model`` is trained and returned.
        """
        if self.loss == "kl" and self._teacher is None:
            raise TaskError(f"{self.name}: call setup(original_model) before finetune")
        steps = int(steps)
        if self.train == "all":
            model = copy.deepcopy(model)
        _to(model, self.device)
        if steps <= 0:
            return model.eval()
        frozen: list[nn.Parameter] = []
        if self.train == "factors":
            factor_ids = {id(p) for m in model.modules() if isinstance(m, Decomposed) for p in m.parameters()}
            if not factor_ids:
                logger.info("%s: the model has no decomposed layer; nothing to fine-tune", self.name)
                return model.eval()
            for p in model.parameters():
                if id(p) not in factor_ids and p.requires_grad:
                    p.requires_grad_(False)
                    frozen.append(p)
        try:
            self._train(model, steps, seed)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        logger.debug("%s: fine-tuned %d steps (%s, train %s, seed %d)", self.name, steps, self.loss, self.train, seed)
        return model.eval()

    def _train(self, model: nn.Module, steps: int, seed: int) -> None:
        opt, sched = make_schedule(self.optimizer, model, self.lr, steps)
        batches = self._batches(self.distillation)
        gen = torch.Generator().manual_seed(int(seed))
        order: list[int] = []
        t = self.temperature
        model.train()
        try:
            with seeded(seed, self.device):
                for step in range(steps):
                    if not order:
                        order = torch.randperm(len(batches), generator=gen).tolist()
                    ids = batches[order.pop()].to(self.device)
                    logits = self._logits(model, ids, "the model on a distillation batch").float()
                    if self.loss == "kl":
                        with torch.no_grad():
                            target = self._logits(self._teacher, ids, "the original on a distillation batch").float()
                        v = logits.shape[-1]
                        loss = F.kl_div(F.log_softmax(logits.reshape(-1, v) / t, dim=-1), F.log_softmax(target.reshape(-1, v) / t, dim=-1),
                                        reduction="batchmean", log_target=True) * (t * t)
                        del target
                    else:
                        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
                    if not bool(torch.isfinite(loss)):
                        raise TaskError(f"{self.name}: the {self.loss} loss became {float(loss)} at step {step} of {steps}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    del logits, loss
        finally:
            opt.zero_grad(set_to_none=True)
            model.eval()


def _to(model: nn.Module, device: str) -> None:
    """Move ``model`` to ``device`` unless it is there already (judged by its first parameter)."""
    target = torch.device(device)
    first = next(model.parameters(), None)
    if first is None:
        return
    here = first.device
    if here.type != target.type or (target.index is not None and here.index != target.index):
        model.to(target)


def _tokenize(tokenizer: Any, text: str, path: Path) -> torch.Tensor:
    quiet = None
    try:
        import transformers

        quiet = transformers.utils.logging
    except ImportError:  # pragma: no cover - a tokenizer object without transformers
        pass
    level = quiet.get_verbosity() if quiet is not None else None
    if quiet is not None:
        quiet.set_verbosity_error()  # "sequence longer than the model's maximum": we cut it into windows
    try:
        enc = tokenizer(text)
    except Exception as exc:
        raise TaskError(f"perplexity task: tokenizing {path} failed: {_first_line(exc)}") from exc
    finally:
        if quiet is not None:
            quiet.set_verbosity(level)
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    return ids


def perplexity_task(spec: str, model_spec: Optional[str] = None, *, device: Optional[str] = None, tokenizer: Any = None) -> PerplexityTask:
    """The task a ``perplexity:FILE[?key=value&...]`` spec names (keys: see the module docstring).

    The tokenizer is ``tokenizer`` if given, else the one saved with the ``hf:`` model ``model_spec``.
    ``device``: used unless the spec names one.
    """
    body = spec.strip()[len(PERPLEXITY_PREFIX):]
    options: dict[str, Any] = {}
    if "?" in body:
        body, _, query = body.rpartition("?")
        for part in filter(None, query.split("&")):
            key, eq, value = part.partition("=")
            key = key.strip().lower().replace("-", "_")
            if not eq or key not in _SPEC_KEYS:
                raise TaskError(f"task spec {spec!r}: unknown option {part!r}; known: {', '.join(sorted(_SPEC_KEYS))}")
            try:
                options[key] = _SPEC_KEYS[key](value.strip())
            except ValueError:
                raise TaskError(f"task spec {spec!r}: option {key}={value!r} is not a valid {_SPEC_KEYS[key].__name__}") from None
    if not body.strip():
        raise TaskError(f"task spec {spec!r}: expected 'perplexity:FILE' (a text file)")
    if tokenizer is None:
        if not is_hf_spec(model_spec):
            raise TaskError(
                f"task spec {spec!r}: the perplexity task tokenises with the model's tokenizer; "
                f"the model spec must be 'hf:DIR' (got {model_spec!r}), or build autorank.tasks.PerplexityTask(file, tokenizer)"
            )
        tokenizer = model_spec
    if "device" not in options and device is not None:
        options["device"] = device
    return PerplexityTask(body.strip(), tokenizer, **options)
