"""``compare(plan)``: the original pipeline and the planned run on the same seed, side by side.

Quality per frame (PSNR and SSIM of the planned frames against the original's), UNet FLOPs
(PyTorch's counter, plus the CPU fused attention it counts as zero: matmul, convolution and
attention FLOPs of every call of the UNet, full or reuse) and wall-clock time, as ratios. Slicing alone leaves the frames equal up to float
rounding; Step Rehash is the approximation this measures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..planner.schema import Plan, RehashPlan, RunReport
from .hooks import Hook, register_hook
from .runner import run


@dataclass
class Comparison:
    psnr: list[float]  # per frame, dB (inf: identical)
    ssim: list[float]
    original_unet_flops: int
    planned_unet_flops: int
    original_seconds: float
    planned_seconds: float
    original_unet_seconds: float
    planned_unet_seconds: float
    report: RunReport
    frames: object = field(repr=False, default=None)
    original_frames: object = field(repr=False, default=None)

    @property
    def original(self) -> Original:
        """The unplanned run, to pass to the next ``compare`` of the same call."""
        return Original(self.original_frames, self.original_unet_flops, self.original_seconds,
                        self.original_unet_seconds)

    @property
    def flops_ratio(self) -> float:
        return self.original_unet_flops / max(1, self.planned_unet_flops)

    @property
    def speedup(self) -> float:
        return self.original_seconds / self.planned_seconds

    @property
    def unet_speedup(self) -> float:
        return self.original_unet_seconds / self.planned_unet_seconds

    def summary(self) -> str:
        finite = [p for p in self.psnr if p != float("inf")]
        mean_psnr = sum(finite) / len(finite) if finite else float("inf")
        lines = [
            f"frames      {len(self.psnr)}: PSNR {mean_psnr:.2f} dB mean (min {min(self.psnr):.2f}), "
            f"SSIM {sum(self.ssim) / len(self.ssim):.4f} mean (min {min(self.ssim):.4f}) vs the original",
            "  per frame PSNR " + " ".join(f"{p:.1f}" for p in self.psnr),
            "  per frame SSIM " + " ".join(f"{s:.3f}" for s in self.ssim),
            f"UNet FLOPs  {self.original_unet_flops / 1e9:.2f} -> {self.planned_unet_flops / 1e9:.2f} GFLOP "
            f"({self.flops_ratio:.2f}x fewer)",
            f"wall clock  {self.original_seconds:.2f} s -> {self.planned_seconds:.2f} s ({self.speedup:.2f}x); "
            f"UNet {self.original_unet_seconds:.2f} s -> {self.planned_unet_seconds:.2f} s ({self.unet_speedup:.2f}x)",
        ]
        if self.report.reused_steps:
            lines.append(f"rehash      key steps {self.report.key_steps}, reused {self.report.reused_steps}")
        return "\n".join(lines)


@dataclass
class Original:
    """What the unplanned pipeline did for one call (reusable across plans with the same call)."""

    frames: object
    unet_flops: int
    seconds: float
    unet_seconds: float


def compare(plan: Plan, pipe, *, seed: int = 0, original: Original | None = None, **call_kwargs) -> Comparison:
    """Run ``pipe`` as is and under ``plan`` with the same seed (``call_kwargs``: image or prompt...).

    FLOPs and frames come from runs under PyTorch's FLOP counter (the planned one through
    ``run``, which also checks the call and reports the steps); wall-clock times from runs without
    any counter or tracker. ``original``: the unplanned run of the same call, if already made."""
    from .adapters import pipeline_adapter
    from .rehash import flop_counter
    from .runner import _call_arguments

    call_kwargs.setdefault("output_type", "pt")
    if plan.rehash is not None:
        call_kwargs.setdefault("num_inference_steps", plan.rehash.steps)
    unet_name = type(pipe.unet).__name__
    with flop_counter() as counter:
        planned = run(plan, pipe=pipe, generator=torch.Generator().manual_seed(seed), progress=False, **call_kwargs)
    planned_flops = sum(counter.get_flop_counts().get(unet_name, {}).values())
    kwargs = _call_arguments(plan, dict(call_kwargs), pipeline_adapter(type(pipe).__name__))
    if original is None:
        with flop_counter() as counter, torch.no_grad():
            frames = pipe(generator=torch.Generator().manual_seed(seed), **kwargs).frames
        flops = sum(counter.get_flop_counts().get(unet_name, {}).values())
        original = Original(frames, int(flops), *_timed(pipe, None, seed, kwargs))
    planned_seconds, planned_unet = _timed(pipe, plan, seed, kwargs)
    from .trained import psnr, ssim  # per frame, on videos in [-1, 1]

    a, b = _video(original.frames) * 2 - 1, _video(planned.frames) * 2 - 1
    return Comparison(
        psnr=[round(float(v), 3) for v in psnr(b, a)],
        ssim=[round(float(v), 5) for v in ssim(b, a)],
        original_unet_flops=original.unet_flops,
        planned_unet_flops=int(planned_flops),
        original_seconds=original.seconds,
        planned_seconds=planned_seconds,
        original_unet_seconds=original.unet_seconds,
        planned_unet_seconds=planned_unet,
        report=planned.report,
        frames=planned.frames,
        original_frames=original.frames,
    )


class _UNetTimer(Hook):
    """Wall-clock and this thread's CPU seconds of the UNet's calls (CPU time: what a one-thread run costs
    on a machine shared with other jobs, where wall clock also counts the waits)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def wrap(self, module, call_next, args, kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return call_next(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.thread_time() - c0


def _timed(pipe, plan: Plan | None, seed: int, kwargs: dict, timer: _UNetTimer | None = None) -> tuple[float, float]:
    """Seconds of one pipeline call (original, or with the plan's hooks attached) and of its UNet calls
    (``timer``: the UNet timer to use, which also counts CPU seconds)."""
    from contextlib import ExitStack

    from .apply import apply_plan
    from .rehash import apply_rehash

    timer = timer or _UNetTimer()
    with ExitStack() as stack, torch.no_grad():
        for comp in plan.components if plan is not None else ():
            if plan.rehash is not None and comp.component == "unet":
                stack.callback(apply_rehash(pipe, plan).remove)
            elif comp.shape is not None:
                stack.callback(apply_plan(getattr(pipe, comp.module_name), comp).remove)
        stack.callback(register_hook(pipe.unet, timer, "vramplan.compare.timer").remove)
        started = time.perf_counter()
        pipe(generator=torch.Generator().manual_seed(seed), **kwargs)
        return time.perf_counter() - started, timer.seconds


def _video(frames) -> torch.Tensor:
    """``[T, C, H, W]`` in [0, 1] from a pipeline's ``pt`` output (first video of the batch)."""
    t = frames[0] if isinstance(frames, torch.Tensor) and frames.dim() == 5 else frames
    if not isinstance(t, torch.Tensor):
        import numpy as np

        t = torch.from_numpy(np.stack([np.asarray(f, dtype=np.float32) / 255.0 for f in t])).permute(0, 3, 1, 2)
    return t.float().clamp(0, 1)


def side_by_side(result: Comparison, path: str | Path, fps: int = 7, scale: int = 4) -> Path:
    """A GIF of the original (left) and the planned video (right), a white column apart, enlarged
    ``scale`` times (nearest neighbour: tiny videos stay crisp)."""
    from .runner import save_video

    a, b = _video(result.original_frames), _video(result.frames)
    gap = torch.ones(a.shape[0], a.shape[1], a.shape[2], 1)
    video = torch.cat([a, gap, b], dim=3)
    if scale > 1:
        video = torch.nn.functional.interpolate(video, scale_factor=scale, mode="nearest")
    return save_video(video, path, fps=fps)


def schedule_plan(cut: str, key_steps, steps: int, mode: str = "optimal", half_steps=()) -> RehashPlan:
    """A bare rehash schedule (no slicing, no prediction) to run with :func:`rehash_video`."""
    return RehashPlan(mode=mode, cut=cut, steps=steps, key_steps=list(key_steps), quality="calibrated",
                      original_unet_flops=1, unet_flops=1, cache_bytes=0, half_steps=list(half_steps))


def rehash_video(pipe, rehash: RehashPlan | None, *, seed: int = 0, **call_kwargs) -> torch.Tensor:
    """The first video of one call of ``pipe`` (``[F, 3, H, W]`` in [-1, 1]) under the schedule ``rehash``
    on its stock UNet, or as is (None): what the quality predictor is measured against."""
    from .rehash import apply_rehash

    handle = apply_rehash(pipe, rehash) if rehash is not None else None
    try:
        with torch.no_grad():
            out = pipe(generator=torch.Generator().manual_seed(seed), output_type="pt", **call_kwargs).frames
    finally:
        if handle is not None:
            handle.remove()
    return _video(out) * 2 - 1
