"""Model adapters; importing this package registers them."""

from . import svd_unet  # noqa: F401
from .base import adapter_for, supported_classes

__all__ = ["adapter_for", "supported_classes"]
