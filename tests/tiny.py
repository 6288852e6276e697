"""Tiny configs of the real diffusers classes, built in code with random weights (fp32)."""

from __future__ import annotations

import torch
from vramplan.runtime.tiny import TINY_UNET as SVD_TINY
from vramplan.runtime.tiny import randomize_norms


def tiny_svd_unet(seed: int = 0, **overrides):
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(seed)
    return randomize_norms(UNetSpatioTemporalConditionModel(**{**SVD_TINY, **overrides}), seed).eval()


def svd_inputs(unet, batch=1, frames=5, height=8, width=8, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    sample = torch.randn(batch, frames, cfg.in_channels, height, width, generator=g)
    ehs = torch.randn(batch, 1, cfg.cross_attention_dim, generator=g)
    n_ids = cfg.projection_class_embeddings_input_dim // cfg.addition_time_embed_dim
    added = torch.rand(batch, n_ids, generator=g) * 10
    timestep = torch.tensor(3.7)
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in (sample, timestep, ehs, added)]
