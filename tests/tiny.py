"""Tiny configs of the real diffusers classes, built in code with random weights (fp32)."""

from __future__ import annotations

import torch

SVD_TINY = dict(
    sample_size=8,
    in_channels=8,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24,
    layers_per_block=1,
    cross_attention_dim=16,
    num_attention_heads=(2, 4),
    num_frames=5,
)


def tiny_svd_unet(seed: int = 0, **overrides):
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(**{**SVD_TINY, **overrides}).eval()
    # Random, non-trivial mixing factors and norm affines so every path matters.
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("mix_factor") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return unet


def svd_inputs(unet, batch=1, frames=5, height=8, width=8, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    sample = torch.randn(batch, frames, cfg.in_channels, height, width, generator=g)
    ehs = torch.randn(batch, 1, cfg.cross_attention_dim, generator=g)
    n_ids = cfg.projection_class_embeddings_input_dim // cfg.addition_time_embed_dim
    added = torch.rand(batch, n_ids, generator=g) * 10
    timestep = torch.tensor(3.7)
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in (sample, timestep, ehs, added)]
