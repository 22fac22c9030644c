"""Recovery options: the ``training:`` keys of :func:`autorank.training.recovery.recover`, parsed and checked.

:meth:`RecoveryOptions.from_dict` reads the search space's ``training:`` block
(or a dict from the API / ``--training``), fills the defaults the benchmark chose,
and raises :class:`RecoveryError` naming the first bad key and its value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from autorank.errors import AutorankError
from autorank.tasks.augment import DEFAULT_FRACTION
from autorank.tasks.distill import TRAINABLE
from autorank.training.blockwise import DEFAULT_BLOCK_LR
from autorank.training.refit import DEFAULT_RIDGE

__all__ = [
    "RECOVERY_KEYS",
    "RecoveryError",
    "RefitOptions",
    "BlockwiseOptions",
    "DistillOptions",
    "AugmentOptions",
    "EarlyStopping",
    "RecoveryOptions",
    "parse_duration",
]

#: keys of the search space's ``training:`` block that belong to recovery
RECOVERY_KEYS = ("refit", "blockwise", "distill", "augment", "early_stopping", "finetune_steps", "finetune_time", "lr")


class RecoveryError(AutorankError, ValueError):
    """A recovery option that cannot be used (the message names the key and the value)."""


# ---------------------------------------------------------------------- options
@dataclass(frozen=True)
class RefitOptions:
    """``refit:``: ``ridge``, the pull toward the current weights in the least-squares solves (relative
    to the Gram matrix's mean diagonal); ``low_rank``: re-solve svd's two factors jointly (else only its
    second factor); ``batches``: how many batches of the task's fine-tuning inputs to fit on
    (``task.training_inputs``; a task without it gives its calibration inputs)."""

    ridge: float = DEFAULT_RIDGE
    low_rank: bool = True
    batches: int = 16


@dataclass(frozen=True)
class BlockwiseOptions:
    """``blockwise:``: the ``share`` of the fine-tuning budget (steps or time) spent training each block
    alone (:func:`autorank.training.blockwise.reconstruct_blocks`) before the end-to-end fine-tune; Adam's
    ``lr``; ``trainable``: ``decomposed`` or ``all`` (the block's parameters; null, the default: as
    ``distill.trainable``, so that one switch keeps every other parameter shared); ``batches`` of the
    task's fine-tuning inputs recorded. With a step budget S, each block gets share·S steps (a block
    step costs about a model step divided by the number of blocks)."""

    share: float = 0.9
    lr: float = DEFAULT_BLOCK_LR
    trainable: Optional[str] = None
    batches: int = 16


@dataclass(frozen=True)
class DistillOptions:
    """``distill:``: weight of the block-output terms (``features``, 0 = the output only) and of the
    logit distillation of a classification task (``output``); ``modules``: a regex of the modules to
    match instead of the blocks holding decomposed layers; ``trainable``: ``all`` or ``decomposed``."""

    features: float = 2.0
    output: float = 1.0
    modules: Optional[str] = None
    trainable: str = "all"


@dataclass(frozen=True)
class AugmentOptions:
    """``augment:``: ``batches`` of new distillation inputs made from the task's own by its augmentation
    (:meth:`autorank.tasks.FidelityTask.augmented_inputs`: token replacement for text, ``fraction`` of the
    tokens replaced), added to the block-wise stage's and the end-to-end distillation's inputs. A task
    without an augmentation (images, labelled data, a user's task) is recovered on its own inputs only."""

    batches: int = 256
    fraction: float = DEFAULT_FRACTION


@dataclass(frozen=True)
class EarlyStopping:
    """``early_stopping:``: evaluate on the held-out split every ``every`` steps; stop after
    ``patience`` evaluations without improvement, once ``after`` of the budget (steps or time) is
    spent; keep the best weights. (A fine-tune often dips while its learning rate is high and
    climbs as it decays: on the digits, stopping on patience alone lost to fine-tuning to the end.)"""

    every: int = 25
    patience: int = 5
    after: float = 0.5


@dataclass(frozen=True)
class RecoveryOptions:
    """What :func:`recover` does; None for a stage turns it off. See the module docstring.

    The defaults are what ``benchmarks/bench_recovery.py --ablation`` measured best at equal
    wall time (MiniLM at 50% FLOPs, the digits, ResNet-20; README, "Recovery after compression").
    """

    refit: Optional[RefitOptions] = field(default_factory=RefitOptions)
    blockwise: Optional[BlockwiseOptions] = field(default_factory=BlockwiseOptions)
    distill: Optional[DistillOptions] = field(default_factory=DistillOptions)
    augment: Optional[AugmentOptions] = field(default_factory=AugmentOptions)
    early_stopping: Optional[EarlyStopping] = field(default_factory=EarlyStopping)
    finetune_steps: Optional[int] = None
    finetune_time: Optional[float] = None
    lr: Optional[float] = None

    @classmethod
    def from_dict(cls, value: Union[Mapping, None, "RecoveryOptions"], source: str = "training") -> "RecoveryOptions":
        """Options from a ``training:`` mapping (only :data:`RECOVERY_KEYS`); defaults for missing keys.

        Raises :class:`RecoveryError` naming the first bad key (``source.key``) and its value.
        """
        if isinstance(value, RecoveryOptions):
            return value
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise RecoveryError(f"{source}: expected a mapping with some of the keys {list(RECOVERY_KEYS)}, got {value!r}")
        unknown = sorted(set(value) - set(RECOVERY_KEYS))
        if unknown:
            raise RecoveryError(f"{source}: unknown key(s) {unknown}; recovery options are {list(RECOVERY_KEYS)}")
        d = cls()
        return cls(
            refit=_refit_options(value.get("refit", True), f"{source}.refit") if "refit" in value else d.refit,
            blockwise=_blockwise_options(value["blockwise"], f"{source}.blockwise") if "blockwise" in value else d.blockwise,
            distill=_distill_options(value["distill"], f"{source}.distill") if "distill" in value else d.distill,
            augment=_augment_options(value["augment"], f"{source}.augment") if "augment" in value else d.augment,
            early_stopping=_early_options(value["early_stopping"], f"{source}.early_stopping")
            if "early_stopping" in value else d.early_stopping,
            finetune_steps=_steps(value.get("finetune_steps"), f"{source}.finetune_steps"),
            finetune_time=None if value.get("finetune_time") is None else parse_duration(value["finetune_time"], f"{source}.finetune_time"),
            lr=_positive(value.get("lr"), f"{source}.lr", allow_none=True),
        )

    def trains_only_decomposed(self, control: bool) -> bool:
        """Whether these options leave every parameter outside the decomposed layers unchanged.

        ``control``: whether the task's fine-tune takes the distillation options
        (:func:`supports_control`); one that does not chooses its own parameters
        (``task.finetune_preserves_original`` says whether it keeps the original's).
        The re-fit changes decomposed factors only.
        """
        if self.blockwise is not None and self.blockwise_trainable() != "decomposed":
            return False
        return not control or (self.distill is not None and self.distill.trainable == "decomposed")

    def blockwise_trainable(self) -> str:
        """What the block-wise stage trains: its own ``trainable``, else the distillation's (``all`` without one)."""
        if self.blockwise is not None and self.blockwise.trainable is not None:
            return self.blockwise.trainable
        return self.distill.trainable if self.distill is not None else DistillOptions().trainable

    def summary(self) -> str:
        """One line: the stages that are on (what the front's members were recovered with)."""
        parts = []
        if self.refit is not None:
            parts.append("re-fit")
        if self.blockwise is not None:
            parts.append(f"block-wise {self.blockwise.share:.0%}")
        if self.distill is not None:
            parts.append(f"distill features x{self.distill.features:g}, {self.distill.trainable}")
        if self.augment is not None:
            parts.append(f"{self.augment.batches} augmented batches where the task makes them")
        if self.early_stopping is not None:
            parts.append(f"early stopping every {self.early_stopping.every}")
        return ", ".join(parts) or "fine-tune only"

    def to_dict(self) -> dict[str, Any]:
        """The ``training:`` form (round-trips through :meth:`from_dict`)."""
        return {
            "refit": False if self.refit is None else asdict(self.refit),
            "blockwise": False if self.blockwise is None else asdict(self.blockwise),
            "distill": False if self.distill is None else asdict(self.distill),
            "augment": False if self.augment is None else asdict(self.augment),
            "early_stopping": False if self.early_stopping is None else asdict(self.early_stopping),
            "finetune_steps": self.finetune_steps,
            "finetune_time": self.finetune_time,
            "lr": self.lr,
        }


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise RecoveryError(f"{where}: expected true or false, got {v!r}")
    return v


def _positive(v: Any, where: str, *, allow_none: bool = False, allow_zero: bool = False) -> Optional[float]:
    if v is None and allow_none:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    if not ok or float(v) < 0 or (float(v) == 0 and not allow_zero):
        need = "a number >= 0" if allow_zero else "a positive number"
        raise RecoveryError(f"{where}: expected {need}{' or null' if allow_none else ''}, got {v!r}")
    return float(v)


def _int(v: Any, where: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise RecoveryError(f"{where}: expected an integer >= {minimum}, got {v!r}")
    return int(v)


def _steps(v: Any, where: str) -> Optional[int]:
    return None if v is None else _int(v, where, 0)


def _keys(v: Mapping, known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(v) - set(known))
    if unknown:
        raise RecoveryError(f"{where}: unknown key(s) {unknown}; expected some of {list(known)}")


def _section(v: Any, where: str, shape: str, known: tuple[str, ...]) -> Union[bool, Mapping]:
    """A ``training:`` sub-block: ``False`` (false or null: off), ``True`` (true: the defaults), or the mapping
    given, its keys checked; anything else raises naming the expected ``shape``."""
    if v is False or v is None:
        return False
    if v is True:
        return True
    if not isinstance(v, Mapping):
        raise RecoveryError(f"{where}: expected true, false or {{{shape}}}, got {v!r}")
    _keys(v, known, where)
    return v


def _refit_options(v: Any, where: str) -> Optional[RefitOptions]:
    v = _section(v, where, "ridge: R, low_rank: true, batches: N", ("ridge", "low_rank", "batches"))
    if isinstance(v, bool):
        return RefitOptions() if v else None
    d = RefitOptions()
    return RefitOptions(
        ridge=_positive(v.get("ridge", d.ridge), f"{where}.ridge", allow_zero=True),
        low_rank=_bool(v.get("low_rank", d.low_rank), f"{where}.low_rank"),
        batches=_int(v.get("batches", d.batches), f"{where}.batches", 1),
    )


def _blockwise_options(v: Any, where: str) -> Optional[BlockwiseOptions]:
    v = _section(v, where, "share: S, lr: LR, trainable: all, batches: N", ("share", "lr", "trainable", "batches"))
    if isinstance(v, bool):
        return BlockwiseOptions() if v else None
    d = BlockwiseOptions()
    share = _positive(v.get("share", d.share), f"{where}.share")
    if share >= 1:
        raise RecoveryError(f"{where}.share: expected a fraction in (0, 1), got {v.get('share')!r}")
    trainable = v.get("trainable", d.trainable)
    if trainable is not None and trainable not in TRAINABLE:
        raise RecoveryError(f"{where}.trainable: expected one of {list(TRAINABLE)} or null, got {trainable!r}")
    return BlockwiseOptions(share=share, lr=_positive(v.get("lr", d.lr), f"{where}.lr"), trainable=trainable,
                            batches=_int(v.get("batches", d.batches), f"{where}.batches", 1))


def _distill_options(v: Any, where: str) -> Optional[DistillOptions]:
    v = _section(v, where, "features: W, output: W, trainable: all, modules: REGEX", ("features", "output", "trainable", "modules"))
    if isinstance(v, bool):
        return DistillOptions() if v else DistillOptions(features=0.0)
    d = DistillOptions()
    trainable = v.get("trainable", d.trainable)
    if trainable not in TRAINABLE:
        raise RecoveryError(f"{where}.trainable: expected one of {list(TRAINABLE)}, got {trainable!r}")
    modules = v.get("modules")
    if modules is not None:
        if not isinstance(modules, str):
            raise RecoveryError(f"{where}.modules: expected a regular expression or null, got {modules!r}")
        try:
            re.compile(modules)
        except re.error as exc:
            raise RecoveryError(f"{where}.modules: {modules!r} is not a valid regular expression ({exc})") from None
    return DistillOptions(
        features=_positive(v.get("features", d.features), f"{where}.features", allow_zero=True),
        output=_positive(v.get("output", d.output), f"{where}.output", allow_zero=True),
        modules=modules,
        trainable=trainable,
    )


def _augment_options(v: Any, where: str) -> Optional[AugmentOptions]:
    v = _section(v, where, "batches: N, fraction: F", ("batches", "fraction"))
    if isinstance(v, bool):
        return AugmentOptions() if v else None
    d = AugmentOptions()
    fraction = _positive(v.get("fraction", d.fraction), f"{where}.fraction")
    if fraction > 1:
        raise RecoveryError(f"{where}.fraction: expected a share of the tokens in (0, 1], got {v.get('fraction')!r}")
    return AugmentOptions(batches=_int(v.get("batches", d.batches), f"{where}.batches", 1), fraction=fraction)


def _early_options(v: Any, where: str) -> Optional[EarlyStopping]:
    v = _section(v, where, "every: N, patience: P, after: F", ("every", "patience", "after"))
    if isinstance(v, bool):
        return EarlyStopping() if v else None
    d = EarlyStopping()
    after = _positive(v.get("after", d.after), f"{where}.after", allow_zero=True)
    if after > 1:
        raise RecoveryError(f"{where}.after: expected a fraction of the budget in [0, 1], got {v.get('after')!r}")
    return EarlyStopping(every=_int(v.get("every", d.every), f"{where}.every", 1),
                         patience=_int(v.get("patience", d.patience), f"{where}.patience", 1), after=after)


_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(value: Any, where: str = "finetune_time") -> float:
    """Seconds from ``90``, ``"90s"``, ``"5m"``, ``"1.5h"`` (RecoveryError naming ``where`` otherwise)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|sec|m|min|h)?\s*", str(value)) if isinstance(value, str) else None
        if m is None:
            raise RecoveryError(f"{where}: expected a duration such as 90s, 5m or 1h (or seconds), got {value!r}")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not math.isfinite(seconds) or seconds <= 0:
        raise RecoveryError(f"{where}: expected a positive duration, got {value!r}")
    return seconds
