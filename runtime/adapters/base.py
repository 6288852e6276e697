"""Adapters: the only place that knows diffusers model classes.

An adapter lowers one model class to a unit program (:mod:`vramplan.runtime.program`): the ops in
execution order (static for a model) and, per call, the initial values and per-call constants.
The slicer, grouping and memory code work on that program and never see a diffusers class.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ...planner.errors import UnsupportedModelError
from ...planner.pipelines import pipeline_spec
from ..fake import attention_kernel
from ..memory import MemoryTracker
from ..opcount import OpCounter
from ..program import Layout, Op, Program


@dataclass
class CallBinding:
    """One call of a model, lowered: what the program starts from and how to finish."""

    env: dict[str, torch.Tensor]
    layouts: dict[str, Layout]
    globals: dict[str, Any]
    finish: Any
    shape: dict[str, Any]  # batch, frames, latent_height, latent_width, dtype (for plan checks)

    def program(self, ops: list[Op], result: str) -> Program:
        """The unit program of this call: ``ops`` from these initial values, returning ``result``."""
        return Program(ops, self.env, self.layouts, result, self.finish, self.globals)


class Adapter(Protocol):
    name: str
    model_classes: tuple[str, ...]
    method: str  # the model method a plan replaces: "forward", or "decode" for a VAE decoder

    def ops(self, model: torch.nn.Module) -> tuple[list[Op], str]:
        """The model's ops in execution order and the name of the value the forward returns."""

    def bind(self, model: torch.nn.Module, *args, **kwargs) -> CallBinding:
        """Lower one forward call's arguments."""

    def example_inputs(self, model: torch.nn.Module, shape, device="cpu", seed: int = 0) -> tuple:
        """Forward arguments of a plan ``shape``: random on real devices, empty on meta."""

    # Optional: ``stream_parts`` (e.g. ``("resnets", "motion_modules")``): numbered children of a top-level
    # block that stream as blocks of their own (finer than the block: less weight on the GPU at once).
    # A unit's streaming block is then :func:`~vramplan.runtime.streaming.stream_block_of` of its name; the
    # profiler lists those in ``block_weights`` and the planner and streamer follow the names.


def example_maker(model: torch.nn.Module, device="cpu", seed: int = 0):
    """``make(*size)``: random tensors in the model's dtype on a real device, empty ones on meta."""
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)

    def make(*size: int) -> torch.Tensor:
        if torch.device(device).type == "meta":
            return torch.empty(*size, device=device, dtype=dtype)
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    return make


_ADAPTERS: list[Adapter] = []


def register(adapter: Adapter) -> Adapter:
    _ADAPTERS.append(adapter)
    return adapter


def supported_classes() -> list[str]:
    return [cls for a in _ADAPTERS for cls in a.model_classes]


def adapter_for(model: torch.nn.Module, component: str | None = None) -> Adapter:
    """The adapter for ``model``'s class, or a clear error naming the supported classes. A class with
    several adapters (a VAE's decode and encode) is told apart by ``component`` (the adapter's
    ``component`` — ``vae`` decodes, ``vae_encoder`` encodes — or its ``method``, ``encode``); otherwise the
    first registered one."""
    name = type(model).__name__
    found = [a for a in _ADAPTERS if name in a.model_classes]
    for adapter in found:
        if component is None or component in (getattr(adapter, "component", None), getattr(adapter, "method", None)):
            return adapter
    if found:  # a plan naming another component (an older plan's default): the class's first adapter
        return found[0]
    raise UnsupportedModelError(
        f"vramplan has no adapter for {name}. Supported model classes: {', '.join(supported_classes())}."
    )


def pipeline_adapter(name: str | None):
    """The runtime adapter of diffusers pipeline class ``name`` (its torch-free facts plus loading,
    profiling and whole-stage measuring), or an UnsupportedModelError naming the supported ones."""
    from . import animatediff_pipeline, svd_pipeline, wan_pipeline  # noqa: F401  (registers the runtime subclasses)

    adapter = pipeline_spec(name)
    if not isinstance(adapter, PipelineAdapter):
        raise UnsupportedModelError(f"{name} can be planned but has no runtime adapter to profile or run it")
    return adapter


def measure_whole_stages(adapter, components: dict, height: int, width: int, frames: int, dtype: str, kernel: str):
    """``adapter.measure_whole_stages``, given ``frames=`` when it takes it (a video VAE decoded whole)."""
    import inspect

    extra = {"frames": frames} if "frames" in inspect.signature(adapter.measure_whole_stages).parameters else {}
    return adapter.measure_whole_stages(components, height, width, dtype, kernel, **extra)


def measure_stage(fn: Callable[[], object], kernel: str) -> tuple[int, int, int]:
    """Activation peak, FLOPs and bytes moved of a whole (unsliced) pipeline stage on meta tensors.

    Lives here, not in the profiler, so that pipeline adapters and the profiler both import it
    without importing each other."""
    counter = OpCounter()
    with torch.no_grad(), attention_kernel(kernel), MemoryTracker() as tracker, counter:
        fn()
    totals = counter.units.values()
    return tracker.peak_bytes, sum(u.flops for u in totals), sum(u.bytes_moved for u in totals)


class LoadFailure(Exception):
    """A component or pipeline that could not be loaded: ``source``, ``what`` and the cause (the runner
    turns it into a message that says how to get the weights)."""

    def __init__(self, source: str, what: str, cause: Exception) -> None:
        super().__init__(f"{what} {source!r}: {cause}")
        self.source, self.what, self.cause = source, what, cause


@contextmanager
def quiet_diffusers():
    """Silence diffusers' warnings for a moment (``.to(dtype)`` on modules kept in fp32)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


class PipelineAdapter:
    """The torch parts every pipeline adapter shares; mixed into a :class:`PipelineSpec` subclass.

    A subclass adds ``measure_whole_stages(components, height, width, dtype, kernel) -> {stage:
    (activation, flops, bytes)}`` and ``stage_profiles(...) -> [StageProfile]``; the profiler runs
    the sliced stages' model profiles and calls them."""

    pipeline: str

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)

    def meta_components(self, configs: dict[str, dict], dtype: str) -> dict[str, torch.nn.Module]:
        """The pipeline's components on the meta device, from their configs (no weights)."""
        from ..models import meta_from_config

        return {name: meta_from_config(configs[name], dtype) for name in self.components}

    def stage_dtype(self, components: dict, stage: str, dtype: str):
        """Around profiling a sliced stage: the component in the dtype the pipeline runs that stage in
        (a VAE encode upcast to fp32); by default as it is."""
        return contextlib.nullcontext()

    def load(self, source: str, dtype: torch.dtype, local_files_only: bool, entry: dict | None = None):
        """The pipeline from a local path or the Hugging Face cache (raises :class:`LoadFailure`)."""
        return self._from_pretrained(self.pipeline_class(), source, dtype, local_files_only)

    @staticmethod
    def _from_pretrained(cls, source: str, dtype: torch.dtype, local_files_only: bool, **extra):
        try:
            return cls.from_pretrained(source, dtype=dtype, local_files_only=local_files_only, **extra)
        except (OSError, ValueError) as err:
            raise LoadFailure(source, cls.__name__, err) from err
