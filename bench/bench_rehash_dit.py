"""Step Rehash on a DiT, side by side with diffusers' own caches (issue 16 parts 4 and 6).

On the trained tiny Wan (``vramplan.runtime.trained_wan``: a real ``WanPipeline``, CFG as two DiT calls per
step, first-order flow-matching Euler), same held-out prompts and seeds for every run:

- the full run (the reference every PSNR/SSIM is measured against: the same prompt and seed, no cache);
- diffusers 0.42.1's caches through ``pipe.transformer.enable_cache(config)``, each at several settings:
  FirstBlockCache (threshold), MagCache (``mag_ratios`` from its own calibration run, as diffusers documents:
  ``calibrate=True``, the printed ratios passed back), TaylorSeer (lite mode: blocks skipped, ``proj_out``
  predicted; its default mode changes nothing on Wan), FasterCache and PyramidAttentionBroadcast (attention
  reuse; ``current_timestep_callback`` = the pipeline's timestep);
- vramplan's planned schedules: one calibration (``vramplan.runtime.calibrate``, on a *training* prompt, not
  one of the evaluated ones) and the joint search (cut, key count, key steps) by predicted PSNR within each
  diffusers point's measured DiT FLOPs (matched points), at fixed savings (1.5x .. 4x), and the fewest FLOPs
  predicted to keep 30 dB (``min_psnr``).

DiT FLOPs are *measured*: PyTorch's FLOP counter (matmul, attention; plus the CPU fused attention kernel) over
every call of the WanTransformer3DModel in the pipeline call (skipped blocks cost nothing, extra work of a
cache counts). Time: the DiT calls' CPU seconds of this thread (a separate run without the counter), the least
of ``--repeats``. PSNR: over the whole video (frames in [-1, 1]), averaged over prompts.

    python bench/bench_rehash_dit.py [--prompts 3] [--untrained] [--write docs/benchmarks.md] [--plot docs/x.png]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Point:
    family: str
    setting: str
    psnr: float
    ssim: float
    flops: float  # DiT FLOPs per video (mean over prompts)
    cpu_s: float  # DiT CPU seconds per video (mean over prompts)
    predicted: float | None = None
    keys: list[int] = field(default_factory=list)
    cut: str | None = None
    cal_measured: float | None = None  # PSNR the calibration measured for it on its own prompt (--refine)


def video_psnr(video: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float((video.float() - ref.float()).square().mean())
    return 10 * math.log10(4.0 / mse) if mse > 0 else math.inf


class Bench:
    def __init__(self, untrained: bool, n_prompts: int, repeats: int):
        from vramplan.runtime import trained_wan as tw

        torch.set_num_threads(1)
        self.tw = tw
        self.pipe = tw.build_pipeline(0) if untrained else tw.load_trained_wan()
        if untrained:
            self.label = "UNTRAINED tiny Wan (random weights: not a quality claim)"
        else:
            import hashlib

            weights = tw.trained_wan_dir() / "transformer" / "diffusion_pytorch_model.safetensors"
            self.label = f"trained tiny Wan, transformer weights sha256 {hashlib.sha256(weights.read_bytes()).hexdigest()[:12]}"
        self.call = dict(height=tw.HEIGHT, width=tw.WIDTH, num_frames=tw.NUM_FRAMES,
                         num_inference_steps=tw.NUM_INFERENCE_STEPS, guidance_scale=tw.GUIDANCE_SCALE)
        self.steps = tw.NUM_INFERENCE_STEPS
        self.prompts = [tw.prompt(*k) for k in tw.heldout_combinations()[:n_prompts]]
        self.repeats = repeats
        self.full = [self._run(p, i, counted=True) for i, p in enumerate(self.prompts)]
        self.full_flops = sum(f[1] for f in self.full) / len(self.full)
        self.full_cpu = self._cpu(None) if repeats else math.nan

    def _run(self, prompt: str, seed: int, counted: bool):
        from vramplan.runtime.rehash import flop_counter

        ctx = flop_counter() if counted else contextlib.nullcontext()
        with torch.no_grad(), ctx as counter, contextlib.redirect_stdout(io.StringIO()):
            frames = self.pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="pt",
                               **self.call).frames
        flops = sum(counter.get_flop_counts().get(type(self.pipe.transformer).__name__, {}).values()) if counted else 0
        return frames[0].float() * 2 - 1, flops

    def _cpu(self, attach) -> float:
        """DiT CPU seconds per video: the least over repeats of the mean over prompts."""
        spent = [0.0]

        def pre(m, a, k):
            spent.append(time.thread_time())

        def post(m, a, k, o):
            spent[0] += time.thread_time() - spent.pop()

        hooks = [self.pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True),
                 self.pipe.transformer.register_forward_hook(post, with_kwargs=True)]
        best = math.inf
        try:
            for _ in range(self.repeats):
                spent[:] = [0.0]
                for i, p in enumerate(self.prompts):
                    detach = attach() if attach else None
                    try:
                        self._run(p, i, counted=False)
                    finally:
                        if detach:
                            detach()
                best = min(best, spent[0] / len(self.prompts))
        finally:
            for h in hooks:
                h.remove()
        return best

    def measure(self, family: str, setting: str, attach, timed: bool = True, **extra) -> Point:
        """``attach()`` puts the method on the pipeline and returns what takes it off (``timed``: also the
        CPU time, in separate runs without the counter)."""
        psnrs, ssims, flops = [], [], []
        from vramplan.runtime.trained import ssim

        for i, p in enumerate(self.prompts):
            detach = attach()
            try:
                video, f = self._run(p, i, counted=True)
            finally:
                detach()
            ref = self.full[i][0]
            psnrs.append(video_psnr(video, ref))
            ssims.append(float(ssim(video, ref).mean()))
            flops.append(f)
        point = Point(family, setting, sum(min(v, 99.0) for v in psnrs) / len(psnrs), sum(ssims) / len(ssims),
                      sum(flops) / len(flops), self._cpu(attach) if timed else math.nan, **extra)
        print(f"{family:<12} {setting:<44} PSNR {point.psnr:6.2f} SSIM {point.ssim:.4f} "
              f"FLOPs x{self.full_flops / point.flops:5.2f} CPU x{self.full_cpu / point.cpu_s:5.2f}"
              + (f" predicted {point.predicted:.1f}" if point.predicted is not None else ""), flush=True)
        return point

    # ------------------------------------------------------------------ diffusers' caches
    def diffusers_cache(self, config):
        def attach():
            self.pipe.transformer.enable_cache(config)
            return self.pipe.transformer.disable_cache
        return attach

    def mag_ratios(self) -> list[float]:
        """MagCache's documented calibration: a run with ``calibrate=True`` prints the ratios (one list per
        CFG branch: we pass the conditional branch's, printed first)."""
        from diffusers import MagCacheConfig

        self.pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=self.steps))
        buf = io.StringIO()
        try:
            with torch.no_grad(), contextlib.redirect_stdout(buf):
                self.pipe(prompt=self.calibration_prompt, generator=torch.Generator().manual_seed(100),
                          output_type="latent", **self.call)
        finally:
            self.pipe.transformer.disable_cache()
        lists = re.findall(r"\[([0-9eE.,\s+-]+)\]", buf.getvalue())
        return [float(v) for v in lists[0].split(",")]

    def diffusers_points(self, quick: bool) -> list[Point]:
        from diffusers import (
            FasterCacheConfig,
            FirstBlockCacheConfig,
            MagCacheConfig,
            PyramidAttentionBroadcastConfig,
            TaylorSeerCacheConfig,
        )

        def ts():
            return self.pipe.current_timestep

        ratios = self.mag_ratios()
        settings = [
            *[("FirstBlockCache", f"threshold {t}", FirstBlockCacheConfig(threshold=t))
              for t in ((0.1, 0.3) if quick else (0.05, 0.1, 0.2, 0.3, 0.5))],
            *[("MagCache", f"threshold {t}, max skip {k}",
               MagCacheConfig(threshold=t, max_skip_steps=k, retention_ratio=0.2, num_inference_steps=self.steps,
                              mag_ratios=ratios))
              for t, k in (((0.06, 3),) if quick else ((0.02, 2), (0.06, 3), (0.12, 3), (0.24, 4), (0.5, 6)))],
            *[("TaylorSeer", f"lite, interval {n}",
               TaylorSeerCacheConfig(cache_interval=n, disable_cache_before_step=3, max_order=1,
                                     taylor_factors_dtype=torch.float32, use_lite_mode=True))
              for n in ((3,) if quick else (2, 3, 4, 5))],
            *[("FasterCache", f"attention every {n}",
               FasterCacheConfig(spatial_attention_block_skip_range=n, current_timestep_callback=ts,
                                 is_guidance_distilled=True,
                                 tensor_format="BCFHW"))
              for n in ((2,) if quick else (2, 3, 4))],
            *[("PAB", f"self+cross attention every {n}, t in (100, 800)",
               PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=n, cross_attention_block_skip_range=n,
                                               current_timestep_callback=ts))
              for n in ((2,) if quick else (2, 3, 4))],
        ]
        return [self.measure(f, s, self.diffusers_cache(c)) for f, s, c in settings]

    # ------------------------------------------------------------------ vramplan
    @property
    def calibration_prompt(self) -> str:
        return self.tw.prompt(*self.tw.train_combinations()[0])

    refine_prompts = 1  # training prompts the refinement measures on (the first is the calibration's)

    def calibrate(self, max_gap: int, refine: int = 0):
        from vramplan.planner.rehash_quality import QualityModel
        from vramplan.planner.rehash_search import candidates
        from vramplan.runtime.calibrate import calibrate
        from vramplan.runtime.calibrate import refine as refined
        from vramplan.runtime.rehash import measure_cuts

        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            self.cal = calibrate(self.pipe, prompt=self.calibration_prompt, max_gap=max_gap, seed=100, **self.call)
        self.cal_seconds = time.perf_counter() - started
        self.refine, self.refine_seconds = refine, 0.0
        if refine:  # measured, then predicted: on the calibration prompt and seed, never the evaluated ones
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                train = self.tw.train_combinations()  # evenly spread, from the calibration prompt on
                prompts = [self.tw.prompt(*k) for k in train[::max(1, len(train) // self.refine_prompts)]]
                prompts = prompts[:self.refine_prompts]
                self.cal = refined(self.pipe, self.cal, refine, variants=[{"prompt": p} for p in prompts],
                                   **self.call)
            self.refine_seconds = time.perf_counter() - started
            print(f"refined: {len(self.cal.measured)} schedules measured on {self.refine_prompts} training prompt(s) in "
                  f"{self.refine_seconds:.0f} s", flush=True)
        self.model = QualityModel(self.cal)
        self.full_call, self.reuse, _ = measure_cuts(self.pipe.transformer, self.cal.shape,
                                                      [c.cut for c in self.cal.cuts])
        self.cands = candidates(self.model, self.reuse, self.full_call)
        print(f"calibrated {len(self.cal.cuts)} cuts in {self.cal_seconds:.0f} s; {len(self.cands)} candidate "
              f"schedules", flush=True)

    def schedule(self, c, why: str, timed: bool = True) -> Point:
        from vramplan.runtime.compare import schedule_plan
        from vramplan.runtime.rehash import apply_rehash

        plan = schedule_plan(c.cut, c.keys, self.steps, half_steps=c.halves)

        def attach():
            return apply_rehash(self.pipe, plan).remove

        halves = f" + {len(c.halves)} half" if c.halves else ""
        return self.measure("vramplan", f"{why}: {len(c.keys)} keys{halves}, {short(c.cut)}", attach, timed=timed,
                            predicted=c.psnr if c.predicted is None else c.predicted, keys=list(c.keys), cut=c.cut,
                            cal_measured=c.psnr if c.measured else None)

    def validation(self, per_cut: int = 3, counts=(4, 7, 10)) -> list[Point]:
        """The predictor against measured PSNR over schedules of every kind: the cheapest ``per_cut - 1``
        cuts on the search's frontier, the cheapest residual cut without CFG reuse on it, and CFG reuse
        alone, each at ``counts`` key steps: uniform, greedy, optimal (the predictor's own) and random."""
        import random

        from vramplan.planner import rehash as R
        from vramplan.planner.rehash import cfg_split
        from vramplan.planner.rehash_search import Candidate, frontier, optimal_by_count

        on_front = list(dict.fromkeys(c.cut for c in frontier(self.cands)))
        plain = [c for c in on_front if not cfg_split(c)[0]] or [c for c in self.reuse if not cfg_split(c)[0]]
        cuts = list(dict.fromkeys([*on_front[:per_cut - 1], *plain[:1], *(["cfg"] if "cfg" in self.reuse else [])]))
        rng, out = random.Random(0), []
        for cut in cuts:
            dp = optimal_by_count(self.model, cut, max(counts))
            for n in counts:
                for kind, keys in (("uniform", R.uniform_keys(self.steps, keys=n)),
                                   ("greedy", R.greedy_for_count(self.cal.cut(cut).similarity, n)[0]),
                                   ("optimal", dp[n]),
                                   ("random", sorted({0, *rng.sample(range(1, self.steps), n - 1)}))):
                    cost = len(keys) * self.full_call + (self.steps - len(keys)) * self.reuse[cut]
                    c = Candidate(cut, tuple(keys), kind, cost, self.model.latent_error(cut, keys),
                                  self.model.psnr(cut, keys))
                    out.append(self.schedule(c, f"validation, {kind}", timed=False))
        return out

    def budget(self, flops_per_video: float) -> float:
        """A measured DiT FLOPs per video in the candidates' unit (FLOPs of one call, all steps)."""
        return flops_per_video / self.full_flops * self.steps * self.full_call


def short(cut: str) -> str:
    """'cfg+blocks.0.ffn->blocks.6.ffn' -> 'CFG reuse + blocks 0->6'."""
    from vramplan.planner.rehash import cfg_split, residual_span

    cfg, base = cfg_split(cut)
    span = residual_span(cut)
    name = f"blocks {_block(span[0])}->{_block(span[1])}" if span else (base or "")
    return " + ".join(([" CFG reuse".strip()] if cfg else []) + ([name] if name else []))


def _block(value: str) -> str:
    """'blocks.6.ffn' -> '6'; a value before the first block (the patch embedding) -> 'embedding'."""
    parts = value.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "blocks" else "embedding"


def run(args) -> tuple[str, list[Point], list[Point], Bench]:
    from vramplan.planner.rehash_search import QualityFloorError, ranked

    b = Bench(args.untrained, args.prompts, args.repeats if args.part == "compare" else 0)
    if args.part == "overhead":
        b.full_cpu = math.nan  # timed side by side with the schedules instead
    print(f"full run: {b.full_flops / 1e9:.2f} GFLOP DiT per video, {b.full_cpu:.2f} CPU s", flush=True)
    b.refine_prompts = args.refine_prompts
    b.calibrate(args.max_gap, args.refine if args.part == "compare" else 0)
    if args.part == "validate":
        return validation_report(b, b.validation()), [], [], b
    if args.part == "overhead":
        return overhead(b, args.repeats), [], [], b
    if args.part == "steps":
        return steps_report(b), [], [], b
    theirs = b.diffusers_points(args.quick)
    ours: dict[tuple, Point] = {}

    def mine(c, why):
        key = (c.cut, c.keys, c.halves)
        if key not in ours:
            ours[key] = b.schedule(c, why)
        return ours[key]

    matched = []
    for p in theirs:
        if p.flops >= b.full_flops:  # saves nothing: within its FLOPs the best is the full run itself
            matched.append((p, Point("vramplan", "the full run (every step key; nothing to save)", 99.0, 1.0,
                                     b.full_flops, b.full_cpu)))
            continue
        best = ranked(b.cands, b.budget(p.flops))
        matched.append((p, mine(best[0], "matched") if best else None))
    for fewer in (1.5, 2.0, 2.5, 3.0, 4.0):
        best = ranked(b.cands, b.steps * b.full_call / fewer)
        if best:
            mine(best[0], f"{fewer}x fewer")
    floor = None
    try:
        floor = ranked(b.cands, None, min_psnr=30.0)[0]
        mine(floor, "min_psnr 30")
    except QualityFloorError as err:
        print(f"min_psnr 30: {err}", flush=True)
    return report(b, theirs, list(ours.values()), matched, args), theirs, list(ours.values()), b


def report(b: Bench, theirs, ours, matched, args) -> str:
    from vramplan.planner.rehash_quality import spearman

    steps = b.steps
    rows = sorted([*theirs, *ours], key=lambda p: (p.family, -p.flops))
    lines = [f"### Step Rehash on a DiT vs diffusers' caches ({b.label})", "",
             f"`WanPipeline`, {b.tw.NUM_FRAMES} frames {b.tw.HEIGHT}x{b.tw.WIDTH}, {steps} steps, guidance "
             f"{b.tw.GUIDANCE_SCALE} (two DiT calls per step), {type(b.pipe.scheduler).__name__}; CPU, fp32, one "
             f"thread. {len(b.prompts)} held-out prompts ({'; '.join(b.prompts)}), seed = prompt index; every "
             f"PSNR/SSIM against the full run with the same prompt and seed (PSNR over the whole video, frames in "
             f"[-1, 1]). Full run: {b.full_flops / 1e9:.2f} GFLOP of DiT per video (measured, PyTorch's counter), "
             f"{b.full_cpu:.2f} DiT CPU s. vramplan: one calibration ({b.cal_seconds:.0f} s, {len(b.cal.cuts)} "
             f"residual cuts, gaps up to {b.cal.max_gap}, on the training prompt '{b.calibration_prompt}')"
             + (f", refined (`calibrate --refine {b.refine}`: the {b.refine} best-predicted schedules at each FLOPs "
                f"level of the predicted frontier run on that same seed and {b.refine_prompts} training prompt(s) spread "
                f"from the calibration's on, {len(b.cal.measured)} schedules, "
                f"{b.refine_seconds:.0f} s; the search ranks those by the measurement)" if b.refine else "")
             + ", then the joint search by PSNR (measured on the calibration prompt where refined, else predicted); "
             "'matched' = the planner's best within that diffusers point's measured FLOPs (a point that saves no "
             "FLOPs is matched by the full run).", "",
             "How each diffusers cache was set up (0.42.1, `pipe.transformer.enable_cache(config)`): FirstBlockCache "
             "by its threshold; MagCache with `mag_ratios` from its own `calibrate=True` run on the same calibration "
             "prompt (the conditional branch's printed ratios), retention 0.2; TaylorSeer in lite mode (blocks "
             "skipped, `proj_out` predicted; its default mode hooks nothing that changes Wan's output), first order, "
             "fp32 factors; FasterCache with `is_guidance_distilled=True` (its unconditional-branch skip needs CFG "
             "batched in one call, Wan makes two) and the default timestep range (-1, 681); PAB on self- and "
             "cross-attention, timesteps (100, 800). Each keeps its state per CFG call where it uses diffusers' cache "
             "contexts (FirstBlockCache, MagCache, TaylorSeer); FasterCache and PAB count both calls.", "",
             "| method | setting | DiT FLOPs x fewer | DiT CPU x faster | PSNR dB | SSIM | predicted PSNR | measured "
             "on the calibration prompt |",
             "|---|---|---|---|---|---|---|---|"]
    for p in rows:
        lines.append(f"| {p.family} | {p.setting} | {b.full_flops / p.flops:.2f} | {b.full_cpu / p.cpu_s:.2f} | "
                     f"{p.psnr:.2f} | {p.ssim:.4f} | "
                     + (f"{min(p.predicted, 99):.1f}" if p.predicted is not None else "") + " | "
                     + (f"{min(p.cal_measured, 99):.1f}" if p.cal_measured is not None else "") + " |")
    lines += ["", "At each diffusers point's measured DiT FLOPs, the planner's schedule (same FLOPs or fewer):", "",
              "| diffusers point | its x fewer | its PSNR | vramplan's schedule | x fewer | PSNR | >= ? |",
              "|---|---|---|---|---|---|---|"]
    wins = 0
    for p, q in matched:
        if q is None:
            lines.append(f"| {p.family}, {p.setting} | {b.full_flops / p.flops:.2f} | {p.psnr:.2f} | none within "
                         f"these FLOPs | | | no |")
            continue
        ok = q.psnr >= p.psnr
        wins += ok
        lines.append(f"| {p.family}, {p.setting} | {b.full_flops / p.flops:.2f} | {p.psnr:.2f} | {q.setting} | "
                     f"{b.full_flops / q.flops:.2f} | {q.psnr:.2f} | {'yes' if ok else '**no**'} |")
    at30 = [p for p in ours if p.psnr >= 30]
    best30 = max(at30, key=lambda p: b.full_flops / p.flops, default=None)
    theirs30 = max((p for p in theirs if p.psnr >= 30), key=lambda p: b.full_flops / p.flops, default=None)
    pred = [p for p in ours if p.predicted is not None]
    rho = spearman([p.predicted for p in pred], [p.psnr for p in pred]) if len(pred) > 2 else float("nan")
    losses = [(p, q) for p, q in matched if q is None or q.psnr < p.psnr]
    lines += ["", f"- Matched points where vramplan's PSNR >= the diffusers cache's: **{wins} of {len(matched)}**"
              + (". Where it loses: " + "; ".join(
                  f"{p.family}, {p.setting} at {b.full_flops / p.flops:.2f}x ({p.psnr:.2f} dB; vramplan "
                  + (f"{q.psnr:.2f} dB at {b.full_flops / q.flops:.2f}x)" if q else "has none within its FLOPs)")
                  for p, q in losses) if losses else "") + ".",
              "- Most DiT FLOPs saved at >= 30 dB: vramplan "
              + (f"**{b.full_flops / best30.flops:.2f}x** ({best30.setting}, {best30.psnr:.1f} dB)" if best30 else
                 "none of its points") + "; diffusers' caches "
              + (f"{b.full_flops / theirs30.flops:.2f}x ({theirs30.family}, {theirs30.setting}, {theirs30.psnr:.1f} dB)"
                 if theirs30 else "none") + " (target: >= 2x at >= 30 dB: "
              + ("met" if best30 and b.full_flops / best30.flops >= 2 else "NOT met") + ").",
              f"- The predictor on vramplan's measured points: Spearman {rho:.2f} over {len(pred)} schedules "
              f"(predicted vs measured PSNR)."]
    if args.plot:
        lines += ["", f"Plot: [{Path(args.plot).name}]({Path(args.plot).name})."]
    return "\n".join(lines + [""])


def overhead(b: Bench, rounds: int, fewer=(1.5, 2.0, 3.0, 4.0)) -> str:
    """Where reuse steps' time goes, side by side in one run: per DiT call (a real call of the pipeline,
    CPU seconds of this thread, the least over ``rounds`` interleaved rounds) the stock forward, a key call and
    a reuse call under the rehash handle, through the executor and run straight; per video, the planner's
    schedule at each of ``fewer`` x fewer FLOPs, its FLOPs ratio (measured) against its CPU ratio either way."""
    from vramplan.planner.rehash_search import ranked
    from vramplan.runtime.compare import schedule_plan
    from vramplan.runtime.rehash import apply_rehash

    pipe, dit = b.pipe, b.pipe.transformer
    chosen = [(f, ranked(b.cands, b.steps * b.full_call / f)[0]) for f in fewer]
    cut = chosen[-1][1].cut
    base = cut.split("+", 1)[1] if cut.startswith("cfg+") else cut
    seen: dict = {}
    hook = dit.register_forward_pre_hook(lambda m, a, k: seen.setdefault("call", (a, k)), with_kwargs=True)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        pipe(prompt=b.prompts[0], generator=torch.Generator().manual_seed(0), output_type="latent", **b.call)
    hook.remove()
    args, kwargs = seen["call"]

    def per_call(keys, straight):
        handle = apply_rehash(dit, schedule_plan(base, keys, 10**4)) if keys is not None else None
        if handle is not None:
            handle.straight = straight
        try:
            with torch.no_grad():
                dit(*args, **kwargs)  # the key call: its cache
                start = time.thread_time()
                for _ in range(20):
                    dit(*args, **kwargs)
                return (time.thread_time() - start) / 20
        finally:
            if handle is not None:
                handle.remove()

    calls = {"stock forward": (None, True), "key call, executor": (list(range(10**4)), False),
             "key call, fast path (the stock forward)": (list(range(10**4)), True),
             "reuse call, executor": ([0], False), "reuse call, fast path (straight)": ([0], True)}
    call_s = {name: min(per_call(*v) for _ in range(rounds)) for name, v in calls.items()}

    def attach(c, straight):
        def on():
            handle = apply_rehash(pipe, schedule_plan(c.cut, c.keys, b.steps))
            handle.straight = straight
            return handle.remove
        return on

    flops = {f: b.measure("vramplan", f"{f}x fewer: {len(c.keys)} keys, {short(c.cut)}", attach(c, True),
                          timed=False).flops for f, c in chosen}
    saved_repeats, b.repeats = b.repeats, 1
    best: dict = {}
    try:
        for _ in range(rounds):  # interleaved: the full run and every variant once per round
            for key, on in [("full", None), *[((f, s), attach(c, s)) for f, c in chosen for s in (False, True)]]:
                best[key] = min(best.get(key, math.inf), b._cpu(on))
    finally:
        b.repeats = saved_repeats
    reuse_share = b.reuse[base] / b.full_call
    lines = [f"### Reuse steps at their FLOPs? ({b.label})", "",
             f"Where a reuse step's time goes, side by side in one run (CPU seconds of one thread, the least of "
             f"{rounds} interleaved rounds; CPU, fp32). Per DiT call (a real call of the pipeline, 20 calls each), "
             f"the rehash handle's calls through the executor (`handle.straight = False`) and on the fast path "
             f"(the default for an unsliced plan: key calls run the stock forward, the span's ends read off its "
             f"blocks; reuse calls run straight, `runtime/straight.py`); the reuse call at `{short(base)}` "
             f"(FLOPs: {reuse_share:.3f} of a full call).", "",
             "| DiT call | ms | x the stock forward |", "|---|---|---|"]
    for name, sec in call_s.items():
        lines.append(f"| {name} | {sec * 1e3:.2f} | {sec / call_s['stock forward']:.3f} |")
    lines += ["", f"Per video ({len(b.prompts)} held-out prompts, the DiT's CPU seconds per video; full run "
              f"{best['full']:.3f} s): the planner's schedule at each FLOPs saving; the target is a CPU speed-up "
              f"within 1.1x of the FLOPs ratio (FLOPs ratio / CPU ratio <= 1.1).", "",
              "| schedule | DiT FLOPs x fewer | CPU x faster, executor | FLOPs/CPU, executor | CPU x faster, fast path "
              "| FLOPs/CPU, fast path |", "|---|---|---|---|---|---|"]
    worst = 0.0
    for f, c in chosen:
        fr = b.full_flops / flops[f]
        ex, st = best["full"] / best[(f, False)], best["full"] / best[(f, True)]
        worst = max(worst, fr / st)
        lines.append(f"| {len(c.keys)} keys, {short(c.cut)} | {fr:.2f} | {ex:.2f} | {fr / ex:.2f} | {st:.2f} | "
                     f"{fr / st:.2f} |")
    lines += ["", f"- Fast path: FLOPs ratio / CPU ratio at most **{worst:.2f}** over these schedules (target <= 1.1: "
              f"{'met' if worst <= 1.1 else 'NOT met'})."]
    return "\n".join(lines + [""])


def validation_report(b: Bench, checked) -> str:
    from vramplan.planner.rehash_quality import spearman

    rho = spearman([p.predicted for p in checked], [p.psnr for p in checked])
    cuts = list(dict.fromkeys(p.cut for p in checked))
    lines = [f"### The quality predictor on a DiT ({b.label})", "",
             f"One calibration ({b.cal_seconds:.0f} s, {len(b.cal.cuts)} cuts, on the training prompt "
             f"'{b.calibration_prompt}', as in the comparison) "
             f"predicts each schedule's PSNR against the full run; each is then run on {len(b.prompts)} held-out "
             f"prompts (the same seeds) and measured (PSNR over the whole video, mean over prompts). DiT FLOPs "
             f"measured by PyTorch's counter in the runs.", ""]
    if checked:
        lines += [f"**The quality predictor on the DiT: Spearman {rho:.3f}** between predicted and measured PSNR "
                  f"over {len(checked)} schedules ({len(cuts)} cuts: {', '.join(short(c) for c in cuts)}; 3 key counts; "
                  f"uniform, greedy, optimal, random) (target >= 0.9: {'met' if rho >= 0.9 else 'NOT met'}); within "
                  "one cut: " + ", ".join(
                      f"{short(c)} {spearman([p.predicted for p in checked if p.cut == c], [p.psnr for p in checked if p.cut == c]):.2f}"
                      for c in cuts) + ".", "",
                  "| cut | keys | kind | DiT FLOPs x fewer | predicted PSNR | measured PSNR |", "|---|---|---|---|---|---|"]
        for p in checked:
            lines.append(f"| {short(p.cut)} | {len(p.keys)} | {p.setting.split(', ')[1].split(':')[0]} | "
                         f"{b.full_flops / p.flops:.2f} | {min(p.predicted, 99):.1f} | {p.psnr:.2f} |")
    return "\n".join(lines + [""])


def steps_report(b: Bench, cut: str = "cfg+patch_embedding->blocks.7.ffn") -> str:
    """Where the predictor misranks: every step but one key, the one reused step (at ``cut``, the cheapest
    CFG-reuse cut) and, at a few steps, the same step as a half step; measured vs predicted PSNR per step.
    An error at one step only: what the predictor's per-step weight (scheduler coefficient, carry) gets wrong."""
    from vramplan.planner.rehash_quality import spearman
    from vramplan.planner.rehash_search import Candidate

    if cut not in b.reuse:
        cut = next(c for c in b.reuse if c.startswith("cfg+"))
    rows = []
    for s, half in [*((s, False) for s in range(1, b.steps)), *((s, True) for s in (2, 9, 16, b.steps - 1))]:
        keys = tuple(k for k in range(b.steps) if k != s)
        halves = (s,) if half else ()
        cost = len(keys) * b.full_call + (b.reuse["cfg"] if half else b.reuse[cut])
        c = Candidate(cut, keys, "hand", cost, b.model.latent_error(cut, keys, halves), b.model.psnr(cut, keys, halves),
                      None, halves)
        rows.append((s, half, b.schedule(c, f"step {s}{' half' if half else ''}", timed=False)))
    reused = [(s, p) for s, h, p in rows if not h]
    rho = spearman([p.predicted for _, p in reused], [p.psnr for _, p in reused])
    # what a predictor that ranked steps as measured could have chosen (picked on these prompts): the reused steps
    # that measure best one at a time, as many as the predictor's own 1.19x choice reuses
    best = sorted(reused, key=lambda sp: -sp[1].psnr)
    hand = []
    for c, reuse, halves in [(cut, tuple(sorted(s for s, _ in best[:n])), ()) for n in (3, 4)]:
        keys = tuple(k for k in range(b.steps) if k not in reuse and k not in halves)
        cand = Candidate(c, keys, "hand", 0.0, b.model.latent_error(c, keys, halves), b.model.psnr(c, keys, halves),
                         None, halves)
        hand.append((reuse, halves, b.schedule(cand, "by hand", timed=False)))
    lines = [f"### One reused step at a time ({b.label})", "",
             f"Every step key but one, which reuses ({short(cut)}) or is a half step (the first CFG call whole, the "
             f"second from the offset); {len(b.prompts)} held-out prompts, calibration as in the comparison. Measured "
             f"minus predicted PSNR per step shows what the predictor's per-step weight gets wrong. Spearman over the "
             f"{len(reused)} one-step schedules: {rho:.2f}.", "",
             "| step | kind | predicted PSNR | measured PSNR | measured - predicted |", "|---|---|---|---|---|"]
    for s, half, p in rows:
        lines.append(f"| {s} | {'half' if half else 'reused'} | {p.predicted:.1f} | {p.psnr:.2f} | "
                     f"{p.psnr - p.predicted:+.1f} |")
    lines += ["", "The 3 and 4 steps that measure best one at a time, reused together (picked on the held-out prompts: "
              "not a planner's choice):", "",
              "| schedule | reused steps | half steps | DiT FLOPs x fewer | predicted PSNR | measured PSNR |",
              "|---|---|---|---|---|---|"]
    for reuse, halves, p in hand:
        lines.append(f"| {p.setting.split(': ', 1)[1]} | {', '.join(map(str, reuse))} | "
                     f"{', '.join(map(str, halves)) or '-'} | {b.full_flops / p.flops:.2f} | {p.predicted:.1f} | "
                     f"{p.psnr:.2f} |")
    return "\n".join(lines + [""])



def plot(theirs, ours, full_flops, full_cpu, path, title) -> None:
    """PSNR against the DiT FLOPs saved (measured) and against the DiT CPU-time speed-up, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4), sharey=True)
    markers = {"FirstBlockCache": "o", "MagCache": "s", "TaylorSeer": "^", "FasterCache": "v", "PAB": "D",
               "vramplan": "*"}
    for ax, (label, x) in zip(axes, (("DiT FLOPs: x fewer than the full run (measured)", lambda p: full_flops / p.flops),
                                     ("DiT CPU time: x faster than the full run (one thread)",
                                      lambda p: full_cpu / p.cpu_s)), strict=True):
        for family, marker in markers.items():
            pts = sorted((x(p), p.psnr) for p in [*theirs, *ours] if p.family == family and math.isfinite(x(p)))
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], marker=marker, ms=9 if family == "vramplan" else 6,
                        lw=1.5 if family == "vramplan" else 0.8, label=family)
        ax.axhline(30, color="grey", lw=0.6, ls="--")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR vs the full run (dB)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=3, help="held-out prompts each method runs on")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per method (the least counts)")
    parser.add_argument("--max-gap", type=int, default=4, help="reuse distances the calibration measures")
    parser.add_argument("--refine", type=int, default=3, help="compare: the calibration's refinement (measured, "
                        "then predicted): the best-predicted schedules run per FLOPs level on the calibration "
                        "prompt (0: the predictor alone)")
    parser.add_argument("--refine-prompts", type=int, default=1, help="training prompts the refinement measures "
                        "on, the PSNR averaged (the first: the calibration prompt; never a held-out one)")
    parser.add_argument("--untrained", action="store_true", help="the same pipeline with random weights (harness "
                        "check only: no quality claim)")
    parser.add_argument("--quick", action="store_true", help="one setting per diffusers cache")
    parser.add_argument("--part", choices=["compare", "validate", "overhead", "steps"], default="compare",
                        help="compare: vs diffusers' caches; validate: the predictor's Spearman over 48 schedules; "
                        "overhead: reuse steps' CPU time against their FLOPs, the executor and the straight run; "
                        "steps: one reused (or half) step at a time, measured vs predicted")
    parser.add_argument("--write", help="markdown file to put the section in (its block replaced if present)")
    parser.add_argument("--plot", help="quality vs DiT FLOPs saved, PNG")
    parser.add_argument("--text-out", help="also write the section's markdown to this file")
    args = parser.parse_args()
    started = time.perf_counter()
    text, theirs, ours, b = run(args)
    if args.plot and args.part == "compare":
        plot(theirs, ours, b.full_flops, b.full_cpu, args.plot, f"Step Rehash vs diffusers' caches, {b.label}")
    machine = f"Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}"
    text += (f"\n{machine}; diffusers {__import__('diffusers').__version__}; {time.strftime('%Y-%m-%d', time.gmtime())}, "
             f"{time.perf_counter() - started:.0f} s; command: `python bench/bench_rehash_dit.py --part {args.part} "
             f"--prompts "
             f"{args.prompts} --repeats {args.repeats} --max-gap {args.max_gap}"
             + (f" --refine {args.refine}" if args.part == "compare" else "")
             + (f" --refine-prompts {args.refine_prompts}" if args.refine_prompts != 1 else "")
             + (" --untrained" if args.untrained else "") + (" --quick" if args.quick else "")
             + "`.\n")
    print(text, flush=True)
    if args.text_out:
        Path(args.text_out).write_text(text)
    if args.write:
        from bench_rehash import write_section

        write_section(Path(args.write), text, {"compare": "dit", "validate": "dit-validation"}.get(args.part,
                                                                                                  f"dit-{args.part}"))


if __name__ == "__main__":
    main()
