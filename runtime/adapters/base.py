"""Adapters: the only place that knows diffusers model classes.

An adapter lowers one model class to a unit program (:mod:`vramplan.runtime.program`): the ops in
execution order (static for a model) and, per call, the initial values and per-call constants.
The slicer, grouping and memory code work on that program and never see a diffusers class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ...planner.errors import UnsupportedModelError
from ..program import Layout, Op


@dataclass
class CallBinding:
    """One call of a model, lowered: what the program starts from and how to finish."""

    env: dict[str, torch.Tensor]
    layouts: dict[str, Layout]
    globals: dict[str, Any]
    finish: Any
    shape: dict[str, Any]  # batch, frames, latent_height, latent_width, dtype (for plan checks)


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


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter for ``model``'s class, or a clear error naming the supported classes."""
    name = type(model).__name__
    for adapter in _ADAPTERS:
        if name in adapter.model_classes:
            return adapter
    raise UnsupportedModelError(
        f"vramplan has no adapter for {name}. Supported model classes: {', '.join(supported_classes())}."
    )
