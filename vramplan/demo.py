"""`make demo`: plan Stable Video Diffusion at 576x1024 for an RTX 2080 Ti, then verify the plan.

Runs on this machine with no GPU and no weights: the plan comes from a shipped profile, and
verification executes it on meta tensors of the full-size UNet.
"""

from __future__ import annotations


def main() -> None:
    from vramplan import plan_for
    from vramplan.cli import plan_table
    from vramplan.planner.fmt import human_bytes

    print("== plan: SVD 14 x 576x1024, CFG, fp16, RTX 2080 Ti with 4.6 GiB to spare ==\n")
    plan = plan_for(gpu="2080Ti", model="svd", height=576, width=1024, vram_gb=4.6)
    print(plan_table(plan))
    from pathlib import Path

    Path("out").mkdir(exist_ok=True)
    path = plan.save("out/svd-2080ti.json")
    print(f"\nplan written to {path}")

    print("\n== verify: run the plan on meta tensors of the full-size UNet ==\n")
    from vramplan.runtime.verify import verify

    report = verify(plan)
    print(f"measured activation peak   {human_bytes(report.measured_activation_bytes)}")
    print(f"predicted activation peak  {human_bytes(report.predicted_activation_bytes)}")
    print(f"prediction error           {report.error * 100:+.2f} %   (verified in {report.seconds:.1f} s)")


if __name__ == "__main__":
    main()
