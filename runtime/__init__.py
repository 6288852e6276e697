"""The runtime: adapters, slicer, grouping, memory tracker. Needs torch and diffusers."""

from .apply import (
    PlanHandle,
    apply_plan,
    fingerprint,
    list_units,
    sample_shape,
    uniform_pipeline_plan,
    uniform_plan,
)
from .fake import attention_kernel, empty_model
from .hooks import Hook, HookHandle, PlanConflictError, register_hook, remove_hook, reset_state
from .memory import MemoryTracker
from .runner import RunResult, load_pipeline, run, save_video
from .verify import verify, verify_all

__all__ = [
    "Hook",
    "HookHandle",
    "PlanConflictError",
    "register_hook",
    "remove_hook",
    "reset_state",
    "MemoryTracker",
    "RunResult",
    "load_pipeline",
    "run",
    "save_video",
    "verify",
    "verify_all",
    "PlanHandle",
    "apply_plan",
    "attention_kernel",
    "empty_model",
    "fingerprint",
    "list_units",
    "sample_shape",
    "uniform_pipeline_plan",
    "uniform_plan",
]
