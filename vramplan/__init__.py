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


def plan_vae(vae, shape, vram_gb: float = 2.0, **kwargs) -> Plan:
    """An exact low-memory plan for ``vae.decode`` (``encode=True``: ``vae.encode``) on latents of
    ``shape`` within ``vram_gb``: ``with vramplan.runtime.apply_plan(pipe.vae, plan):``. Needs torch
    (see :func:`vramplan.runtime.vae.plan_vae`)."""
    from .runtime.vae import plan_vae as _plan_vae

    return _plan_vae(vae, shape, vram_gb, **kwargs)


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
    "plan_vae",
]
