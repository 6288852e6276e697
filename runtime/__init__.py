"""The runtime: adapters, slicer, grouping, memory tracker. Needs torch and diffusers."""

from .apply import PlanHandle, apply_plan, fingerprint, list_units, sample_shape, uniform_plan
from .fake import attention_kernel, empty_model, kernel_for_compute_capability
from .memory import MemoryTracker

__all__ = [
    "MemoryTracker",
    "PlanHandle",
    "apply_plan",
    "attention_kernel",
    "empty_model",
    "fingerprint",
    "kernel_for_compute_capability",
    "list_units",
    "sample_shape",
    "uniform_plan",
]
