"""`make demo`: plan Stable Video Diffusion at 576x1024 for an RTX 2080 Ti, verify the plan on
meta tensors of the full-size models, then run a tiny SVD-architecture pipeline under a plan.

No GPU and no weights are needed. The tiny pipeline has random weights, so its "video" is noise:
the demo shows the machinery (planning, exact sliced execution, measurement), not a video model.
"""

from __future__ import annotations

from pathlib import Path


def main() -> None:
    from vramplan import plan_for
    from vramplan.cli import plan_table
    from vramplan.planner.fmt import human_bytes

    out = Path("out")
    out.mkdir(exist_ok=True)
    print("== 1. plan: Stable Video Diffusion, 14 x 576x1024, CFG, fp16, for an RTX 2080 Ti, within 6 GiB ==\n")
    plan = plan_for(gpu="2080Ti", model="svd", height=576, width=1024, vram_gb=6.0)
    print(plan_table(plan))
    print(f"\nplan written to {plan.save(out / 'svd-2080ti.json')}")

    print("\n== 2. verify: the UNet and the VAE decoder under the plan, on meta tensors at full size ==\n")
    from vramplan.runtime.verify import verify_all

    for report in verify_all(plan):
        print(f"{report.component:<5} measured {human_bytes(report.measured_activation_bytes):>10}   predicted "
              f"{human_bytes(report.predicted_activation_bytes):>10}   error {report.error * 100:+.2f} %   "
              f"({report.seconds:.1f} s)")

    print("\n== 3. run: a tiny SVD pipeline (real diffusers classes, random weights, CPU, fp32) under a plan ==\n")
    import numpy as np
    import torch
    from PIL import Image

    from vramplan.runtime import uniform_pipeline_plan
    from vramplan.runtime.runner import run, save_video
    from vramplan.runtime.tiny import tiny_svd_pipeline

    torch.set_num_threads(1)  # tiny tensors: one thread beats two (no synchronisation overhead)
    pipe = tiny_svd_pipeline()
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    tiny_plan = uniform_pipeline_plan(pipe, 4, height=64, width=64, num_frames=8)
    kwargs = dict(image=image, num_inference_steps=4, output_type="pt")
    result = run(tiny_plan, pipe=pipe, generator=torch.Generator().manual_seed(0), progress=False, **kwargs)
    original = pipe(height=64, width=64, num_frames=8, decode_chunk_size=8, generator=torch.Generator().manual_seed(0),
                    **kwargs).frames
    print(result.report.summary())
    diff = (result.frames - original).abs().max().item()
    print(f"\nlargest difference to the unplanned pipeline: {diff:.2e} (exact up to float rounding)")
    print(f"video written to {save_video(result.frames, out / 'tiny-svd.gif')} (random weights: noise)")


if __name__ == "__main__":
    main()
