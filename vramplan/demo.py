"""`make demo`: the SVD UNet's units and a full-size memory comparison, on this machine.

Runs on meta tensors: no GPU, no weights, no download.
"""

from __future__ import annotations

import time


def main() -> None:
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    from vramplan.planner.schema import SampleShape
    from vramplan.profiles import unet_config
    from vramplan.runtime import (
        MemoryTracker,
        apply_plan,
        attention_kernel,
        empty_model,
        list_units,
        uniform_plan,
    )
    from vramplan.runtime.adapters import adapter_for
    from vramplan.runtime.memory import gib

    unet = empty_model(UNetSpatioTemporalConditionModel, unet_config("svd"), torch.float16)
    units = list_units(unet)
    print(f"SVD UNet: {len(units)} units, e.g.")
    for unit in units[:8]:
        print(f"  {unit.name:<55} {unit.axis}")
    shape = SampleShape(batch=2, frames=14, latent_height=72, latent_width=128, dtype="fp16")
    args = adapter_for(unet).example_inputs(unet, shape, device="meta")
    print(f"\nactivation peak, {shape.describe()} (576x1024), fused attention, meta tensors:")
    for label, plan in [("original", None), ("k=4 grouped", uniform_plan(unet, 4, shape)),
                        ("k=8 grouped", uniform_plan(unet, 8, shape))]:
        t0 = time.perf_counter()
        handle = apply_plan(unet, plan) if plan else None
        with attention_kernel("flash"), MemoryTracker() as tracker, torch.no_grad():
            unet(*args)
        if handle:
            handle.remove()
        print(f"  {label:<12} {gib(tracker.peak_bytes):6.2f} GiB   (traced in {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
