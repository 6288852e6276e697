"""What vramplan knows about each diffusers video pipeline, without torch.

One class per diffusers pipeline class, registered by that class name: the stages of a call and
the component and method each enters by, which stages the planner slices, the latent-shape rules
(VAE scale factor, smallest latent, frame limits), the call arguments a plan fixes, the UNet batch
under guidance and the conditioning input a run needs. ``plan_for``, the CLI and the schema
checks ask these classes instead of knowing pipelines themselves; ``runtime/adapters/*_pipeline.py``
subclass them with the parts that need torch (loading, profiling, measuring whole stages).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .errors import InvalidArgumentError, PlanMismatchError, UnsupportedModelError
from .schema import Plan, SampleShape


class PipelineSpec:
    """The torch-free facts of one diffusers pipeline class. Subclass and :func:`register`."""

    pipeline: ClassVar[str]  # diffusers pipeline class name
    # Entry points of the stages, in call order: (stage, component, method).
    stages: ClassVar[tuple[tuple[str, str, str], ...]]
    # Stages the planner slices -> the batch of their sample: "guidance" (UNet) or 1 (decoder, per video).
    sliced: ClassVar[dict[str, str | int]] = {"denoise": "guidance", "decode": 1}
    # A sliced stage whose component already has a plan from another stage (the VAE: decode) gets its own
    # component plan, named here (stage -> plan name, e.g. "encode_vae" -> "vae_encoder"); the plan runs
    # on the stage's pipeline attribute and entry method, and shares that attribute's residency.
    stage_plans: ClassVar[dict[str, str]] = {}
    # Other component plans a sliced stage may run under (stage -> plan names, e.g. the decode along rows,
    # "decode" -> ("vae_rows",)): each a second adapter of the stage's model on its attribute and entry
    # method. A profile may carry the stage profiled under them; the planner takes per stage whichever
    # plans fastest within the budget (planner/alternatives.py), and the plan names the one taken.
    stage_alternatives: ClassVar[dict[str, tuple[str, ...]]] = {}
    components: ClassVar[tuple[str, ...]]
    conditioning: ClassVar[str]  # the call argument a run needs: "image" or "prompt"
    # Used when the configs do not say (diffusers derives both from the configs the same way).
    vae_scale_factor: ClassVar[int] = 8
    min_latent: ClassVar[int] = 8  # the UNets downsample latents three times
    guidance_batch: ClassVar[int] = 2  # classifier-free guidance runs the UNet on [uncond, cond]
    # The call argument that decodes this many frames at once: a plan decodes all frames in one sliced
    # pass (its decoder shape has every frame), so the run sets it to the plan's frame count.
    chunk_argument: ClassVar[str | None] = "decode_chunk_size"
    # A variant of a diffusers class (Wan 2.2's two experts) is registered under its own name and says
    # which class it is and which checkpoints (``model_index.json``) it matches.
    diffusers_class: ClassVar[str | None] = None

    @classmethod
    def matches(cls, index: dict) -> bool:
        return True

    def stage_calls(self, stage: str, per_step: bool, steps: int, guidance: bool = True) -> int:
        """How often ``stage`` runs in a call of ``steps`` denoising steps (a per-step stage: ``steps``)."""
        return steps if per_step else 1

    # -- shapes ----------------------------------------------------------------------------
    def max_frames(self, unet_config: dict[str, Any] | None) -> int | None:
        """The most frames the UNet can take (None: no limit)."""
        return None

    def default_frames(self, entry: dict[str, Any] | None, unet_config: dict[str, Any] | None) -> int | None:
        """The frame count used when the user gives none."""
        return (entry or {}).get("frames")

    def scale_factor(self, configs: dict[str, dict] | None = None) -> int:
        """Pixels per latent along each side: 2 ** (VAE blocks - 1), as diffusers computes it."""
        blocks = ((configs or {}).get("vae") or {}).get("block_out_channels")
        return 2 ** (len(blocks) - 1) if blocks else self.vae_scale_factor

    def smallest_latent(self, configs: dict[str, dict] | None = None) -> int:
        """The smallest latent side the UNet takes: it halves the latents once per block after the first."""
        blocks = ((configs or {}).get("unet") or {}).get("block_out_channels")
        return 2 ** (len(blocks) - 1) if blocks else self.min_latent

    def check_size(self, height: int, width: int, configs: dict[str, dict] | None = None) -> None:
        """Refuse pixel sizes the VAE and UNet cannot take, saying which would work."""
        f, smallest = self.scale_factor(configs), self.smallest_latent(configs)
        for label, value in (("height", height), ("width", width)):
            if value % f:
                raise InvalidArgumentError(
                    f"{label}={value} is not a multiple of {f}: the VAE encodes {f}x{f} pixels into one latent. "
                    f"Try {label}={max(round(value / f), smallest) * f}."
                )
            if value // f < smallest:
                raise InvalidArgumentError(
                    f"{label}={value} is too small: the UNet downsamples latents to 1/{smallest}, so it needs at "
                    f"least {smallest * f} pixels."
                )

    def check_frames(self, frames: int, unet_config: dict[str, Any] | None) -> None:
        if frames < 1:
            raise InvalidArgumentError(f"frames={frames}: a video needs at least one frame")
        limit = self.max_frames(unet_config)
        if limit is not None and frames > limit:
            raise InvalidArgumentError(self.frames_message(frames, limit))

    def frames_message(self, frames: int, limit: int) -> str:
        return f"frames={frames}: {self.pipeline} takes at most {limit} frames."

    def unet_shape(self, height: int, width: int, frames: int, guidance: bool, dtype: str,
                   configs: dict[str, dict] | None = None) -> SampleShape:
        """The UNet's sample shape for one video of this size."""
        return self.stage_shape("denoise", height, width, frames, guidance, dtype, configs)

    def stage_shape(self, stage: str, height: int, width: int, frames: int, guidance: bool, dtype: str,
                    configs: dict[str, dict] | None = None) -> SampleShape:
        """The sample shape of a sliced stage (``configs``: the pipeline's component configs, for the scale)."""
        batch = self.sliced[stage]
        if batch == "guidance":
            batch = self.guidance_batch if guidance else 1
        f = self.scale_factor(configs)
        return SampleShape(batch=batch, frames=frames, latent_height=height // f, latent_width=width // f, dtype=dtype)

    # -- runs ------------------------------------------------------------------------------
    def call_arguments(self, plan: Plan) -> dict[str, Any]:
        """Call arguments the plan fixes (``height``, ``width``, ``num_frames`` and pipeline specifics)."""
        args = {"height": plan.height, "width": plan.width, "num_frames": plan.frames}
        if self.chunk_argument:
            args[self.chunk_argument] = plan.frames
        return {k: v for k, v in args.items() if v is not None}

    def plan_name(self, stage: str) -> str:
        """The component plan ``stage`` runs under: its own (``stage_plans``) or its attribute's."""
        if stage in self.stage_plans:
            return self.stage_plans[stage]
        return next(comp for s, comp, _ in self.stages if s == stage)

    def plan_names(self, stage: str) -> tuple[str, ...]:
        """Every component plan ``stage`` may run under: its own (:meth:`plan_name`), then its alternatives."""
        return (self.plan_name(stage),) + tuple(self.stage_alternatives.get(stage, ()))

    # Stages whose sample is a latent (pixels / the VAE's scale); the encoders' are tokens or pixels.
    latent_stages: ClassVar[frozenset[str]] = frozenset({"denoise", "denoise_2", "decode"})

    def pixel_or_token_plans(self) -> set[str]:
        """Component plans whose sample is not a latent: no VAE scale relates it to the video's size."""
        return {p for s, _, _ in self.stages if s not in self.latent_stages for p in self.plan_names(s)} - {
            p for s, _, _ in self.stages if s in self.latent_stages for p in self.plan_names(s)}

    def attribute_of(self, name: str) -> str:
        """The pipeline attribute a component plan runs on (``vae`` for ``vae_encoder``)."""
        for stage, plan in self.stage_plans.items():
            if plan == name:
                return next(comp for s, comp, _ in self.stages if s == stage)
        for stage, plans in self.stage_alternatives.items():
            if name in plans:
                return next(comp for s, comp, _ in self.stages if s == stage)
        return name

    def sliced_components(self) -> list[str]:
        """Component plans the planner slices (those a complete plan must give a shape)."""
        return [self.plan_name(s) for s in self.sliced]

    def plan_components(self) -> tuple[str, ...]:
        """Every component plan a plan of this pipeline may have: the components and the stages' own plans."""
        own = [*self.stage_plans.values(), *(p for plans in self.stage_alternatives.values() for p in plans)]
        return self.components + tuple(dict.fromkeys(p for p in own if p not in self.components))

    def check_plan(self, plan: Plan) -> None:
        """Refuse a plan whose components do not belong to this pipeline (an edited or mixed-up file)."""
        names = {c.component for c in plan.components}
        allowed = self.plan_components()
        foreign = sorted(names - set(allowed))
        if foreign:
            raise PlanMismatchError(
                f"the plan says {self.pipeline}, whose components are {', '.join(allowed)}, but it has "
                f"{', '.join(foreign)}: it was made for another pipeline or edited. Make a new plan (vramplan plan)."
            )
        for comp in plan.components:
            want = self.attribute_of(comp.component)
            if comp.module_name != want:
                raise PlanMismatchError(
                    f"the plan's {comp.component} runs on the pipeline's {comp.module_name!r}, but {self.pipeline} "
                    f"runs it on {want!r}: the file was edited. Make a new plan (vramplan plan)."
                )

    def missing_components(self, plan: Plan) -> list[str]:
        """Sliced components the plan does not slice (they would run whole, unplanned); a stage sliced under
        one of its alternatives (``stage_alternatives``) is not missing."""
        have = {c.component for c in plan.components if c.shape is not None}
        return [self.plan_name(s) for s in self.sliced if not have.intersection(self.plan_names(s))]


_SPECS: dict[str, type[PipelineSpec]] = {}


def register(cls: type[PipelineSpec]) -> type[PipelineSpec]:
    """Register a pipeline class; a subclass registered later (the runtime's) replaces its base."""
    _SPECS[cls.pipeline] = cls
    return cls


def known_pipelines() -> list[str]:
    return sorted(_SPECS)


def pipeline_spec(name: str | None) -> PipelineSpec:
    """The registered facts of diffusers pipeline class ``name``, or a clear error naming the known ones."""
    cls = _SPECS.get(name or "")
    if cls is None:
        raise UnsupportedModelError(
            f"vramplan does not know the pipeline {name!r}; supported pipelines: {', '.join(known_pipelines())}"
        )
    return cls()


@register
class StableVideoDiffusion(PipelineSpec):
    """``StableVideoDiffusionPipeline``: image encoder, VAE encoder (fp32 when ``force_upcast``), UNet
    per step, temporal VAE decoder on all frames, post-processing."""

    pipeline = "StableVideoDiffusionPipeline"
    stages = (("encode_image", "image_encoder", "forward"), ("encode_vae", "vae", "encode"),
              ("denoise", "unet", "forward"), ("decode", "vae", "decode"))
    # The CLIP image encoder is a planned stage (its layers stream; 257 tokens are not sliced); the VAE encode
    # of the conditioning image is sliced along rows under its own plan (vae holds the decode's).
    sliced: ClassVar[dict[str, str | int]] = {"encode_image": 1, "encode_vae": 1, "denoise": "guidance", "decode": 1}
    stage_plans: ClassVar[dict[str, str]] = {"encode_vae": "vae_encoder"}
    # The temporal decoder along rows (runtime/adapters/svd_vae.py): a lower floor, slower where a frame fits.
    stage_alternatives: ClassVar[dict[str, tuple[str, ...]]] = {"decode": ("vae_rows",)}
    components = ("unet", "vae", "image_encoder")
    conditioning = "image"

    def stage_shape(self, stage, height, width, frames, guidance, dtype, configs=None) -> SampleShape:
        if stage == "encode_image":  # one image resized to the encoder's input size, pixels
            side = int(((configs or {}).get("image_encoder") or {}).get("image_size") or 224)
            return SampleShape(batch=1, frames=1, latent_height=side, latent_width=side, dtype=dtype)
        if stage == "encode_vae":  # one image in pixels; fp16 VAEs with force_upcast encode in fp32
            vae = (configs or {}).get("vae") or {}
            upcast = dtype == "fp16" and vae.get("force_upcast", True)
            return SampleShape(batch=1, frames=1, latent_height=height, latent_width=width,
                               dtype="fp32" if upcast else dtype)
        return super().stage_shape(stage, height, width, frames, guidance, dtype, configs)

    def default_frames(self, entry, unet_config):
        return super().default_frames(entry, unet_config) or (unet_config or {}).get("num_frames")


@register
class AnimateDiff(PipelineSpec):
    """``AnimateDiffPipeline``: CLIP text encoder, ``UNetMotionModel`` per step, SD VAE decoder (frames
    independent: any chunking is exact; vramplan decodes all at once, sliced), post-processing."""

    pipeline = "AnimateDiffPipeline"
    stages = (("encode_text", "text_encoder", "forward"), ("denoise", "unet", "forward"), ("decode", "vae", "decode"))
    # The SD decoder along rows (runtime/adapters/sd_vae.py): a lower floor, slower where a frame fits.
    stage_alternatives: ClassVar[dict[str, tuple[str, ...]]] = {"decode": ("vae_rows",)}
    components = ("unet", "vae", "text_encoder")
    conditioning = "prompt"

    def max_frames(self, unet_config):
        # The motion modules' positional embedding has motion_max_seq_length positions.
        return (unet_config or {}).get("motion_max_seq_length")

    def frames_message(self, frames: int, limit: int) -> str:
        return (f"frames={frames}: the AnimateDiff motion modules take at most {limit} frames "
                f"(motion_max_seq_length={limit}). Use frames <= {limit}.")


# ---------------------------------------------------------------------------- Wan 2.1 / 2.2
def flow_timesteps(steps: int, shift: float, train_timesteps: int = 1000) -> list[int]:
    """The timesteps ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)`` sets for
    ``steps`` steps (the Wan pipelines' scheduler), without numpy: sigmas evenly spaced from 1 to
    1/train, shifted ``shift*s / (1 + (shift-1)*s)``, times ``train_timesteps``."""
    out = []
    for i in range(steps):
        s = 1 + (1 / train_timesteps - 1) * i / steps
        s = shift * s / (1 + (shift - 1) * s)
        if i == 0 and abs(s - 1) < 1e-6:
            s -= 1e-6  # as the scheduler does (a finite log at the first step)
        out.append(int(s * train_timesteps))  # the scheduler's timesteps are int64 (truncated)
    return out


def expert_steps(steps: int, boundary_ratio: float, shift: float, train_timesteps: int = 1000) -> tuple[int, int]:
    """(high-noise, low-noise) step counts of a Wan 2.2 two-expert run: ``transformer`` runs the steps
    whose timestep is at least ``boundary_ratio * train_timesteps``, ``transformer_2`` the rest."""
    boundary = boundary_ratio * train_timesteps
    high = sum(t >= boundary for t in flow_timesteps(steps, shift, train_timesteps))
    return high, steps - high


class _Wan(PipelineSpec):
    """The Wan 2.1 / 2.2 pipelines: UMT5 prompt encoding (prompt and negative prompt, one batch-1 call
    each), the DiT per step run as two batch-1 forwards under CFG (as the stock pipelines do), the
    causal video VAE decode (sliced along rows with halos: ``runtime/adapters/wan_vae.py``), post-processing.

    Latents: ``(frames - 1) / 4 + 1`` frames, pixels / the VAE's spatial factor (8; 16 for the Wan 2.2
    VAE of TI2V-5B), then 2x2 patches: frames must be 4n+1 and sizes multiples of factor x patch (the
    stock pipeline rounds silently; a plan refuses)."""

    sliced: ClassVar[dict[str, str | int]] = {"encode_text": 1, "denoise": 1, "decode": 1}
    guidance_batch = 1  # CFG as two batch-1 forwards: the batch does not double
    chunk_argument = None
    conditioning = "prompt"
    temporal_factor: ClassVar[int] = 4
    patch: ClassVar[int] = 2
    text_tokens: ClassVar[int] = 512  # max_sequence_length: prompts are padded (and truncated) to it
    default_flow_shift: ClassVar[float] = 3.0
    boundary_ratio: ClassVar[float | None] = None  # Wan 2.2 A14B: where transformer_2 takes over
    experts: ClassVar[int] = 1

    def scale_factor(self, configs=None) -> int:
        vae = (configs or {}).get("vae") or {}
        return int(vae.get("scale_factor_spatial") or self.vae_scale_factor)

    def smallest_latent(self, configs=None) -> int:
        return self.patch

    def default_frames(self, entry, unet_config):
        return (entry or {}).get("frames") or 81

    def check_size(self, height: int, width: int, configs=None) -> None:
        f = self.scale_factor(configs) * self.patch
        for label, value in (("height", height), ("width", width)):
            if value % f or value < f:
                raise InvalidArgumentError(
                    f"{label}={value} is not a multiple of {f}: the Wan VAE encodes {f // self.patch}x"
                    f"{f // self.patch} pixels into one latent and the transformer takes 2x2 latent patches. "
                    f"Try {label}={max(round(value / f), 1) * f}."
                )

    def check_frames(self, frames: int, unet_config=None) -> None:
        super().check_frames(frames, unet_config)
        if frames % self.temporal_factor != 1:
            n = max(round((frames - 1) / self.temporal_factor), 0)
            raise InvalidArgumentError(
                f"frames={frames} is not of the form 4n+1: the Wan VAE keeps the first frame and compresses the "
                f"rest 4x in time (the stock pipeline would silently round to {frames // 4 * 4 + 1}). "
                f"Try frames={4 * n + 1}."
            )

    def stage_shape(self, stage, height, width, frames, guidance, dtype, configs=None) -> SampleShape:
        if stage == "encode_text":  # one prompt of text_tokens tokens per call
            return SampleShape(batch=1, frames=1, latent_height=1, latent_width=self.text_tokens, dtype=dtype)
        if stage == "encode_vae":  # the conditioning video (the image, then zeros): video frames, pixels
            return SampleShape(batch=1, frames=frames, latent_height=height, latent_width=width, dtype=dtype)
        f = self.scale_factor(configs)
        temporal = int(((configs or {}).get("vae") or {}).get("scale_factor_temporal") or self.temporal_factor)
        latent_frames = (frames - 1) // temporal + 1
        return SampleShape(batch=1, frames=latent_frames, latent_height=height // f, latent_width=width // f,
                           dtype=dtype)

    def stage_calls(self, stage: str, per_step: bool, steps: int, guidance: bool = True) -> int:
        """How often ``stage`` runs in a call of ``steps`` steps: the prompt encoder once per prompt (and
        once more for the negative prompt), each expert twice per step of its own under CFG."""
        cfg = 2 if guidance else 1
        if stage == "encode_text":
            return cfg
        if stage in ("denoise", "denoise_2"):
            if self.boundary_ratio is None:
                return cfg * steps
            high, low = expert_steps(steps, self.boundary_ratio, self.default_flow_shift)
            return cfg * (high if stage == "denoise" else low)
        return steps if per_step else 1


@register
class WanT2V(_Wan):
    """``WanPipeline`` with one transformer: Wan 2.1 T2V 1.3B / 14B, and Wan 2.2 TI2V-5B (the Wan 2.2
    VAE, 16x spatial; one timestep per token: ``expand_timesteps``)."""

    pipeline = "WanPipeline"
    stages = (("encode_text", "text_encoder", "forward"), ("denoise", "transformer", "forward"),
              ("decode", "vae", "decode"))
    components = ("transformer", "vae", "text_encoder")


@register
class WanT2VA14B(_Wan):
    """``WanPipeline`` with two experts (Wan 2.2 T2V-A14B): ``transformer`` for the high-noise steps,
    ``transformer_2`` after ``boundary_ratio`` (0.875): the switch is a stage boundary."""

    pipeline = "WanPipeline:A14B"
    diffusers_class = "WanPipeline"
    stages = (("encode_text", "text_encoder", "forward"), ("denoise", "transformer", "forward"),
              ("denoise_2", "transformer_2", "forward"), ("decode", "vae", "decode"))
    sliced = {"encode_text": 1, "denoise": 1, "denoise_2": 1, "decode": 1}
    components = ("transformer", "transformer_2", "vae", "text_encoder")
    boundary_ratio = 0.875
    experts = 2

    @classmethod
    def matches(cls, index: dict) -> bool:
        return _names_component(index, "transformer_2")


@register
class WanI2V(_Wan):
    """``WanImageToVideoPipeline`` of Wan 2.1 I2V-14B: the CLIP image encoder (1.2 GiB; a planned stage
    through the CLIP vision adapter, as SVD's: its layers stream, 257 tokens are not sliced), the VAE
    encode of the conditioning video (the image then zeros; rows with halos, its own plan
    ``vae_encoder``), the transformer, the decode."""

    pipeline = "WanImageToVideoPipeline"
    stages = (("encode_text", "text_encoder", "forward"), ("encode_image", "image_encoder", "forward"),
              ("encode_vae", "vae", "encode"), ("denoise", "transformer", "forward"), ("decode", "vae", "decode"))
    # The VAE encode of the conditioning video is sliced along rows under its own plan (vae holds the decode's).
    sliced = {"encode_text": 1, "encode_image": 1, "encode_vae": 1, "denoise": 1, "decode": 1}
    stage_plans = {"encode_vae": "vae_encoder"}
    components = ("transformer", "vae", "text_encoder", "image_encoder")
    conditioning = "image"

    def stage_shape(self, stage, height, width, frames, guidance, dtype, configs=None) -> SampleShape:
        if stage == "encode_image":  # one image resized to the encoder's input size (the CLIP processor's), pixels
            side = int(((configs or {}).get("image_encoder") or {}).get("image_size") or 224)
            return SampleShape(batch=1, frames=1, latent_height=side, latent_width=side, dtype=dtype)
        return super().stage_shape(stage, height, width, frames, guidance, dtype, configs)


@register
class WanI2VA14B(_Wan):
    """``WanImageToVideoPipeline`` of Wan 2.2 I2V-A14B: no image encoder, two experts (boundary 0.9)."""

    pipeline = "WanImageToVideoPipeline:A14B"
    diffusers_class = "WanImageToVideoPipeline"
    stages = (("encode_text", "text_encoder", "forward"), ("encode_vae", "vae", "encode"),
              ("denoise", "transformer", "forward"), ("denoise_2", "transformer_2", "forward"),
              ("decode", "vae", "decode"))
    sliced = {"encode_text": 1, "encode_vae": 1, "denoise": 1, "denoise_2": 1, "decode": 1}
    stage_plans = {"encode_vae": "vae_encoder"}
    components = ("transformer", "transformer_2", "vae", "text_encoder")
    conditioning = "image"
    boundary_ratio = 0.9
    experts = 2

    @classmethod
    def matches(cls, index: dict) -> bool:
        return _names_component(index, "transformer_2")


def _names_component(index: dict, name: str) -> bool:
    """Whether a ``model_index.json`` has component ``name`` (``[library, class]``, not ``[null, null]``)."""
    value = index.get(name)
    return isinstance(value, list) and bool(value) and value[0] is not None


def pipeline_variant(class_name: str | None, index: dict) -> str | None:
    """The registered spec for a checkpoint of diffusers class ``class_name``: a variant (Wan 2.2's
    two experts: ``WanPipeline:A14B``) when one matches its ``model_index.json``, else the class."""
    for key, cls in _SPECS.items():
        if getattr(cls, "diffusers_class", None) == class_name and cls.matches(index):
            return key
    return class_name


def check_number(name: str, value: Any, *, integer: bool = False, minimum: float | None = None,
                 positive: bool = False, allow_none: bool = False) -> None:
    """Refuse a value of the wrong type, nan/inf, or out of range, naming the argument."""
    if value is None and allow_none:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        want = "an integer" if integer else "a number"
        raise InvalidArgumentError(f"{name}={value!r} must be {want}, not {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidArgumentError(f"{name}={value!r} must be a finite number")
    if positive and value <= 0:
        raise InvalidArgumentError(f"{name}={value!r} must be > 0")
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"{name}={value!r} must be >= {minimum:g}")


# ---------------------------------------------------------------------------- where a pipeline comes from
@dataclass
class PipelineSource:
    """A pipeline named by the user: its diffusers class, component configs, and a cache key."""

    name: str  # as the user wrote it: "svd", a Hugging Face id or a path
    pipeline: str
    configs: dict[str, dict[str, Any]]
    entry: dict[str, Any] | None = None  # the catalogue entry of a shipped model
    key: str = ""  # file-name-safe: the short name, or a hash of the configs

    @property
    def unet_config(self) -> dict[str, Any] | None:
        return self.configs.get("unet")


def pipeline_source(model: str) -> PipelineSource:
    """Resolve a catalogue name, a local pipeline folder or a Hugging Face id whose configs are in the
    local cache (nothing is downloaded). Only configs are read: no torch."""
    from ..profiles import component_config, model_catalogue

    if not isinstance(model, str) or not model.strip():
        raise InvalidArgumentError(f"model={model!r} must be a model name, a Hugging Face id or a local path")
    catalogue = model_catalogue()
    entry = catalogue.get(model.lower())
    if entry is not None:
        configs = {c: component_config(model, c) for c in entry["components"]}
        return PipelineSource(model.lower(), entry["pipeline"], configs, entry, model.lower())
    read = _folder_reader(model) or _hub_cache_reader(model)
    folder = Path(model).expanduser()
    if read is None and folder.is_dir():
        raise UnsupportedModelError(f"model folder {model} has no model_index.json: give a pipeline folder "
                                    f"written by save_pretrained")
    if read is None and (model.startswith((".", "/", "~")) or model.count("/") > 1):  # a path, not a hub id
        raise UnsupportedModelError(f"model {model!r}: no such folder (a local pipeline folder written by "
                                    f"save_pretrained, a shipped name ({', '.join(sorted(catalogue))}) or a "
                                    f"Hugging Face id)")
    if read is None and model == "trained-svd":
        raise UnsupportedModelError("trained-svd, the small trained demo model, has no full-size profile to plan "
                                    "from: make its plans with `vramplan trained-plan`")
    if read is None:
        raise UnsupportedModelError(
            f"unknown model {model!r}: not a shipped model ({', '.join(sorted(catalogue))}), not a local pipeline "
            f"folder, and no model_index.json for it in the local Hugging Face cache. Use a shipped name, a folder "
            f"written by save_pretrained, or download the configs once (`huggingface-cli download {model} "
            f"--include '*.json'`)."
        )
    index = _load_json(read("model_index.json"), f"{model}/model_index.json")
    pipeline = index.get("_class_name") if isinstance(index, dict) else None
    pipeline = pipeline_variant(pipeline, index) if isinstance(index, dict) else pipeline
    spec = pipeline_spec(pipeline)
    configs, missing = {}, []
    for component in spec.components:
        text = read(f"{component}/config.json")
        if text is None:
            missing.append(f"{component}/config.json")
        else:
            configs[component] = _load_json(text, f"{model}/{component}/config.json")
    if missing:
        raise UnsupportedModelError(
            f"{model!r} ({pipeline}) lacks {', '.join(missing)}: vramplan needs every component's config "
            f"(`huggingface-cli download {model} --include '*.json'`)."
        )
    return PipelineSource(model, pipeline, configs, None, f"{pipeline}-{config_key(configs)}")


def config_key(configs: dict[str, dict]) -> str:
    """A short hash of a pipeline's component configs (cache keys of pipelines named by path or id)."""
    clean = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in configs.items()}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _folder_reader(model: str):
    folder = Path(model).expanduser()
    if not (folder / "model_index.json").is_file():
        return None

    def read(name: str) -> str | None:
        path = folder / name
        return path.read_text(encoding="utf-8") if path.is_file() else None

    return read


def _hub_cache_reader(model: str):
    if "/" not in model or Path(model).expanduser().exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # the planner alone does not need huggingface_hub
        return None

    def read(name: str) -> str | None:
        try:
            found = try_to_load_from_cache(model, name)
        except Exception:  # noqa: BLE001 - an invalid repo id is just "not there"
            return None
        return Path(found).read_text(encoding="utf-8") if isinstance(found, str) else None

    return read if read("model_index.json") is not None else None


def _load_json(text: str | None, where: str) -> Any:
    try:
        return json.loads(text or "")
    except (json.JSONDecodeError, RecursionError) as err:
        raise InvalidArgumentError(f"{where} is not valid JSON: {err}") from err
