"""Full-size models without memory: build on the meta device, route attention like the target GPU.

Meta tensors carry shapes, dtypes and storage sizes but no data, so a full-size SVD forward at
576x1024 runs in seconds on a laptop and the :class:`MemoryTracker` sees every allocation the GPU
would make. One thing differs: on meta tensors ``scaled_dot_product_attention`` picks the math
path and materialises the whole attention matrix (91 GiB for SVD at 576x1024), while a GPU runs a
fused kernel whose memory is linear in the sequence. :func:`attention_kernel` routes the call to
the fused kernel's own op (flash on sm80+, memory-efficient before), whose meta implementation
allocates exactly what the GPU kernel returns.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

AttentionKernel = Literal["flash", "efficient", "cpu_flash", "math"]
ATTENTION_KERNELS: tuple[str, ...] = ("flash", "efficient", "cpu_flash", "math")


class attention_kernel(TorchFunctionMode):  # noqa: N801 - used like a function: `with attention_kernel("flash"):`
    """Inside this context, SDPA on meta tensors runs the chosen kernel's op.

    Real tensors are left alone (they already run the kernel their device picks). ``flash`` falls
    back to ``efficient`` where the GPU would too: fp32 inputs, an attention mask, or a head
    dimension flash does not support.
    """

    def __init__(self, kernel: AttentionKernel = "flash") -> None:
        super().__init__()
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {ATTENTION_KERNELS}")
        self.kernel = kernel

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.kernel != "math":
            query = args[0] if args else kwargs["query"]
            if query.device.type == "meta":
                return _fused_sdpa(self.kernel, *args, **kwargs)
        return func(*args, **kwargs)


def _fused_sdpa(
    kernel: AttentionKernel,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    aten = torch.ops.aten
    if kernel == "cpu_flash":
        return aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )[0]
    flash_ok = (
        query.dtype in (torch.float16, torch.bfloat16)
        and attn_mask is None
        and query.shape[-1] <= 256
        and query.shape[-1] % 8 == 0
    )
    if kernel == "flash" and flash_ok:
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    return aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, False, dropout_p, is_causal, scale=scale
    )[0]


def empty_model(model_cls: type[torch.nn.Module], config: dict, dtype: torch.dtype = torch.float16):
    """Build ``model_cls`` from ``config`` with every parameter and buffer on the meta device.

    ``accelerate.init_empty_weights`` is used rather than ``torch.device("meta")`` because some
    diffusers modules (SVD's ``AlphaBlender.mix_factor``) create parameters with the legacy
    ``torch.Tensor([...])`` constructor, which ignores the default device. Buffers (built on the
    CPU) are moved to meta afterwards.
    """
    from accelerate import init_empty_weights
    from diffusers.utils import logging as diffusers_logging

    with init_empty_weights():  # include_buffers=True would leave mix_factor on the CPU again
        model = model_cls.from_config(config)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # .to(dtype) warns about fp32 modules; nothing to keep here
    try:
        return model.to(device="meta", dtype=dtype).eval()
    finally:
        diffusers_logging.set_verbosity(level)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers (works on meta models: sizes are known)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
