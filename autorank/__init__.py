"""autorank: AutoML for low-rank compression of PyTorch models.

Public API::

    import autorank
    result = autorank.search(model, task, budget="30%flops", trials=40, out="runs/mine")
    result.front                                           # Pareto front, sorted by cost
    result.export(result.pick("best"), "small.onnx", format="onnx")

    plan = autorank.Plan.uniform(model, "svd", 0.5)       # or a JSON file
    small = autorank.decompose(model, plan, calibration=x)
    autorank.save(small, "small.pt")
    same = autorank.load("small.pt")
    autorank.methods.available()
"""

from __future__ import annotations

from autorank import methods
from autorank._version import __version__
from autorank.cache import FactorCache
from autorank.calibration import Calibration
from autorank.errors import AutorankError
from autorank.plan import LayerPlan, Plan
from autorank.saving import load, save
from autorank.search import search  # the function; it shadows the subpackage of the same name on purpose
from autorank.surgery import candidate_layers, decompose, plan_of, resolve_plan
from autorank.zoo import load_model

# imported on first use
_LAZY = {
    "SearchResult": ("autorank.search", "SearchResult"),
    "SearchSpace": ("autorank.search", "SearchSpace"),
    "Task": ("autorank.tasks", "Task"),
    "BaseTask": ("autorank.tasks", "BaseTask"),
    "ClassificationTask": ("autorank.tasks", "ClassificationTask"),
    "FidelityTask": ("autorank.tasks", "FidelityTask"),
    "Budget": ("autorank.cost.budget", "Budget"),
    "parse_budget": ("autorank.cost.budget", "parse_budget"),
    "export_model": ("autorank.export", "export_model"),
    "fold_batch_norms": ("autorank.bn_folding", "fold_batch_norms"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autorank' has no attribute {name!r}")

__all__ = [
    "search",
    "SearchResult",
    "SearchSpace",
    "Task",
    "BaseTask",
    "ClassificationTask",
    "FidelityTask",
    "Budget",
    "parse_budget",
    "export_model",
    "fold_batch_norms",
    "AutorankError",
    "Calibration",
    "FactorCache",
    "LayerPlan",
    "Plan",
    "candidate_layers",
    "decompose",
    "load",
    "load_model",
    "methods",
    "plan_of",
    "resolve_plan",
    "save",
    "__version__",
]
