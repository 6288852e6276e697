"""Execute a plan on meta tensors of the full-size model and compare with its prediction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..planner.allocator import replay
from ..planner.errors import PlanMismatchError
from ..planner.schema import Plan
from .adapters.base import adapter_for
from .apply import apply_plan, fingerprint
from .fake import attention_kernel
from .memory import MemoryTracker
from .models import meta_unet


@dataclass
class VerifyReport:
    measured_activation_bytes: int
    predicted_activation_bytes: int | None
    measured_needed_bytes: int  # measured sequence replayed through the allocator model
    peak_label: str | None
    seconds: float

    @property
    def error(self) -> float | None:
        """Relative error of the predicted activation peak (+ = over-predicted)."""
        if not self.predicted_activation_bytes:
            return None
        return self.predicted_activation_bytes / self.measured_activation_bytes - 1


def verify(plan: Plan, model: torch.nn.Module | None = None) -> VerifyReport:
    """Run ``plan`` on meta tensors of its model (built from ``plan.model.name`` unless given)."""
    import time

    started = time.perf_counter()
    if model is None:
        if not plan.model.name:
            raise PlanMismatchError("the plan names no model to build; pass the model to verify()")
        model = meta_unet(plan.model.name, plan.shape.dtype)
    actual = fingerprint(model)
    if actual.config_hash != plan.model.config_hash:
        raise PlanMismatchError(
            f"the plan was made for {plan.model.describe()}, but {plan.model.name} builds {actual.describe()}"
        )
    args = adapter_for(model).example_inputs(model, plan.shape, device="meta")
    kernel = plan.target.attention_kernel if plan.target else "flash"
    expandable = plan.target is None or plan.target.allocator == "expandable_segments"
    with apply_plan(model, plan), attention_kernel(kernel), MemoryTracker(record_events=True) as tracker:
        with torch.no_grad():
            model(*args)
    predicted = plan.prediction.activation_peak_bytes if plan.prediction else None
    return VerifyReport(
        measured_activation_bytes=tracker.peak_bytes,
        predicted_activation_bytes=predicted,
        measured_needed_bytes=replay(tracker.events, expandable).needed_peak,
        peak_label=tracker.peak_label,
        seconds=time.perf_counter() - started,
    )
