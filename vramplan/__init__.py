"""vramplan: make video diffusion fit the GPU you have.

``plan_for`` and ``load_plan`` need no torch; the runtime (``vramplan.runtime``) does.
"""

from .api import load_plan, plan_for
from .planner.errors import (
    InfeasibleError,
    InvalidArgumentError,
    InvalidPlanError,
    PlanConflictError,
    PlanFormatError,
    PlanMismatchError,
    UnknownGPUError,
    UnsupportedModelError,
    VramplanError,
)
from .planner.schema import Plan

__version__ = "0.1.0"

__all__ = [
    "InfeasibleError",
    "InvalidArgumentError",
    "InvalidPlanError",
    "PlanConflictError",
    "Plan",
    "PlanFormatError",
    "PlanMismatchError",
    "UnknownGPUError",
    "UnsupportedModelError",
    "VramplanError",
    "load_plan",
    "plan_for",
]
