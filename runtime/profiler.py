"""Profile a model at one sample shape: what every unit reads, makes and needs, per slice count.

All traces run on meta tensors of the full-size model (seconds, no weights) with attention routed
to the target GPU's fused kernel:

1. the unmodified forward: the original activation peak, per top-level block;
2. the unit program unsliced, under the op counter: each unit's output size and shape, FLOPs,
   memory traffic, kernel count;
3. one trace per slice-count target 2^i, running only the first (largest) slice of every unit
   (``first_slice_only``): each unit's per-slice scratch memory at that k.

Every allocation sequence is replayed through the caching-allocator model to get overhead
factors. The result is a :class:`~vramplan.planner.schema.ModelProfile`, cached on disk by model
fingerprint, shape and kernel.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..planner.allocator import replay
from ..planner.schema import AllocatorProfile, ModelProfile, ModelRef, SampleShape, UnitProfile
from .adapters.base import adapter_for
from .apply import fingerprint
from .executor import Segment, execute
from .fake import attention_kernel, weight_bytes
from .memory import MemoryTracker
from .opcount import OpCounter
from .program import Program

log = logging.getLogger(__name__)

DEFAULT_MAX_K = 256


def slice_counts(length: int, max_k: int = DEFAULT_MAX_K) -> list[int]:
    """Candidate slice counts for an axis: the smallest k for each power-of-two target.

    Only the largest slice matters for memory, so for each target 2^i the smallest k giving the
    same largest slice is kept (28 frames: 1, 2, 4, 7, 14, 28).
    """
    out = []
    for i in range(max_k.bit_length()):
        target = 1 << i
        if target > max_k:
            break
        size = -(-length // min(target, length))
        k = -(-length // size)
        if k not in out:
            out.append(k)
        if size == 1:
            break
    return out


def block_of(unit: str) -> str:
    """The top-level block of a unit, for per-block tables: ``down_blocks.1``, ``decoder.mid_block``."""
    parts = unit.split(".")
    for i, part in enumerate(parts):
        if part in ("down_blocks", "up_blocks"):
            return ".".join(parts[: i + 2])
        if part == "mid_block":
            return ".".join(parts[: i + 1])
    return ".".join(parts[:2]) if len(parts) > 1 and parts[0] in ("decoder", "encoder") else parts[0]


def profile(
    model: torch.nn.Module,
    shape: SampleShape,
    kernel: str = "flash",
    name: str | None = None,
    max_k: int = DEFAULT_MAX_K,
    progress: Callable[[str], None] | None = None,
) -> ModelProfile:
    """Profile ``model`` (best built on meta: :func:`~vramplan.runtime.empty_model`) at ``shape``."""
    started = time.perf_counter()
    say = progress or log.info
    adapter = adapter_for(model)
    ops, result = adapter.ops(model)
    device = next(model.parameters()).device
    args = adapter.example_inputs(model, shape, device=device)

    # 1. The unmodified forward.
    modules = dict(model.named_modules())
    blocks = {block_of(op.name) for op in ops}
    label = {b: modules[b] for b in sorted(blocks) if b in modules}
    with torch.no_grad(), attention_kernel(kernel), MemoryTracker(label, record_events=True) as original:
        getattr(model, getattr(adapter, "method", "forward"))(*args)
    say(f"original forward: activation peak {original.peak_bytes / 2**30:.3f} GiB")

    # 2. Unsliced unit program: sizes, FLOPs, traffic, kernels.
    seen: dict[str, tuple[torch.Size, int, int]] = {}

    def observe(op, value, length):
        seen[op.output] = (value.shape, value.numel() * value.element_size(), length)

    counter = OpCounter()
    program = _program(adapter, model, ops, result, args)
    with torch.no_grad(), attention_kernel(kernel), counter:
        execute(program, [Segment([op], op.spec.axis, 1) for op in ops], observer=observe)

    # 3. Per-slice scratch at each slice-count target.
    lengths = {op.name: seen[op.output][2] for op in ops}
    scratch: dict[str, dict[int, int]] = {op.name: {} for op in ops}
    ratios: dict[str, dict[int, float]] = {"default": {}, "expandable_segments": {}}
    for i in range(max_k.bit_length()):
        target = 1 << i
        if target > max_k:
            break
        ks = {op.name: _k_for(lengths[op.name], target) if op.spec.axis else 1 for op in ops}
        if all(ks[op.name] in scratch[op.name] for op in ops):
            continue
        segments = [Segment([op], op.spec.axis, ks[op.name]) for op in ops]
        program = _program(adapter, model, ops, result, args)
        with torch.no_grad(), attention_kernel(kernel), MemoryTracker(record_events=True) as tracker:
            execute(program, segments, first_slice_only=True)
        for op in ops:
            scratch[op.name].setdefault(ks[op.name], tracker.units[op.name].transient_bytes)
        for mode in ratios:
            ratios[mode][target] = round(replay(tracker.events, mode == "expandable_segments").ratio, 4)
        say(f"slice target {target:>4}: traced in {time.perf_counter() - started:.1f} s")

    units = []
    for op in ops:
        shape_, nbytes, length = seen[op.output]
        stats = counter.units.get(op.name)
        units.append(
            UnitProfile(
                name=op.name,
                axis=op.spec.axis,
                needs_input_stats=op.spec.needs_input_stats,
                kind=op.spec.kind,
                block=block_of(op.name),
                inputs=list(op.inputs),
                output_bytes=nbytes,
                output_shape=list(shape_),
                axis_length=length,
                flops=stats.flops if stats else 0,
                bytes_moved=stats.bytes_moved if stats else 0,
                kernels=stats.kernels if stats else 0,
                scratch=scratch[op.name],
            )
        )
    first_entry = _first_entry(ops, args, adapter, model, kernel, result)
    import diffusers

    ref = fingerprint(model, name)
    return ModelProfile(
        component=getattr(adapter, "component", "unet"),
        model=ModelRef(class_name=ref.class_name, config_hash=ref.config_hash, name=name),
        shape=shape,
        attention_kernel=kernel,
        weight_bytes=weight_bytes(model),
        globals_bytes=first_entry,
        result=result,
        units=units,
        original_peak_bytes=original.peak_bytes,
        original_block_peaks={b: u.peak_bytes for b, u in original.units.items()},
        allocator=AllocatorProfile(
            method="replay of the traced allocation sequences (first slice of every unit) through "
            "vramplan.planner.allocator; k -> needed/allocated",
            default={k: v for k, v in ratios["default"].items()},
            expandable_segments={k: v for k, v in ratios["expandable_segments"].items()},
            original_default=round(replay(original.events).ratio, 4),
            original_expandable_segments=round(replay(original.events, True).ratio, 4),
        ),
        versions={"torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__},
    )


def measure_stage(fn: Callable[[], object], kernel: str) -> tuple[int, int, int]:
    """Activation peak, FLOPs and bytes moved of a whole (unsliced) pipeline stage on meta tensors."""
    counter = OpCounter()
    with torch.no_grad(), attention_kernel(kernel), MemoryTracker() as tracker, counter:
        fn()
    totals = counter.units.values()
    return tracker.peak_bytes, sum(u.flops for u in totals), sum(u.bytes_moved for u in totals)


def component_profiles(components: dict[str, torch.nn.Module], name: str, refs: dict[str, ModelRef]):
    """Weights and identity of each pipeline component (``refs``: those already profiled)."""
    from ..planner.schema import ComponentProfile

    return [
        ComponentProfile(
            component=comp,
            model=ModelRef(**{**(refs.get(comp) or fingerprint(model)).model_dump(), "name": name}),
            weight_bytes=weight_bytes(model),
        )
        for comp, model in components.items()
    ]


def _k_for(length: int, target: int) -> int:
    size = -(-length // min(target, length))
    return -(-length // size)


def _program(adapter, model, ops, result, args) -> Program:
    binding = adapter.bind(model, *args)
    return Program(ops, binding.env, binding.layouts, result, binding.finish, binding.globals)


def _first_entry(ops, args, adapter, model, kernel, result) -> int:
    """Bytes live when the first unit starts: what the call's prologue made."""
    with torch.no_grad(), attention_kernel(kernel), MemoryTracker() as tracker:
        program = _program(adapter, model, ops, result, args)
        entry = tracker.current_bytes
        del program
    return entry


# ---------------------------------------------------------------------------- on-disk cache
def cache_dir() -> Path:
    root = os.environ.get("VRAMPLAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vramplan"
    )
    return Path(root) / "profiles"


def cache_path(ref: ModelRef, shape: SampleShape, kernel: str) -> Path:
    stem = (
        f"{ref.class_name}-{ref.config_hash[:16]}-b{shape.batch}-f{shape.frames}-"
        f"{shape.latent_height}x{shape.latent_width}-{shape.dtype}-{kernel}"
    )
    return cache_dir() / f"{stem}.json"


def cached_profile(model, shape: SampleShape, kernel: str, name: str | None = None, **kwargs) -> ModelProfile:
    """:func:`profile`, read from / written to the on-disk cache."""
    path = cache_path(fingerprint(model), shape, kernel)
    if path.exists():
        prof = ModelProfile.load(path)
        prof.model.name = name or prof.model.name
        return prof
    prof = profile(model, shape, kernel, name=name, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.save(path)
    return prof



SHIPPED = [
    (model, frames, height, width, kernel)
    for model, frames in (("svd", 14), ("svd-xt", 25), ("animatediff", 16))
    for height, width in ((576, 1024), (512, 512))
    for kernel in ("flash", "efficient")
]


def pipeline_profile(model: str, height: int, width: int, frames: int, guidance: bool = True,
                     dtype: str = "fp16", kernel: str = "flash", progress=None):
    """Profile a shipped model's whole pipeline on meta tensors (about half a minute)."""
    from ..profiles import component_config, model_entry
    from .adapters import PIPELINE_ADAPTERS
    from .models import meta_from_config

    entry = model_entry(model)
    if entry["pipeline"] not in PIPELINE_ADAPTERS:
        raise NotImplementedError(f"no pipeline profiler for {entry['pipeline']}")
    components = {c: meta_from_config(component_config(model, c), dtype) for c in entry["components"]}
    return PIPELINE_ADAPTERS[entry["pipeline"]].profile_pipeline(components, model, height, width, frames, guidance, dtype, kernel,
                                        progress=progress)


def cached_pipeline_profile(model: str, height: int, width: int, frames: int, guidance: bool, dtype: str,
                            kernel: str):
    """:func:`pipeline_profile`, read from / written to the on-disk cache."""
    from ..planner.plan import pipeline_profile_name
    from ..planner.schema import PipelineProfile
    from ..profiles import model_catalogue

    if model.lower() not in model_catalogue():
        raise NotImplementedError(
            f"whole-pipeline profiles are built for the shipped models ({', '.join(model_catalogue())}); "
            f"for {model!r} profile the UNet with `vramplan profile`"
        )
    path = cache_dir() / pipeline_profile_name(model.lower(), height, width, frames, guidance, dtype, kernel)
    if path.exists():
        return PipelineProfile.load(path)
    prof = pipeline_profile(model.lower(), height, width, frames, guidance, dtype, kernel)
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.save(path)
    return prof


def regenerate_shipped(progress: Callable[[str], None] | None = None, models: list[str] | None = None) -> list[Path]:
    """Re-profile the shipped pipeline configurations (CFG, fp16) into ``vramplan/profiles/models``."""
    from importlib import resources

    from ..planner.plan import SHIPPED_DIR, pipeline_profile_name

    folder = Path(str(resources.files("vramplan.profiles").joinpath(SHIPPED_DIR)))
    written = []
    for model, frames, height, width, kernel in SHIPPED:
        if models and model not in models:
            continue
        if progress:
            progress(f"profiling the {model} pipeline, {frames} x {height}x{width} ({kernel})")
        prof = pipeline_profile(model, height, width, frames, True, "fp16", kernel)
        name = pipeline_profile_name(model, height, width, frames, True, "fp16", kernel)
        written.append(prof.save(folder / name))
    return written
