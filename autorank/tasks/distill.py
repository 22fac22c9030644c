"""What a built-in task's fine-tune can do beyond ``steps`` and ``seed``: feature distillation,
a choice of trainable parameters, a wall-time budget and a per-step callback.

:class:`FinetuneControl` is passed as ``task.finetune(model, steps, seed=..., control=...)``
to :class:`~autorank.tasks.FidelityTask` and :class:`~autorank.tasks.ClassificationTask`
(user tasks keep the plain ``finetune(model, steps, *, seed=0)``; :mod:`autorank.training.recovery`
wraps those generically). It is what :func:`autorank.training.recovery.recover` builds from the
search space's ``training:`` options.

Feature distillation matches, besides the final output, the outputs of the *blocks*
that contain decomposed layers: for each decomposed layer, the smallest module among
the layer itself and its ancestors whose parent is a ``ModuleList`` or ``Sequential``
(a transformer's layer in ``encoder.layer``, a ResNet's basic block in ``layer2``, the
layer itself in a plain ``Sequential`` CNN), or the modules whose qualified names match
a user's regular expression. A block returning a tuple or a ``ModelOutput`` is read by
its first tensor. Each term (the task's own output loss, and the mean squared error of
each block's output against the teacher's) is divided by its value on the first step,
so that every term starts at 1 and the weights say how much each one counts (the
blocks share the ``features`` weight equally), whatever the scale of the activations.

References
----------
- A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio. FitNets: Hints
  for Thin Deep Nets. ICLR 2015 (matching intermediate features).
- X. Jiao, Y. Yin, L. Shang, X. Jiang, X. Chen, L. Li, F. Wang, Q. Liu. TinyBERT:
  Distilling BERT for Natural Language Understanding. Findings of EMNLP 2020
  (layer-wise hidden-state distillation of transformers).
- L. Liebenwein, A. Maalouf, D. Feldman, D. Rus. Compressing Neural Networks: Towards
  Determining the Optimal Layer-wise Decomposition (ALDS). NeurIPS 2021 (every
  compressed network is fine-tuned).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from autorank.errors import TaskError
from autorank.methods._layers import Decomposed

__all__ = ["FinetuneControl", "FeatureDistiller", "TermScale", "feature_blocks", "first_tensor", "kd_loss", "TRAINABLE",
           "KD_TEMPERATURE"]

#: what ``trainable`` may be
TRAINABLE = ("all", "decomposed")
#: temperature of the logit distillation of a classification task (Hinton et al. 2015)
KD_TEMPERATURE = 2.0


@dataclass
class FinetuneControl:
    """Options of one fine-tune of a built-in task (see the module docstring).

    ``features``: weight of the feature terms (0: the output only). ``output``: weight
    of the distillation of the teacher's logits, for a classification task (its
    cross-entropy on the labels keeps weight 1; a fidelity task's output term is its
    own loss). ``modules``: a regular expression of the module names to match (None:
    the blocks holding decomposed layers). ``teacher``: the original model (a
    fidelity task uses its own frozen copy when None). ``trainable``: ``"all"`` or
    ``"decomposed"`` (only the factors of decomposed layers are trained).
    ``time_s``: stop after this wall time; the learning rate then decays with the
    elapsed share of it (cosine) instead of the share of steps. ``lr``: overrides
    the task's learning rate. ``callback(step)``: called after every optimizer step
    (1-based count); returning True stops the fine-tune. ``extra_inputs``: distillation
    batches beyond the task's own (augmented ones: a fidelity task labels them with the
    teacher; a classification task, which needs labels, ignores them).
    """

    features: float = 0.0
    output: float = 1.0
    modules: Optional[str] = None
    teacher: Optional[nn.Module] = None
    trainable: str = "all"
    time_s: Optional[float] = None
    lr: Optional[float] = None
    callback: Optional[Callable[[int], bool]] = None
    extra_inputs: Optional[list] = None
    #: share of the budget (steps or time) over which the learning rate warms up linearly
    warmup: float = 0.05
    #: filled while running: optimizer steps taken, seconds, why it stopped
    steps_done: int = field(default=0, init=False)
    seconds: float = field(default=0.0, init=False)
    stopped_by: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE:
            raise TaskError(f"fine-tune option trainable={self.trainable!r}: use one of {', '.join(TRAINABLE)}")
        for key in ("features", "output"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise TaskError(f"fine-tune option {key}={v!r}: expected a number >= 0")
        if self.time_s is not None and not (self.time_s > 0):
            raise TaskError(f"fine-tune option time_s={self.time_s!r}: expected a positive number of seconds")
        if self.modules is not None:
            try:
                re.compile(self.modules)
            except re.error as exc:
                raise TaskError(f"fine-tune option modules={self.modules!r} is not a valid regular expression ({exc})") from None

    # ------------------------------------------------------------------ used by the tasks' loops
    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters to train; with ``"decomposed"``, those of Decomposed modules only."""
        if self.trainable == "all":
            return [p for p in model.parameters() if p.requires_grad]
        seen: set[int] = set()
        out = []
        for m in model.modules():
            if isinstance(m, Decomposed):
                for p in m.parameters():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        out.append(p)
        if not out:
            raise TaskError("fine-tune option trainable='decomposed': the model has no decomposed layer to train")
        return out

    def optimizer(self, make: Callable[[list, float], torch.optim.Optimizer], model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """The optimizer of the trainable parameters; the others are frozen until :meth:`finish`
        (so that the backward pass skips them: a transformer's embeddings are half its weights)."""
        params = self.trainable_parameters(model)
        keep = {id(p) for p in params}
        self._frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
        for p in self._frozen:
            p.requires_grad_(False)
        return make(params, float(self.lr if self.lr is not None else lr))

    def begin(self, make: Callable[[list, float], torch.optim.Optimizer], model: nn.Module, lr: float,
              distiller: Optional["FeatureDistiller"] = None) -> torch.optim.Optimizer:
        """:meth:`optimizer` then :meth:`start`, closing ``distiller`` (its hooks) if the optimizer cannot be made:
        what a task's ``finetune`` does last before its loop."""
        try:
            opt = self.optimizer(make, model, lr)
        except BaseException:
            if distiller is not None:
                distiller.close()
            raise
        self.start()
        return opt

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self.steps_done = 0
        self.stopped_by = ""

    def set_lr(self, opt: torch.optim.Optimizer, step: int, steps: int) -> None:
        """A linear warm-up over the first ``warmup`` share of the budget, then a cosine decay to zero.

        The share used is the larger of the shares of steps and of wall time.
        Adam's first steps move every weight by about the learning rate whatever
        its gradient; the warm-up keeps them from undoing what the initialisation
        (and the re-fit) got right.
        """
        used = (time.perf_counter() - self._t0) / self.time_s if self.time_s is not None else 0.0
        frac = min(1.0, max(step / max(1, steps), used))
        factor = 0.5 * (1.0 + math.cos(math.pi * frac))
        if self.warmup > 0:  # counted with this step done, so that the first step is not at zero
            factor *= min(1.0, max((step + 1) / max(1, steps), used) / self.warmup)
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor

    def after_step(self, step: int) -> bool:
        """Count the step; True when the fine-tune must stop (time budget, callback)."""
        self.steps_done = step
        self.seconds = time.perf_counter() - self._t0
        if self.callback is not None and self.callback(step):
            self.stopped_by = self.stopped_by or "callback"
            return True
        if self.time_s is not None and self.seconds >= self.time_s:
            self.stopped_by = "time"
            return True
        return False

    def finish(self, steps: int) -> None:
        for p in getattr(self, "_frozen", []):
            p.requires_grad_(True)
        self._frozen = []
        self.seconds = time.perf_counter() - self._t0
        if not self.stopped_by:
            self.stopped_by = "steps"


def first_tensor(output: Any) -> Optional[torch.Tensor]:
    """The first tensor of a module's output: itself, the first of a tuple/list, the first value of a dict/ModelOutput."""
    seen = output
    for _ in range(8):
        if isinstance(seen, torch.Tensor):
            return seen
        if isinstance(seen, (tuple, list)):
            if not seen:
                return None
            seen = seen[0]
        elif isinstance(seen, Mapping):
            values = [v for v in seen.values() if v is not None]
            if not values:
                return None
            seen = values[0]
        else:
            return None
    return None


def feature_blocks(model: nn.Module, pattern: Optional[str] = None) -> list[str]:
    """Names of the modules whose outputs feature distillation matches (see the module docstring).

    With ``pattern``: every module whose qualified name matches it (``re.search``),
    raising :class:`TaskError` when none does.
    """
    named = dict(model.named_modules())
    if pattern is not None:
        rx = re.compile(pattern)
        found = [n for n in named if n and rx.search(n)]
        if not found:
            raise TaskError(f"fine-tune option modules={pattern!r}: no module of the model matches")
        return found
    out: list[str] = []
    for name, module in named.items():
        if not isinstance(module, Decomposed):
            continue
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            candidate = ".".join(parts[:k])
            parent = named.get(".".join(parts[: k - 1]), model) if k > 1 else model
            if isinstance(parent, (nn.ModuleList, nn.Sequential)) and not isinstance(parent, Decomposed):
                if candidate not in out:
                    out.append(candidate)
                break
    return out


class FeatureDistiller:
    """Forward hooks on the same blocks of a student and a teacher; the feature loss of the last forward.

    ``loss(student_features, teacher_features)``: the mean over blocks of the
    squared error of each block's output, each divided by its own value on the first
    call (so that each block starts at 1). Hooks are removed by :meth:`close`.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, blocks: list[str]):
        self.blocks = list(blocks)
        s_named, t_named = dict(student.named_modules()), dict(teacher.named_modules())
        missing = [b for b in self.blocks if b not in t_named]
        if missing:
            raise TaskError(f"feature distillation: the teacher has no module {missing[0]!r}")
        self.student_out: dict[str, torch.Tensor] = {}
        self.teacher_out: dict[str, torch.Tensor] = {}
        self._scale: dict[str, float] = {}
        self._handles = []
        for b in self.blocks:
            self._handles.append(s_named[b].register_forward_hook(self._store(self.student_out, b)))
            self._handles.append(t_named[b].register_forward_hook(self._store(self.teacher_out, b)))

    @staticmethod
    def _store(into: dict, name: str):
        def hook(_m, _args, out):
            t = first_tensor(out)
            if t is not None:
                into[name] = t
        return hook

    def take_teacher(self) -> dict[str, torch.Tensor]:
        """The teacher's block outputs of the last teacher forward (detached), and forget them."""
        out = {k: v.detach() for k, v in self.teacher_out.items()}
        self.teacher_out.clear()
        return out

    def loss(self, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
        terms = []
        for b in self.blocks:
            s, t = self.student_out.get(b), teacher.get(b)
            if s is None or t is None:
                continue
            if s.shape != t.shape:
                raise TaskError(f"feature distillation: block {b!r} outputs {tuple(s.shape)}, the teacher's {tuple(t.shape)}")
            term = F.mse_loss(s.float(), t.float())
            if b not in self._scale:
                self._scale[b] = max(float(term.detach()), 1e-12)
            terms.append(term / self._scale[b])
        self.student_out.clear()
        if not terms:
            raise TaskError("feature distillation: no block output was recorded (are the blocks called by forward?)")
        return torch.stack(terms).mean()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.student_out.clear()
        self.teacher_out.clear()


class TermScale:
    """Divides a loss term by its value on the first call (a measured, constant scale)."""

    def __init__(self) -> None:
        self.scale: Optional[float] = None

    def __call__(self, term: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            self.scale = max(float(term.detach()), 1e-12)
        return term / self.scale


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = KD_TEMPERATURE) -> torch.Tensor:
    """KL divergence of temperature-softened logits, times T² (Hinton, Vinyals, Dean 2015)."""
    t = float(temperature)
    log_p = F.log_softmax(student.float().reshape(-1, student.shape[-1]) / t, dim=-1)
    log_q = F.log_softmax(teacher.float().reshape(-1, teacher.shape[-1]) / t, dim=-1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (t * t)
