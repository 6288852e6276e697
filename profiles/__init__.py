"""Shipped data: GPU specs and model catalogue/configs/profiles, read with importlib.resources."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


def read_json(name: str) -> Any:
    """A JSON file shipped in this package, e.g. ``"gpus.json"`` or ``"models/svd_unet.json"``."""
    return json.loads(resources.files(__name__).joinpath(name).read_text())


@cache
def model_catalogue() -> dict[str, dict[str, Any]]:
    return read_json("models.json")["models"]


def model_entry(name: str) -> dict[str, Any]:
    """The catalogue entry of a short model name (``svd``, ``svd-xt``)."""
    catalogue = model_catalogue()
    key = name.lower()
    if key not in catalogue:
        from ..planner.errors import VramplanError

        raise VramplanError(f"unknown model {name!r}; shipped models: {', '.join(sorted(catalogue))}")
    return catalogue[key]


def unet_config(name: str) -> dict[str, Any]:
    return component_config(name, "unet")


def component_config(name: str, component: str) -> dict[str, Any]:
    """The config of a shipped model's component (unet, vae, image_encoder)."""
    entry = model_entry(name)
    config = read_json(f"models/{entry['components'][component]}")
    if component == "unet":
        config.update(entry.get("unet_config_overrides", {}))
    return config
