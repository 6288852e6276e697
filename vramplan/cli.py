"""The ``vramplan`` command line: plan, gpus, profile, schema, verify."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .planner.errors import VramplanError

GIB = 2**30


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vramplan", description="Make video diffusion fit the GPU you have.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="plan a model for a GPU, print the table and write the plan JSON")
    _shape_args(p)
    p.add_argument("--gpu", default="auto", help='GPU name ("2080Ti", "RTX 4090", ...) or "auto" (NVML)')
    p.add_argument("--steps", type=int, default=25, help="denoising steps (latency prediction)")
    p.add_argument("--vram-gb", type=float, help="plan for this much memory instead of the GPU's")
    p.add_argument("--max-latency", type=float, help="seconds for all steps: minimise memory within it")
    p.add_argument("--allocator", choices=["expandable_segments", "default", "none"], default="expandable_segments")
    p.add_argument("--solver", choices=["auto", "ilp", "dp"], default="auto")
    p.add_argument("-o", "--output", help="plan file to write (default: <model>-<gpu>.json)")

    sub.add_parser("gpus", help="list the known GPUs")

    p = sub.add_parser("profile", help="profile a model at a shape on meta tensors (needs torch)")
    _shape_args(p)
    p.add_argument("--kernel", choices=["flash", "efficient"], default="flash", help="fused attention kernel")
    p.add_argument("--max-k", type=int, default=256)
    p.add_argument("-o", "--output", help="profile file (default: the cache)")
    p.add_argument("--regenerate-shipped", action="store_true", help="rewrite every shipped profile")

    p = sub.add_parser("schema", help="print the JSON Schema of plan files (or of profiles)")
    p.add_argument("--profile", action="store_true", help="the model profile schema instead")

    p = sub.add_parser("verify", help="run a plan on meta tensors of the full model: measured vs predicted")
    p.add_argument("plan")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return COMMANDS[args.command](args)
    except VramplanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="svd", help='"svd", "svd-xt", a Hugging Face id or a local path')
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--frames", type=int, help="default: the model's")
    p.add_argument("--no-guidance", action="store_true", help="no classifier-free guidance (UNet batch 1)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")


def cmd_plan(args) -> int:
    from .api import plan_for

    plan = plan_for(
        gpu=args.gpu, model=args.model, height=args.height, width=args.width, frames=args.frames,
        guidance=not args.no_guidance, dtype=args.dtype, steps=args.steps, vram_gb=args.vram_gb,
        max_latency_s=args.max_latency, allocator=args.allocator, method=args.solver,
    )
    print(plan_table(plan))
    out = args.output or f"{args.model.replace('/', '_')}-{plan.target.gpu.replace(' ', '')}.json"
    plan.save(out)
    print(f"\nwrote {out}")
    return 0


def plan_table(plan) -> str:
    """Per block: original vs planned activation peak, slice counts, groups; then the totals."""
    from .api import find_profile
    from .planner.costs import CostModel
    from .planner.gpus import find_gpu

    pred, target = plan.prediction, plan.target
    lines = [
        f"{plan.model.name or plan.model.class_name}: {plan.shape.describe()} on {target.gpu} "
        f"({_gib(target.usable_bytes)} GiB usable, {target.attention_kernel} attention, {target.allocator})",
    ]
    profile = find_profile(plan.model.name, plan.shape, target.attention_kernel) if plan.model.name else None
    if profile is not None:
        blocks = _block_rows(plan, profile, CostModel(profile, find_gpu(target.gpu), target.allocator))
        lines += ["", f"{'block':<16}{'original GiB':>14}{'planned GiB':>13}  {'slices k':<14}groups"]
        lines += [f"{b:<16}{o:>14}{p:>13}  {k:<14}{g}" for b, o, p, k, g in blocks]
    lines += [
        "",
        f"predicted peak   {_gib(pred.peak_bytes)} GiB = context {_gib(pred.context_bytes)} + weights "
        f"{_gib(pred.weight_bytes)} + live {_gib(pred.live_bytes)} + transient {_gib(pred.transient_bytes)} "
        f"+ allocator {_gib(pred.allocator_bytes)} + margin {_gib(pred.margin_bytes)}",
        f"activation peak  {_gib(pred.activation_peak_bytes)} GiB (original forward "
        f"{_gib(pred.original_activation_peak_bytes)} GiB), at {pred.peak_unit}",
        f"latency          {pred.latency_s:.2f} s for {target.steps} steps ({pred.unet_call_s * 1000:.0f} ms per "
        f"UNet call, {'calibrated' if pred.latency_calibrated else 'uncalibrated'})",
        f"solver           {plan.solver.method}: {plan.solver.status}, gap {plan.solver.gap}, "
        f"{plan.solver.solve_seconds * 1000:.0f} ms over {plan.solver.candidates} candidate segments",
    ]
    return "\n".join(lines)


def _block_rows(plan, profile, model) -> list[tuple[str, str, str, str, str]]:
    from .planner.costs import Segment

    group_of = {u: g for g in plan.groups for u in g.units}
    seen_groups: set[int] = set()
    peaks: dict[str, int] = {}
    i = 0
    while i < model.n:
        unit = model.units[i]
        group = group_of.get(unit.name)
        length = len(group.units) if group else 1
        cost = model.cost(Segment(i, i + length - 1, plan.k(unit.name)))
        for u in model.units[i : i + length]:
            peaks[u.block] = max(peaks.get(u.block, 0), cost.activation_bytes)
        i += length
    rows = []
    for block in dict.fromkeys(u.block for u in profile.units):
        names = [u.name for u in profile.units if u.block == block]
        ks = sorted({plan.k(n) for n in names})
        groups = [g for g in plan.groups if g.units[0] in names and id(g) not in seen_groups]
        seen_groups.update(id(g) for g in groups)
        rows.append((
            block,
            _gib(profile.original_block_peaks.get(block)),
            _gib(peaks.get(block)),
            ",".join(map(str, ks)),
            f"{len(groups)} ({sum(len(g.units) for g in groups)} units)" if groups else "-",
        ))
    return rows


def cmd_gpus(args) -> int:
    from .planner.gpus import all_gpus

    print(f"{'name':<16}{'usable GiB':>11}{'GB/s':>8}{'fp16 TFLOPS':>13}{'cc':>6}  attention")
    for g in all_gpus():
        print(f"{g.name:<16}{g.memory_usable_bytes / GIB:>11.2f}{g.memory_bandwidth_gbps:>8.0f}"
              f"{g.fp16_tensor_tflops:>13.1f}{g.compute_capability:>6}  {','.join(g.attention_kernels)}")
    return 0


def cmd_profile(args) -> int:
    from .api import sample_shape_for
    from .runtime.profiler import cached_profile, profile, regenerate_shipped

    if args.regenerate_shipped:
        for path in regenerate_shipped(progress=print):
            print("wrote", path)
        return 0
    from .runtime.models import meta_unet

    shape = sample_shape_for(args.model, args.height, args.width, args.frames, not args.no_guidance, args.dtype)
    unet = meta_unet(args.model, shape.dtype)
    if args.output:
        prof = profile(unet, shape, args.kernel, name=args.model, max_k=args.max_k, progress=print)
        prof.save(args.output)
        print("wrote", args.output)
    else:
        prof = cached_profile(unet, shape, args.kernel, name=args.model, max_k=args.max_k, progress=print)
    print(f"{len(prof.units)} units; original activation peak {_gib(prof.original_peak_bytes)} GiB; "
          f"weights {_gib(prof.weight_bytes)} GiB")
    return 0


def cmd_schema(args) -> int:
    from .planner.schema import ModelProfile, Plan

    print(json.dumps((ModelProfile if args.profile else Plan).model_json_schema(), indent=2))
    return 0


def cmd_verify(args) -> int:
    from .planner.schema import Plan
    from .runtime.verify import verify

    plan = Plan.load(args.plan)
    report = verify(plan)
    print(f"{plan.model.name}: {plan.shape.describe()}, {len(plan.slices)} sliced units, {len(plan.groups)} groups")
    print(f"measured activation peak   {_gib(report.measured_activation_bytes)} GiB  (at {report.peak_label})")
    print(f"predicted activation peak  {_gib(report.predicted_activation_bytes)} GiB")
    if report.error is not None:
        print(f"prediction error           {report.error * 100:+.2f} %")
    print(f"allocator replay           {_gib(report.measured_needed_bytes)} GiB needed "
          f"({plan.target.allocator if plan.target else 'expandable_segments'})")
    print(f"verified in {report.seconds:.1f} s on meta tensors")
    return 0


COMMANDS = {"plan": cmd_plan, "gpus": cmd_gpus, "profile": cmd_profile, "schema": cmd_schema, "verify": cmd_verify}

if __name__ == "__main__":
    sys.exit(main())
