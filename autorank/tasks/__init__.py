"""Tasks: how autorank scores, fine-tunes and feeds a model.

- :class:`Task` — the protocol the search calls; :class:`BaseTask` — a convenient base.
- :class:`ClassificationTask` — top-1 accuracy on labelled data, fine-tuning with cross-entropy.
- :class:`FidelityTask` — label-free: agreement with the original model, distillation.
- :func:`demo_task` — scikit-learn's 8×8 digits (the ``demo`` model's task).
- :func:`minilm_task` — sentence-embedding fidelity for the ``minilm`` model.
- :class:`PerplexityTask` — next-token perplexity of a causal LM on a text file (``perplexity:FILE``).
- :func:`load_task` — a task from a spec (built-in name, ``module:callable``, ``file.py:callable``).
- :class:`FinetuneControl` — feature distillation, trainable parameters, a time budget and a per-step
  callback for the built-in tasks' ``finetune`` (used by :mod:`autorank.training.recovery`).
"""

from __future__ import annotations

from autorank.errors import TaskError
from autorank.tasks.base import BaseTask, Task
from autorank.tasks.classification import ClassificationTask
from autorank.tasks.demo import demo_task
from autorank.tasks.distill import FinetuneControl
from autorank.tasks.fidelity import FidelityTask
from autorank.tasks.loader import load_task
from autorank.tasks.perplexity import PerplexityTask
from autorank.tasks.text import minilm_task  # transformers is imported only when a MiniLM is loaded

__all__ = [
    "BaseTask",
    "ClassificationTask",
    "FidelityTask",
    "FinetuneControl",
    "PerplexityTask",
    "Task",
    "TaskError",
    "demo_task",
    "load_task",
    "minilm_task",
]

