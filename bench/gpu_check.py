"""GPU check: real peak memory and latency of full-size UNets and VAE decoders against the plan's
predictions, then a least-squares fit of the latency model's constants for the card.

For each model (SVD, SVD-XT, AnimateDiff) the UNet and the VAE decoder are built from the shipped
configs with random fp16 weights directly on the GPU (no download), and for each plan of that model
(``vramplan.plan_for`` for the card, and for smaller budgets so that the plan slices) it runs:

- the original call and the planned call: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``
  above what was allocated before the call, against the predicted activation peak (and the peak
  times the allocator factor); latency by CUDA events, after warmup, median of N;
- the unit program segment by segment (original: every unit whole; planned: the plan's segments),
  timing every segment with CUDA events. Each segment's predicted time is linear in the cost
  model's three constants (``planner/costs.py``: 1 / compute efficiency, 1 / bandwidth efficiency,
  seconds per launch; the card's own when its profile is calibrated, else the defaults), so a
  least-squares fit over all timed segments (relative error, non-negative) gives the card's constants.

It writes them as a GPU-profile overlay (``vramplan.planner.schema.GpuOverlay``: the profile they apply
to, the constants with the card named as measured, and the whole measurement) to
``profiles/calibration/<card>.json`` or ``--out``, which ``planner/gpus.py`` applies when it builds the
GPU profiles (also from a folder named by ``VRAMPLAN_CALIBRATION_DIR``); it never edits
``profiles/gpus.json``. A markdown table for ``docs/benchmarks.md`` goes next to it.
It keeps to ``--timeout-budget`` seconds, skipping (and saying so) what would not fit.

    python bench/gpu_check.py                        # every model, the local GPU (NVML), ~3-6 min on an H100
    python bench/gpu_check.py --quick --models svd   # one model, fewer repeats, the card's plan only
    python bench/gpu_check.py --cpu-smoke --out /tmp/c.json   # tiny models on the CPU: exercises every path
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
DEFAULT_MODELS = ("svd", "animatediff", "svd-xt")  # most useful first: later ones are skipped if time runs out
BUILD_SECONDS = 20.0  # allowance for building one full-size component on the GPU (time budget)
SAFETY = 1.5  # uncalibrated predicted latency may be off by this much (time budget)


# ---------------------------------------------------------------------------- data
@dataclass
class Case:
    """One component of one model to check: the real module is built from ``cls`` + ``config``."""

    model: str
    stage: str
    component: str
    cls: str
    config: dict
    profile: object  # ModelProfile
    plans: list[tuple[str, object]]  # (label, ComponentPlan)
    notes: list[str] = field(default_factory=list)


@dataclass
class Row:
    """One call measured against its prediction."""

    model: str
    stage: str
    run: str  # "original" or the plan's label
    segments: int
    max_k: int
    predicted_activation_bytes: int
    allocated_bytes: int | None
    predicted_needed_bytes: int
    reserved_bytes: int | None
    predicted_s: float
    measured_s: float | None
    fitted_s: float | None = None
    features: list = field(default_factory=list, repr=False)  # per segment (compute_s, memory_s, launches)


@dataclass
class Point:
    """One timed segment: its cost-model features and its measured seconds."""

    compute_s: float  # FLOPs at the GPU's peak rate (seconds at 100% efficiency)
    memory_s: float  # bytes at the GPU's peak bandwidth
    launches: float  # kernel launches (slices x kernels)
    seconds: float
    model: str = ""
    run: str = ""


# ---------------------------------------------------------------------------- cost-model features
CONSTANTS = ("compute_efficiency", "bandwidth_efficiency", "launch_seconds")


def with_constants(gpu, compute_efficiency, bandwidth_efficiency, launch_seconds):
    """``gpu`` priced with these latency constants (an efficiency of None: that term costs nothing); the
    host-link efficiency stays the card's."""
    from vramplan.planner.costs import latency_constants

    current = latency_constants(gpu)
    latency = current.model_copy(update={"compute_efficiency": compute_efficiency,
                                         "bandwidth_efficiency": bandwidth_efficiency,
                                         "launch_seconds": launch_seconds})
    return gpu.model_copy(update={"latency": latency})


def segment_features(profile, gpu, segments, host=frozenset()) -> list[tuple[float, float, float]]:
    """(compute_s, memory_s, launches) of each planner segment, such that the cost model's time on ``gpu`` is
    ``compute_s / compute_efficiency + memory_s / bandwidth_efficiency + launches * launch_seconds`` with
    the card's constants (``GpuProfile.latency``, else the defaults of ``planner/costs.py``), plus the
    host-link time of values placed on ``host``, a fixed offset that is not fitted.

    Read off the cost model itself, evaluated on copies of ``gpu`` with one term switched on at a time
    (its efficiency 1 or one second per launch, the others costing nothing), so the features follow
    ``planner/costs.py``; a check refuses them if that model stops being linear in its constants."""
    from vramplan.planner import costs

    def seconds(card) -> list[float]:
        model = costs.CostModel(profile, card, "none")
        return [model.cost(seg, host).seconds - model.cost(seg, host).transfer_s for seg in segments]

    rows = list(zip(seconds(with_constants(gpu, 1.0, None, 0.0)), seconds(with_constants(gpu, None, 1.0, 0.0)),
                    seconds(with_constants(gpu, None, None, 1.0)), strict=True))
    reference = costs.CostModel(profile, gpu, "none")
    constants = current_constants(gpu)
    for f, seg in zip(rows, segments, strict=True):
        want = reference.cost(seg, host).seconds - reference.cost(seg, host).transfer_s
        got = predict(f, constants)
        if not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12):
            raise RuntimeError(f"the cost model is no longer linear in its constants ({got} vs {want} s): "
                               f"update bench/gpu_check.py's features")
    return rows


def current_constants(gpu=None) -> dict[str, float]:
    """The constants ``gpu`` is priced with now (its own when calibrated), or the defaults of
    ``planner/costs.py`` (``gpu`` None); a dropped term's efficiency is infinite."""
    from vramplan.planner import costs

    if gpu is None:
        return {"compute_efficiency": costs.COMPUTE_EFFICIENCY, "bandwidth_efficiency": costs.BANDWIDTH_EFFICIENCY,
                "launch_seconds": costs.LAUNCH_SECONDS}
    c = costs.latency_constants(gpu)
    return {name: math.inf if getattr(c, name) is None else getattr(c, name) for name in CONSTANTS}


def predict(point_features, constants: dict[str, float]) -> float:
    c, b, n = point_features

    def over(x, efficiency):
        return 0.0 if efficiency is None or math.isinf(efficiency) else x / efficiency

    return (over(c, constants["compute_efficiency"]) + over(b, constants["bandwidth_efficiency"])
            + n * constants["launch_seconds"])


def fit_constants(points: list[Point], before: dict[str, float] | None = None) -> dict:
    """Least squares of the relative error, with non-negative coefficients (every subset of the three
    terms is tried; the best feasible one wins): 1/efficiency for compute and memory, seconds per launch.
    ``before``: the constants the points were predicted with (default: the defaults of ``planner/costs.py``)."""
    import numpy as np

    usable = [p for p in points if p.seconds > 0]
    if len(usable) < 3:
        raise ValueError(f"need at least 3 timed segments to fit 3 constants, got {len(usable)}")
    x = np.array([[p.compute_s, p.memory_s, p.launches] for p in usable], dtype=float)
    t = np.array([p.seconds for p in usable], dtype=float)
    a, y = x / t[:, None], np.ones(len(t))  # relative: every segment counts, however short
    best = None
    for mask in range(1, 8):
        cols = [i for i in range(3) if mask >> i & 1]
        if np.linalg.matrix_rank(a[:, cols]) < len(cols):
            continue
        coef, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
        if (coef < 0).any():
            continue
        full = np.zeros(3)
        full[cols] = coef
        residual = float(np.sum((a @ full - y) ** 2))
        if best is None or residual < best[0]:
            best = (residual, full)
    if best is None:
        raise ValueError("no non-negative fit exists for these timings")
    inv_compute, inv_memory, launch = best[1]
    constants = {  # a term the fit drops (coefficient 0) costs nothing: efficiency infinite
        "compute_efficiency": 1 / inv_compute if inv_compute > 0 else math.inf,
        "bandwidth_efficiency": 1 / inv_memory if inv_memory > 0 else math.inf,
        "launch_seconds": float(launch),
    }
    before = before or current_constants()
    after = _errors(usable, constants)
    return {
        "constants": constants,
        "constants_before": dict(before),
        "dropped": [name for name, value in constants.items() if value in (math.inf, 0.0)],
        "points": len(usable),
        "median_abs_rel_error_before": statistics.median(_errors(usable, before)),
        "median_abs_rel_error_after": statistics.median(after),
        "method": "non-negative least squares of relative error over timed segments (each segment's "
                  "predicted time is linear in 1/compute_efficiency, 1/bandwidth_efficiency, launch_seconds)",
    }


def _errors(points: list[Point], constants) -> list[float]:
    return [abs(predict((p.compute_s, p.memory_s, p.launches), constants) / p.seconds - 1) for p in points]


# ---------------------------------------------------------------------------- devices
class Device:
    """Where calls run: CUDA (events, allocator statistics) or the CPU (perf_counter, MemoryTracker)."""

    def __init__(self, torch, cpu: bool):
        self.torch, self.cpu = torch, cpu
        self.name = "cpu" if cpu else "cuda"

    def sync(self) -> None:
        if not self.cpu:
            self.torch.cuda.synchronize()

    def mark(self):
        if self.cpu:
            return time.perf_counter()
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return end - start if self.cpu else start.elapsed_time(end) / 1000

    def memory(self, fn) -> tuple[int, int | None]:
        """Peak bytes allocated (and reserved, on CUDA) by ``fn()`` above what was there before."""
        torch = self.torch
        if self.cpu:
            from vramplan.runtime.memory import MemoryTracker

            with MemoryTracker() as tracker:
                out = fn()
                del out
            return tracker.peak_bytes, None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - allocated, torch.cuda.max_memory_reserved() - reserved

    def time_call(self, fn, warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            self.sync()
            start = self.mark()
            out = fn()
            end = self.mark()
            self.sync()
            del out
            times.append(self.seconds(start, end))
        return statistics.median(times)


# ---------------------------------------------------------------------------- models
def materialise(torch, cls_name: str, config: dict, dtype, device: str, seed: int = 0):
    """A diffusers model from ``config`` with random weights made on ``device`` (no download, no CPU copy).

    Parameters are created on the meta device (as ``runtime/fake.py`` does), then ``to_empty`` gives
    them storage on ``device`` and they are initialised there; buffers (positional tables) keep the
    values the constructor computed."""
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, cls_name)
    with init_empty_weights():  # parameters on meta, buffers real (on the CPU)
        model = cls.from_config(config)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mix_factor"):
                p.fill_(0.5)
            elif p.ndim >= 2:  # linear / conv: unit variance through the layer
                p.copy_(torch.randn(p.shape, generator=gen, device=device) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # norm scales
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, device=device))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen, device=device))
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    from vramplan.runtime.adapters.base import quiet_diffusers

    with quiet_diffusers():
        return model.to(dtype=dtype).eval()


def executor_segments(ops, comp, model):
    """The executor segments of a run (``comp`` None: every unit whole) and the cost model's segments
    for the same run, checked to agree unit for unit."""
    from vramplan.runtime.apply import build_segments
    from vramplan.runtime.executor import unit_by_unit

    if comp is None:
        segments = unit_by_unit(ops)
        planner = whole_units(model.n)
    else:
        segments, _ = build_segments(ops, comp)
        planner = planned_units(model, comp)
    spans = [(len(s.ops), s.k) for s in segments]
    if spans != [(s.stop - s.start + 1, s.k) for s in planner]:
        raise RuntimeError("the executor's segments and the cost model's differ: update bench/gpu_check.py")
    return segments, planner


def time_segments(device: Device, model, adapter, ops, result, args, segments, warmup: int, repeats: int):
    """Median seconds of each segment of one execution of the unit program."""
    import torch
    from vramplan.runtime.executor import execute

    runs = []
    for i in range(warmup + repeats):
        marks: list = []

        @contextlib.contextmanager
        def around(seg, marks=marks):
            start = device.mark()
            yield
            marks.append((start, device.mark()))

        with torch.no_grad():
            binding = adapter.bind(model, *args)
            program = binding.program(ops, result)
            out = execute(program, segments, around_segment=around)
        device.sync()
        del out, program, binding
        if i >= warmup:
            runs.append([device.seconds(s, e) for s, e in marks])
    return [statistics.median(times) for times in zip(*runs, strict=True)]


# ---------------------------------------------------------------------------- cases
def gpu_cases(models, gpu, height: int, width: int, budgets: list[str]) -> list[Case]:
    """Full-size components and their plans from ``plan_for`` (shipped pipeline profiles)."""
    from vramplan.planner.errors import InfeasibleError
    from vramplan.planner.pipelines import pipeline_source
    from vramplan.profiles import model_catalogue

    from vramplan import plan_for
    from vramplan.plots import sliced_stages

    cases: list[Case] = []
    for model in models:
        configs = pipeline_source(model).configs
        by_stage: dict[str, Case] = {}
        notes = []
        entry = model_catalogue().get(model, {})
        size = dict(height=height, width=width)  # a model shipped at its own sizes and dtype (Wan: bf16)
        if entry.get("shipped"):
            size = dict(height=entry["shipped"][0][0], width=entry["shipped"][0][1], dtype=entry.get("dtype", "fp16"),
                        host_ram_gb=256)
        for budget in budgets:
            if budget == "card":
                vram, label = None, f"plan {gpu.name}"
            elif budget == "floor":
                vram = _floor_gib(model, gpu, height, width)
                label = f"plan floor {vram:.2f} GiB"
            else:
                vram, label = float(budget), f"plan {float(budget):g} GiB"
            try:
                plan = plan_for(gpu=gpu.name, model=model, vram_gb=vram, **size)
            except InfeasibleError as err:
                notes.append(f"{label}: infeasible ({str(err).split(':')[0]})")
                continue
            for stage, comp, profile, _ in sliced_stages(plan):
                cfg = configs[stage.component]
                if not hasattr(__import__("diffusers"), cfg["_class_name"]):  # UMT5: built by transformers
                    notes.append(f"{stage.stage}: {cfg['_class_name']} is not built here (not a diffusers model)")
                    continue
                # a stage under another plan at another budget (the decode along rows at the floor) is its own case
                case = by_stage.setdefault(f"{stage.stage}:{stage.plan_name}", Case(
                    model, stage.stage, stage.plan_name, cfg["_class_name"], cfg, profile, []))
                case.plans.append((label, comp))
        for case in by_stage.values():
            case.notes += notes
        cases += by_stage.values()
    return cases


def _floor_gib(model: str, gpu, height: int, width: int) -> float:
    """A budget just above the smallest plan's peak (read from the planner's refusal of a tiny budget)."""
    from vramplan.planner.errors import InfeasibleError
    from vramplan.profiles import model_catalogue

    from vramplan import plan_for

    entry = model_catalogue().get(model, {})
    size = dict(height=height, width=width)
    if entry.get("shipped"):
        size = dict(height=entry["shipped"][0][0], width=entry["shipped"][0][1], dtype=entry.get("dtype", "fp16"),
                    host_ram_gb=256)
    try:
        plan_for(gpu=gpu.name, model=model, vram_gb=0.5, **size)
    except InfeasibleError as err:
        vram = err.min_peak_bytes / GIB * 1.02 + 0.02  # + the 2% margin the plan keeps
    else:
        return 0.5
    for _ in range(32):  # the stated floor is a bound (SVD's with the decode along rows: 0.79 GiB, 0.91 plans)
        try:
            plan_for(gpu=gpu.name, model=model, vram_gb=vram, **size)
            return vram
        except InfeasibleError:
            vram += 0.01
    return vram


SMOKE = {  # model -> [(stage, class, tiny config name in runtime/tiny.py, batch, frames)]
    "svd": [("denoise", "UNetSpatioTemporalConditionModel", "TINY_UNET", 2, 3),
            ("decode", "AutoencoderKLTemporalDecoder", "TINY_VAE", 1, 3)],
    "svd-xt": [("denoise", "UNetSpatioTemporalConditionModel", "TINY_UNET", 2, 5)],
    "animatediff": [("denoise", "UNetMotionModel", "TINY_MOTION_UNET", 2, 3),
                    ("decode", "AutoencoderKL", "TINY_SD_VAE", 1, 3)],
    # Wan: the DiT (CFG as two batch-1 calls); diffusers' own tiny test config
    "wan2.1-t2v-1.3b": [("denoise", "WanTransformer3DModel", {
        "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
        "out_channels": 4, "text_dim": 16, "freq_dim": 256, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32}, 1, 3)],
}


def smoke_cases(models, gpu) -> list[Case]:
    """Tiny components (``runtime/tiny.py``) on the CPU in fp32: profiled on meta, planned at the
    GPU's memory and at half the original activation peak (so that the plan slices)."""
    import diffusers
    import torch
    from vramplan.planner.errors import InfeasibleError
    from vramplan.planner.plan import make_plan
    from vramplan.planner.schema import SampleShape
    from vramplan.runtime import tiny
    from vramplan.runtime.fake import empty_model
    from vramplan.runtime.profiler import profile

    cases = []
    for model in models:
        for stage, cls_name, config_name, batch, frames in SMOKE[model]:
            config = dict(config_name if isinstance(config_name, dict) else getattr(tiny, config_name))
            shape = SampleShape(batch=batch, frames=frames, latent_height=8, latent_width=8, dtype="fp32")
            meta = empty_model(getattr(diffusers, cls_name), config, torch.float32)
            prof = profile(meta, shape, "cpu_flash", name=f"tiny-{model}", max_k=4, progress=lambda _: None)
            case = Case(model, stage, prof.component, cls_name, config, prof, [])
            base = gpu.cuda_context_bytes + prof.weight_bytes
            for label, fraction in (("plan card", None), ("plan 0.5x", 0.5)):
                usable = None if fraction is None else int((base + prof.original_peak_bytes * fraction) / 0.98) + 1
                try:
                    plan = make_plan(prof, gpu, usable_bytes=usable, allocator="none")
                except InfeasibleError:
                    case.notes.append(f"{label}: infeasible")
                    continue
                case.plans.append((label, plan.components[0]))
            cases.append(case)
    return cases


# ---------------------------------------------------------------------------- the check
def estimate_seconds(case: Case, gpu, warmup: int, repeats: int, build: float = BUILD_SECONDS) -> float:
    """What checking ``case`` may take: build + calls + segment runs at the uncalibrated prediction x SAFETY."""
    from vramplan.planner.costs import CostModel

    model = CostModel(case.profile, gpu, "none")
    calls = [sum(model.cost(s).seconds for s in whole_units(model.n))]
    for _, comp in case.plans:
        calls.append(sum(model.cost(s).seconds for s in planned_units(model, comp)))
    per_run = sum(calls)
    return build + SAFETY * per_run * (2 * (warmup + repeats) + 1)


def whole_units(n: int):
    """Cost-model segments of the unmodified program: every unit whole."""
    from vramplan.planner.costs import Segment

    return [Segment(i, i, 1) for i in range(n)]


def planned_units(model, comp):
    """Cost-model segments of a component plan (torch-free: also used for the time estimate)."""
    from vramplan.planner.costs import Segment

    group_at = {g.units[0]: g for g in comp.groups}
    out, i = [], 0
    while i < model.n:
        name = model.units[i].name
        size = len(group_at[name].units) if name in group_at else 1
        k = comp.k(name) if model.units[i].axis else 1
        depth = group_at[name].depth if name in group_at else 1
        out.append(Segment(i, i + size - 1, k, depth=depth))
        i += size
    return out


def check_case(case: Case, device: Device, gpu, dtype, warmup: int, repeats: int, points: list[Point],
               deadline: float) -> tuple[list[Row], list[str]]:
    """Build the component, run original and planned calls, time their segments. Variants that would
    start after ``deadline`` (perf_counter) are skipped and named."""
    import torch
    from vramplan.planner.costs import CostModel
    from vramplan.runtime.adapters.base import adapter_for
    from vramplan.runtime.apply import apply_plan

    planned = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[case.profile.shape.dtype]
    module = materialise(torch, case.cls, case.config, dtype if device.cpu else planned, device.name)
    adapter = adapter_for(module, case.profile.component)  # a VAE's encode case runs its encode adapter
    ops, result = adapter.ops(module)
    cost = CostModel(case.profile, gpu, "none" if device.cpu else "expandable_segments")
    shape = next((comp.shape for _, comp in case.plans), case.profile.shape)
    args = adapter.example_inputs(module, shape, device=device.name)

    def call():  # looked up at each call: the plan replaces the entry method while it is applied
        return getattr(module, adapter.method)(*args)

    rows, skipped = [], []
    for label, comp in [("original", None), *case.plans]:
        if time.perf_counter() > deadline:
            skipped.append(f"{case.model} {case.stage} {label}: skipped, out of time")
            continue
        segments, planned = executor_segments(ops, comp, cost)
        if comp is None:
            act = case.profile.original_peak_bytes
            needed = int(act * (1.0 if device.cpu else case.profile.allocator.original_expandable_segments))
        else:
            costs = [cost.cost(s, frozenset(comp.host), frozenset(comp.streamed)) for s in planned]
            act, needed = max(c.activation_bytes for c in costs), max(c.needed_bytes for c in costs)
        features = segment_features(case.profile, gpu, planned, frozenset(comp.host) if comp else frozenset())
        predicted = sum(predict(f, current_constants(gpu)) for f in features)
        with apply_plan(module, comp) if comp is not None else contextlib.nullcontext(), torch.no_grad():
            # timed first: the memory run then finds cuBLAS/cuDNN handles and workspaces already made
            measured = device.time_call(call, warmup, repeats)
            allocated, reserved = device.memory(call)
        times = time_segments(device, module, adapter, ops, result, args, segments, min(warmup, 1), repeats)
        points += [Point(*f, t, case.model, f"{case.stage} {label}") for f, t in zip(features, times, strict=True)]
        rows.append(Row(case.model, case.stage, label, len(segments), max(s.k for s in segments), act, allocated,
                        needed, reserved, predicted, measured, features=features))
    return rows, skipped


# ---------------------------------------------------------------------------- output
def markdown(rows: list[Row], fit: dict | None, header: dict, skipped: list[str]) -> str:
    sizes = [n for r in rows for n in (r.predicted_activation_bytes, r.allocated_bytes) if n]
    unit, scale = ("GiB", GIB) if not sizes or max(sizes) >= GIB / 4 else ("MiB", 2**20)

    def gib(n):
        return "-" if n is None else f"{n / scale:.2f}"

    def err(measured, predicted):
        return "" if not measured else f" ({(predicted / measured - 1) * 100:+.1f}%)"

    def ms(s):
        return "-" if s is None else f"{s * 1000:.1f}"

    lines = [
        f"GPU check on **{header['device']}** (profile {header['card']}), {header['dtype']}, torch {header['torch']}, "
        f"{header['date']}; latency: median of {header['repeats']} after {header['warmup']} warmup "
        f"({'perf_counter' if header['cpu'] else 'CUDA events'}).",
        "",
        f"| model | stage | run | segments / max k | predicted act. {unit} | allocated {unit} (pred. err) | "
        f"predicted needed {unit} | reserved {unit} | predicted ms | measured ms | fitted ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.stage} | {r.run} | {r.segments} / {r.max_k} | {gib(r.predicted_activation_bytes)} | "
            f"{gib(r.allocated_bytes)}{err(r.allocated_bytes, r.predicted_activation_bytes)} | "
            f"{gib(r.predicted_needed_bytes)} | {gib(r.reserved_bytes)} | {ms(r.predicted_s)} | {ms(r.measured_s)} | "
            f"{ms(r.fitted_s)} |"
        )
    if fit is not None:
        c, old = fit["constants"], fit["constants_before"]
        dropped = f" (dropped by the fit: {', '.join(fit['dropped'])})" if fit["dropped"] else ""
        lines += ["", f"Fitted over {fit['points']} timed segments{dropped}: compute efficiency "
                      f"{c['compute_efficiency']:.3f} "
                      f"(was {old['compute_efficiency']}), bandwidth efficiency {c['bandwidth_efficiency']:.3f} "
                      f"(was {old['bandwidth_efficiency']}), launch {c['launch_seconds'] * 1e6:.1f} µs "
                      f"(was {old['launch_seconds'] * 1e6:.0f}); median |error| per segment "
                      f"{fit['median_abs_rel_error_before'] * 100:.0f}% before, "
                      f"{fit['median_abs_rel_error_after'] * 100:.0f}% after."]
    lines += [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def _finite(value):
    """JSON has no infinity: a dropped term's efficiency is written as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and math.isinf(value) else value


def overlay(gpu, fit: dict | None, record: dict) -> dict:
    """The GPU-profile overlay ``planner/gpus.py`` applies (``vramplan.planner.schema.GpuOverlay``): the
    profile the constants belong to, the fitted constants with the card named as measured (None when
    nothing was fitted), and the whole record; checked against the schema before it is written."""
    from vramplan.planner.costs import latency_constants
    from vramplan.planner.schema import GpuOverlay, LatencyConstants, LatencySource

    latency = None
    if fit is not None:
        c = fit["constants"]
        latency = LatencyConstants(
            compute_efficiency=None if math.isinf(c["compute_efficiency"]) else c["compute_efficiency"],
            bandwidth_efficiency=None if math.isinf(c["bandwidth_efficiency"]) else c["bandwidth_efficiency"],
            launch_seconds=c["launch_seconds"],
            link_efficiency=latency_constants(gpu).link_efficiency,  # not measured here: the card's as it was
            source=LatencySource(card=record["device_name"], date=record["measured_at"], tool="bench/gpu_check.py",
                                 smoke=record["smoke"]),
        )
    data = GpuOverlay(gpu=gpu.name, latency=latency, measurement=_finite(record)).model_dump(mode="json")
    GpuOverlay.model_validate(data)
    return data


def default_out(gpu, smoke: bool) -> Path:
    """``profiles/calibration/<card>.json`` (read by ``planner/gpus.py``); a smoke run's numbers mean
    nothing, so it goes to ``out/gpu_check-smoke/`` instead."""
    folder = REPO / "out" / "gpu_check-smoke" if smoke else REPO / "profiles" / "calibration"
    return folder / f"{slug(gpu.name)}.json"


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")


# ---------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated: svd, svd-xt, animatediff")
    p.add_argument("--gpu", default="auto", help='GPU profile to plan for and calibrate: "auto" (NVML) or a name')
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--budgets", default="floor,11,card",
                   help='plans to run, in this order: "floor" (the smallest plan), budgets in GiB, "card" (the '
                        "GPU's memory); default floor,11,card")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per run (median)")
    p.add_argument("--timeout-budget", type=float, default=360.0,
                   help="seconds for the whole check; what would not fit is skipped (default 360)")
    p.add_argument("--quick", action="store_true", help="2 repeats; the smallest plan and the card's only")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU in fp32 (no CUDA needed)")
    p.add_argument("--out", help="GPU-profile overlay JSON (default profiles/calibration/<card>.json, which "
                                 "planner/gpus.py applies; --cpu-smoke: out/gpu_check-smoke/<card>.json)")
    p.add_argument("--markdown", help="markdown table file (default: next to the JSON, .md)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in SMOKE]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(SMOKE)}")
    if args.quick:
        args.warmup, args.repeats, args.budgets = 1, 2, "floor,card"
    if args.cpu_smoke:
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
        if args.gpu == "auto":
            args.gpu = "RTX 4090"  # any profile: the smoke run exercises the code, its numbers mean nothing
    args.budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if not args.cpu_smoke:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # what plans assume
    import torch
    from vramplan.planner.errors import VramplanError
    from vramplan.planner.gpus import find_gpu

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA device; run with --cpu-smoke to exercise the check on tiny models", file=sys.stderr)
        return 2
    try:
        gpu = find_gpu(args.gpu)
    except VramplanError as err:
        if args.gpu != "auto" or args.cpu_smoke:
            print(f"error: {err}", file=sys.stderr)
            return 2
        gpu = find_gpu(torch.cuda.get_device_name())  # no NVML: the name CUDA reports
    device = Device(torch, cpu=args.cpu_smoke)
    dtype = torch.float32 if args.cpu_smoke else torch.float16
    if args.cpu_smoke:
        torch.set_num_threads(1)
    cases = smoke_cases(args.models, gpu) if args.cpu_smoke else gpu_cases(args.models, gpu, args.height, args.width,
                                                                            args.budgets)
    rows: list[Row] = []
    points: list[Point] = []
    skipped: list[str] = []
    for case in cases:
        skipped += [f"{case.model} {case.stage}: {n}" for n in case.notes]
        estimate = estimate_seconds(case, gpu, args.warmup, args.repeats, 1.0 if args.cpu_smoke else BUILD_SECONDS)
        elapsed = time.perf_counter() - started
        if elapsed + estimate > args.timeout_budget:
            skipped.append(f"{case.model} {case.stage}: skipped, would take ~{estimate:.0f} s with "
                           f"{args.timeout_budget - elapsed:.0f} s of the budget left")
            continue
        print(f"[{elapsed:6.1f} s] {case.model} {case.stage}: {len(case.plans)} plan(s), estimate {estimate:.0f} s",
              flush=True)
        try:
            done, missed = check_case(case, device, gpu, dtype, args.warmup, args.repeats, points,
                                      started + args.timeout_budget)
            rows += done
            skipped += missed
        except torch.OutOfMemoryError as err:
            skipped.append(f"{case.model} {case.stage}: out of memory ({str(err).splitlines()[0]})")
        gc.collect()
        if not args.cpu_smoke:
            torch.cuda.empty_cache()
    fit = None
    try:
        fit = fit_constants(points, current_constants(gpu))
    except ValueError as err:
        skipped.append(f"no fit: {err}")
    if fit is not None:
        for row in rows:
            row.fitted_s = sum(predict(f, fit["constants"]) for f in row.features)
    header = {
        "device": "CPU (smoke run, tiny models)" if args.cpu_smoke else torch.cuda.get_device_name(),
        "card": gpu.name, "dtype": "fp32" if args.cpu_smoke else "fp16", "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "warmup": args.warmup,
        "repeats": args.repeats, "cpu": args.cpu_smoke,
    }
    table = markdown(rows, fit, header, skipped)
    print("\n" + table)
    out = Path(args.out) if args.out else default_out(gpu, args.cpu_smoke)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "card": gpu.name,
        "device_name": header["device"],
        # the peaks the efficiencies are fractions of
        "gpu_profile": gpu.model_dump(include={"name", "fp16_tensor_tflops", "fp32_tflops", "memory_bandwidth_gbps",
                                               "compute_capability", "attention_kernels"}),
        "smoke": args.cpu_smoke,
        "measured_at": header["date"],
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "shape": {"height": args.height, "width": args.width, "dtype": header["dtype"]},
        "constants_before": current_constants(gpu),
        "fit": fit,
        "rows": [{k: v for k, v in asdict(r).items() if k != "features"} for r in rows],
        "skipped": skipped,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.write_text(json.dumps(overlay(gpu, fit, record), indent=1) + "\n")
    md = Path(args.markdown) if args.markdown else out.with_suffix(".md")
    md.write_text(table)
    print(f"wrote {out} and {md} in {record['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
