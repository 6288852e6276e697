"""Calibrate Step Rehash on the user's pipeline: one full trajectory, measured at every candidate cut.

At every denoising step the whole model (UNet or DiT) runs (keeping every candidate cut: ``keep``),
so the trajectory is the original one. Per cut we record the cosine similarity of what it caches (a
feature, or a DiT residual span's ``end - start``) to every earlier step's (on at most a million
evenly strided values, in host memory), and, for the last ``max_gap`` steps ``a`` (whose whole
caches are parked in host memory), the relative L2 error of the *guided* noise prediction when this
step reuses step ``a``'s cache (the reuse program run on this step's inputs). Guidance is applied as
the pipeline does: ``uncond + scale * (cond - uncond)`` with the pipeline's ``guidance_scale`` (per
frame for SVD) when one call holds the CFG batch; as the pipeline combined its calls when it makes
several per step (Wan).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ..planner.errors import PlanMismatchError, UnsupportedArgumentError
from ..planner.rehash import (
    DEFAULT_MAX_GAP,
    Calibration,
    CfgReuseError,
    CutCalibration,
    RehashCutError,
    SchedulerOrderError,
    cfg_split,
    cut_values,
)
from ..planner.schema import Plan, SampleShape
from .adapters.base import adapter_for
from .apply import component_for, dtype_name, fingerprint
from .executor import Segment, execute
from .program import Program
from .rehash import cache_name, cache_of, cfg_cuts, execute_keeping, rehash_cuts, reuse_ops

log = logging.getLogger(__name__)


def denoiser(pipe):
    """The pipeline's per-step model: its UNet, or its DiT (``transformer``)."""
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if model is None:
        raise UnsupportedArgumentError(f"{type(pipe).__name__} has neither a UNet nor a transformer to calibrate")
    if getattr(pipe, "transformer_2", None) is not None:
        raise UnsupportedArgumentError(
            f"{type(pipe).__name__} switches to a second transformer for the low-noise steps (Wan 2.2 A14B); "
            f"Step Rehash calibrates one denoiser per trajectory. Plan without rehash.")
    return model


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
    every candidate cut of its UNet or DiT (a DiT's residual cuts: the cached value is the span's
    residual). With ``plan`` the size and steps come from the plan (and the model runs with the plan's
    slice counts, ungrouped, so that every cut exists whole).

    A pipeline may call the model several times per step (Wan's classifier-free guidance: a conditional
    and an unconditional call); each call reuses its own cache, as at run time, and the error is that
    of the noise prediction the pipeline hands its scheduler, combined from the calls as the pipeline
    combined them (the coefficients are fitted on the full run and checked to reproduce it)."""
    unet = denoiser(pipe)
    cuts_given = bool(cuts)
    order = getattr(pipe.scheduler, "order", 1)
    if order != 1:
        raise SchedulerOrderError(
            f"{type(pipe.scheduler).__name__} calls the model {order} times per step; Step Rehash (and its "
            f"calibration) needs a first-order scheduler (Euler, DDIM, DPM++ 2M, UniPC)."
        )
    slices: dict[str, int] = {}
    if plan is not None:
        comp = component_for(unet, plan)
        slices = dict(comp.slices)
        _plan_call(pipe, plan, call_kwargs)
        if num_inference_steps is None and plan.rehash is not None:
            num_inference_steps = plan.rehash.steps
        elif num_inference_steps is None and plan.target is not None:
            num_inference_steps = plan.target.steps
    if num_inference_steps is None:
        raise PlanMismatchError("calibrate needs num_inference_steps (or a plan with steps)")
    adapter = adapter_for(unet)
    ops, result = adapter.ops(unet)
    candidates = rehash_cuts(unet)
    offered = candidates + cfg_cuts(unet)
    unknown = [c for c in cuts or () if c not in offered]
    if unknown:
        raise RehashCutError(f"not rehash cuts of this model: {', '.join(unknown)}; its cuts: {', '.join(offered)}")
    asked = list(cuts) if cuts else offered
    cfg = [c for c in asked if cfg_split(c)[0]]  # per-step CFG reuse: measured from the calls' outputs
    cuts = list(dict.fromkeys(b for c in asked if (b := cfg_split(c)[1]) is not None))  # run in the model
    segments = [Segment([op], op.spec.axis, slices.get(op.name, 1) if op.spec.axis else 1) for op in ops]
    reuse = {c: reuse_ops(ops, result, c) for c in cuts}
    reuse_segs = {c: [Segment([op], op.spec.axis, slices.get(op.name, 1) if op.spec.axis else 1) for op in r]
                  for c, r in reuse.items()}
    layouts = {op.output: op.layout for op in ops}
    kept_values = {v for c in cuts for v in cut_values(c)}
    n = num_inference_steps
    sim = {c: [[1.0 if a == s else 0.0 for s in range(n)] for a in range(n)] for c in asked}
    err: dict[str, list[list[float | None]]] = {c: [[None] * n for _ in range(n)] for c in asked}
    sketches: dict[str, list[torch.Tensor]] = {c: [] for c in asked}  # every step, at most SKETCH values
    offsets: dict[int, list[torch.Tensor]] = {}  # the last max_gap steps: each later call's output - the first's
    # the last max_gap steps' caches, whole, per call of the step: window[cut][a][call]
    window: dict[str, dict[int, list[torch.Tensor]]] = {c: {} for c in cuts}
    state = {"step": 0, "shape": None, "calls": [], "slots": None}

    def forward(*args, **kwargs):
        s, slot = state["step"], len(state["calls"])
        if s >= n:
            raise SchedulerOrderError(f"more model calls than the {n} steps: the scheduler makes several per step")
        binding = adapter.bind(unet, *args, **kwargs)
        state["shape"] = binding.shape
        program = binding.program(ops, result)
        out, kept = execute_keeping(program, segments, kept_values)
        call = {"out": _tensor(out), "cache": {}, "approx": {}}
        for c in cuts:
            call["cache"][c] = cache_of(c, kept).detach()
            for a in range(max(0, s - max_gap), s):
                if slot >= len(window[c].get(a, ())):
                    raise SchedulerOrderError(
                        f"step {s} made more model calls than step {a}; Step Rehash needs the same calls every step")
                cached = window[c][a][slot].to(call["cache"][c].device)
                b = adapter.bind(unet, *args, **kwargs)
                p = Program(reuse[c], {**b.env, cache_name(c): cached},
                            {**b.layouts, cache_name(c): layouts[cut_values(c)[-1]]}, result, b.finish, b.globals)
                call["approx"][(c, a)] = _tensor(execute(p, reuse_segs[c])).detach()
        state["calls"].append(call)
        return out

    def end_step(model_output) -> None:
        """The scheduler got the step's noise prediction: the step's errors and similarities."""
        s, calls = state["step"], state["calls"]
        if not calls:
            raise SchedulerOrderError(f"step {s} made no model call")
        if state["slots"] is None:
            state["slots"] = len(calls)
        elif len(calls) != state["slots"]:
            raise SchedulerOrderError(f"step {s} made {len(calls)} model calls, step 0 {state['slots']}; "
                                      f"Step Rehash needs the same calls every step")
        combine = _combiner(pipe, [c["out"] for c in calls], model_output)
        guided = combine([c["out"] for c in calls])
        def record(c, here, approx_at):
            for a, before in enumerate(sketches[c]):
                sim[c][a][s] = sim[c][s][a] = _cosine(before, here)
            for a in range(max(0, s - max_gap), s):
                approx = combine(approx_at(a))
                err[c][a][s] = float((approx - guided).float().norm() / guided.float().norm().clamp_min(1e-12))
            sketches[c].append(here)

        for c in cuts:
            if c in asked:
                record(c, _sketch(torch.cat([call["cache"][c].flatten() for call in calls])),
                       lambda a, c=c: [call["approx"][(c, a)] for call in calls])
            window[c][s] = [call["cache"][c].to("cpu") for call in calls]
            window[c].pop(s - max_gap, None)
        if len(calls) == 2:  # CFG reuse: the second call is the first's output plus a key step's offset
            first, offset = calls[0]["out"], calls[1]["out"] - calls[0]["out"]
            for c in cfg:
                base = cfg_split(c)[1]
                here = _sketch(torch.cat([*([calls[0]["cache"][base].flatten()] if base else []), offset.flatten()]))

                def approx_at(a, base=base):
                    one = first if base is None else calls[0]["approx"][(base, a)]
                    return [one, one + offsets[a][0].to(one.device)]

                record(c, here, approx_at)
            offsets[s] = [offset.detach().to("cpu")]
            offsets.pop(s - max_gap, None)
        state["step"], state["calls"] = s + 1, []

    probe = _Probe(pipe, seed, end_step)
    saved = unet.__dict__.get("forward")
    unet.forward = forward
    try:
        with torch.no_grad(), probe:
            pipe(num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed),
                 **call_kwargs)
    finally:
        if saved is None:
            del unet.forward
        else:
            unet.forward = saved
    if state["step"] != n:
        raise SchedulerOrderError(f"the pipeline made {state['step']} denoising steps, not {n}")
    shape = state["shape"]
    if state["slots"] != 2:
        if cfg and cuts_given:
            raise CfgReuseError(
                f"per-step CFG reuse needs a pipeline that calls the model twice per step; {type(pipe).__name__} "
                f"made {state['slots']} call(s) per step (guidance_scale <= 1, or CFG batched into one call)")
        asked = [c for c in asked if c not in cfg]
    return Calibration(
        model=fingerprint(unet, model_name),
        shape=SampleShape(batch=shape["batch"], frames=shape["frames"], latent_height=shape["latent_height"],
                          latent_width=shape["latent_width"], dtype=dtype_name(shape["dtype"])),
        pipeline=type(pipe).__name__,
        scheduler=type(pipe.scheduler).__name__,
        steps=n,
        max_gap=max_gap,
        seed=seed,
        calls_per_step=state["slots"],
        cuts=[CutCalibration(cut=c, similarity=_round(sim[c]), error=_round(err[c])) for c in asked],
        **probe.fields(n),
    )


def _plan_call(pipe, plan: Plan, call_kwargs: dict) -> dict:
    """The pipeline call's size from ``plan`` where ``call_kwargs`` does not give it (what calibrate runs)."""
    for key, value in (("height", plan.height), ("width", plan.width), ("num_frames", plan.frames)):
        if value is not None:
            call_kwargs.setdefault(key, value)
    if plan.frames and getattr(pipe, "unet", None) is not None:
        call_kwargs.setdefault("decode_chunk_size", plan.frames)
    return call_kwargs


def _combiner(pipe, outs: list[torch.Tensor], model_output: torch.Tensor):
    """How the pipeline made the noise prediction it hands its scheduler from the step's model outputs:
    one call (CFG batched in it: :func:`_guided`), or several (Wan's conditional and unconditional
    calls): a fixed linear combination, fitted by least squares on this step and refused unless it
    reproduces the pipeline's prediction."""
    if len(outs) == 1:
        return lambda xs: _guided(pipe, xs[0])
    a = torch.stack([o.double().flatten() for o in outs], 1)
    target = model_output.double().flatten()
    coef = torch.linalg.lstsq(a, target.unsqueeze(1)).solution.flatten()
    miss = float((a @ coef - target).norm() / target.norm().clamp_min(1e-30))
    if miss > 1e-4:
        raise UnsupportedArgumentError(
            f"{type(pipe).__name__} combines its {len(outs)} model calls per step in a way that is not a fixed "
            f"linear combination (off by {miss:.2g}); Step Rehash cannot calibrate it")
    weights = [float(c) for c in coef]
    return lambda xs: sum(w * x.double() for w, x in zip(weights, xs, strict=True))


class _Probe:
    """What carries a noise-prediction error into the video, measured on the full run (for the quality
    predictor, :func:`vramplan.planner.rehash.predict`): the norm of the guided noise prediction the
    pipeline hands its scheduler at each step, how far the scheduler's step moves the latent per unit
    change of it (a copy of the scheduler steps a perturbed prediction: its coefficient, whatever the
    scheduler), and how far the VAE's decoded frames move per unit change of the final latent (the
    decode repeated on a perturbed latent). Perturbations use their own random generator and leave
    the pipeline's state and results untouched."""

    REL = 1e-2  # perturbation size, relative to the RMS of what it perturbs

    def __init__(self, pipe, seed: int, on_step=None):
        self.pipe, self.gen, self.on_step = pipe, torch.Generator().manual_seed(seed + 7919), on_step
        config = getattr(pipe.scheduler, "config", {})
        self.flow = bool("FlowMatch" in type(pipe.scheduler).__name__ or config.get("use_flow_sigmas")
                         or config.get("prediction_type") == "flow_prediction")
        self.noise_norm: list[float] = []
        self.step_gain: list[float] = []
        self.sigmas: list[float] = []
        self.decoded = [0.0, 0.0, 0]  # sum ||d frames||^2, sum ||d latent||^2, frame values
        config = getattr(getattr(pipe, "vae", None), "config", None)
        self.scale = float(getattr(config, "scaling_factor", 1.0) or 1.0)
        std = getattr(config, "latents_std", None)
        if std:  # Wan: the decoder reads latent * std + mean (per channel): the RMS gain
            self.scale = 1.0 / (sum(v * v for v in std) / len(std)) ** 0.5

    def _noise(self, t: torch.Tensor) -> torch.Tensor:
        r = torch.randn(t.shape, generator=self.gen, dtype=torch.float32).to(t.device, t.dtype)
        rms = t.float().square().mean().sqrt().clamp_min(1e-12)
        return r * (self.REL * rms).to(t.dtype)

    def __enter__(self):
        import copy

        scheduler, vae = self.pipe.scheduler, getattr(self.pipe, "vae", None)
        step, decode = scheduler.step, getattr(vae, "decode", None)

        def probed_step(model_output, timestep, sample, *args, **kwargs):
            if self.on_step is not None:
                self.on_step(model_output)
            twin = copy.deepcopy(scheduler)
            twin.__dict__.pop("step", None)  # the copy steps as the class does, not through this probe
            index = getattr(scheduler, "step_index", None)
            sigmas = getattr(scheduler, "sigmas", None)
            out = step(model_output, timestep, sample, *args, **kwargs)
            after = getattr(scheduler, "step_index", None)
            if index is None and after is not None:  # set by the first step (flow-matching Euler)
                index = after - 1
            delta = self._noise(model_output)
            with torch.random.fork_rng(devices=[]):
                moved = twin.step(model_output + delta, timestep, sample, *args, **kwargs)
            a, b = _first(out), _first(moved)
            self.noise_norm.append(float(model_output.float().norm()))
            self.latent_rms = float(a.float().square().mean().sqrt())  # the last step's: the final latent
            self.step_gain.append(float((b - a).float().norm() / delta.float().norm().clamp_min(1e-30)))
            if sigmas is not None and index is not None:
                self.sigmas.append(float(sigmas[index]))
            return out

        def probed_decode(z, *args, **kwargs):
            out = decode(z, *args, **kwargs)
            delta = self._noise(z)
            moved = decode(z + delta, *args, **kwargs)
            a, b = _first(out), _first(moved)
            self.decoded[0] += float((b - a).float().square().sum())
            self.decoded[1] += float(delta.float().square().sum())
            self.decoded[2] += a.numel()
            return out

        self.saved = scheduler.__dict__.get("step"), (vae.__dict__.get("decode") if vae is not None else None)
        scheduler.step = probed_step
        if decode is not None:
            vae.decode = probed_decode
        return self

    def __exit__(self, *exc) -> None:
        scheduler, vae = self.pipe.scheduler, getattr(self.pipe, "vae", None)
        for owner, name, saved in ((scheduler, "step", self.saved[0]), (vae, "decode", self.saved[1])):
            if owner is None:
                continue
            if saved is None:
                owner.__dict__.pop(name, None)
            else:
                setattr(owner, name, saved)

    def fields(self, steps: int) -> dict:
        """The Calibration fields measured (those not measured stay absent)."""
        out: dict = {}
        if len(self.noise_norm) == steps:
            out.update(noise_norm=_r(self.noise_norm), step_gain=_r(self.step_gain))
        if len(self.sigmas) == steps:
            out.update(sigmas=_r(self.sigmas), latent_rms=round(self.latent_rms, 6), flow_matching=self.flow)
        frames, latent, values = self.decoded
        if values and latent > 0:
            # decode input = latent / scaling_factor: the gain per unit change of the scheduler's latent
            out.update(decode_gain=round((frames / latent) ** 0.5 / self.scale, 6), frame_values=values)
        return out


def _first(out) -> torch.Tensor:
    """The tensor of a scheduler step's or a VAE decode's output (dataclass or tuple)."""
    for name in ("prev_sample", "sample"):
        if hasattr(out, name):
            return getattr(out, name)
    return out[0]


def _r(values):
    return [float(f"{v:.6g}") for v in values]


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


def schedule_candidates(unet: torch.nn.Module, cal: Calibration, kinds=None):
    """Every searched schedule (:func:`vramplan.planner.rehash_search.candidates`) at the calibration's cuts,
    priced in UNet FLOPs of all steps (PyTorch's counter on ``unet`` at the calibration's shape), and
    the FLOPs of one full call."""
    from ..planner.rehash_quality import QualityModel
    from ..planner.rehash_search import KINDS, candidates
    from .rehash import measure_cuts

    check_calibration(unet, cal)
    full, reuse, _ = measure_cuts(unet, cal.shape, [c.cut for c in cal.cuts])
    return candidates(QualityModel(cal), reuse, full, kinds=kinds or KINDS), full


def check_calibration(unet: torch.nn.Module, cal: Calibration) -> None:
    """Refuse a calibration made for another model (class and config) than ``unet``."""
    mine = fingerprint(unet)
    if (mine.class_name, mine.config_hash) != (cal.model.class_name, cal.model.config_hash):
        from ..planner.rehash import CalibrationMismatchError

        raise CalibrationMismatchError(
            f"this calibration was made for {cal.model.describe()}, not for this {mine.describe()}. "
            f"Calibrate this model (vramplan calibrate).")


def refine(pipe, cal: Calibration, top: int, *, seed: int | None = None, plan: Plan | None = None,
           variants: list[dict] | None = None, **call_kwargs) -> Calibration:
    """Measured, then predicted: run the ``top`` schedules the planner would rank best at each FLOPs level of
    the predicted frontier (:func:`~vramplan.planner.rehash_search.refinement`) on the calibration's call
    (``call_kwargs``: the same prompt or image and size, or ``plan``'s size; ``seed``: the calibration's), measure each
    video's PSNR against the full run's, and return ``cal`` with them in ``measured`` (where it measured a
    schedule the planner ranks it by the measurement). Schedules already measured are not rerun.
    ``variants``: several calls (each a dict over ``call_kwargs``, e.g. other prompts), the PSNR the mean over
    them, each against its own full run."""
    from ..planner.rehash import MAX_MEASURED, MAX_PSNR, MeasuredSchedule
    from ..planner.rehash_search import refinement
    from .compare import rehash_video, schedule_plan

    if not 1 <= top <= 16:
        raise UnsupportedArgumentError(f"refine={top}: measure 1..16 schedules per FLOPs level")
    unet = denoiser(pipe)
    cands, _ = schedule_candidates(unet, cal)
    todo = [c for c in refinement(cands, top) if not c.measured][:MAX_MEASURED - len(cal.measured)]
    seed = (cal.seed or 0) if seed is None else seed
    if plan is not None:
        _plan_call(pipe, plan, call_kwargs)
    call_kwargs = {"num_inference_steps": cal.steps, **call_kwargs}
    if not todo:
        return cal
    calls = [{**call_kwargs, **v} for v in variants] if variants else [call_kwargs]
    fulls = [rehash_video(pipe, None, seed=seed, **kw) for kw in calls]
    measured = list(cal.measured)
    for c in todo:
        plan_c = schedule_plan(c.cut, c.keys, cal.steps, half_steps=c.halves)
        each = []
        for kw, full in zip(calls, fulls, strict=True):
            mse = float((rehash_video(pipe, plan_c, seed=seed, **kw).double() - full.double()).square().mean())
            each.append(MAX_PSNR if mse <= 0 else min(MAX_PSNR, 10 * math.log10(4.0 / mse)))
        psnr = sum(each) / len(each)
        measured.append(MeasuredSchedule(cut=c.cut, key_steps=list(c.keys), half_steps=list(c.halves),
                                         psnr=round(psnr, 4),
                                         predicted_psnr=None if c.psnr is None else round(min(c.psnr, MAX_PSNR), 4)))
        log.info("refine: %s %d keys %s measured %.2f dB (predicted %s)", c.cut, len(c.keys), list(c.halves),
                 psnr, c.psnr)
    return Calibration.model_validate({**cal.model_dump(), "measured": [m.model_dump() for m in measured]})


def frontier_rows(cands, full: float, steps: int) -> list[dict]:
    """The Pareto frontier (PSNR vs UNet FLOPs: measured where the calibration ran the schedule, else
    predicted) as rows for a table or JSON."""
    from ..planner.rehash_search import frontier

    return [dict(cut=c.cut, key_steps=list(c.keys), keys=len(c.keys), half_steps=list(c.halves), schedule=c.name,
                 kind=c.kind,
                 flops_fewer=round(steps * full / c.cost, 4), unet_flops=int(c.cost),
                 psnr=None if c.psnr is None else round(min(c.psnr, 200.0), 2), psnr_source=c.source,
                 predicted_psnr=(None if (p := c.predicted if c.measured else c.psnr) is None
                                 else round(min(p, 200.0), 2)),
                 predicted_error=round(c.error, 6))
            for c in frontier(cands)]


def plot_frontier(cands, full: float, steps: int, path: str | Path, title: str = "") -> Path:
    """PSNR (measured where the calibration ran the schedule, else predicted) against the UNet FLOPs saving of
    every searched schedule, by kind, and the frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..planner.rehash_search import frontier

    def xy(cs):
        pts = [(steps * full / c.cost, min(c.psnr, 80.0)) for c in cs if c.psnr is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, marker in (("uniform", "s"), ("greedy", "^"), ("optimal", "o")):
        xs, ys = xy([c for c in cands if c.kind == kind])
        if xs:
            ax.scatter(xs, ys, s=10, marker=marker, alpha=0.5, label=kind)
    xs, ys = xy(frontier(cands))
    ax.plot(xs, ys, "k-", lw=1.2, label="frontier")
    ax.set_xlabel("UNet FLOPs: x fewer than the full run")
    ax.set_ylabel("PSNR vs the full run (dB, capped at 80; measured where refined, else predicted)", fontsize=8)
    measured = [c for c in cands if c.measured and c.psnr is not None]
    if measured:
        ax.scatter([steps * full / c.cost for c in measured], [min(c.psnr, 80.0) for c in measured], s=28,
                   facecolors="none", edgecolors="r", label="measured (calibrate --refine)")
    ax.set_title(title or "Step Rehash schedules: predicted quality vs saving", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
