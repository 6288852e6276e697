"""Build a model without weights from a short name, a Hugging Face id or a local path.

Only configs are read (from the shipped catalogue, a local folder or the local Hugging Face cache);
nothing is downloaded. Used by the profiler and by ``verify``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..planner.errors import VramplanError
from ..profiles import model_catalogue, unet_config
from .fake import empty_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_unet_config(model: str) -> dict:
    """The UNet config of a catalogue name, a local pipeline/UNet folder or a cached HF repo."""
    if model.lower() in model_catalogue():
        return unet_config(model)
    path = Path(model).expanduser()
    if path.exists():
        for candidate in (path / "unet" / "config.json", path / "config.json", path):
            if candidate.is_file():
                return json.loads(candidate.read_text())
        raise VramplanError(f"{path} has no unet/config.json or config.json")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError as err:  # pragma: no cover - diffusers depends on huggingface_hub
        raise VramplanError("reading a Hugging Face id needs huggingface_hub") from err
    for filename in ("unet/config.json", "config.json"):
        found = try_to_load_from_cache(model, filename)
        if isinstance(found, str):
            return json.loads(Path(found).read_text())
    raise VramplanError(
        f"{model!r} is not a shipped model ({', '.join(sorted(model_catalogue()))}), not a local folder, and its "
        f"config is not in the local Hugging Face cache. Download it once "
        f"(`huggingface-cli download {model} unet/config.json`) or pass a local path."
    )


def meta_unet(model: str, dtype: str = "fp16") -> torch.nn.Module:
    """The UNet of ``model`` on the meta device (no memory, no weights)."""
    return meta_from_config(load_unet_config(model), dtype)


def meta_from_config(config: dict, dtype: str = "fp16") -> torch.nn.Module:
    """A diffusers or transformers model from its config, on the meta device."""
    import diffusers

    class_name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    cls = getattr(diffusers, class_name or "", None)
    if cls is not None:
        return empty_model(cls, config, DTYPES[dtype])
    import transformers
    from accelerate import init_empty_weights

    cls = getattr(transformers, class_name or "", None)
    if cls is None:
        raise VramplanError(f"config names no diffusers or transformers model class ({class_name!r})")
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    with init_empty_weights():
        model = cls(cls.config_class(**fields))
    if hasattr(model, "tie_weights"):  # init_empty_weights re-creates tied parameters apart (UMT5's embeddings)
        model.tie_weights()
    return model.to(device="meta", dtype=DTYPES[dtype]).eval()
