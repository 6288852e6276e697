"""Step Rehash benchmarks.

(i)   Full-size SVD 14f, SVD-XT 25f and AnimateDiff 16f at 576x1024 (CFG, fp16), from the shipped
      profiles (no torch): UNet FLOPs per video and the planner's predicted latency on a GPU for 25,
      13 and 9 key steps out of 25 at every candidate cut (uniform schedules).
(ii)  The quality predictor on the shipped trained image-to-video model (CPU, fp32): one calibration
      predicts the PSNR (against the full run) of schedules of every kind at several cuts; each is then
      run on held-out first frames: Spearman rank correlation, the table, and the planner's joint choice
      (cut, keys, key steps) against DeepCache's uniform schedule at the same UNet FLOPs.
(iii) Reuse steps at their FLOPs: denoising wall clock of rehash schedules against the stock pipeline,
      side by side in one process, against their FLOPs ratio.
(iv)  DeepCache's published skip branches on the trained model: its uniform schedule (every N-th step)
      at each branch and interval against the planner's schedule at the same UNet FLOPs, PSNR/SSIM vs
      the full run on held-out clips; the >= 1.6x at >= 40 dB target.

    python bench/bench_rehash.py [--part i|ii|iii|iv|all] [--gpu "RTX 4090"] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import platform
import re
import time
from pathlib import Path

MODELS = (("svd", 14), ("svd-xt", 25), ("animatediff", 16))
KEYS = (25, 13, 9)
STEPS = 25
TARGET = 1.6


def part_i(gpu_name: str) -> str:
    from vramplan.planner.gpus import find_gpu
    from vramplan.planner.pipeline import plan_pipeline
    from vramplan.planner.plan import shipped_pipeline_profile
    from vramplan.planner.rehash import candidate_cuts, plan_rehash, profile_nodes, valid_cuts

    gpu = find_gpu(gpu_name)
    out = [f"### (i) Full-size models, counted from the shipped profiles ({STEPS} steps, 576x1024, CFG, fp16)", "",
           f"Uniform schedules (DeepCache): 25 key steps = no rehash; 13 = interval 2; 9 = interval 3. "
           f"Latency: the planner's prediction for {gpu.name} (uncalibrated roofline), whole pipeline. "
           f"FLOPs: matmul/conv/attention FLOPs of the UNet calls of one video.", ""]
    summary = []
    for model, frames in MODELS:
        kernel = gpu.attention_kernel
        profile = shipped_pipeline_profile(model, 576, 1024, frames, True, "fp16", kernel)
        unet = next(s.profile for s in profile.stages if s.per_step and s.profile is not None)
        cuts = valid_cuts(profile_nodes(unet.units), unet.result, candidate_cuts(unet.units))
        base = plan_pipeline(profile, gpu, steps=STEPS)
        full = sum(u.flops for u in unet.units)
        out += [f"**{model}** ({frames} frames): original {STEPS * full / 1e15:.2f} PFLOP per video, "
                f"{base.prediction.latency_s:.1f} s predicted", "",
                "| cut | reuse call / full call (FLOPs) | PFLOP @13 | x fewer @13 | s @13 | PFLOP @9 | x fewer @9 | s @9 |",
                "|---|---|---|---|---|---|---|---|"]
        best = None
        for cut in cuts:
            cells = []
            ratio13 = None
            for keys in KEYS[1:]:
                plan = plan_rehash(profile, gpu, mode="uniform", keys=keys, steps=STEPS, cut=cut)
                r = plan.rehash
                ratio = r.original_unet_flops / r.unet_flops
                ratio13 = ratio if keys == 13 else ratio13
                cells += [f"{r.unet_flops / 1e15:.2f}", f"{ratio:.2f}", f"{plan.prediction.latency_s:.1f}"]
            reuse_fraction = (r.unet_flops - len(r.key_steps) * full) / ((STEPS - len(r.key_steps)) * full)
            out.append(f"| `{cut}` | {reuse_fraction:.3f} | " + " | ".join(cells) + " |")
            if best is None or ratio13 > best[0]:
                best = (ratio13, cut)
        met = "met" if best[0] >= TARGET else "NOT met"
        summary.append(f"- {model}: best cut at 13/25 key steps `{best[1]}`: {best[0]:.2f}x fewer UNet FLOPs "
                       f"(target >= {TARGET}x: {met})")
        out.append("")
    return "\n".join(out + ["Best cut per model at 13 of 25 key steps:", "", *summary, ""])


CUTS_II = ("up_blocks.0.attentions.1.proj_out", "up_blocks.1.resnets.0.temporal_res_block.norm2",
           "up_blocks.1.attentions.1.proj_out", "up_blocks.2.resnets.0.temporal_res_block.norm2")


def _trained_setup(max_gap: int, calibrate_too: bool = True):
    import torch
    from vramplan.runtime import trained
    from vramplan.runtime.calibrate import calibrate

    from vramplan.cli_rehash import trained_kwargs

    torch.set_num_threads(1)
    pipe = trained.trained_svd_pipeline()
    call = dict(height=trained.HEIGHT, width=trained.WIDTH, num_frames=trained.NUM_FRAMES,
                decode_chunk_size=trained.NUM_FRAMES, num_inference_steps=trained.NUM_INFERENCE_STEPS,
                **trained_kwargs())
    if not calibrate_too:
        return pipe, call, None, None
    started = time.perf_counter()
    cal = calibrate(pipe, max_gap=max_gap, seed=0, image=trained.heldout_example(0)[1], **call)
    return pipe, call, cal, time.perf_counter() - started


def part_ii(keys_list=(6, 9, 13, 17), examples=(1, 2), max_gap: int = 4, plot: str | None = None,
            frontier_plot: str | None = None) -> str:
    """The quality predictor against measured PSNR, over schedules of every kind at several cuts."""
    import random

    from vramplan.planner import rehash as R
    from vramplan.planner.rehash_quality import QualityModel, spearman
    from vramplan.planner.rehash_search import candidates, frontier, optimal_by_count, ranked, schedule_name
    from vramplan.runtime import trained
    from vramplan.runtime.calibrate import plot_calibration, plot_frontier
    from vramplan.runtime.compare import rehash_video, schedule_plan
    from vramplan.runtime.rehash import measure_cuts

    pipe, call, cal, cal_seconds = _trained_setup(max_gap)
    if plot:
        plot_calibration(cal, plot)
    steps, model = cal.steps, QualityModel(cal)
    full, reuse, _ = measure_cuts(pipe.unet, cal.shape, [c.cut for c in cal.cuts])
    images = {i: trained.heldout_example(i)[1] for i in examples}
    originals = {i: rehash_video(pipe, None, seed=i, image=images[i], **call) for i in examples}

    def measure(cut, keys):
        plan = schedule_plan(cut, keys, steps)
        videos = {i: rehash_video(pipe, plan, seed=i, image=images[i], **call) for i in examples}
        psnr = sum(float(trained.psnr(videos[i], originals[i]).mean()) for i in examples) / len(examples)
        ssim = sum(float(trained.ssim(videos[i], originals[i]).mean()) for i in examples) / len(examples)
        return psnr, ssim

    rng = random.Random(0)
    rows = []
    for cut in CUTS_II:
        dp = optimal_by_count(model, cut, max(keys_list))
        for n in keys_list:
            schedules = [("uniform", R.uniform_keys(steps, keys=n), None),
                         ("greedy", *R.greedy_for_count(cal.cut(cut).similarity, n)),
                         ("optimal", dp[n], None),
                         ("random", sorted({0, *rng.sample(range(1, steps), n - 1)}), None)]
            for kind, keys, t in schedules:
                cost = len(keys) * full + (steps - len(keys)) * reuse[cut]
                p, s_ = measure(cut, keys)
                rows.append(dict(cut=cut, n=n, kind=kind, keys=keys, name=schedule_name(kind, keys, t),
                                 fewer=steps * full / cost, pred=model.psnr(cut, keys), psnr=p, ssim=s_))
                print(f"{cut[-34:]:>34} {n:>2} {kind:<8} pred {rows[-1]['pred']:6.2f} measured {p:6.2f}", flush=True)
    pred, meas = [r["pred"] for r in rows], [r["psnr"] for r in rows]
    rho = spearman(pred, meas)
    within = {c: spearman([r["pred"] for r in rows if r["cut"] == c], [r["psnr"] for r in rows if r["cut"] == c])
              for c in CUTS_II}
    mae = sum(abs(a - b) for a, b in zip(pred, meas, strict=True)) / len(rows)
    bias = sum(a - b for a, b in zip(pred, meas, strict=True)) / len(rows)

    # the planner's joint choice (any cut, key count, schedule) at the UNet FLOPs of DeepCache's uniform
    # schedules at each cut, measured the same way
    cands = candidates(model, reuse, full)
    if frontier_plot:
        plot_frontier(cands, full, steps, frontier_plot, title="trained tiny SVD: predicted PSNR vs UNet FLOPs saved")
    joint = []
    for cut in CUTS_II[1:]:
        for n in (9, 13):
            keys = R.uniform_keys(steps, keys=n)
            budget = n * full + (steps - n) * reuse[cut]
            best = ranked(cands, budget)[0]
            p, _ = measure(best.cut, best.keys)
            base = next(r for r in rows if r["cut"] == cut and r["n"] == n and r["kind"] == "uniform")
            joint.append((cut, n, base, best, p))
            print(f"joint @ {cut[-30:]} {n}: {best.cut[-30:]} {len(best.keys)} pred {best.psnr:.2f} meas {p:.2f}",
                  flush=True)

    import hashlib

    weights = trained.trained_dir() / "unet" / "diffusion_pytorch_model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    out = [f"### (ii) The quality predictor on the shipped trained model (CPU, fp32, {steps} steps, "
           f"{trained.NUM_FRAMES} x {trained.HEIGHT}x{trained.WIDTH}, CFG; UNet weights sha256 {digest})", "",
           f"One calibration ({cal_seconds:.0f} s, every cut, gaps up to {max_gap}, held-out clip 0, seed 0) predicts "
           f"each schedule's PSNR against the full run (`vramplan.planner.rehash_quality`); each schedule is then run "
           f"on held-out clips {', '.join(map(str, examples))} (seeds = clip) against the full run with the same seed. "
           f"{len(rows)} schedules: {len(CUTS_II)} cuts x {len(keys_list)} key counts x 4 kinds (uniform, greedy, "
           f"optimal under the predictor, random).", "",
           f"**Spearman rank correlation, predicted vs measured PSNR: {rho:.3f}** over {len(rows)} schedules "
           f"(target >= 0.9: {'met' if rho >= 0.9 else 'NOT met'}); within one cut: "
           + ", ".join(f"`{c.split('.', 1)[1]}` {v:.2f}" for c, v in within.items())
           + f". Mean absolute error {mae:.1f} dB (predicted - measured: {bias:+.1f} dB on average).", "",
           "| cut | keys | schedule | UNet FLOPs x fewer | predicted PSNR | measured PSNR | SSIM |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| `{r['cut']}` | {len(r['keys'])} | {r['kind']}: {r['name']} | {r['fewer']:.2f} | "
                   f"{r['pred']:.1f} | {r['psnr']:.2f} | {r['ssim']:.4f} |")
    out += ["", "The planner's joint choice (`rehash_search.ranked`: any cut, key count and key steps, the best "
            "predicted PSNR) within the UNet FLOPs of DeepCache's uniform schedule at a cut, measured the same way:",
            "", "| DeepCache-cost point | uniform PSNR | planner's choice | its FLOPs x fewer | predicted | measured |",
            "|---|---|---|---|---|---|"]
    for cut, n, base, best, p in joint:
        out.append(f"| `{cut}`, {n} keys ({base['fewer']:.2f}x) | {base['psnr']:.2f} | `{best.cut}`, "
                   f"{len(best.keys)} keys, {best.name} | {steps * full / best.cost:.2f} | {best.psnr:.1f} | {p:.2f} |")
    front = frontier(cands)
    out += ["", f"Frontier: {len(front)} of {len(cands)} searched schedules (`vramplan calibrate --frontier`); "
            + (f"plot: [{Path(frontier_plot).name}]({Path(frontier_plot).name})." if frontier_plot else "")]
    return "\n".join(out + [""])


def part_iii(repeats: int = 5) -> str:
    """Reuse steps at their FLOPs: denoising wall clock of rehash schedules against the stock pipeline's,
    side by side in one process (interleaved, the fastest of ``repeats`` runs each), against FLOPs."""
    import torch
    from vramplan.planner.rehash import uniform_keys
    from vramplan.runtime import trained
    from vramplan.runtime.compare import _timed, _UNetTimer, schedule_plan
    from vramplan.runtime.rehash import measure_cuts

    from vramplan.cli_rehash import trained_kwargs, trained_plan

    torch.set_num_threads(1)
    pipe = trained.trained_svd_pipeline()
    steps = trained.NUM_INFERENCE_STEPS
    call = dict(image=trained.heldout_example(0)[1], height=trained.HEIGHT, width=trained.WIDTH,
                num_frames=trained.NUM_FRAMES, decode_chunk_size=trained.NUM_FRAMES, num_inference_steps=steps,
                output_type="pt", **trained_kwargs())
    base = trained_plan(pipe, rehash="off")
    cuts = ("up_blocks.2.resnets.0.temporal_res_block.norm2", "up_blocks.1.attentions.1.proj_out")
    full, reuse, _ = measure_cuts(pipe.unet, base.component("unet").shape, list(cuts))
    configs = {"stock diffusers": None,
               "vramplan, every step key": (cuts[0], list(range(steps)))}
    for cut in cuts:
        for n in (13, 9):
            configs[f"`{cut}`, {n} keys (uniform)"] = (cut, uniform_keys(steps, keys=n))

    def plan_of(entry):
        if entry is None:
            return None
        plan = schedule_plan(*entry, steps)
        return base.model_copy(update={"rehash": plan})

    wall = {name: float("inf") for name in configs}
    cpu = dict(wall)
    for _ in range(repeats):
        for name, entry in configs.items():
            timer = _UNetTimer()
            _timed(pipe, plan_of(entry), 0, call, timer)
            wall[name], cpu[name] = min(wall[name], timer.seconds), min(cpu[name], timer.cpu_seconds)
    out = ["### (iii) Reuse steps at their FLOPs (CPU, one thread, the trained model)", "",
           f"UNet (denoising) time of one {steps}-step call, the least of {repeats} interleaved runs per row, all "
           "in one process: wall clock, and the thread's CPU time (the same work without the waits of a machine "
           "shared with other jobs). FLOPs: PyTorch's counter (plus CPU fused attention). Target: the time ratio "
           "to the stock run within 1.1x of the FLOPs ratio.", "",
           "| run | UNet FLOPs / stock | wall s | wall / stock | / FLOPs ratio | CPU s | CPU / stock | / FLOPs ratio |",
           "|---|---|---|---|---|---|---|---|"]
    for name, entry in configs.items():
        if entry is None:
            flops = 1.0
        else:
            n = len(entry[1])
            flops = (n * full + (steps - n) * reuse[entry[0]]) / (steps * full)
        w, c = wall[name] / wall["stock diffusers"], cpu[name] / cpu["stock diffusers"]
        out.append(f"| {name} | {flops:.3f} | {wall[name]:.3f} | {w:.3f} | {w / flops:.2f} | {cpu[name]:.3f} | "
                   f"{c:.3f} | {c / flops:.2f} |")
    return "\n".join(out + [""])


# DeepCache (Ma et al. 2023, github.com/horseee/DeepCache): a reuse step keeps the shallow path of one skip
# branch (conv_in, the down modules up to the one whose residual that branch carries, the up layers from the
# one reading it) and replaces the rest by the feature cached at the last full step. Per published setting:
# the skip connection r it keeps (index into the down path's residuals, conv_in's = 0; the paper's code
# counts branches from r = 1, "ignoring the first skip branch", the plug-and-play helper from r = 0), what
# it was published as, the vramplan cut that is the same cache on the trained tiny SVD (2 layers per up
# block), and the op our reuse program runs that DeepCache's does not (None: the same ops).
DEEPCACHE = (
    (0, "plug-and-play helper, `cache_branch_id=0` (README, diffusers' DeepCache page; interval 3)",
     "up_blocks.2.resnets.0.temporal_res_block.norm2", None),
    (1, "paper's code, branch 0 (the skip after down block 0's first layer): SVD-XT (`cache_branch=0`, N=3), SD 1.5 "
        "(`cache_layer_id=0, cache_block_id=0`: N=2 uniform on COCO; N=5 non-uniform in its demo, not run here)",
     "up_blocks.1.attentions.1.proj_out", "up_blocks.1.upsamplers.0"),
    (2, "paper's code, branch 1 (no published run; between the two)", "up_blocks.1.attentions.0.proj_out", None),
    (3, "paper's code, branch 2: DDPM on CIFAR-10 / LSUN (`--branch 2`, N=5)", "up_blocks.0.attentions.1.proj_out",
     "up_blocks.0.upsamplers.0"),
)
INTERVALS = (2, 3, 5, 10)


def _module_flops(unet, shape, name: str) -> int:
    """FLOPs of the submodule ``name`` in one stock forward of ``unet`` at ``shape`` (PyTorch's counter)."""
    import torch
    from vramplan.runtime.adapters import adapter_for
    from vramplan.runtime.rehash import flop_counter

    args = adapter_for(unet).example_inputs(unet, shape)
    with torch.no_grad(), flop_counter() as counter:
        unet(*args)
    return sum(counter.get_flop_counts()[f"{type(unet).__name__}.{name}"].values())


def _reuse_modules(unet, cut: str) -> str:
    """The reuse program of ``cut``, by module (from the unit program's dependency walk)."""
    from vramplan.planner.rehash import reuse_names
    from vramplan.runtime.adapters import adapter_for

    ops, result = adapter_for(unet).ops(unet)
    out: list[str] = []
    for name in reuse_names([(op.output, op.inputs) for op in ops], result, cut):
        parts = name.split(".")
        short = ".".join(parts[:4]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]
        short = "head" if short == "conv_norm_out" else short
        if short not in out:
            out.append(short)
    return ", ".join(out)


def part_iv(examples=(1, 2), max_gap: int = 4, plot: str | None = None, calibration: str | None = None) -> str:
    """DeepCache's published skip branches and uniform schedule on the trained SVD, against the planner's
    schedule (joint search, ``with_rehash``) at the same UNet FLOPs, measured on held-out clips."""
    from vramplan.planner import rehash as R
    from vramplan.runtime import trained
    from vramplan.runtime.compare import rehash_video, schedule_plan
    from vramplan.runtime.rehash import measure_cuts, with_rehash

    from vramplan.cli_rehash import trained_plan

    if calibration and Path(calibration).exists():
        pipe, call, _, _ = _trained_setup(0, calibrate_too=False)
        cal, cal_seconds = R.Calibration.load(calibration), None
    else:
        pipe, call, cal, cal_seconds = _trained_setup(max_gap)
        if calibration:
            cal.save(calibration)
    steps = cal.steps
    base = trained_plan(pipe, rehash="off")
    shape = base.component("unet").shape
    cuts = [cut for _, _, cut, _ in DEEPCACHE]
    full, reuse, _ = measure_cuts(pipe.unet, shape, cuts)
    extra = {cut: (_module_flops(pipe.unet, shape, op) if op else 0) for _, _, cut, op in DEEPCACHE}
    images = {i: trained.heldout_example(i)[1] for i in examples}
    originals = {i: rehash_video(pipe, None, seed=i, image=images[i], **call) for i in examples}
    measured: dict[tuple[str, tuple[int, ...]], tuple[float, float]] = {}

    def measure(cut, keys):
        if (cut, tuple(keys)) not in measured:
            plan = schedule_plan(cut, keys, steps)
            videos = {i: rehash_video(pipe, plan, seed=i, image=images[i], **call) for i in examples}
            measured[(cut, tuple(keys))] = tuple(
                sum(float(f(videos[i], originals[i]).mean()) for i in examples) / len(examples)
                for f in (trained.psnr, trained.ssim))
        return measured[(cut, tuple(keys))]

    rows = []
    for r, _, cut, _ in DEEPCACHE:
        for n in INTERVALS:
            keys = R.uniform_keys(steps, interval=n)
            cost = len(keys) * full + (steps - len(keys)) * (reuse[cut] - extra[cut])
            dc = measure(cut, keys)
            planned = with_rehash(base, pipe.unet, mode="optimal", steps=steps, calibration=cal,
                                  max_unet_flops=int(cost)).rehash
            ours = measure(planned.cut, planned.key_steps)
            rows.append(dict(r=r, cut=cut, n=n, keys=keys, fewer=steps * full / cost, dc=dc, plan=planned,
                             fewer_ours=planned.original_unet_flops / planned.unet_flops, ours=ours))
            print(f"r={r} N={n:>2} {steps * full / cost:.2f}x DeepCache {dc[0]:6.2f} dB | ours {planned.cut[-32:]} "
                  f"{len(planned.key_steps)} keys {rows[-1]['fewer_ours']:.2f}x {ours[0]:6.2f} dB", flush=True)
    target = with_rehash(base, pipe.unet, mode="optimal", steps=steps, calibration=cal,
                         max_unet_flops=int(steps * full / TARGET)).rehash
    target_q = measure(target.cut, target.key_steps)
    if plot:
        _plot_iv(rows, (target.original_unet_flops / target.unet_flops, target_q), plot)

    wins = sum(row["ours"][0] >= row["dc"][0] for row in rows)
    margins = [row["ours"][0] - row["dc"][0] for row in rows]
    at_target = [row for row in rows if row["fewer_ours"] >= TARGET]
    best = max(at_target, key=lambda row: row["ours"][0], default=None)
    target_fewer = target.original_unet_flops / target.unet_flops
    met = target_fewer >= TARGET and target_q[0] >= 40.0
    out = [f"### (iv) DeepCache's published branches on the trained SVD (CPU, fp32, {steps} steps, "
           f"{trained.NUM_FRAMES} x {trained.HEIGHT}x{trained.WIDTH}, CFG)", "",
           "DeepCache (Ma et al. 2023) keeps the shallow path of one skip branch at reuse steps and runs the whole "
           "UNet every N-th step from step 0 (its uniform schedule). Each published branch is mapped to the skip "
           "connection it keeps (index r into the down path's residuals, conv_in's = 0) and so to the feature it "
           "caches on the trained UNet; the table says which vramplan cut that is and which modules its reuse step "
           "runs (the unit program's dependency walk). The mapping is by what a branch keeps, not by DeepCache's index "
           "arithmetic, which assumes SD/SVD's three layers per up block (`up_cache_module_idx = 1 - module`; the "
           "trained UNet has two). Where DeepCache caches an upsampler's output (r = 1, 3), "
           "vramplan has no cut there (its cuts are temporal res-block halves and transformers), so the nearest cut "
           "is the upsampler's input: the reuse step recomputes the upsampler from the cached value, the same "
           "output as DeepCache's, and DeepCache's FLOPs below are ours less the upsampler's (counted).", "",
           "| r | published as | cut on the trained SVD | its reuse step runs | reuse / full FLOPs (DeepCache's) |",
           "|---|---|---|---|---|"]
    for r, what, cut, op in DEEPCACHE:
        note = f"; DeepCache skips `{op}`" if op else ""
        out.append(f"| {r} | {what} | `{cut}`{note} | {_reuse_modules(pipe.unet, cut)} | "
                   f"{reuse[cut] / full:.3f} ({(reuse[cut] - extra[cut]) / full:.3f}) |")
    cal_note = (f"one calibration ({cal_seconds:.0f} s, every cut, gaps up to {max_gap}, held-out clip 0, seed 0)"
                if cal_seconds is not None else f"a saved calibration (every cut, gaps up to {cal.max_gap}, clip 0)")
    out += ["", f"Every row: DeepCache's uniform schedule (every N-th step key, at its branch) and vramplan's planned "
            f"schedule (`with_rehash(mode='optimal', max_unet_flops=` DeepCache's FLOPs `)`: cut, key count and key "
            f"steps searched jointly from {cal_note}), each run on held-out clips {', '.join(map(str, examples))} "
            "(seed = clip) against the full run with the same seed; PSNR over the video, SSIM per frame, averaged.", "",
            "| r | N | DeepCache: UNet FLOPs x fewer | PSNR | SSIM | vramplan's plan | x fewer | PSNR | SSIM | ΔPSNR |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        p = row["plan"]
        out.append(f"| {row['r']} | {row['n']} | {row['fewer']:.2f} | {row['dc'][0]:.2f} | {row['dc'][1]:.4f} | "
                   f"`{p.cut}`, {len(p.key_steps)} keys, {p.schedule} | {row['fewer_ours']:.2f} | "
                   f"{row['ours'][0]:.2f} | {row['ours'][1]:.4f} | {row['ours'][0] - row['dc'][0]:+.2f} |")
    out += ["", f"**vramplan >= DeepCache at the same UNet FLOPs: {wins} of {len(rows)} matched points** "
            f"(PSNR margin {min(margins):+.2f} to {max(margins):+.2f} dB; target: every point, "
            f"{'met' if wins == len(rows) else 'NOT met'}).", "",
            f"**>= {TARGET}x fewer UNet FLOPs at >= 40 dB:** the plan at {TARGET}x (`max_unet_flops` = full / {TARGET}) "
            f"is `{target.cut}`, {len(target.key_steps)} keys ({target.schedule}), {target_fewer:.2f}x fewer, "
            f"measured {target_q[0]:.2f} dB, SSIM {target_q[1]:.4f} (target {'met' if met else 'NOT met'})"
            + (f"; among the matched points at >= {TARGET}x the best measures {best['ours'][0]:.2f} dB at "
               f"{best['fewer_ours']:.2f}x." if best else ".")]
    if plot:
        out += ["", f"Plot: [{Path(plot).name}]({Path(plot).name})."]
    return "\n".join(out + [""])


def _plot_iv(rows, target, path: str) -> None:
    """Measured PSNR and SSIM against UNet FLOPs saved: DeepCache per branch, vramplan's plans."""
    from vramplan.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    for ax, q, label in ((axes[0], 0, "PSNR vs the full run (dB)"), (axes[1], 1, "SSIM vs the full run")):
        for r, _, _, _ in DEEPCACHE:
            pts = sorted((row["fewer"], row["dc"][q]) for row in rows if row["r"] == r)
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="s", ms=5, lw=1, alpha=0.8,
                    label=f"DeepCache, branch r={r} (N={', '.join(map(str, INTERVALS))})")
        pts = sorted({(row["fewer_ours"], row["ours"][q]) for row in rows})
        ax.plot([a for a, _ in pts], [b for _, b in pts], "ko", ms=7, label="vramplan, planned at the same FLOPs")
        ax.plot([target[0]], [target[1][q]], "r*", ms=13, label=f"vramplan, planned at {TARGET}x")
        ax.set_xlabel("UNet FLOPs: x fewer than the full run")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].axhline(40.0, color="grey", ls=":", lw=1)
    axes[0].legend(fontsize=7)
    fig.suptitle("trained tiny SVD: DeepCache's published branches vs vramplan's planned schedules", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_section(path: Path, text: str, part: str) -> None:
    """Put ``text`` in the part's own block of the Step Rehash section (replaced if present)."""
    begin, end = f"<!-- rehash-{part}:begin -->", f"<!-- rehash-{part}:end -->"
    block = f"{begin}\n{text}\n{end}"
    doc = path.read_text() if path.exists() else ""
    if begin in doc:
        doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
    elif "<!-- rehash:end -->" in doc:
        doc = doc.replace("<!-- rehash:end -->", block + "\n\n<!-- rehash:end -->")
    else:
        doc = doc.rstrip() + "\n\n<!-- rehash:begin -->\n## Step Rehash\n\n" + block + "\n<!-- rehash:end -->\n"
    path.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["i", "ii", "iii", "iv", "all"], default="all")
    parser.add_argument("--gpu", default="RTX 4090")
    parser.add_argument("--examples", type=int, default=2, help="(ii): held-out clips each schedule is measured on")
    parser.add_argument("--write", help="markdown file to put the parts in (each part's block replaced if present)")
    parser.add_argument("--plot", help="(ii): also draw the trained model's calibration heatmaps (PNG)")
    parser.add_argument("--frontier-plot", help="(ii): also draw the searched schedules and their frontier (PNG)")
    parser.add_argument("--max-gap", type=int, default=4, help="(ii): reuse distances the calibration measures")
    parser.add_argument("--repeats", type=int, default=5, help="(iii): timed runs per configuration")
    parser.add_argument("--deepcache-plot", help="(iv): also draw quality vs UNet FLOPs saved (PNG)")
    parser.add_argument("--calibration", help="(iv): a calibration JSON of the trained model to reuse (made and "
                        "saved there if absent)")
    args = parser.parse_args()
    machine = f"Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}"
    runs = {"i": lambda: part_i(args.gpu),
            "ii": lambda: part_ii(examples=tuple(range(1, args.examples + 1)), plot=args.plot,
                                  max_gap=args.max_gap, frontier_plot=args.frontier_plot),
            "iii": lambda: part_iii(args.repeats),
            "iv": lambda: part_iv(examples=tuple(range(1, args.examples + 1)), max_gap=args.max_gap,
                                  plot=args.deepcache_plot, calibration=args.calibration)}
    for part, fn in runs.items():
        if args.part not in (part, "all"):
            continue
        started = time.perf_counter()
        text = fn()
        text += (f"\n{machine}; {time.strftime('%Y-%m-%d', time.gmtime())}, {time.perf_counter() - started:.0f} s; "
                 f"command: `python bench/bench_rehash.py --part {part}"
                 + {"i": f" --gpu '{args.gpu}'", "ii": f" --examples {args.examples} --max-gap {args.max_gap}",
                    "iii": f" --repeats {args.repeats}",
                    "iv": f" --examples {args.examples} --max-gap {args.max_gap}"}[part] + "`.\n")
        print(text, flush=True)
        if args.write:
            write_section(Path(args.write), text, part)


if __name__ == "__main__":
    main()
