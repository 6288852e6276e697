"""Profile a model at one sample shape: what every unit reads, makes and needs, per slice count.

All traces run on meta tensors of the full-size model (seconds, no weights) with attention routed
to the target GPU's fused kernel:

1. the unmodified forward: the original activation peak, per top-level block;
2. the unit program unsliced, under the op counter: each unit's output size and shape, FLOPs,
   memory traffic, kernel count;
3. one trace per slice-count target 2^i, running only the first (largest) slice of every unit
   (``first_slice_only``): each unit's per-slice scratch memory at that k.

Trace 2 also records which units read each parameter and buffer: a block (``block_of``, or the finer
streaming units an adapter declares: ``stream_parts``, :func:`~.streaming.stream_block_of`) whose
module's weights are read by units of that block alone may be streamed (``block_weights``).

Every allocation sequence is replayed through the caching-allocator model to get overhead
factors. The result is a :class:`~vramplan.planner.schema.ModelProfile`, cached on disk by model
fingerprint, shape and kernel.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..planner.allocator import replay
from ..planner.errors import PlanFormatError, ProfileCacheError
from ..planner.pipelines import check_number
from ..planner.schema import (
    AllocatorProfile,
    ModelProfile,
    ModelRef,
    PipelineProfile,
    SampleShape,
    UnitProfile,
)
from .adapters.base import adapter_for, measure_whole_stages, pipeline_adapter
from .apply import fingerprint
from .executor import Segment, execute, unit_by_unit
from .fake import attention_kernel, weight_bytes
from .gather import gathered_bytes
from .memory import MemoryTracker
from .opcount import OpCounter
from .program import Program
from .streaming import WeightReaders, adapter_block
from .streaming import block_of as block_of  # re-exported: per-block tables import it from here

log = logging.getLogger(__name__)

DEFAULT_MAX_K = 256
# Part of every cache key: bump when what the profiler measures changes, so old entries are not served.
# 6: finer streaming blocks (stream_parts), pipeline stages with their own plan (SVD's and Wan I2V's VAE encode,
# SVD's CLIP image encoder): cached pipeline profiles made before would plan those stages whole
# 7: the Wan VAE decode as one rows unit per up block (cached profiles name a unit it no longer has)
PROFILER_VERSION = 7  # 3: block_weights; 4: rows units (row maps), VAE encode profiles; 5: block_gathered


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


def profile(
    model: torch.nn.Module,
    shape: SampleShape,
    kernel: str = "flash",
    name: str | None = None,
    max_k: int = DEFAULT_MAX_K,
    progress: Callable[[str], None] | None = None,
    component: str | None = None,
) -> ModelProfile:
    """Profile ``model`` (best built on meta: :func:`~vramplan.runtime.empty_model`) at ``shape``
    (``component="vae_encoder"``: a VAE's encode, not its decode)."""
    check_number("max_k", max_k, integer=True, minimum=1)
    started = time.perf_counter()
    adapter = adapter_for(model, component)
    targets = [1 << i for i in range(max_k.bit_length()) if 1 << i <= max_k]
    bar = _progress_bar(2 + len(targets), f"profiling {getattr(adapter, 'component', 'unet')}")

    def say(message: str) -> None:
        (progress or log.info)(message)
        bar.set_postfix_str(message[:40], refresh=False)
        bar.update(1)

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
    readers = WeightReaders(model)
    with torch.no_grad(), attention_kernel(kernel), readers:  # the prologue reads weights too (embeddings)
        program = _program(adapter, model, ops, result, args)
        ids_numel = {n: v.numel() for n, v in program.env.items() if isinstance(v, torch.Tensor)}
        with counter:
            execute(program, unit_by_unit(ops), observer=observe)
    say(f"unit program: {len(ops)} units")

    # 3. Per-slice scratch at each slice-count target.
    lengths = {op.name: seen[op.output][2] for op in ops}
    scratch: dict[str, dict[int, int]] = {op.name: {} for op in ops}
    ratios: dict[str, dict[int, float]] = {"default": {}, "expandable_segments": {}}
    for target in targets:
        ks = {op.name: _k_for(lengths[op.name], target) if op.spec.axis else 1 for op in ops}
        if all(ks[op.name] in scratch[op.name] for op in ops):
            bar.update(1)
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
                whole_inputs=list(op.whole_inputs),
                output_bytes=nbytes,
                output_shape=list(shape_),
                axis_length=length,
                flops=stats.flops if stats else 0,
                bytes_moved=stats.bytes_moved if stats else 0,
                kernels=stats.kernels if stats else 0,
                scratch=scratch[op.name],
                rows=op.rows.as_list() if op.spec.axis == "rows" and op.rows is not None else None,
                rows_cropped=op.spec.axis == "rows" and op.rows_cropped,
                stage_inside=op.spec.axis == "rows" and op.stage_inside,
            )
        )
    bar.close()
    first_entry = _first_entry(ops, args, adapter, model, kernel, result)
    stream_block = adapter_block(adapter)  # a unit's streaming block (finer where the adapter declares)
    block_weights = readers.block_weights([op.name for op in ops], stream_block)
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
        block_weights=block_weights,
        block_gathered=_gathered(dict(model.named_modules(remove_duplicate=False)), ops, block_weights, ids_numel, seen,
                                 stream_block),
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


def _gathered(modules, ops, block_weights: dict[str, int], ids_numel: dict[str, int], seen,
              stream_block: Callable[[str], str] = block_of) -> dict[str, int]:
    """Per streamable block of a unit that gathers table rows (``Op.gathers``): the device bytes of the
    rows its ids can select at this shape (the distinct ids, at most; see :mod:`.gather`)."""
    out: dict[str, int] = {}
    for op in ops:
        block = stream_block(op.name)
        if not op.gathers or block not in block_weights or block not in modules:
            continue
        n = ids_numel.get(op.gathers)
        if n is None and op.gathers in seen:
            n = math.prod(seen[op.gathers][0])
        if n is None:
            continue
        tables = {id(t): t for t in modules[block].parameters()}.values()
        out[block] = sum(gathered_bytes(t, n) for t in tables)
    return out


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
    return binding.program(ops, result)


def _first_entry(ops, args, adapter, model, kernel, result) -> int:
    """Bytes live when the first unit starts: what the call's prologue made."""
    with torch.no_grad(), attention_kernel(kernel), MemoryTracker() as tracker:
        program = _program(adapter, model, ops, result, args)
        entry = tracker.current_bytes
        del program
    return entry


# ---------------------------------------------------------------------------- progress
class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str):
    """A tqdm bar on stderr when it is a terminal; otherwise nothing (messages go to the log)."""
    if not sys.stderr.isatty():
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a runtime dependency
        return _NoBar()
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit="trace")


# ---------------------------------------------------------------------------- on-disk cache
def cache_dir() -> Path:
    root = os.environ.get("VRAMPLAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vramplan"
    )
    return Path(root) / "profiles"


def writable_cache_dir() -> Path:
    """The cache folder, created and checked writable *before* any profiling (which takes minutes)."""
    folder = cache_dir()
    hint = "Set VRAMPLAN_CACHE to a writable folder."
    for path in (folder, *folder.parents):
        if path.exists() and not path.is_dir():
            raise ProfileCacheError(f"the profile cache folder {folder} cannot be made: {path} is a file. {hint}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as err:
        raise ProfileCacheError(
            f"the profile cache folder {folder} is not writable ({err.strerror or err}). {hint}"
        ) from err
    return folder


def cache_path(ref: ModelRef, shape: SampleShape, kernel: str, max_k: int = DEFAULT_MAX_K,
               component: str | None = None) -> Path:
    """Keyed by everything the profile depends on: model config (and which of its adapters: a VAE's
    encode is ``component="vae_encoder"``), shape, kernel, max_k, profiler version."""
    part = f"-{component}" if component == "vae_encoder" else ""
    stem = (
        f"{ref.class_name}{part}-{ref.config_hash[:16]}-b{shape.batch}-f{shape.frames}-"
        f"{shape.latent_height}x{shape.latent_width}-{shape.dtype}-{kernel}-k{max_k}-v{PROFILER_VERSION}"
    )
    return cache_dir() / f"{stem}.json"


def _read_cached(path: Path, cls, matches: Callable[[object], bool]):
    """A cache entry, or None (with a warning) when it is corrupt, invalid or for something else."""
    if not path.exists():
        return None
    try:
        prof = cls.load(path)
    except (PlanFormatError, OSError) as err:
        log.warning("ignoring the corrupt profile cache entry %s (%s); profiling again", path, err)
        return None
    if not matches(prof):
        log.warning("ignoring the profile cache entry %s: it describes another model or shape; profiling again", path)
        return None
    return prof


def _write_cached(prof, path: Path) -> None:
    """Save atomically; a cache that cannot be written loses the cache entry, never the profile."""
    try:
        prof.save(path)
    except OSError as err:
        log.warning("could not write the profile cache entry %s (%s); the profile is returned uncached",
                    path, err.strerror or err)


def cached_profile(model, shape: SampleShape, kernel: str, name: str | None = None, max_k: int = DEFAULT_MAX_K,
                   **kwargs) -> ModelProfile:
    """:func:`profile`, read from / written to the on-disk cache."""
    check_number("max_k", max_k, integer=True, minimum=1)
    writable_cache_dir()
    ref = fingerprint(model)
    path = cache_path(ref, shape, kernel, max_k, kwargs.get("component"))

    def matches(p: ModelProfile) -> bool:
        return p.model.config_hash == ref.config_hash and p.shape == shape and p.attention_kernel == kernel

    prof = _read_cached(path, ModelProfile, matches)
    if prof is not None:
        prof.model.name = name or prof.model.name
        return prof
    prof = profile(model, shape, kernel, name=name, max_k=max_k, **kwargs)
    _write_cached(prof, path)
    return prof


def pipeline_profile(model: str, height: int, width: int, frames: int, guidance: bool = True,
                     dtype: str = "fp16", kernel: str = "flash", max_k: int = DEFAULT_MAX_K,
                     progress: Callable[[str], None] | None = None) -> PipelineProfile:
    """Profile a whole pipeline (a catalogue name, a local pipeline folder or a cached Hugging Face id)
    on meta tensors of its full-size components: its adapter measures the stages that run whole,
    each sliced stage's model is profiled, and the adapter says what every stage holds."""
    from ..planner.pipelines import pipeline_source

    check_number("max_k", max_k, integer=True, minimum=1)
    say = progress or log.info
    source = pipeline_source(model)
    adapter = pipeline_adapter(source.pipeline)
    adapter.check_size(height, width, source.configs)
    adapter.check_frames(frames, source.unet_config)
    bar = _progress_bar(1 + len(adapter.sliced), f"profiling {source.name}")
    components = adapter.meta_components(source.configs, dtype)
    say("stages that run whole")
    whole = measure_whole_stages(adapter, components, height, width, frames, dtype, kernel)
    bar.update(1)
    profiles: dict[str, ModelProfile] = {}
    for stage, component, method in adapter.stages:
        if stage in adapter.sliced and stage not in profiles:
            say(f"{stage}: {component}")
            shape = adapter.stage_shape(stage, height, width, frames, guidance, dtype, source.configs)
            twin = next((s for s, c, m in adapter.stages if s in profiles and m == method
                         and _same_model(components[c], components[component])
                         and profiles[s].shape == shape), None)
            if twin is not None:  # an identical model at the same shape (Wan 2.2's two experts): one profile
                profiles[stage] = profiles[twin].model_copy(deep=True)
                bar.update(1)
                continue
            with adapter.stage_dtype(components, stage, dtype):  # SVD encodes in fp32
                profiles[stage] = profile(components[component], shape, kernel, name=source.name, max_k=max_k,
                                          progress=progress, component="vae_encoder" if method == "encode" else None)
            bar.update(1)
    bar.close()
    stages = adapter.stage_profiles(components, height, width, frames, guidance, dtype, whole, profiles)
    refs = {component: profiles[stage].model for stage, component, _ in adapter.stages if stage in profiles}
    from .alternatives import alternative_stages

    # each stage under the other plans its pipeline lists (the decode along rows: vae_rows)
    alternatives = alternative_stages(adapter, components, stages, kernel, source.name, progress, max_k)
    return PipelineProfile(
        model_name=source.name, pipeline=adapter.pipeline, height=height, width=width, frames=frames,
        guidance=guidance, dtype=dtype, attention_kernel=kernel,
        components=component_profiles(components, source.name, refs), stages=stages, alternatives=alternatives,
        versions=next(iter(profiles.values())).versions,
    )


def _same_model(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same class and config (fingerprint) and dtype: the profiler would measure the same profile."""
    fa, fb = fingerprint(a), fingerprint(b)
    return (fa.class_name, fa.config_hash) == (fb.class_name, fb.config_hash) and \
        next(a.parameters()).dtype == next(b.parameters()).dtype


def cached_pipeline_profile(model: str, height: int, width: int, frames: int, guidance: bool, dtype: str,
                            kernel: str, max_k: int = DEFAULT_MAX_K) -> PipelineProfile:
    """:func:`pipeline_profile`, read from / written to the on-disk cache (checked writable first)."""
    from ..planner.pipelines import pipeline_source
    from ..planner.plan import pipeline_profile_name

    check_number("max_k", max_k, integer=True, minimum=1)
    source = pipeline_source(model)
    folder = writable_cache_dir()
    name = pipeline_profile_name(source.key, height, width, frames, guidance, dtype, kernel)
    path = folder / name.replace(".pipeline.json", f"-k{max_k}-v{PROFILER_VERSION}.pipeline.json")

    def matches(p: PipelineProfile) -> bool:
        return (p.pipeline, p.height, p.width, p.frames, p.guidance, p.dtype, p.attention_kernel) == (
            source.pipeline, height, width, frames, guidance, dtype, kernel)

    prof = _read_cached(path, PipelineProfile, matches)
    if prof is not None:  # keyed by configs: the same pipeline under another name (a folder, an id) shares it
        return prof.model_copy(update={"model_name": source.name})
    prof = pipeline_profile(model, height, width, frames, guidance, dtype, kernel, max_k=max_k)
    _write_cached(prof, path)
    return prof


SHIPPED_SIZES = ((576, 1024), (512, 512))
SHIPPED_KERNELS = ("flash", "efficient")


def regenerate_shipped(progress: Callable[[str], None] | None = None, models: list[str] | None = None) -> list[Path]:
    """Re-profile the shipped pipeline configurations (every catalogue model at its default frame
    count, CFG, fp16; or at the entry's own ``shipped`` sizes, ``dtype`` and ``kernels``) into
    ``vramplan/profiles/models``."""
    from importlib import resources

    from ..planner.plan import SHIPPED_DIR, pipeline_profile_name
    from ..profiles import model_catalogue

    folder = Path(str(resources.files("vramplan.profiles").joinpath(SHIPPED_DIR)))
    written = []
    for model, entry in model_catalogue().items():
        if models and model not in models:
            continue
        sizes, kernels = entry.get("shipped") or SHIPPED_SIZES, entry.get("kernels") or SHIPPED_KERNELS
        dtype = entry.get("dtype", "fp16")
        for (height, width), kernel in ((s, k) for s in sizes for k in kernels):
            frames = entry["frames"]
            if progress:
                progress(f"profiling the {model} pipeline, {frames} x {height}x{width} ({kernel})")
            prof = pipeline_profile(model, height, width, frames, True, dtype, kernel)
            name = pipeline_profile_name(model, height, width, frames, True, dtype, kernel)
            written.append(prof.save(folder / name))
    return written

