"""Model adapters; importing this package registers them."""

from . import animatediff_pipeline, animatediff_unet, sd_vae, svd_pipeline, svd_unet, svd_vae  # noqa: F401
from .base import adapter_for, supported_classes

# Whole pipelines: diffusers pipeline class -> module with PIPELINE, STAGES, profile_pipeline and
# measure_whole_stages.
PIPELINE_ADAPTERS = {m.PIPELINE: m for m in (svd_pipeline, animatediff_pipeline)}

__all__ = ["PIPELINE_ADAPTERS", "adapter_for", "supported_classes"]
