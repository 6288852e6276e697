"""The SD / SVD VAE decoders along rows (``component="vae_rows"``) in the whole pipelines: floors and latency.

For SVD 14f, SVD-XT 25f and AnimateDiff 16f at 576x1024 (fp16, the 2080 Ti's profiles: ``efficient``
attention), the shipped pipeline profile's decode stage is re-profiled on meta tensors under the rows
lowering (rows slice counts up to ``--max-k``, as a pipeline would cap them for planning time) and spliced
in, every other stage as shipped. Both profiles are then planned side by side on the 2080 Ti profile
(24 GiB assumed host memory, as ``vramplan plan --gpu 2080Ti``): the exact floor (the smallest budget in
0.01 GiB steps that plans; what the refusal just below names), and the predicted latency at a few budgets.
``--verify``: the rows floor plan's decode runs on meta tensors under the rows adapter, measured against
its prediction.

    python bench/bench_vae_rows.py [--models svd svd-xt animatediff] [--verify] [--write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from report import machine, table, write_section  # noqa: E402
from vramplan.planner.errors import InfeasibleError  # noqa: E402
from vramplan.planner.gpus import find_gpu  # noqa: E402
from vramplan.planner.pipeline import plan_pipeline  # noqa: E402
from vramplan.planner.plan import shipped_pipeline_profile  # noqa: E402

GIB = 2**30
HOST = 24 * GIB
BUDGETS = (None, 6.0, 4.0, 2.0, 1.4)


def rows_profile(model: str, height: int, width: int, frames: int, kernel: str, max_k: int):
    """The shipped pipeline profile with its decode stage re-profiled under the rows lowering."""
    from vramplan.planner.pipelines import pipeline_source
    from vramplan.runtime.adapters.base import pipeline_adapter
    from vramplan.runtime.profiler import profile

    shipped = shipped_pipeline_profile(model, height, width, frames, True, "fp16", kernel)
    source = pipeline_source(model)
    adapter = pipeline_adapter(source.pipeline)
    vae = adapter.meta_components(source.configs, "fp16")["vae"]
    shape = adapter.stage_shape("decode", height, width, frames, True, "fp16", source.configs)
    dec = profile(vae, shape, kernel, name=source.name, component="vae_rows")
    units = [u.model_copy(update={"scratch": {k: v for k, v in u.scratch.items() if k <= max_k}}) if u.axis == "rows"
             else u for u in dec.units]
    dec = dec.model_copy(update={"units": units, "component": "vae"})  # planned as the pipeline's vae
    stages = [s.model_copy(update={"profile": dec}) if s.stage == "decode" else s for s in shipped.stages]
    return shipped, shipped.model_copy(update={"stages": stages})


def plan(prof, gb):
    return plan_pipeline(prof, find_gpu("2080Ti"), usable_bytes=None if gb is None else int(gb * GIB),
                         host_ram_bytes=HOST, host_ram_source="assumed")


def floor(prof, lo: float = 0.5, hi: float = 2.5) -> tuple[float, str]:
    """The smallest budget (0.01 GiB steps) that plans, and what the refusal just below it names."""
    lo_c, hi_c = round(lo * 100), round(hi * 100)
    while hi_c - lo_c > 1:
        mid = (lo_c + hi_c) // 2
        try:
            plan(prof, mid / 100)
            hi_c = mid
        except InfeasibleError:
            lo_c = mid
    try:
        plan(prof, (hi_c - 1) / 100)
        why = "?"
    except InfeasibleError as e:
        text = str(e)
        why = text[text.find("set by ") + 7 :].split(", with")[0] if "set by " in text else text[:80]
    return hi_c / 100, why


def verify_decode(prof, model: str, gb: float) -> str:
    from vramplan.planner.pipelines import pipeline_source
    from vramplan.runtime.models import meta_from_config
    from vramplan.runtime.verify import _run

    p = plan(prof, gb)
    comp = p.component("vae")
    stage = next(s for s in p.stages if s.stage == "decode")
    vae = meta_from_config(pipeline_source(model).configs["vae"], comp.shape.dtype)
    report = _run(p, comp.model_copy(update={"component": "vae_rows"}), vae)
    measured, predicted = report.measured_activation_bytes, stage.activation_bytes
    return f"{predicted / GIB:.4f} / {measured / GIB:.4f} GiB ({(predicted / measured - 1) * 100:+.2f} %)"


def main(argv=None) -> None:
    from vramplan.profiles import model_catalogue

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["svd", "svd-xt", "animatediff"])
    ap.add_argument("--max-k", type=int, default=64)
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--write", action="store_true", help="record the tables in docs/benchmarks.md")
    args = ap.parse_args(argv)
    floors, latency = [], []
    for model in args.models:
        frames = model_catalogue()[model]["frames"]
        started = time.perf_counter()
        shipped, rows = rows_profile(model, 576, 1024, frames, "efficient", args.max_k)
        print(f"{model}: decode re-profiled along rows in {time.perf_counter() - started:.1f} s", flush=True)
        (f0, why0), (f1, why1) = floor(shipped), floor(rows)
        check = verify_decode(rows, model, f1) if args.verify else "-"
        floors.append([f"{model} {frames}f", f"{f0:.2f}", why0, f"{f1:.2f}", why1, check])
        for gb in BUDGETS:
            a, b = plan(shipped, gb), plan(rows, gb)
            dec_a = next(s for s in a.stages if s.stage == "decode").seconds
            dec_b = next(s for s in b.stages if s.stage == "decode").seconds
            latency.append([f"{model} {frames}f", "card" if gb is None else f"{gb:g} GiB",
                            f"{a.prediction.latency_s:.1f}", f"{b.prediction.latency_s:.1f}",
                            f"{b.prediction.latency_s / a.prediction.latency_s:.3f}x", f"{dec_a:.1f}", f"{dec_b:.1f}"])
        print(table(["model", "floor (frames, shipped)", "set by", "floor (rows)", "set by",
                     "rows floor plan's decode on meta: predicted / measured"], floors[-1:]), flush=True)
    t1 = table(["model", "floor, frames decode (shipped) GiB", "set by", "floor, rows decode GiB", "set by",
                "rows floor plan's decode on meta: predicted / measured"], floors)
    t2 = table(["model", "budget", "latency s, frames decode", "latency s, rows decode", "ratio",
                "decode s, frames", "decode s, rows"], latency)
    print(t1)
    print()
    print(t2)
    if args.write:
        body = (
            "### The SD/SVD VAE decoders along rows (`vae_rows`) in the whole pipelines\n\n"
            f"`python bench/bench_vae_rows.py --verify` ({machine()}): the shipped 576x1024 fp16 profile's decode stage "
            f"re-profiled on meta tensors under the rows lowering (`component=\"vae_rows\"`, rows slice counts up to "
            f"{args.max_k}) and spliced in, every other stage as shipped; both planned on the RTX 2080 Ti profile "
            "(efficient attention, 24 GiB assumed host memory, as `vramplan plan --gpu 2080Ti`). Floors: the smallest "
            "`--vram-gb` in 0.01 steps that plans, and what the refusal 0.01 GiB below names; the rows floor plan's "
            "decode runs on meta tensors under the rows adapter (measured = predicted).\n\n" + t1 + "\n\n"
            "Predicted latency (25 steps) of the fastest plan at each budget, the whole pipeline and its decode "
            "stage:\n\n" + t2 + "\n\n"
            "Rows lower every floor (now set by other stages) but cost time wherever one frame fits: the slab holds "
            "every frame at once, each GroupNorm needs a statistics pass (a recompute pass inside a group), and halos "
            "add rows, where a frames slice needs none of these. A unit has one axis, so the shipped pipelines keep "
            "the frames decode; the rows lowering is there for single images and for the planner to choose per unit "
            "once it can (not built).\n")
        write_section("vae_rows", body)

if __name__ == "__main__":
    main()
