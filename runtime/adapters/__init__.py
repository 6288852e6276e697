"""Model adapters and pipeline adapters; importing this package registers them."""

from . import animatediff_pipeline, animatediff_unet, sd_vae, svd_pipeline, svd_unet, svd_vae  # noqa: F401
from . import umt5_encoder, wan_transformer  # noqa: F401
from . import vae_encoder  # noqa: F401  (after sd_vae/svd_vae: their decode adapters stay the default)
from . import wan_vae  # noqa: F401
from .base import adapter_for, pipeline_adapter, supported_classes

__all__ = ["adapter_for", "pipeline_adapter", "supported_classes"]
