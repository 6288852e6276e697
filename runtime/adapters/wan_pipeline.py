"""Wan 2.1 / 2.2 as whole pipelines, the torch parts: measuring the stages that run whole, the stage
profiles, loading and checking a checkpoint against a plan. The torch-free facts are the ``_Wan``
specs of :mod:`vramplan.planner.pipelines`.

``WanPipeline.__call__`` encodes the prompt and the negative prompt with UMT5 (batch 1 each, 512
tokens), runs the transformer twice per step (cond, then uncond: batch 1 each; Wan 2.2 A14B switches
to ``transformer_2`` once the timestep falls below ``boundary_ratio``), decodes the latents with
``AutoencoderKLWan`` and post-processes the frames. ``WanImageToVideoPipeline`` adds the CLIP image
encoder (Wan 2.1) and the VAE encode of the conditioning video (the image, then zeros). The text
encoder, the transformers, the VAE encode (under its own plan ``vae_encoder``: ``vae`` holds the
decode's) and the VAE decode (both rows with halos) are sliced stages (their profiles let the planner
slice, place and stream); so is Wan 2.1's CLIP image encoder (the CLIP vision adapter, one streamable
block per layer; the stock ``encode_image`` asks for ``output_hidden_states`` and reads the
penultimate one, which the adapter's program returns).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ...planner.errors import InvalidArgumentError, PlanMismatchError, UnsupportedArgumentError
from ...planner.pipelines import WanI2V, WanI2VA14B, WanT2V, WanT2VA14B, pipeline_variant, register
from ...planner.schema import ModelProfile, Plan, StageProfile
from .base import LoadFailure, PipelineAdapter, measure_stage

log = logging.getLogger(__name__)
_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


class _WanAdapter(PipelineAdapter):
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.diffusers_class or self.pipeline)

    # -- measuring -----------------------------------------------------------------------------
    def measure_whole_stages(self, components: dict, height: int, width: int, dtype: str, kernel: str,
                             frames: int = 81) -> dict:
        """The stages a spec does not slice (none of the shipped specs: the CLIP image encoder, the VAE
        encode of the conditioning video, the VAE decode are all planned), on meta tensors."""
        vae = components["vae"]
        configs = {"vae": dict(vae.config)}
        f = self.scale_factor(configs)
        t = self.temporal_factor
        latents = torch.empty(1, vae.config.z_dim, (frames - 1) // t + 1, height // f, width // f,
                              device="meta", dtype=vae.dtype)
        out = {}
        if "decode" not in self.sliced:
            out["decode"] = measure_stage(lambda: vae.decode(latents), kernel)
        if "encode_vae" in {s for s, _, _ in self.stages} and "encode_vae" not in self.sliced:
            video = torch.empty(1, 3, frames, height, width, device="meta", dtype=vae.dtype)
            out["encode_vae"] = measure_stage(lambda: vae.encode(video).latent_dist.mode(), kernel)
        if "image_encoder" in components and "encode_image" not in self.sliced:
            encoder = components["image_encoder"]
            side = encoder.config.image_size
            pixels = torch.empty(1, 3, side, side, device="meta", dtype=next(encoder.parameters()).dtype)
            out["encode_image"] = measure_stage(lambda: encoder(pixel_values=pixels, output_hidden_states=True),
                                                kernel)
        return out

    def stage_profiles(self, components: dict, height: int, width: int, frames: int, guidance: bool, dtype: str,
                       whole: dict, profiles: dict[str, ModelProfile]) -> list[StageProfile]:
        size = _BYTES[dtype]
        text = components["text_encoder"]
        dit = profiles["denoise"]
        shape = dit.shape
        channels = components["transformer"].config.out_channels
        latent_values = channels * shape.frames * shape.latent_height * shape.latent_width
        # latents (fp32), the transformer input (model dtype), two noise predictions and the CFG sum (fp32)
        latent = latent_values * (4 + size + 2 * size + 4)
        embeds = (2 if guidance else 1) * self.text_tokens * text.config.d_model * size
        image_latents = 0
        if "encode_vae" in whole or "encode_vae" in profiles:  # the condition latents and the mask, concatenated
            image_latents = (components["vae"].config.z_dim + 4) * shape.frames * shape.latent_height \
                * shape.latent_width * (4 + size)
        frames_px = frames * 3 * height * width
        stages: list[StageProfile] = []
        for stage, component, _ in self.stages:
            if stage == "encode_text":
                p = profiles[stage]
                stages.append(StageProfile(stage=stage, component=component, profile=p,
                                           activation_bytes=p.original_peak_bytes, held_bytes=embeds))
            elif stage == "encode_image" and stage in profiles:  # the CLIP vision adapter: layers stream
                p = profiles[stage]
                stages.append(StageProfile(stage=stage, component=component, profile=p,
                                           activation_bytes=p.original_peak_bytes,
                                           held_bytes=embeds + 3 * height * width * 4))
            elif stage == "encode_image":
                act, flops, moved = whole[stage]
                stages.append(StageProfile(stage=stage, component=component, activation_bytes=act, flops=flops,
                                           bytes_moved=moved, held_bytes=embeds + 3 * height * width * 4))
            elif stage == "encode_vae" and stage in profiles:  # rows with halos, under its own plan
                p = profiles[stage]
                stages.append(StageProfile(stage=stage, component=component, plan_component=self.plan_name(stage),
                                           profile=p, activation_bytes=p.original_peak_bytes,
                                           held_bytes=embeds + frames_px * size))
            elif stage == "encode_vae":
                act, flops, moved = whole[stage]
                stages.append(StageProfile(stage=stage, component=component, activation_bytes=act, flops=flops,
                                           bytes_moved=moved, held_bytes=embeds + frames_px * size))
            elif stage in ("denoise", "denoise_2"):
                p = profiles[stage]
                stages.append(StageProfile(stage=stage, component=component, per_step=True, profile=p,
                                           activation_bytes=p.original_peak_bytes,
                                           held_bytes=latent + image_latents + embeds))
            elif stage == "decode" and stage in profiles:  # sliced along rows (the Wan VAE adapter)
                p = profiles[stage]
                stages.append(StageProfile(stage=stage, component=component, profile=p,
                                           activation_bytes=p.original_peak_bytes, held_bytes=latent_values * (4 + size)))
            elif stage == "decode":
                act, flops, moved = whole[stage]
                stages.append(StageProfile(stage=stage, component=component, activation_bytes=act, flops=flops,
                                           bytes_moved=moved, held_bytes=latent_values * (4 + size)))
        stages.append(postprocess_stage(frames, height, width, dtype))
        return stages

    # -- loading and checking ------------------------------------------------------------------------
    def load(self, source: str, dtype: torch.dtype, local_files_only: bool, entry: dict | None = None):
        """The pipeline from a local folder or the local Hugging Face cache, after checking (from its
        ``model_index.json``, before any weight is read) that it is the Wan variant the plan is for."""
        index = _read_index(source)
        if index is not None:
            self._check_variant(pipeline_variant(index.get("_class_name"), index), source)
        return self._from_pretrained(self.pipeline_class(), source, dtype, local_files_only)

    def check_call(self, plan: Plan, kwargs: dict) -> None:
        """Refuse, before any weight is loaded, a call the plan cannot run: no image for image-to-video,
        no prompt, or another text length than the 512 tokens the plan was made for."""
        if self.conditioning == "image" and kwargs.get("image") is None:
            raise InvalidArgumentError(f"{self.pipeline} generates from an image: pass image= (a PIL image) to run()")
        if kwargs.get("prompt") is None and kwargs.get("prompt_embeds") is None:
            raise InvalidArgumentError(f"{self.pipeline} needs a prompt: pass prompt= to run()")
        length = kwargs.get("max_sequence_length", self.text_tokens)
        if length != self.text_tokens:
            raise UnsupportedArgumentError(
                f"max_sequence_length={length!r}: the plan was made for the stock {self.text_tokens} text tokens "
                f"(prompts are padded to it; the transformer's image/text split assumes it). Leave it unset."
            )

    def check_pipeline(self, pipe, plan: Plan) -> None:
        """Refuse a pipeline of another Wan variant than the plan's (a Wan 2.2 plan on a 2.1 checkpoint)."""
        has_second = getattr(pipe, "transformer_2", None) is not None
        variant = type(pipe).__name__ + (":A14B" if has_second else "")
        self._check_variant(variant, type(pipe).__name__)

    def prompt_notes(self, pipe, kwargs: dict) -> list[str]:
        """What happens to prompts longer than the text encoder takes: truncated to 512 tokens, as the stock
        pipeline's tokenizer call does (``truncation=True``); said, not refused."""
        notes = []
        tokenizer = getattr(pipe, "tokenizer", None)
        for key in ("prompt", "negative_prompt"):
            texts = kwargs.get(key)
            if tokenizer is None or texts is None:
                continue
            for text in [texts] if isinstance(texts, str) else list(texts):
                n = len(tokenizer(text, add_special_tokens=True).input_ids)
                if n > self.text_tokens:
                    notes.append(f"{key} has {n} tokens; the UMT5 text encoder takes {self.text_tokens}: the rest is "
                                 f"cut off, as the stock pipeline does (truncation)")
        for note in notes:
            log.warning(note)
        return notes

    def _check_variant(self, variant: str | None, source: str) -> None:
        if variant != self.pipeline:
            what = {True: "two transformers (Wan 2.2 A14B)", False: "one transformer (Wan 2.1, or Wan 2.2 TI2V-5B)"}
            raise PlanMismatchError(
                f"the plan is for {self.pipeline} ({what[self.experts == 2]}), but {source} is {variant} "
                f"({what[str(variant).endswith(':A14B')]}). Make a plan for this checkpoint (vramplan.plan_for with "
                f"its model name or folder)."
            )


def postprocess_stage(frames: int, height: int, width: int, dtype: str) -> StageProfile:
    """``postprocess_video`` of the decoded video (held, model dtype): denormalize ``(x * 0.5 + 0.5).clamp``
    makes two model-dtype temporaries at once on the GPU, then ``.cpu()`` before the fp32 cast
    (``VaeImageProcessor.pt_to_numpy``)."""
    values, size = frames * 3 * height * width, _BYTES[dtype]
    return StageProfile(stage="postprocess", component="none", activation_bytes=2 * values * size,
                        bytes_moved=5 * values * size, held_bytes=values * size)


def _read_index(source: str) -> dict | None:
    """The ``model_index.json`` of a local folder or a cached Hugging Face repo (None when neither has it)."""
    path = Path(source).expanduser() / "model_index.json"
    text = None
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source, "model_index.json")
            if isinstance(found, str):
                text = Path(found).read_text(encoding="utf-8")
        except Exception:  # noqa: BLE001 - not a repo id: the loader says what is missing
            return None
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError as err:
        raise LoadFailure(source, "model_index.json", err) from err


@register
class WanT2VAdapter(_WanAdapter, WanT2V):
    pass


@register
class WanT2VA14BAdapter(_WanAdapter, WanT2VA14B):
    pass


@register
class WanI2VAdapter(_WanAdapter, WanI2V):
    pass


@register
class WanI2VA14BAdapter(_WanAdapter, WanI2VA14B):
    pass
