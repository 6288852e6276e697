"""Calibrate Step Rehash on the user's pipeline: one full trajectory, measured at every candidate cut.

At every denoising step the whole UNet runs (keeping every candidate cut: ``keep``), so the
trajectory is the original one. Per cut we record the cosine similarity of its feature to every
earlier step's (on at most a million evenly strided values per feature, in host memory), and, for
the last ``max_gap`` steps ``a`` (whose whole features are parked in host memory),
the relative L2 error of the *guided* noise prediction when this step reuses step ``a``'s feature
(the reuse program run on this step's inputs). Guidance is applied as the pipeline does:
``uncond + scale * (cond - uncond)`` with the pipeline's ``guidance_scale`` (per frame for SVD).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..planner.errors import PlanMismatchError
from ..planner.rehash import DEFAULT_MAX_GAP, Calibration, CutCalibration, RehashCutError, SchedulerOrderError
from ..planner.schema import Plan, SampleShape
from .adapters.base import adapter_for
from .apply import component_for, dtype_name, fingerprint
from .executor import Segment, execute
from .program import Program
from .rehash import execute_keeping, rehash_cuts, reuse_ops

log = logging.getLogger(__name__)


def calibrate(
    pipe,
    *,
    num_inference_steps: int | None = None,
    plan: Plan | None = None,
    cuts: list[str] | None = None,
    max_gap: int = DEFAULT_MAX_GAP,
    seed: int = 0,
    model_name: str | None = None,
    **call_kwargs,
) -> Calibration:
    """Run ``pipe`` once (``call_kwargs``: image or prompt, height, width, num_frames...) and measure
    every candidate cut of its UNet. With ``plan`` the size and steps come from the plan (and the
    UNet runs with the plan's slice counts, ungrouped, so that every cut exists whole)."""
    unet = pipe.unet
    order = getattr(pipe.scheduler, "order", 1)
    if order != 1:
        raise SchedulerOrderError(
            f"{type(pipe.scheduler).__name__} calls the UNet {order} times per step; Step Rehash (and its "
            f"calibration) needs a first-order scheduler (Euler, DDIM, DPM++ 2M)."
        )
    slices: dict[str, int] = {}
    if plan is not None:
        comp = component_for(unet, plan)
        slices = dict(comp.slices)
        for key, value in (("height", plan.height), ("width", plan.width), ("num_frames", plan.frames)):
            if value is not None:
                call_kwargs.setdefault(key, value)
        if num_inference_steps is None and plan.rehash is not None:
            num_inference_steps = plan.rehash.steps
        elif num_inference_steps is None and plan.target is not None:
            num_inference_steps = plan.target.steps
        if plan.frames:
            call_kwargs.setdefault("decode_chunk_size", plan.frames)
    if num_inference_steps is None:
        raise PlanMismatchError("calibrate needs num_inference_steps (or a plan with steps)")
    adapter = adapter_for(unet)
    ops, result = adapter.ops(unet)
    candidates = rehash_cuts(unet)
    unknown = [c for c in cuts or () if c not in candidates]
    if unknown:
        raise RehashCutError(f"not rehash cuts of this UNet: {', '.join(unknown)}; its cuts: {', '.join(candidates)}")
    cuts = list(cuts) if cuts else candidates
    segments = [Segment([op], op.spec.axis, slices.get(op.name, 1) if op.spec.axis else 1) for op in ops]
    reuse = {c: reuse_ops(ops, result, c) for c in cuts}
    reuse_segs = {c: [Segment([op], op.spec.axis, slices.get(op.name, 1) if op.spec.axis else 1) for op in r]
                  for c, r in reuse.items()}
    layouts = {op.output: op.layout for op in ops}
    n = num_inference_steps
    sim = {c: [[1.0 if a == s else 0.0 for s in range(n)] for a in range(n)] for c in cuts}
    err: dict[str, list[list[float | None]]] = {c: [[None] * n for _ in range(n)] for c in cuts}
    sketches: dict[str, list[torch.Tensor]] = {c: [] for c in cuts}  # every step, at most SKETCH values
    window: dict[str, dict[int, torch.Tensor]] = {c: {} for c in cuts}  # the last max_gap steps, whole
    state = {"step": 0, "shape": None}

    def forward(*args, **kwargs):
        s = state["step"]
        if s >= n:
            raise SchedulerOrderError(f"more UNet calls than the {n} steps: the scheduler makes several per step")
        binding = adapter.bind(unet, *args, **kwargs)
        state["shape"] = binding.shape
        program = binding.program(ops, result)
        out, kept = execute_keeping(program, segments, set(cuts))
        guided = _guided(pipe, _tensor(out))
        for c in cuts:
            feature = kept[c]
            here = _sketch(feature)
            for a, before in enumerate(sketches[c]):
                sim[c][a][s] = sim[c][s][a] = _cosine(before, here)
            for a in range(max(0, s - max_gap), s):
                cached = window[c][a].to(feature.device)
                b = adapter.bind(unet, *args, **kwargs)
                p = Program(reuse[c], {**b.env, c: cached}, {**b.layouts, c: layouts[c]}, result, b.finish, b.globals)
                approx = _guided(pipe, _tensor(execute(p, reuse_segs[c])))
                err[c][a][s] = float((approx - guided).float().norm() / guided.float().norm().clamp_min(1e-12))
            sketches[c].append(here)
            window[c][s] = feature.detach().to("cpu")
            window[c].pop(s - max_gap, None)
        state["step"] = s + 1
        return out

    saved = unet.__dict__.get("forward")
    unet.forward = forward
    try:
        with torch.no_grad():
            pipe(num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed),
                 **call_kwargs)
    finally:
        if saved is None:
            del unet.forward
        else:
            unet.forward = saved
    if state["step"] != n:
        raise SchedulerOrderError(f"the pipeline made {state['step']} UNet calls for {n} steps")
    shape = state["shape"]
    return Calibration(
        model=fingerprint(unet, model_name),
        shape=SampleShape(batch=shape["batch"], frames=shape["frames"], latent_height=shape["latent_height"],
                          latent_width=shape["latent_width"], dtype=dtype_name(shape["dtype"])),
        pipeline=type(pipe).__name__,
        scheduler=type(pipe.scheduler).__name__,
        steps=n,
        max_gap=max_gap,
        seed=seed,
        cuts=[CutCalibration(cut=c, similarity=_round(sim[c]), error=_round(err[c])) for c in cuts],
    )


def _round(matrix):
    return [[None if v is None else round(v, 6) for v in row] for row in matrix]


def _tensor(out) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else out[0]


def _guided(pipe, noise: torch.Tensor) -> torch.Tensor:
    """The noise prediction after classifier-free guidance, as the pipeline combines it."""
    if not getattr(pipe, "do_classifier_free_guidance", False):
        return noise
    uncond, cond = noise.chunk(2)
    scale = pipe.guidance_scale
    if isinstance(scale, torch.Tensor):
        scale = scale.to(noise.device, noise.dtype)
    return uncond + scale * (cond - uncond)


SKETCH = 1 << 20


def _sketch(feature: torch.Tensor) -> torch.Tensor:
    """The feature flattened (fp32, host), or an evenly strided subset of SKETCH values of a larger one:
    the similarity of full-size features is estimated on a million values instead of holding every
    step of every cut."""
    flat = feature.detach().flatten()
    if flat.numel() > SKETCH:
        flat = flat[:: flat.numel() // SKETCH][:SKETCH]
    return flat.to("cpu", torch.float32)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))


def plot_calibration(cal: Calibration, path: str | Path, cuts: list[str] | None = None) -> Path:
    """Heatmaps of step-to-step similarity per cut (as the paper's Fig. 5), and the reuse error by gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [cal.cut(c) for c in cuts] if cuts else cal.cuts
    cols = min(4, len(chosen))
    rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, entry in zip(axes.flat, chosen, strict=False):
        im = ax.imshow(entry.similarity, vmin=min(min(r) for r in entry.similarity), vmax=1.0, cmap="viridis")
        ax.set_title(entry.cut.replace("up_blocks.", "up.").replace("temporal_res_block.", "t."), fontsize=7)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    fig.suptitle(f"cosine similarity of the cut feature between steps ({cal.pipeline}, {cal.steps} steps)",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_path(cal: Calibration, name: str | None = None) -> Path:
    """Where a calibration lives by default: beside the cached profiles."""
    from .profiler import writable_cache_dir

    s = cal.shape
    label = (name or cal.model.name or cal.model.class_name).replace("/", "_")
    stem = f"calibration-{label}-{s.frames}x{s.latent_height}x{s.latent_width}-{cal.steps}steps-{cal.model.config_hash[:12]}"
    return writable_cache_dir() / f"{stem}.json"
