"""Step Rehash benchmarks.

(i)  Full-size SVD 14f, SVD-XT 25f and AnimateDiff 16f at 576x1024 (CFG, fp16), from the shipped
     profiles (no torch): UNet FLOPs per video and the planner's predicted latency on a GPU for 25,
     13 and 9 key steps out of 25 at every candidate cut (uniform schedules).
(ii) The shipped trained image-to-video model (CPU, fp32): one calibration, then greedy, optimal and
     DeepCache-uniform schedules with the same key-step counts, each run against the full run on the
     same seed and held-out first frames: PSNR/SSIM to the full run, UNet FLOPs and CPU wall clock.

    python bench/bench_rehash.py [--part i|ii|both] [--gpu "RTX 4090"] [--write docs/benchmarks.md]
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


def part_ii(keys_list=(9, 13, 17), examples: int = 2, max_gap: int = 5, plot: str | None = None) -> str:
    import torch
    from vramplan.runtime import trained
    from vramplan.runtime.calibrate import calibrate
    from vramplan.runtime.compare import compare

    from vramplan.cli_rehash import trained_kwargs, trained_plan

    torch.set_num_threads(1)
    pipe = trained.trained_svd_pipeline()
    extra = trained_kwargs()
    started = time.perf_counter()
    plain = trained_plan(pipe, rehash="off")
    cal = calibrate(pipe, plan=plain.model_copy(update={"target": None}), num_inference_steps=trained.NUM_INFERENCE_STEPS,
                    max_gap=max_gap, image=trained.heldout_example(0)[1], **extra)
    cal_seconds = time.perf_counter() - started
    if plot:
        from vramplan.runtime.calibrate import plot_calibration

        plot_calibration(cal, plot)
    steps = cal.steps
    rows, originals = [], {}
    from vramplan.planner.rehash import schedule_error

    for keys in keys_list:
        uniform = trained_plan(pipe, rehash="uniform", keys=keys)
        cut, budget = uniform.rehash.cut, uniform.rehash.unet_flops
        variants = [
            ("uniform", uniform),  # DeepCache: evenly spaced keys at the cheapest cut
            ("greedy", trained_plan(pipe, rehash="greedy", keys=keys, calibration=cal, cut=cut)),
            ("optimal", trained_plan(pipe, rehash="optimal", keys=keys, calibration=cal, cut=cut)),
            # the planner's choice of cut and keys for the same UNet FLOPs as the uniform schedule
            ("optimal-any-cut", trained_plan(pipe, rehash="optimal", calibration=cal, max_unet_flops=budget)),
        ]
        for mode, plan in variants:
            err = schedule_error(cal.cut(plan.rehash.cut).error, plan.rehash.key_steps)
            psnrs, ssims, ratios, speed = [], [], [], []
            for i in range(examples):
                image = trained.heldout_example(i)[1]
                c = compare(plan, pipe, seed=i, original=originals.get(i), image=image, num_inference_steps=steps,
                            **extra)
                originals[i] = c.original
                psnrs.append(sum(c.psnr) / len(c.psnr))
                ssims.append(sum(c.ssim) / len(c.ssim))
                ratios.append(c.flops_ratio)
                speed.append(c.unet_speedup)
            r = plan.rehash
            rows.append((keys, mode, len(r.key_steps), r.cut, err, sum(psnrs) / examples, sum(ssims) / examples,
                         sum(ratios) / examples, sum(speed) / examples))
    import hashlib

    weights = trained.trained_dir() / "unet" / "diffusion_pytorch_model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    out = [f"### (ii) The shipped trained model (CPU, fp32, {steps} steps, {trained.NUM_FRAMES} x "
           f"{trained.HEIGHT}x{trained.WIDTH}, CFG; UNet weights sha256 {digest})", "",
           f"One calibration ({cal_seconds:.0f} s, gaps up to {max_gap}) on held-out clip 0; each schedule run on "
           f"{examples} held-out first frames against the full run with the same seed. PSNR/SSIM: mean over frames "
           f"and examples, planned vs full run. Error: calibrated sum of relative guided-noise errors (- where a gap "
           f"exceeds the calibrated {max_gap}). Speed: UNet "
           f"wall clock, full / planned (CPU, one thread; a tiny model is dominated by per-op overhead).", "",
           "| keys | schedule | key steps | cut | calibrated error | PSNR dB | SSIM | UNet FLOPs x fewer | UNet speed |",
           "|---|---|---|---|---|---|---|---|---|"]
    for keys, mode, n, cut, err, p, s, ratio, sp in rows:
        label = {"uniform": "DeepCache uniform", "greedy": "greedy (Alg. 1), same cut", "optimal": "optimal (DP), same cut",
                 "optimal-any-cut": "optimal (DP), any cut, same FLOPs"}[mode]
        out.append(f"| {keys} | {label} | {n} | `{cut}` | {'-' if err is None else f'{err:.3f}'} | {p:.2f} | "
                   f"{s:.4f} | {ratio:.2f} | {sp:.2f}x |")
    verdicts = []
    for keys in keys_list:
        by = {r[1]: r[5] for r in rows if r[0] == keys}
        verdicts.append(f"- {keys} keys: optimal {by['optimal']:.2f} dB vs uniform {by['uniform']:.2f} dB "
                        f"({'>=' if by['optimal'] >= by['uniform'] else '<'}), at the same cut; greedy "
                        f"{by['greedy']:.2f} dB; optimal over every cut at uniform's FLOPs {by['optimal-any-cut']:.2f} dB")
    return "\n".join(out + ["", *verdicts, ""])


def write_section(path: Path, text: str) -> None:
    begin, end = "<!-- rehash:begin -->", "<!-- rehash:end -->"
    block = f"{begin}\n## Step Rehash\n\n{text}\n{end}"
    doc = path.read_text() if path.exists() else ""
    if begin in doc:
        doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["i", "ii", "both"], default="both")
    parser.add_argument("--gpu", default="RTX 4090")
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--write", help="markdown file to put the section in (replaced if present)")
    parser.add_argument("--plot", help="(ii): also draw the trained model's calibration heatmaps (PNG)")
    parser.add_argument("--max-gap", type=int, default=5, help="(ii): reuse distances the calibration measures")
    args = parser.parse_args()
    parts = []
    if args.part in ("i", "both"):
        parts.append(part_i(args.gpu))
    if args.part in ("ii", "both"):
        parts.append(part_ii(examples=args.examples, plot=args.plot, max_gap=args.max_gap))
    machine = f"Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}; " \
              f"command: `python bench/bench_rehash.py --part {args.part} --max-gap {args.max_gap}`."
    text = "\n".join(parts) + "\n" + machine + "\n"
    print(text)
    if args.write:
        write_section(Path(args.write), text)


if __name__ == "__main__":
    main()
