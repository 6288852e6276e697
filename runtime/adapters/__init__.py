"""Model adapters; importing this package registers them."""

from . import animatediff_unet, sd_vae, svd_unet, svd_vae  # noqa: F401
from .base import adapter_for, supported_classes

__all__ = ["adapter_for", "supported_classes"]
