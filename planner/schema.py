"""The JSON contracts between the profiler, the planner and the runtime (pydantic, no torch).

A :class:`Plan` says, for one model config and one sample shape, how many slices each unit is
cut into and which consecutive units run as one group. It is versioned JSON: ``Plan.load``
names the field that is wrong in a corrupt file and refuses versions it does not know.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import PlanFormatError

SCHEMA_VERSION = 1

DType = Literal["fp32", "fp16", "bf16"]
Axis = Literal["frames", "tokens", "rows"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelRef(_Strict):
    """Which model a plan or profile belongs to: class plus a hash of its config."""

    class_name: str = Field(description="diffusers model class, e.g. UNetSpatioTemporalConditionModel")
    config_hash: str = Field(description="sha256 of the model config (keys starting with '_' ignored)")
    name: str | None = Field(default=None, description="short name, Hugging Face id or path, for messages")

    def describe(self) -> str:
        label = f"{self.name} " if self.name else ""
        return f"{label}({self.class_name}, config {self.config_hash[:12]})"


class SampleShape(_Strict):
    """The UNet's input: batch (CFG doubles it), frames, latent height/width, dtype."""

    batch: int = Field(ge=1, description="UNet batch; classifier-free guidance doubles it")
    frames: int = Field(ge=1)
    latent_height: int = Field(ge=1)
    latent_width: int = Field(ge=1)
    dtype: DType

    def describe(self) -> str:
        return (
            f"batch {self.batch} x {self.frames} frames x {self.latent_height}x{self.latent_width} latents, "
            f"{self.dtype}"
        )


class Group(_Strict):
    """Consecutive units of one axis that run slice by slice end to end with one slice count."""

    units: list[str] = Field(min_length=1, description="unit names, consecutive in execution order")
    axis: Axis
    k: int = Field(ge=1, description="slice count shared by every unit of the group")
    depth: int = Field(
        default=1, ge=1,
        description="slices in flight at once, each on its own CUDA stream (memory: depth x a slice); "
        "on other devices the same waves run one slice after another",
    )


class LatencySource(_Strict):
    """Where a GPU's latency constants come from: the card they were measured on, when, with what."""

    card: str = Field(description="the device name as measured (NVML / torch.cuda.get_device_name)")
    date: str = Field(description="when it was measured, e.g. 2026-11-27 15:00 UTC")
    tool: str = Field(default="bench/gpu_check.py", description="what measured it")
    smoke: bool = Field(default=False, description="a CPU smoke run: exercises the code, its numbers mean nothing")


class LatencyConstants(_Strict):
    """The latency model's constants for one GPU (``planner/costs.py``), fitted by ``bench/gpu_check.py``.

    A segment's time is compute FLOPs / (peak x ``compute_efficiency``) + bytes / (bandwidth x
    ``bandwidth_efficiency``) + kernel launches x ``launch_seconds``; host-link copies run at
    ``pcie_gbps`` x ``link_efficiency``. An efficiency of None is a term the fit dropped: it costs nothing."""

    compute_efficiency: float | None = Field(gt=0, description="fraction of the fp16 tensor / fp32 peak reached")
    bandwidth_efficiency: float | None = Field(gt=0, description="fraction of the memory bandwidth reached")
    launch_seconds: float = Field(ge=0, description="host cost per kernel launch (per slice)")
    link_efficiency: float = Field(default=1.0, gt=0, description="fraction of pcie_gbps reached by pinned copies")
    source: LatencySource | None = None

    @model_validator(mode="after")
    def _finite(self):
        for name in ("compute_efficiency", "bandwidth_efficiency", "launch_seconds", "link_efficiency"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name}={value} must be finite (None: a term the fit dropped)")
        return self


class GpuProfile(_Strict):
    """One GPU model's specs (``profiles/gpus.json``). Latency figures are vendor peaks, priced with
    the default constants of ``planner/costs.py``, until ``latency`` carries the card's own (then
    ``calibrated`` is true)."""

    name: str
    aliases: list[str] = Field(default_factory=list)
    memory_total_bytes: int = Field(gt=0)
    memory_usable_bytes: int = Field(gt=0, description="what cudaMemGetInfo reports as total")
    cuda_context_bytes: int = Field(description="CUDA context + library workspaces of a PyTorch process")
    memory_bandwidth_gbps: float
    fp16_tensor_tflops: float = Field(description="dense fp16 tensor throughput with fp32 accumulation")
    fp32_tflops: float
    compute_capability: str
    attention_kernels: list[Literal["flash", "efficient"]]
    bf16: bool
    pcie_gbps: float
    calibrated: bool = False
    sources: list[str] = Field(default_factory=list)
    notes: str = ""
    latency: LatencyConstants | None = Field(
        default=None, description="the card's fitted latency constants (None: the defaults of planner/costs.py)")

    @model_validator(mode="after")
    def _calibrated(self):
        if self.latency is not None:
            self.calibrated = True
        return self

    @property
    def attention_kernel(self) -> str:
        """The fused SDPA kernel PyTorch runs here for fp16 without a mask."""
        return "flash" if "flash" in self.attention_kernels else "efficient"


class GpuOverlay(_Strict):
    """A per-card overlay on a shipped GPU profile (``profiles/calibration/<card>.json`` or a file in
    ``$VRAMPLAN_CALIBRATION_DIR``), written by ``bench/gpu_check.py``: the profile it applies to and the
    latency constants fitted there; ``measurement`` keeps what the check measured (free form)."""

    format: Literal["vramplan-gpu-overlay"] = "vramplan-gpu-overlay"
    version: Literal[1] = 1
    gpu: str = Field(description="the GPU profile the constants apply to (their peaks are its figures)")
    latency: LatencyConstants | None = Field(description="None: the check fitted nothing (too few timings)")
    measurement: dict[str, Any] = Field(default_factory=dict, description="the check's record: rows, fit, skipped")


class UnitProfile(_Strict):
    """What one unit reads, makes and needs, measured on the full-size model."""

    name: str
    axis: Axis | None
    needs_input_stats: bool = False
    kind: str = ""
    block: str = Field(description="top-level block, for per-block tables (down_blocks.0, mid_block, ...)")
    inputs: list[str] = Field(description="values read: names of the units that made them, or initial inputs")
    whole_inputs: list[str] = Field(default_factory=list, description="inputs read whole by every slice "
                                    "(attention keys/values for a query chunk); made before the unit's segment")
    output_bytes: int = Field(ge=0)
    output_shape: list[Annotated[int, Field(ge=0)]]
    axis_length: int = Field(ge=0, description="size of the slicing axis at this unit (B*T frames or H*W tokens)")
    flops: int = Field(ge=0, description="matmul/conv/attention FLOPs of the unsliced unit")
    bytes_moved: int = Field(ge=0, description="bytes read + written by its other (memory-bound) ops")
    kernels: int = Field(ge=0, description="non-view ops per slice (launch-cost model)")
    rows: list[list[int]] | None = Field(
        default=None, description="axis rows: the unit's layers along the height, each [kernel, stride, pad before, "
        "pad after, upsampling(, relative cost per output row)] (vramplan.planner.rows.RowMap): the halo and the "
        "row mapping")
    rows_cropped: bool = Field(default=False, description="axis rows: the unit crops to the rows still needed "
                               "after every layer (its halo work is priced layer by layer)")
    stage_inside: bool = Field(default=False, description="axis rows: a host-placed input is staged one frame "
                               "(dim 2) of its slab at a time by the unit itself")
    scratch: dict[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=0)]] = Field(
        description="slice count k -> peak bytes the unit's computation adds above its entry for one "
        "(the largest) slice, its output piece included, output buffer excluded"
    )


class AllocatorProfile(_Strict):
    """CUDA caching-allocator overhead from replays of the traced allocation sequences."""

    method: str = Field(description="how the factors were obtained")
    default: dict[Annotated[int, Field(ge=1)], Annotated[float, Field(gt=0)]] = Field(description="k -> memory needed / bytes allocated, default allocator")
    expandable_segments: dict[Annotated[int, Field(ge=1)], Annotated[float, Field(gt=0)]] = Field(description="k -> the same with expandable segments")
    original_default: float = Field(gt=0, description="needed/allocated of the unmodified forward, default allocator")
    original_expandable_segments: float = Field(gt=0)


# Plan and profile files are read whole: refuse anything larger before reading (``verify /dev/zero``).
MAX_FILE_BYTES = 64 * 2**20
# Deeper JSON than any vramplan document has is refused before parsing (recursion in the parser).
MAX_DEPTH = 32


def write_atomic(path: str | Path, text: str) -> Path:
    """Write through a temporary file in the same folder and ``os.replace``: a concurrent reader sees
    the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_limited(path: str | Path, what: str = "file") -> str:
    """A document's text: at most MAX_FILE_BYTES of UTF-8, else a PlanFormatError saying what is wrong."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except IsADirectoryError:
        raise PlanFormatError(f"{path} is a folder, not a {what}") from None
    except OSError as err:
        raise PlanFormatError(f"cannot read {what} {path}: {err.strerror or err}") from err
    if len(data) > MAX_FILE_BYTES:
        raise PlanFormatError(f"{path} is larger than {MAX_FILE_BYTES // 2**20} MiB: not a vramplan {what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PlanFormatError(f"{path} is not UTF-8 text (byte {err.start}): not a vramplan {what}") from None
    _check_depth(text, str(path))
    return text


def _check_depth(text: str, source: str) -> None:
    depth = 0
    for match in _BRACKETS.finditer(_STRINGS.sub('""', text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > MAX_DEPTH:
            raise PlanFormatError(f"{source} nests deeper than {MAX_DEPTH} levels: not a vramplan document")


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


class _JsonFile(_Strict):
    """save/load for the profile documents, with the wrong field named on a bad file."""

    def save(self, path: str | Path) -> Path:
        return write_atomic(path, self.model_dump_json(indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path):
        text = read_limited(path, cls.__name__)
        try:
            return cls.model_validate_json(text)
        except ValidationError as err:
            raise PlanFormatError(f"{path} is not a valid {cls.__name__}: {_describe(err)}") from err


class ModelProfile(_JsonFile):
    """Everything the planner needs about one model at one sample shape, with no torch."""

    schema_version: int = SCHEMA_VERSION
    component: str = Field(default="unet", description="pipeline attribute the model is (unet, vae)")
    model: ModelRef
    shape: SampleShape
    attention_kernel: Literal["flash", "efficient", "cpu_flash", "math"]
    weight_bytes: int = Field(ge=0)
    globals_bytes: int = Field(ge=0, description="bytes live when the first unit starts (embeddings etc.)")
    result: str = Field(description="the value the forward returns")
    units: list[UnitProfile] = Field(min_length=1)
    original_peak_bytes: int = Field(ge=0, description="activation peak of the unmodified forward")
    original_block_peaks: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    block_weights: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict,
        description="weight bytes of each block that may be streamed (its parameters are used only by "
        "units of that block); weights outside these blocks always stay resident",
    )
    block_gathered: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict,
        description="streamable blocks whose weights are tables a unit gathers rows of (an embedding): when "
        "streamed, the table stays in host memory and only the rows the call's ids select (at most this "
        "many bytes at the profiled shape) are copied to the device",
    )
    allocator: AllocatorProfile
    versions: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _gathered_within_blocks(self) -> ModelProfile:
        for block, nbytes in self.block_gathered.items():
            if nbytes > self.block_weights.get(block, -1):
                raise ValueError(f"block_gathered names {block!r} with {nbytes} bytes: a gathered table must be a "
                                 f"block of block_weights, its rows no larger than the block's weights")
        return self


class ComponentProfile(_Strict):
    component: str = Field(description="pipeline attribute: unet, vae, image_encoder, text_encoder")
    model: ModelRef
    weight_bytes: int = Field(ge=0)


class StageProfile(_Strict):
    """One stage of a pipeline run: which component, how often, and what it needs."""

    stage: str = Field(description="encode_image, encode_vae, encode_text, denoise, decode")
    component: str
    per_step: bool = Field(default=False, description="runs once per denoising step")
    profile: ModelProfile | None = Field(default=None, description="unit profile of a stage the planner slices")
    activation_bytes: int = Field(ge=0, description="activation peak of the unmodified stage")
    flops: int = Field(default=0, ge=0)
    bytes_moved: int = Field(default=0, ge=0)
    held_bytes: int = Field(ge=0, description="tensors of other stages on the GPU meanwhile (latents, embeddings)")
    extra_weight_bytes: int = Field(default=0, ge=0, description="weights added for the stage (a VAE upcast to fp32)")
    plan_component: str | None = Field(
        default=None, description="the component plan that slices this stage when it is not the component's own: "
        "a second sliced entry point of one model (vae_encoder: the VAE's encode, while vae is its decode)")

    @property
    def plan_name(self) -> str:
        """The name of the component plan this stage runs under (``plan_component`` or ``component``)."""
        return self.plan_component or self.component


class PipelineProfile(_JsonFile):
    """Everything the planner needs about a whole pipeline run at one size."""

    schema_version: int = SCHEMA_VERSION
    model_name: str
    pipeline: str
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    frames: int = Field(ge=1)
    guidance: bool
    dtype: DType
    attention_kernel: Literal["flash", "efficient", "cpu_flash", "math"]
    components: list[ComponentProfile] = Field(min_length=1)
    stages: list[StageProfile] = Field(min_length=1)
    alternatives: list[StageProfile] = Field(
        default_factory=list, description="a stage profiled under another component plan its pipeline lists "
        "(stage_alternatives: the decode as vae_rows); the planner takes per stage whichever plans fastest")
    versions: dict[str, str] = Field(default_factory=dict)


class Target(_Strict):
    """What the plan was asked to meet."""

    gpu: str
    usable_bytes: int = Field(gt=0, description="memory the plan may use in all (usable VRAM or vram_gb)")
    max_latency_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    objective: Literal["min_latency", "min_peak"]
    allocator: Literal["default", "expandable_segments", "none"] = Field(
        default="expandable_segments",
        description="caching-allocator setting the prediction assumes ('none': no allocator, e.g. CPU)",
    )
    attention_kernel: Literal["flash", "efficient", "cpu_flash", "math"] = "flash"
    steps: int = Field(default=1, ge=1, description="denoising steps the latency is for")
    pinned: bool = Field(default=True, description="host-link copies priced at the pinned rate (False: pageable)")
    host_ram_bytes: int | None = Field(
        default=None, gt=0, description="pinned host memory the plan may use (None: no limit was set)")
    host_ram_source: str | None = Field(
        default=None, description="where host_ram_bytes comes from: 'given', 'this machine' or 'assumed'")


class Prediction(_Strict):
    """Predicted peak memory, broken down, and latency."""

    peak_bytes: int = Field(description="context + weights + activations + allocator overhead + margin")
    context_bytes: int
    weight_bytes: int
    live_bytes: int = Field(description="full-size values held at the peak (skips, residuals, buffers)")
    transient_bytes: int = Field(description="one slice's intermediates at the peak")
    streamed_bytes: int = Field(default=0, description="weights of streamed blocks on the GPU at the peak")
    allocator_bytes: int = Field(description="modelled caching-allocator overhead at the peak")
    margin_bytes: int
    activation_peak_bytes: int = Field(description="live + transient: what `verify` measures")
    peak_unit: str
    peak_stage: str = "denoise"
    original_activation_peak_bytes: int
    original_peak_bytes: int | None = Field(
        default=None, description="the unmodified pipeline with every component resident: context + weights + activations"
    )
    unet_call_s: float
    latency_s: float = Field(description="unet_call_s x steps")
    host_bytes: int = Field(default=0, ge=0, description="pinned host memory for host-placed values and streamed weights")
    transfer_s: float = Field(default=0.0, ge=0, description="host-link seconds in latency_s not hidden behind compute")
    latency_calibrated: bool = False
    allocator_model: str


class SolverInfo(_Strict):
    method: str
    status: str
    gap: float | None = None
    solve_seconds: float
    candidates: int


class ComponentPlan(_Strict):
    """How to run one model (a pipeline component) on one sample shape.

    Units not named in ``slices`` run unsliced. ``resident``: the weights (less any streamed blocks')
    stay on the GPU for the whole run; otherwise they are moved to the GPU before the component's stage
    and off after it.
    """

    component: str = Field(default="unet", description="pipeline attribute: unet, vae, image_encoder, ...")
    attribute: str | None = Field(
        default=None, description="the pipeline attribute this plan runs on when it is not `component`: a stage's "
        "own plan of a model that has another (vae_encoder runs vae.encode; its residency is the attribute's)")
    model: ModelRef
    shape: SampleShape | None = Field(default=None, description="None for a component that is not sliced")
    slices: dict[str, int] = Field(default_factory=dict, description="unit name -> slice count k (>= 1)")
    groups: list[Group] = Field(default_factory=list)
    resident: bool = Field(
        default=True, description="the component's weights stay on the GPU for the whole run (those of streamed "
        "blocks excepted: they live in pinned host memory); false: moved to the GPU for its stages only")
    recompute: list[str] = Field(
        default_factory=list,
        description="units whose input statistics come from recomputing their producers slice by slice "
        "(they sit inside a group after the unit that makes their input)",
    )
    host: list[str] = Field(
        default_factory=list,
        description="values (named by the unit that makes them) kept in pinned host memory between "
        "segments and moved to the GPU slice by slice",
    )
    streamed: list[str] = Field(
        default_factory=list,
        description="blocks whose weights live in pinned host memory and are copied in just before use "
        "(the next one prefetched while the current one computes)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ComponentPlan:
        bad = {u: k for u, k in self.slices.items() if k < 1}
        if bad:
            raise ValueError(f"slice counts must be >= 1: {bad}")
        seen: set[str] = set()
        for group in self.groups:
            for unit in group.units:
                if unit in seen:
                    raise ValueError(f"unit {unit!r} is in more than one group")
                seen.add(unit)
                if self.slices.get(unit, group.k) != group.k:
                    raise ValueError(
                        f"unit {unit!r} has k={self.slices[unit]} but its group has k={group.k}"
                    )
        return self

    def k(self, unit: str) -> int:
        return self.slices.get(unit, 1)

    @property
    def module_name(self) -> str:
        """The pipeline attribute holding the model this plan runs on (``attribute`` or ``component``)."""
        return self.attribute or self.component

    def describe(self) -> str:
        """``unet: svd (UNet..., config ...) with batch 2 x 14 frames ...``; a component that is not sliced says so."""
        shape = f"with {self.shape.describe()}" if self.shape is not None else "(not sliced)"
        return f"{self.component}: {self.model.describe()} {shape}"


class StagePrediction(_Strict):
    """One pipeline stage at its worst moment."""

    stage: str
    component: str = Field(description="the component plan the stage runs under (its pipeline attribute, or the "
                           "stage's own plan: vae_encoder)")
    calls: int
    peak_bytes: int = Field(description="everything on the GPU at the stage's peak")
    weight_bytes: int = Field(description="weights on the GPU during the stage")
    held_bytes: int = Field(description="tensors from other stages held meanwhile")
    activation_bytes: int
    needed_bytes: int = Field(description="activation x allocator factor")
    original_activation_bytes: int
    peak_unit: str | None = None
    seconds: float = Field(description="predicted time of all its calls, weight transfers included")
    streamed_bytes: int = Field(default=0, ge=0, description="weights of streamed blocks (on the GPU only around their use)")
    host_bytes: int = Field(default=0, ge=0, description="pinned host memory the stage uses (placed values, streamed weights)")


class RehashPlan(_Strict):
    """Step Rehash: on key steps the whole UNet runs and the value at ``cut`` is cached; the other
    steps run only what the output needs given the cut. The one approximation a plan may make."""

    mode: Literal["uniform", "greedy", "optimal"]
    cut: str = Field(description="the cached value: a unit of the UNet's program (a temporal layer's output), or "
                     "a residual cut 'start->end' whose span's residual (end - start) is cached (a DiT's middle blocks)")
    steps: int = Field(ge=1, description="denoising steps the schedule is for (one UNet call each)")
    key_steps: list[int] = Field(min_length=1, description="0-based steps that run the whole UNet; 0 always")
    quality: Literal["calibrated", "uncalibrated"]
    predicted_error: float | None = Field(
        default=None, description="calibrated: the quality predictor's L2 error of the final latent (older plans: the "
        "sum over reused steps of the guided noise prediction's relative error)"
    )
    predicted_psnr: float | None = Field(
        default=None, description="calibrated: the quality predictor's PSNR of the video against the full run, dB"
    )
    measured_psnr: float | None = Field(
        default=None, ge=0.0, le=200.0, description="the calibration ran this schedule on its own call (calibrate "
        "--refine): the measured PSNR vs the full run, dB, which the planner ranked it by instead of the prediction"
    )
    schedule: str | None = Field(
        default=None, description="what the key steps are, named honestly (e.g. 'uniform, every 2nd step "
        "(DeepCache's schedule)' only where it is DeepCache's computation)"
    )
    threshold: float | None = Field(default=None, description="greedy: cosine similarity threshold used")
    original_unet_flops: int = Field(description="UNet FLOPs per video without rehash")
    unet_flops: int = Field(description="UNet FLOPs per video with this schedule")
    key_call_s: float | None = Field(default=None, description="predicted seconds of a full UNet call")
    reuse_call_s: float | None = Field(default=None, description="predicted seconds of a reuse call")
    latency_saved_s: float | None = Field(default=None, description="predicted; None for plans made without a profile")
    cache_bytes: int = Field(description="the cached cut (whole CFG batch), held through the denoising stage")
    calibration: str | None = Field(default=None, description="the calibration used: file and sha256 prefix")
    half_steps: list[int] = Field(
        default_factory=list, description="reused steps of per-step CFG reuse over a cut ('cfg+<cut>') that run the "
        "first call whole and reuse only the second (the last key step's offset); they refresh no cache")

    @model_validator(mode="after")
    def _keys(self) -> RehashPlan:
        if self.key_steps != sorted(set(self.key_steps)) or self.key_steps[0] != 0 or self.key_steps[-1] >= self.steps:
            raise ValueError(f"key_steps must be increasing, start at 0 and lie below steps={self.steps}")
        if self.half_steps and (self.half_steps != sorted(set(self.half_steps)) or self.half_steps[-1] >= self.steps
                                or set(self.half_steps) & set(self.key_steps)):
            raise ValueError(f"half_steps must be increasing, below steps={self.steps} and not key steps")
        return self

    @property
    def reused_steps(self) -> list[int]:
        keys = set(self.key_steps)
        return [s for s in range(self.steps) if s not in keys]


class Plan(_Strict):
    """A whole run: per component slicing, groups and residency, the target and the prediction."""

    schema_version: int = Field(default=SCHEMA_VERSION, description="version of this JSON schema")
    model_name: str | None = Field(default=None, description="svd, svd-xt, a Hugging Face id or a path")
    pipeline: str | None = Field(default=None, description="diffusers pipeline class, if a whole pipeline")
    height: int | None = Field(default=None, ge=1, description="pixels")
    width: int | None = Field(default=None, ge=1)
    frames: int | None = Field(default=None, ge=1)
    components: list[ComponentPlan] = Field(min_length=1)
    target: Target | None = None
    prediction: Prediction | None = None
    stages: list[StagePrediction] = Field(default_factory=list)
    solver: SolverInfo | None = None
    rehash: RehashPlan | None = Field(default=None, description="Step Rehash schedule of the UNet, if any")

    @model_validator(mode="after")
    def _version(self) -> Plan:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not {SCHEMA_VERSION}")
        names = [c.component for c in self.components]
        if len(set(names)) != len(names):
            raise ValueError(f"components named twice: {names}")
        if self.pipeline is not None:  # a plan edited to claim another pipeline is refused when read
            from .errors import VramplanError
            from .pipelines import pipeline_spec

            try:
                pipeline_spec(self.pipeline).check_plan(self)
            except VramplanError as err:
                raise ValueError(str(err)) from None
        return self

    def component(self, name: str) -> ComponentPlan:
        for comp in self.components:
            if comp.component == name:
                return comp
        raise KeyError(f"the plan has no component {name!r} (it has {[c.component for c in self.components]})")

    def describe(self) -> str:
        if self.height and self.width:
            return f"{self.model_name or '?'} {self.frames} x {self.height}x{self.width}"
        comp = next((c for c in self.components if c.shape is not None), self.components[0])
        return comp.describe()

    # -- JSON ------------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def save(self, path: str | Path) -> Path:
        return write_atomic(path, self.to_json() + "\n")

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> Plan:
        if len(text) > MAX_FILE_BYTES:
            raise PlanFormatError(f"{source} is larger than {MAX_FILE_BYTES // 2**20} MiB: not a vramplan plan")
        _check_depth(text, source)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanFormatError(f"{source} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise PlanFormatError(f"{source} must hold a JSON object, not {type(data).__name__}")
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise PlanFormatError(f"{source} has no integer 'schema_version' field; is it a vramplan plan?")
        if version > SCHEMA_VERSION:
            raise PlanFormatError(
                f"{source} uses plan schema version {version}, but this vramplan reads version "
                f"{SCHEMA_VERSION}; upgrade vramplan to read it."
            )
        if version < SCHEMA_VERSION:
            raise PlanFormatError(f"{source} uses plan schema version {version}, which is no longer read.")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise PlanFormatError(f"{source} is not a valid plan: {_describe(err)}") from err

    @classmethod
    def load(cls, path: str | Path, *, check: bool = True) -> Plan:
        """Read a plan file; with ``check`` it must agree with itself and with its model's profile
        (:func:`.integrity.check_plan`: a stated prediction is recomputed, never trusted)."""
        plan = cls.from_json(read_limited(path, "plan file"), source=str(path))
        if check:
            from .integrity import check_plan

            check_plan(plan, source=str(path))
        return plan


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")  # our own validators' messages read as they are
        parts.append(f"field '{where}': {msg}")
    more = len(err.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


class StageReport(_Strict):
    stage: str
    seconds: float
    calls: int
    peak_bytes: int | None = Field(default=None, description="measured peak while the stage ran (tracker, CPU)")


class RunReport(_Strict):
    """What a run measured, next to what its plan predicted."""

    device: str
    pipeline: str
    plan_gpu: str | None = None
    allocator_setting: str | None = Field(default=None, description="CUDA caching allocator config in effect")
    peak_allocated_bytes: int | None = Field(default=None, description="torch.cuda.max_memory_allocated")
    peak_reserved_bytes: int | None = Field(default=None, description="torch.cuda.max_memory_reserved")
    nvml_used_bytes: int | None = Field(default=None, description="device memory in use (NVML), largest sample")
    tracker_peak_bytes: int | None = Field(default=None, description="MemoryTracker peak of tensors made by the run")
    predicted_peak_bytes: int | None = None
    predicted_activation_bytes: int | None = None
    predicted_latency_s: float | None = None
    predicted_pageable_latency_s: float | None = Field(
        default=None, description="the plan's latency re-priced at the pageable host-link rate, when pinned host "
        "memory could not be allocated during the run (None: pinned memory worked, or no re-pricing was possible)")
    total_seconds: float
    stages: list[StageReport] = Field(default_factory=list)
    step_seconds: list[float] = Field(default_factory=list)
    key_steps: list[int] = Field(default_factory=list, description="Step Rehash: steps that ran the whole UNet")
    reused_steps: list[int] = Field(default_factory=list, description="Step Rehash: steps that reused the cut")
    unet_call_seconds: list[float] = Field(default_factory=list, description="Step Rehash: UNet time per step")
    notes: list[str] = Field(default_factory=list)

    def summary(self) -> str:
        from .fmt import human_bytes

        def size(n):
            return "-" if n is None else human_bytes(n)

        lines = [f"{self.pipeline} on {self.device}: {self.total_seconds:.2f} s"]
        if self.peak_allocated_bytes is not None:
            lines.append(f"  peak allocated {size(self.peak_allocated_bytes)}, reserved {size(self.peak_reserved_bytes)}, "
                         f"NVML used {size(self.nvml_used_bytes)} (allocator: {self.allocator_setting})")
        if self.tracker_peak_bytes is not None:
            lines.append(f"  peak of tensors made by the run (tracker) {size(self.tracker_peak_bytes)}")
        if self.predicted_peak_bytes is not None:
            lines.append(f"  plan for {self.plan_gpu}: predicted peak {size(self.predicted_peak_bytes)}, "
                         f"latency {self.predicted_latency_s:.1f} s")
        if self.predicted_pageable_latency_s is not None:
            lines.append(f"  pinned host memory failed: predicted {self.predicted_pageable_latency_s:.1f} s at the "
                         f"pageable rate")
        for st in self.stages:
            peak = f", peak {size(st.peak_bytes)}" if st.peak_bytes is not None else ""
            lines.append(f"  {st.stage:<14} {st.seconds:8.3f} s over {st.calls} call(s){peak}")
        if self.step_seconds:
            lines.append(f"  steps: {len(self.step_seconds)}, mean {sum(self.step_seconds) / len(self.step_seconds):.3f} s")
        if self.reused_steps:
            t = self.unet_call_seconds

            def mean(steps):
                return sum(t[s] for s in steps) / len(steps) if steps and len(t) > max(steps) else float("nan")

            lines.append(f"  rehash: {len(self.key_steps)} key steps ({mean(self.key_steps):.3f} s per UNet call), "
                         f"{len(self.reused_steps)} reused ({mean(self.reused_steps):.3f} s)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
