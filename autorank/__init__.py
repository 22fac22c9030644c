"""autorank: AutoML for low-rank compression of PyTorch models.

Public API::

    import autorank
    plan = autorank.Plan.uniform(model, "svd", 0.5)       # or a JSON file
    small = autorank.decompose(model, plan, calibration=x)
    autorank.save(small, "small.pt")
    same = autorank.load("small.pt")
    autorank.methods.available()
"""

from __future__ import annotations

from autorank import methods
from autorank.cache import FactorCache
from autorank.calibration import Calibration
from autorank.errors import AutorankError
from autorank.export import load, save
from autorank.plan import LayerPlan, Plan
from autorank.surgery import candidate_layers, decompose, plan_of, resolve_plan
from autorank.zoo import load_model

__version__ = "0.1.0"

__all__ = [
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
