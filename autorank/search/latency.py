"""Latency where the search needs it: the table for a latency budget, the front's re-measurement, the worker job.

:func:`profile_latency_job` loads a model spec, profiles it and fills the latency
table on the machine it runs on, so that a process with the target device (a Ray
worker with the requested accelerator) can measure with nothing else.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from autorank import methods as registry
from autorank.cost.latency import DEFAULT_RHOS, build_table, concrete_rank, default_candidates, model_dtype, normalise_rank
from autorank.cost.latency_table import LatencyTable, model_signature
from autorank.cost.profile import profile_model
from autorank.cost.timing import LatencyError, measure, resolve_device
from autorank.zoo import example_input, load_model

logger = logging.getLogger("autorank")

Progress = Callable[[dict[str, Any]], None]

__all__ = ["profile_latency_job", "latency_table_for", "measure_front"]


def _parse_candidates(candidates: Optional[Mapping[str, Any]]) -> Optional[dict[str, list[tuple[str, Any]]]]:
    if candidates is None:
        return None
    out: dict[str, list[tuple[str, Any]]] = {}
    for name, pairs in candidates.items():
        lst = []
        for pair in pairs:
            if isinstance(pair, Mapping):
                method, rank, options = pair["method"], pair["rank"], pair.get("options")
            else:
                method, rank, *rest = pair
                options = rest[0] if rest else None
            lst.append((str(method), normalise_rank(rank), dict(options or {})))
        out[str(name)] = lst
    return out


def profile_latency_job(
    model_spec: str,
    input_shape: Sequence[int],
    *,
    device: str = "cpu",
    batch_size: int = 1,
    candidates: Optional[Mapping[str, Any]] = None,
    threads: Optional[int] = None,
    table_dir: Optional[str] = None,
    rhos: Sequence[float] = DEFAULT_RHOS,
    clock: str = "wall",
    include_table: bool = False,
) -> dict[str, Any]:
    """Measure a model's latency table on this worker, from JSON-able arguments alone.

    Loads ``model_spec`` (:func:`autorank.zoo.load_model`), profiles it on an
    example input of ``input_shape`` with its first dimension set to
    ``batch_size``, fills the table under ``table_dir`` (default directory when
    None) for ``candidates`` (``{name: [[method, rank], ...]}``, default: every
    applicable method at ``rhos``) and returns a JSON-able summary: the device's
    name, the table's key and path, the base latency, each layer's dense latency
    and its replacements' latencies, and how many new measurements were made.
    ``include_table``: add the whole table (``"table"``), for a driver that does
    not share the worker's disk: ``LatencyTable.from_dict(result["table"])``.
    """
    resolve_device(device)  # fail before loading anything
    shape = tuple(int(s) for s in input_shape)
    if not shape:
        raise LatencyError("input shape must have at least one dimension (the batch)")
    shape = (int(batch_size),) + shape[1:]
    model = load_model(model_spec)
    x = example_input(model_spec, shape)
    profile = profile_model(model, x)
    parsed = _parse_candidates(candidates) or default_candidates(profile, rhos)
    table = LatencyTable(
        table_dir, device=device, dtype=model_dtype(model), threads=threads, batch_size=int(batch_size), clock=clock
    )
    t0 = time.perf_counter()
    build_table(model, profile, parsed, table=table, example_inputs=x)
    elapsed = time.perf_counter() - t0
    named = dict(model.named_modules())
    layers: dict[str, Any] = {}
    for name, pairs in parsed.items():
        lp = profile.layers[name]
        reps = []
        for method, rank, *rest in pairs:
            if method in ("none", "dense"):
                continue
            concrete = concrete_rank(profile, name, method, rank, rest[0] if rest else None)
            mname = registry.get(method).name
            reps.append({
                "method": mname,
                "requested": list(rank) if isinstance(rank, tuple) else rank,
                **({"options": rest[0]} if rest and rest[0] else {}),
                "rank": list(concrete) if isinstance(concrete, tuple) else concrete,
                "latency_s": table.get(named[name], lp.input_shape, mname, concrete),
            })
        layers[name] = {
            "type": lp.type,
            "shape": lp.spec.describe(),
            "input_shape": list(lp.input_shape),
            "dense_s": table.get(named[name], lp.input_shape),
            "replacements": reps,
        }
    return {
        "model": model_spec,
        "device": device,
        "device_name": table.device_name,
        "torch": torch.__version__,
        "dtype": table.validity["dtype"],
        "threads": table.threads,
        "batch_size": table.batch_size,
        "clock": table.clock,
        "input_shape": list(shape),
        "table_key": table.key,
        "table_path": str(table.path),
        "base_latency_s": table.get_model(model_signature(profile, table.batch_size)),
        "layers": layers,
        "new_measurements": table.measurements,
        "elapsed_s": elapsed,
        "pid": os.getpid(),
        **({"table": table.to_dict()} if include_table else {}),
    }


def latency_table_for(model, profile, choices, task, space, emit: Progress):
    """Latency lookup table for every (layer, method, ρ) the space allows, measured on the task's device."""
    device = getattr(task, "device", "cpu") or "cpu"
    candidates = {n: [(m, r) for m in ch.methods if m != "none" for r in ch.rhos_for(m)] for n, ch in choices.items()}
    if space.align:
        candidates = {n: [(m, r, {"align": space.align}) for m, r in c] for n, c in candidates.items()}
    total = sum(len(v) for v in candidates.values())

    def prog(done, tot, what):
        emit({"phase": "latency", "done": done, "total": tot, "what": what})

    table = build_table(model, profile, candidates, device=device, progress=prog, example_inputs=task.example_inputs())
    base = profile.latency
    if base is None:
        base = table.get_model(model_signature(profile, table.batch_size))
    logger.info("latency table: %d entries (%d candidates) on %s", len(table), total, table.device_name)
    return table, float(base)


def measure_front(result, original: nn.Module, example: Any, task: Any) -> None:
    """Measured latency of the original and of each front member, on the task's device, side by side."""
    device = getattr(task, "device", "cpu") or "cpu"
    inputs = example if isinstance(example, tuple) else (example,)
    try:
        base = measure(copy.deepcopy(original), inputs, device=device, threads=1, warmup=3, repeats=15)
    except Exception as exc:  # pragma: no cover - measuring is informative, never fatal
        logger.warning("could not measure the original's latency: %s", exc)
        return
    result.original_latency_s = base.median
    for member in result.front:
        try:
            model = result.build(member, original)
            member.latency_measured_s = measure(model, inputs, device=device, threads=1, warmup=3, repeats=15).median
        except Exception as exc:  # pragma: no cover
            logger.warning("could not measure trial %d: %s", member.trial, exc)
