"""Model adapters and pipeline adapters; importing this package registers them."""

# Registration order matters where a class has two adapters: sd_vae/svd_vae (decode) before vae_encoder,
# so that a VAE's decode adapter is its default.
from . import (  # noqa: F401
    animatediff_pipeline,
    animatediff_unet,
    clip_vision,
    sd_vae,
    svd_pipeline,
    svd_unet,
    svd_vae,
    umt5_encoder,
    vae_encoder,
    wan_transformer,
    wan_vae,
    wan_vae_encoder,
)
from .base import adapter_for, pipeline_adapter, supported_classes

__all__ = ["adapter_for", "pipeline_adapter", "supported_classes"]
