"""Tiny conformance cases of the adapters that are a class's *second* adapter: the VAE encodes (and the
SD/SVD decoders' rows lowering, ``vae_rows``, on the default decodes' cases).

``tests/tiny.py`` ``CASES`` holds one case per model class (its default adapter, the first registered:
a VAE's decode). A class with another adapter, told apart by ``adapter_for(model, component)``, has its
case here, keyed by ``(class, component)``; the conformance suite runs every registered pair.

The conformance checks call ``inputs(batch, frames, h, w, seed)`` with small ``frames``, ``h``, ``w``:
here ``h`` and ``w`` are latent rows and columns (the pixels are the encoder's downsampling times them,
plus one row and column when odd, so some heights do not divide), and ``frames`` counts what the
encode slices along besides rows: images for the SD/SVD encoder, latent frames (4n+1 video frames) for
the Wan encoder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tiny import CASES, Case, _shape, tiny_wan_vae
from vramplan.runtime.tiny import TINY_SD_VAE, TINY_VAE, randomize_norms


def _parameters(model, args, kwargs) -> torch.Tensor:
    return model.encode(*args, **kwargs).latent_dist.parameters


def _image_vae_case(cls_name: str, config: dict, seed: int) -> Callable[[], Case]:
    """The SD/SVD 2-D encoder (``vae_encoder.py``): images ``[batch*frames, 3, H, W]``, sliced by rows."""

    def make() -> Case:
        import diffusers

        torch.manual_seed(seed)
        vae = randomize_norms(getattr(diffusers, cls_name)(**config), seed).eval()
        down = 2 ** (len(config["block_out_channels"]) - 1)

        def inputs(batch, frames, h, w, seed=1):
            height, width = down * h + h % 2, down * w + w % 2
            x = torch.randn(batch * frames, 3, height, width, generator=torch.Generator().manual_seed(seed))
            return (x,), {}, _shape(1, batch * frames, height, width)  # bind: batch 1, frames N, pixel sizes

        return Case(vae, inputs, _parameters, "encoder.mid_block")

    return make


def _wan_vae_encode_case() -> Case:
    """The Wan 2.1 VAE encode (``wan_vae_encoder.py``): videos ``[B, 3, 4(f-1)+1, H, W]``, rows outer and
    the stock frame chunks inner. Container: ``quant_conv``, which the stock encode calls once."""
    from vramplan.runtime.adapters.wan_vae_encoder import spatial_ratio

    vae = tiny_wan_vae(4)
    ratio = spatial_ratio(vae)

    def inputs(batch, frames, h, w, seed=1):
        t, height, width = 4 * (frames - 1) + 1, ratio * h + h % 2, ratio * w + w % 2
        x = torch.randn(batch, 3, t, height, width, generator=torch.Generator().manual_seed(seed))
        return (x,), {}, _shape(batch, t, height, width)

    return Case(vae, inputs, _parameters, "quant_conv")


ENCODE_CASES: dict[tuple[str, str], Callable[[], Case]] = {
    ("AutoencoderKL", "vae_encoder"): _image_vae_case("AutoencoderKL", TINY_SD_VAE, 5),
    ("AutoencoderKLTemporalDecoder", "vae_encoder"): _image_vae_case("AutoencoderKLTemporalDecoder", TINY_VAE, 6),
    ("AutoencoderKLWan", "vae_encoder"): _wan_vae_encode_case,
    # the decodes' rows lowering (sd_vae.py, svd_vae.py: component vae_rows), on the default decodes' cases
    ("AutoencoderKL", "vae_rows"): CASES["AutoencoderKL"],
    ("AutoencoderKLTemporalDecoder", "vae_rows"): CASES["AutoencoderKLTemporalDecoder"],
}
