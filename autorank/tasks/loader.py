"""Task specs: how the CLI and the search name a task.

A task spec is one of:

- a built-in name: ``demo`` (digits classification, :func:`~autorank.tasks.demo.demo_task`)
  or ``minilm`` (sentence-embedding fidelity, :func:`~autorank.tasks.text.minilm_task`);
- ``perplexity:FILE.txt[?seq_len=128&...]``: next-token perplexity of a causal LM on a
  text file, tokenised with the tokenizer saved with a ``hf:DIR`` model
  (:class:`~autorank.tasks.perplexity.PerplexityTask`);
- ``package.module:callable`` or ``path/to/file.py:callable``: a callable called with
  no arguments that returns a task (a task class works), or a task object itself;
- a task object (returned as is, once checked);
- ``None``: the built-in task of a built-in model spec (``demo`` → ``demo``,
  ``minilm`` → ``minilm``); any other model needs a task.

Whatever is loaded must provide the :class:`~autorank.tasks.base.Task` protocol
(``setup``, ``example_inputs``, ``calibration_inputs``, ``evaluate``, ``finetune``
and the ``name``, ``metric``, ``device`` attributes); otherwise a
:class:`~autorank.errors.TaskError` names the spec and what is missing.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

from autorank.errors import TaskError
from autorank.specs import resolve_target
from autorank.tasks.base import TASK_ATTRIBUTES, TASK_METHODS, Task
from autorank.tasks.demo import demo_task
from autorank.tasks.perplexity import PERPLEXITY_PREFIX, perplexity_task
from autorank.tasks.text import minilm_task

__all__ = ["BUILTIN_TASKS", "load_task", "check_task"]


def _demo(device: str) -> Task:
    return demo_task(device=device)


def _minilm(device: str) -> Task:
    return minilm_task(device=device)


#: built-in task name -> factory(device)
BUILTIN_TASKS: dict[str, Callable[[str], Task]] = {"demo": _demo, "minilm": _minilm}

#: built-in model spec -> its built-in task
MODEL_TASKS: dict[str, str] = {"demo": "demo", "minilm": "minilm"}


def check_task(obj: Any, spec: str) -> Task:
    """``obj`` if it provides the Task protocol, else a TaskError naming ``spec`` and what is missing."""
    missing = [m for m in TASK_METHODS if not callable(getattr(obj, m, None))]
    missing += [a for a in TASK_ATTRIBUTES if not hasattr(obj, a)]
    if missing or not isinstance(obj, Task):
        raise TaskError(
            f"task spec {spec!r}: {type(obj).__name__} is not a task: missing "
            + ", ".join(missing or ["part of the Task protocol"])
            + " (see autorank.tasks.Task)"
        )
    return obj


def load_task(spec: Union[str, Task, None], model_spec: Optional[str] = None, *, device: Optional[str] = None) -> Task:
    """The task a spec names (see the module docstring); ``device`` is given to built-in tasks
    (default ``cpu``; a ``perplexity:`` spec's own ``device=`` option wins, else ``auto``: CUDA when available)."""
    if isinstance(spec, str) and spec.strip().startswith(PERPLEXITY_PREFIX):
        return check_task(perplexity_task(spec.strip(), model_spec, device=device), spec.strip())
    device = device or "cpu"
    if spec is None:
        name = MODEL_TASKS.get(model_spec.strip()) if isinstance(model_spec, str) else None
        if name is None:
            raise TaskError(
                f"model spec {model_spec!r} has no built-in task: a task must be given "
                f"(a built-in task: {', '.join(sorted(BUILTIN_TASKS))}, or 'package.module:callable' / 'file.py:callable' returning a Task)"
            )
        return check_task(BUILTIN_TASKS[name](device), name)
    if not isinstance(spec, str):
        return check_task(spec, repr(spec) if len(repr(spec)) < 60 else type(spec).__name__)
    spec = spec.strip()
    if not spec:
        raise TaskError("task spec must be a non-empty string such as 'demo' or 'package.module:callable'")
    if spec in BUILTIN_TASKS:
        return check_task(BUILTIN_TASKS[spec](device), spec)
    if ":" not in spec:
        raise TaskError(
            f"task spec {spec!r}: not a built-in task ({', '.join(sorted(BUILTIN_TASKS))}) and not of the form "
            "'package.module:callable' or 'file.py:callable'"
        )
    obj = resolve_target(spec, what="task spec", error=TaskError)
    is_task_object = all(callable(getattr(obj, m, None)) for m in TASK_METHODS) and not isinstance(obj, type)
    if callable(obj) and not is_task_object:
        try:
            obj = obj()
        except TaskError:
            raise
        except Exception as exc:
            raise TaskError(f"task spec {spec!r}: calling it failed: {type(exc).__name__}: {exc}") from exc
    return check_task(obj, spec)
