"""`make demo`: plan Stable Video Diffusion at 576x1024 for an RTX 2080 Ti with Step Rehash, then
generate a real (tiny) video with the small trained image-to-video model that ships with vramplan:
the original run and the planned run (sliced, Step Rehash) on the same seed, side by side in one
GIF, with their comparison (PSNR/SSIM per frame, UNet FLOPs, CPU wall clock).

No GPU, no download. About a minute on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path


def main() -> None:
    from vramplan import plan_for
    from vramplan.cli import plan_table
    from vramplan.planner.rehash import rehash_summary

    out = Path("out")
    out.mkdir(exist_ok=True)
    print("== 1. plan: Stable Video Diffusion, 14 x 576x1024, CFG, fp16, RTX 2080 Ti within 6 GiB, 25 steps,"
          " Step Rehash on 12 of them ==\n")
    plan = plan_for(gpu="2080Ti", model="svd", height=576, width=1024, vram_gb=6.0, rehash="uniform", keys=13)
    print(plan_table(plan))
    print(rehash_summary(plan))
    print(f"\nplan written to {plan.save(out / 'svd-2080ti-rehash.json')}")

    print("\n== 1b. exact on a 4 GB laptop GPU: SVD-XT, 25 x 576x1024 (the original pipeline needs 32.7 GiB) ==\n")
    from vramplan.cli import placement_summary

    laptop = plan_for(gpu="3050 laptop", model="svd-xt", height=576, width=1024)
    pred = laptop.prediction
    print(f"RTX 3050 Laptop: predicted peak {pred.peak_bytes / 2**30:.2f} GiB of "
          f"{laptop.target.usable_bytes / 2**30:.2f} GiB usable, {pred.latency_s:.0f} s for 25 steps (uncalibrated), "
          f"{pred.host_bytes / 2**30:.2f} GiB of pinned host memory")
    for comp in laptop.components:
        if summary := placement_summary(comp):
            print(f"  {comp.component}: {summary}")
    print(f"plan written to {laptop.save(out / 'svd-xt-3050-laptop.json')} (`vramplan verify` checks it on meta tensors)")

    print("\n== 2. the small trained image-to-video model (CPU, fp32): original vs sliced + Step Rehash ==\n")
    import torch

    from vramplan.cli_rehash import trained_kwargs, trained_plan
    from vramplan.runtime import trained
    from vramplan.runtime.compare import compare, side_by_side

    torch.set_num_threads(1)  # tiny tensors: one thread beats two (no synchronisation overhead)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    pipe = trained.trained_svd_pipeline()
    tiny_plan = trained_plan(pipe, rehash="uniform", keys=13, slices=2)
    print(rehash_summary(tiny_plan))
    print(f"plan written to {tiny_plan.save(out / 'trained-rehash.json')}\n")
    clip, image = trained.heldout_example(0)  # a held-out clip: the model never saw it
    result = compare(tiny_plan, pipe, seed=0, image=image, num_inference_steps=trained.NUM_INFERENCE_STEPS,
                     **trained_kwargs())
    print(result.summary())
    truth = trained.psnr(result.original_frames[0] * 2 - 1, clip)[1:].mean().item()
    ours = trained.psnr(result.frames[0] * 2 - 1, clip)[1:].mean().item()
    print(f"vs the true held-out clip (frames 2..{len(clip)}): original {truth:.2f} dB, rehash {ours:.2f} dB PSNR")
    print(f"\nvideo written to {side_by_side(result, out / 'trained-original-vs-rehash.gif')} "
          f"(left: original, right: sliced + Step Rehash)")

    print("\n== 3. the small trained text-to-video Wan (WanPipeline, CPU, fp32): true vs generated vs rehash ==\n")
    from vramplan.runtime import trained_wan

    gif = trained_wan.demo(out)
    print(f"\nvideo written to {gif} (left: the true clip, middle: generated, right: Step Rehash)")


if __name__ == "__main__":
    main()
