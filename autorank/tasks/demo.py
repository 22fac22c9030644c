"""The demo: scikit-learn's 8×8 handwritten digits and a small CNN trained on them.

The data is ``sklearn.datasets.load_digits`` (1,797 real 8×8 grayscale digits
shipped inside scikit-learn, no download), pixel values scaled from 0..16 to
0..1, shaped ``(N, 1, 8, 8)``, split 80/20 stratified with a fixed seed.

:func:`trained_demo_model` trains :class:`~autorank.models.DigitsCNN` on the
training split with a fixed recipe (seeded, one torch thread, under a minute of
CPU) the first time it is needed on a machine, folds its batch norms into the
convolutions before them (the inference form every deployment uses, and the
first step of AIMET's compression workflow: a factorization then removes time
the batch norms would otherwise keep), and caches the weights under the
autorank cache directory (``$AUTORANK_CACHE_DIR``, else ``~/.cache/autorank``),
in ``models/demo-digitscnn-<recipe hash>.pt``. The file is written atomically and
read with ``torch.load(weights_only=True)``; an unreadable or foreign file is
logged and replaced by training again. ``autorank.load_model("demo")`` returns
this trained model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from autorank.bn_folding import fold_batch_norms
from autorank.fileio import atomic_write_bytes
from autorank.models import DigitsCNN, seeded
from autorank.tasks.classification import ClassificationTask

logger = logging.getLogger("autorank")

__all__ = ["RECIPE", "demo_architecture", "fold_demo", "digits_split", "cache_root", "demo_weights_path", "trained_demo_model", "demo_task"]

#: how the demo model is trained; any change gives a new cache file name
RECIPE: dict = {
    "version": 3,
    "data": "sklearn.datasets.load_digits, pixels/16, (N,1,8,8)",
    "split": {"val_fraction": 0.2, "stratified": True, "seed": 0},
    "model": "autorank.models.DigitsCNN(width=96, upsample=2), init seed 0",
    "optimizer": "adam",
    "lr": 5e-3,
    "schedule": "onecycle",
    "epochs": 5,
    "batch_size": 64,
    "shuffle_seed": 0,
    "inference_form": "batch norms folded into the convolutions before them: DigitsCNN(batch_norm=False)",
}

_FORMAT = "autorank.demo-weights"

#: times the demo model was trained in this process (tests read it)
training_runs = 0


@functools.lru_cache(maxsize=1)
def _split_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    split = RECIPE["split"]
    train_idx, val_idx = train_test_split(
        list(range(len(y))), test_size=split["val_fraction"], stratify=digits.target, random_state=split["seed"]
    )
    tr, va = torch.tensor(train_idx), torch.tensor(val_idx)
    return x[tr], y[tr], x[va], y[va]


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``: 1,437 and 360 digits, images ``(N, 1, 8, 8)`` in [0, 1]."""
    return tuple(t.clone() for t in _split_tensors())  # type: ignore[return-value]


def demo_architecture() -> DigitsCNN:
    """The demo's architecture as served (untrained): DigitsCNN in inference form, no batch norms."""
    return DigitsCNN(batch_norm=False)


def fold_demo(trained: DigitsCNN) -> DigitsCNN:
    """``trained`` (with batch norms) in inference form: every batch norm folded into the convolution before it.

    Same outputs in eval mode (to float rounding); the batch norms' slots hold ``nn.Identity``, as in
    ``DigitsCNN(batch_norm=False)``.
    """
    folded, pairs = fold_batch_norms(trained)
    expected = sum(isinstance(m, torch.nn.BatchNorm2d) for m in trained.modules())
    if len(pairs) != expected:  # the recipe's architecture changed under it
        raise RuntimeError(f"fold_demo: folded {len(pairs)} of the demo's {expected} batch norms")
    return folded.eval()


def cache_root() -> Path:
    """The autorank cache directory: ``$AUTORANK_CACHE_DIR``, else ``~/.cache/autorank``."""
    root = os.environ.get("AUTORANK_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "autorank"


@functools.lru_cache(maxsize=1)
def _recipe_hash() -> str:
    shapes = {k: list(v.shape) for k, v in seeded(demo_architecture).state_dict().items()}  # caller's RNG untouched
    blob = json.dumps({"recipe": RECIPE, "state_shapes": shapes}, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def demo_weights_path() -> Path:
    """Where the trained demo weights are cached (the name carries a hash of :data:`RECIPE`)."""
    return cache_root() / "models" / f"demo-digitscnn-{_recipe_hash()}.pt"


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def _train() -> tuple[dict[str, torch.Tensor], float]:
    """Train DigitsCNN with :data:`RECIPE`; the inference form's state dict and its validation accuracy."""
    global training_runs
    x_tr, y_tr, x_va, y_va = _split_tensors()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and polite on shared machines
    start = time.perf_counter()
    try:
        model = seeded(DigitsCNN)
        bs, epochs, lr = RECIPE["batch_size"], RECIPE["epochs"], RECIPE["lr"]
        per_epoch = (len(y_tr) + bs - 1) // bs
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch)
        gen = torch.Generator().manual_seed(RECIPE["shuffle_seed"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RECIPE["shuffle_seed"])
            for _ in range(epochs):
                model.train()
                perm = torch.randperm(len(y_tr), generator=gen)
                for i in range(0, len(y_tr), bs):
                    idx = perm[i : i + bs]
                    loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
        model = fold_demo(model.eval())
        acc = _accuracy(model, x_va, y_va)
    finally:
        torch.set_num_threads(threads)
    training_runs += 1
    logger.info(
        "trained the demo model (DigitsCNN on scikit-learn digits) in %.1f s: validation accuracy %.4f",
        time.perf_counter() - start,
        acc,
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, acc


def _read(path: Path, model: torch.nn.Module) -> bool:
    """Load cached weights into ``model``; False (with a warning) if the file is missing or unusable."""
    if not path.exists():
        return False
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise ValueError("not an autorank demo-weights file")
        model.load_state_dict(blob["state_dict"], strict=True)
        return True
    except Exception as exc:  # corrupt, truncated or foreign: train again
        logger.warning("ignoring unreadable demo weights %s (%s: %s); training again", path, type(exc).__name__, exc)
        return False


def _write(path: Path, state: dict[str, torch.Tensor], acc: float) -> None:
    buf = io.BytesIO()
    torch.save({"format": _FORMAT, "recipe": json.dumps(RECIPE, sort_keys=True), "val_accuracy": acc, "state_dict": state}, buf)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:  # a read-only cache: the model is still usable, trained again next time
        logger.warning("could not cache the demo weights at %s: %s", path, exc)


@contextlib.contextmanager
def _training_lock(directory: Path) -> Iterator[None]:
    """One process trains at a time per cache directory: the others wait, then read its weights.

    An advisory lock on the directory itself (POSIX ``flock``; nothing left
    behind). Where the directory cannot be made or locked (read-only, another
    OS), each process trains on its own, as before.
    """
    try:
        import fcntl

        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def trained_demo_model(path: Optional[Path] = None) -> torch.nn.Module:
    """DigitsCNN trained on the digits (cached per machine; see the module docstring), in eval mode.

    Two processes that start on an empty cache together (two searches, a test
    suite's workers) train it once: the second waits for the first's file.
    """
    path = Path(path) if path is not None else demo_weights_path()
    model = seeded(demo_architecture)
    if _read(path, model):
        return model.eval()
    with _training_lock(path.parent):
        if not _read(path, model):
            state, acc = _train()
            model.load_state_dict(state)
            _write(path, state, acc)
    return model.eval()


def demo_task(device: str = "cpu", *, batch_size: int = 64, lr: float = 3e-4, calibration_batches: int = 4) -> ClassificationTask:
    """Top-1 accuracy on the 360 validation digits; fine-tuning on the 1,437 training digits.

    ``lr`` 3e-4: with its batch norms folded the demo has nothing that re-normalises its activations, and
    1e-3 left a damaged copy (noise of half each weight's spread) at 60% accuracy after 20 steps where 3e-4
    brought it to 89%."""
    x_tr, y_tr, x_va, y_va = _split_tensors()
    train = DataLoader(TensorDataset(x_tr, y_tr), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x_va, y_va), batch_size=256, shuffle=False)
    return ClassificationTask(train, val, device=device, lr=lr, calibration_batches=calibration_batches, name="digits")
