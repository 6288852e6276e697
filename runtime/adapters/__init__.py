"""Model adapters and pipeline adapters; importing this package registers them."""

from . import animatediff_pipeline, animatediff_unet, sd_vae, svd_pipeline, svd_unet, svd_vae  # noqa: F401
from . import wan_transformer  # noqa: F401
from .base import adapter_for, pipeline_adapter, supported_classes

__all__ = ["adapter_for", "pipeline_adapter", "supported_classes"]
