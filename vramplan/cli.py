"""The ``vramplan`` command line: plan, gpus, profile, schema, verify."""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from .cli_rehash import TRAINED
from .planner.errors import InputFileError, InvalidArgumentError, VramplanError
from .planner.pipelines import check_number

GIB = 2**30
# Library loggers whose INFO lines are phases a user waits through (shown without -v).
PHASE_LOGGERS = ("vramplan.api", "vramplan.planner.capacity")


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every default that is a value (not None or False, nor one the help already states)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


# Commands that run torch on this machine's CPU (or its GPU): they get a thread count (--threads).
TORCH_COMMANDS = frozenset({"run", "calibrate", "compare", "trained-plan", "profile", "verify"})


def default_threads() -> int:
    """torch threads for CPU work when neither --threads nor OMP_NUM_THREADS says: one on a machine of
    up to 4 cores (small models on a few shared cores run 4-20x slower with torch's default of one
    thread per core, which spin against each other and any other job), else half the cores, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return 1 if cores <= 4 else min(8, cores // 2)


def set_threads(args) -> str | None:
    """Set torch's CPU threads for a command that runs torch; returns what to say about it (printed
    on stderr when the command ends, so that a mistake on the command line stays a one-line error)."""
    if args.command not in TORCH_COMMANDS:
        return None
    if args.threads is None and os.environ.get("OMP_NUM_THREADS"):
        return f"torch CPU threads: {os.environ['OMP_NUM_THREADS']} (OMP_NUM_THREADS)"
    import torch

    if args.threads is None and torch.cuda.is_available():
        return None  # the work is on the GPU: torch's default serves the host side
    n = args.threads or default_threads()
    torch.set_num_threads(n)
    why = "--threads" if args.threads else "the default on this machine; --threads N or OMP_NUM_THREADS to change"
    return f"torch CPU threads: {n} ({why})"


def _version() -> str:
    from . import __version__

    return f"vramplan {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vramplan", description="Make video diffusion fit the GPU you have.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="add the library's log lines (per-unit profiling, GPU overlays, ...) and "
                             "the traceback of an error; also after the command")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads for commands that run a model (run, compare, calibrate, verify, "
                             "profile); default: OMP_NUM_THREADS if set, else 1 on up to 4 cores, else half the "
                             "cores (at most 8)")
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter))

    p = sub.add_parser("plan", help="plan a model for a GPU, print the table and write the plan JSON")
    _shape_args(p)
    p.add_argument("--gpu", default="auto", help='GPU name ("2080Ti", "RTX 4090", ...) or "auto" (NVML)')
    p.add_argument("--steps", type=int, default=25, help="denoising steps (latency prediction)")
    p.add_argument("--vram-gb", type=float, help="plan for this much memory instead of the GPU's")
    p.add_argument("--max-latency", type=float, help="seconds for all steps: minimise memory within it")
    p.add_argument("--allocator", choices=["expandable_segments", "default", "none"], default="expandable_segments",
                   help="PyTorch CUDA allocator setting the plan is priced for")
    p.add_argument("--solver", choices=["auto", "ilp", "dp"], default="auto",
                   help="the final solve: ILP (PuLP/CBC), exact DP, or auto (ILP when CBC is there)")
    p.add_argument("--rehash", choices=["off", "uniform", "greedy", "optimal"], default="off",
                   help="Step Rehash schedule (greedy and optimal need --calibration)")
    p.add_argument("--calibration", help="calibration JSON from `vramplan calibrate` (Step Rehash)")
    p.add_argument("--keys", type=int, help="Step Rehash: how many steps run the whole UNet")
    p.add_argument("--min-psnr", type=float, help="Step Rehash with --calibration: the fastest schedule predicted "
                   "to keep this PSNR (dB) against the full run")
    p.add_argument("-o", "--output", help="plan file to write (default: <model>-<gpu>.json)")
    p.add_argument("--plot", metavar="PNG", help="also draw per-block memory, original vs plan (needs matplotlib)")
    p.add_argument("--host-ram-gb", type=float,
                   help="pinned host memory the plan may use for placed values and streamed weights (default: "
                        "75%% of this machine's RAM with --gpu auto, else an assumed 24 GiB, printed with the plan)")
    p.add_argument("--pageable", action="store_true",
                   help="host memory cannot be pinned where the plan runs (container limits): price host-link "
                        "copies of placed values and streamed weights at the pageable rate")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table (still written)")

    p = sub.add_parser("gpus", help="list the known GPUs")
    p.add_argument("--json", action="store_true", help="print the GPU profiles as JSON instead of the table")

    p = sub.add_parser("profile", help="profile a model at a shape on meta tensors (needs torch)")
    _shape_args(p)
    p.add_argument("--kernel", choices=["flash", "efficient", "both"],
                   help="fused attention kernel (default: both into the cache, so that `plan` finds the profile "
                        "for any GPU; flash with -o)")
    p.add_argument("--max-k", type=int, default=256, help="largest slice count profiled")
    p.add_argument("-o", "--output", help="write the UNet's profile to this file (default: the whole pipeline's "
                                          "profile into the cache, where `plan` finds it)")
    p.add_argument("--regenerate-shipped", action="store_true", help="rewrite every shipped pipeline profile")
    p.add_argument("--json", action="store_true", help="print what was profiled and where it is as JSON (the text "
                                                     "goes to stderr)")

    p = sub.add_parser("schema", help="print the JSON Schema of plan files (or of profiles)")
    p.add_argument("--profile", action="store_true", help="the model profile schema instead")

    p = sub.add_parser("verify", help="run a plan on meta tensors of the full model: measured vs predicted")
    p.add_argument("plan")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="largest relative prediction error accepted (default 0.01 = 1%%); above it verify exits 1")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON (the text goes to stderr)")

    p = sub.add_parser("run", help="run a plan on its pipeline (weights from a local path or the HF cache)")
    p.add_argument("plan")
    p.add_argument("--image", help=f"conditioning image ({_pipelines_taking('image')})")
    p.add_argument("--prompt", help=f"text prompt ({_pipelines_taking('prompt')})")
    p.add_argument("--negative-prompt", help=f"negative prompt ({_pipelines_taking('prompt')})")
    p.add_argument("--out", default="video.gif", help="GIF or MP4 to write")
    p.add_argument("--seed", type=int, default=0, help="random seed of the run")
    p.add_argument("--steps", type=int, help="denoising steps (default: the plan's)")
    p.add_argument("--fps", type=int, default=7, help="frames per second of the video written")
    p.add_argument("--allow-download", action="store_true", help="let diffusers download missing weights")
    p.add_argument("--memory-snapshot", metavar="PICKLE",
                   help="CUDA only: write PyTorch's allocator snapshot of the run (open at pytorch.org/memory_viz)")
    p.add_argument("--json", action="store_true", help="print the run report (peaks, seconds per stage) as JSON")

    commands = dict(COMMANDS)
    for module_name in COMMAND_MODULES:  # commands that live in their own modules (fleet, rehash, ...)
        commands.update(importlib.import_module(module_name).register(sub))
    for command in sub.choices.values():  # `vramplan plan -v` as well as `vramplan -v plan`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="as `vramplan -v`: library log lines; tracebacks of errors")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    for name in PHASE_LOGGERS:  # a line per phase (profiling a new shape, ...) even without -v
        logging.getLogger(name).setLevel(logging.INFO)
    if not args.verbose:  # transformers' advisories (install torchvision, ...) are not the user's business here
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        check_number("--threads", args.threads, integer=True, minimum=1, allow_none=True)
        threads = set_threads(args)
        code = commands[args.command](args)
        if threads:
            print(threads, file=sys.stderr)
        return code
    except VramplanError as err:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `vramplan schema | head`: the reader left early; stop quietly
        try:  # Python's final flush of stdout would raise again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 1


def check_output(path: str | os.PathLike, what: str = "output file") -> Path:
    """Refuse an output path that cannot be written, before any work (profiling takes minutes)."""
    out = Path(path).expanduser()
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise InputFileError(f"{what} {out} is a folder; give a file name")
    if not folder.is_dir():
        raise InputFileError(f"cannot write {what} {out}: the folder {folder} does not exist (create it first)")
    if not os.access(folder, os.W_OK):
        raise InputFileError(f"cannot write {what} {out}: the folder {folder} is not writable")
    return out


def _pipelines_taking(conditioning: str) -> str:
    from .planner.pipelines import known_pipelines, pipeline_spec

    return ", ".join(p for p in known_pipelines() if pipeline_spec(p).conditioning == conditioning)


def _shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="svd",
                   help='"svd", "svd-xt", "animatediff", a local pipeline folder or a cached Hugging Face id')
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--frames", type=int, help="default: the model's")
    p.add_argument("--no-guidance", action="store_true", help="no classifier-free guidance (UNet batch 1)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"],
                   help="default: the model's own (bf16 for the Wan models, else fp16)")


def cmd_plan(args) -> int:
    from .api import plan_for

    check_output(args.output or "plan.json", "plan file")  # the default is written to the current folder
    for flag, value in (("--keys", args.keys), ("--calibration", args.calibration), ("--min-psnr", args.min_psnr)):
        if value is not None and args.rehash == "off":  # would be ignored: a plan without Step Rehash
            raise InvalidArgumentError(f"{flag} needs --rehash (uniform, greedy or optimal); without it the plan "
                                       "has no Step Rehash")
    if args.plot:
        check_output(args.plot, "plot file")
        if Path(args.plot).suffix.lower() != ".png":  # checked before the plan file is written
            raise InvalidArgumentError(f"--plot writes a PNG: name the file *.png, not {Path(args.plot).name!r}")
    started = time.perf_counter()
    plan = plan_for(
        gpu=args.gpu, model=args.model, height=args.height, width=args.width, frames=args.frames,
        guidance=not args.no_guidance, dtype=args.dtype, steps=args.steps, vram_gb=args.vram_gb,
        max_latency_s=args.max_latency, allocator=args.allocator, method=args.solver,
        rehash=args.rehash, calibration=args.calibration, keys=args.keys, pinned=not args.pageable,
        host_ram_gb=args.host_ram_gb, min_psnr=args.min_psnr,
    )
    goal = f"the smallest peak within {args.max_latency:g} s" if args.max_latency else "the fastest plan"
    print(f"planned {goal} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    if args.json:
        print(plan.model_dump_json(indent=1))
    else:
        print(plan_table(plan))
    if plan.rehash is not None and not args.json:
        from .planner.rehash import rehash_summary

        print(rehash_summary(plan))
    out = args.output or f"{Path(args.model).name or 'model'}-{plan.target.gpu.replace(' ', '')}.json"
    existed = Path(out).expanduser().exists()
    plan.save(out)
    print(f"\n{'overwrote' if existed else 'wrote'} {out}{' (it existed)' if existed else ''}",
          file=sys.stderr if args.json else sys.stdout)
    if args.plot:
        from .plots import plot_plan

        print(f"wrote {plot_plan(plan, args.plot)}", file=sys.stderr if args.json else sys.stdout)
    return 0


def plan_table(plan) -> str:
    """Per stage: residency, original vs planned peak, pinned host memory; per block of each sliced
    component: original vs planned activation peak, slice counts, groups, and why a block's plan
    exceeds its original; a legend of the plan's terms; then the totals, host memory beside GPU memory."""
    pred, target = plan.prediction, plan.target
    lines = [
        f"{plan.describe()} ({plan.pipeline or 'one model'}) on {target.gpu}: {_gib(target.usable_bytes)} GiB "
        f"usable, {target.attention_kernel} attention, allocator {target.allocator}",
    ]
    if plan.stages:
        lines += ["", f"{'stage':<14}{'component':<15}{'on GPU':<9}{'weights':>8}{'original act.':>15}"
                      f"{'planned act.':>14}{'stage peak':>12}{'host':>7}{'seconds':>9}"]
        resident = {c.component: c.resident for c in plan.components}
        for st in plan.stages:
            where = "always" if resident.get(st.component, True) else "moved"
            lines.append(f"{st.stage:<14}{st.component:<15}{where:<9}{_gib(st.weight_bytes):>8}"
                         f"{_gib(st.original_activation_bytes):>15}{_gib(st.activation_bytes):>14}"
                         f"{_gib(st.peak_bytes):>12}{_gib(st.host_bytes):>7}{st.seconds:>9.2f}")
    sliced = _sliced_components(plan)
    for comp, profile, model in sliced:
        streamed = set(comp.streamed)
        rows = _block_rows(comp, profile, model)
        lines += ["", f"{comp.component}: {comp.shape.describe()}",
                  f"  {'block':<22}{'original GiB':>13}{'planned GiB':>13}  {'slices k':<16}{'weights':<10}"
                  f"{'groups':<14}why bigger"]
        lines += [f"  {b:<22}{o:>13}{p:>13}  {k:<16}{'streamed' if b in streamed else '':<10}{g:<14}{why}".rstrip()
                  for b, o, p, k, g, why, _ in rows]
        present = max((r[6] for r in rows), default=0)
        if present:
            lines.append(f"  streamed weights on the GPU besides the planned activations: up to {_gib(present)} GiB "
                         f"at once (in the stage's planned act.)")
        placement = placement_summary(comp, profile)
        if placement:
            lines.append(f"  {placement}")
    if sliced:
        lines += ["", *LEGEND]
    streamed_peak = f" + streamed {_gib(pred.streamed_bytes)}" if pred.streamed_bytes else ""
    lines += [
        "",
        f"predicted peak   {_gib(pred.peak_bytes)} GiB in {pred.peak_stage} = context {_gib(pred.context_bytes)} + "
        f"weights {_gib(pred.weight_bytes)} + live {_gib(pred.live_bytes)} + transient {_gib(pred.transient_bytes)}"
        f"{streamed_peak} + allocator {_gib(pred.allocator_bytes)} + margin {_gib(pred.margin_bytes)}",
        f"pinned host      {_gib(pred.host_bytes)} GiB {_host_parts(plan)}; {_host_budget(target)}",
    ]
    if pred.host_bytes or pred.transfer_s:
        rate = "pinned" if target.pinned else "pageable"
        lines.append(f"host link        {pred.transfer_s:.2f} s of transfers not hidden behind compute ({rate} rate)")
    if pred.original_peak_bytes:
        lines.append(f"original         {_gib(pred.original_peak_bytes)} GiB (every component resident, "
                     f"unsliced; all frames decoded at once)")
    lines += [
        f"latency          {pred.latency_s:.2f} s for {target.steps} steps ({pred.unet_call_s * 1000:.0f} ms per "
        f"UNet call, {'calibrated' if pred.latency_calibrated else 'uncalibrated'})",
        f"solver           {plan.solver.method}: {plan.solver.status}, gap {plan.solver.gap}, "
        f"{plan.solver.solve_seconds * 1000:.0f} ms over {plan.solver.candidates} candidate segments",
    ]
    return "\n".join(lines)


LEGEND = (
    "legend  k          slices a unit's input is cut into along its axis (frames, tokens, rows); 1: whole",
    "        groups     consecutive units run slice by slice end to end with one k (what crosses stays one slice)",
    "        depth      slices of a group in flight at once, each on its own CUDA stream (memory: depth slices)",
    "        recompute  units needing statistics over a whole input (GroupNorm) get them by re-running its",
    "                   producers slice by slice instead of keeping the input whole",
    "        host       values kept in pinned host memory between segments, copied in slice by slice",
    "        streamed   blocks whose weights stay in pinned host memory, copied in just before use (the next",
    "                   prefetched); original/planned GiB: activation peak in the block, unmodified vs the plan",
)


def _host_parts(plan) -> str:
    """``(placed values X + streamed weights Y)`` of the prediction's pinned host memory."""
    streamed = sum(s.streamed_bytes for s in plan.stages)
    placed = plan.prediction.host_bytes - streamed
    if not plan.stages or not plan.prediction.host_bytes:
        return "(nothing placed or streamed)"
    return f"(placed values {_gib(placed)} + streamed weights {_gib(streamed)})"


def _host_budget(target) -> str:
    if target.host_ram_bytes is None:
        return "no host memory budget set"
    return f"budget {_gib(target.host_ram_bytes)} GiB ({target.host_ram_source or 'given'})"


def placement_summary(comp, profile=None) -> str:
    """One line: recompute, host placement, streamed blocks and depth of a component plan ("" if none)."""
    parts = []
    if comp.recompute:
        parts.append(f"recompute {len(comp.recompute)} unit{'s' * (len(comp.recompute) > 1)}")
    if comp.host:  # sizes: the prediction's host memory (placed values may share buffers)
        parts.append(f"host {len(comp.host)} value{'s' * (len(comp.host) > 1)}")
    if comp.streamed:
        size = ""
        if profile is not None and profile.block_weights:
            size = f" ({_gib(sum(profile.block_weights.get(b, 0) for b in comp.streamed))} GiB)"
        parts.append(f"streamed {len(comp.streamed)} block{'s' * (len(comp.streamed) > 1)}{size}")
    deep: dict[int, int] = {}
    for g in comp.groups:
        if g.depth > 1:
            deep[g.depth] = deep.get(g.depth, 0) + 1
    if deep:
        parts.append("depth " + ", ".join(f"{d} on {n} group{'s' * (n > 1)}" for d, n in sorted(deep.items())))
    return "; ".join(parts)


def _sliced_components(plan):
    """(component plan, its ModelProfile, its CostModel) for every sliced component we have a profile of."""
    from .plots import sliced_stages

    return [(comp, profile, model) for _, comp, profile, model in sliced_stages(plan)]


def _block_rows(plan, profile, model) -> list[tuple[str, str, str, str, str, str, int]]:
    from .plots import block_rows

    return [
        (r.block, _gib(r.original_bytes), _gib(r.planned_bytes), ",".join(map(str, r.ks)),
         f"{r.groups} ({r.grouped_units} units)" if r.groups else "-", r.why, r.streamed_bytes)
        for r in block_rows(plan, profile, model)
    ]


def cmd_gpus(args) -> int:
    from .planner.gpus import all_gpus

    if args.json:
        print(json.dumps([g.model_dump(mode="json") for g in all_gpus()], indent=1))
        return 0
    print(f"{'name':<16}{'usable GiB':>11}{'GB/s':>8}{'fp16 TFLOPS':>13}{'cc':>6}  attention")
    for g in all_gpus():
        print(f"{g.name:<16}{g.memory_usable_bytes / GIB:>11.2f}{g.memory_bandwidth_gbps:>8.0f}"
              f"{g.fp16_tensor_tflops:>13.1f}{g.compute_capability:>6}  {','.join(g.attention_kernels)}")
    return 0


def cmd_profile(args) -> int:
    """Without -o: the whole pipeline's profile into the cache, for both attention kernels by default
    (a GPU's kernel decides which one ``plan`` reads), saying where; with -o: the UNet's, to a file."""
    from .api import sample_shape_for

    check_number("--max-k", args.max_k, integer=True, minimum=1)
    if args.output:
        check_output(args.output, "profile file")
        if args.kernel == "both":
            raise InvalidArgumentError("-o writes one profile: give --kernel flash or --kernel efficient")
    from .runtime.profiler import DEFAULT_MAX_K, profile, regenerate_shipped, writable_cache_dir

    say = functools.partial(print, file=sys.stderr) if args.json else print  # --json: stdout is the data
    if args.regenerate_shipped:
        paths = []
        for path in regenerate_shipped(progress=say):
            say("wrote", path)
            paths.append(str(path))
        _print_json(args, {"regenerated": paths})
        return 0
    guidance = not args.no_guidance
    if args.dtype is None:  # not given: the model's own
        from .api import default_dtype

        args.dtype = default_dtype(args.model)
    shape = sample_shape_for(args.model, args.height, args.width, args.frames, guidance, args.dtype)
    if args.output:
        from .runtime.models import meta_unet

        kernel = args.kernel or "flash"
        prof = profile(meta_unet(args.model, shape.dtype), shape, kernel, name=args.model, max_k=args.max_k,
                       progress=say)
        prof.save(args.output)
        _print_json(args, {"model": args.model, "kernel": kernel, "written": str(args.output), "component": "unet",
                           "units": len(prof.units), "original_activation_peak_bytes": prof.original_peak_bytes,
                           "weight_bytes": prof.weight_bytes})
        say(f"wrote {args.output}: the UNet, {kernel} attention ({len(prof.units)} units; original activation "
              f"peak {_gib(prof.original_peak_bytes)} GiB; weights {_gib(prof.weight_bytes)} GiB). `plan` reads "
              f"the cache, not this file: run `profile` without -o for that")
        return 0
    from .planner.plan import shipped_pipeline_profile
    from .runtime.profiler import cached_pipeline_profile

    folder = writable_cache_dir()  # before building and profiling, not after
    kernels = ("flash", "efficient") if args.kernel in (None, "both") else (args.kernel,)
    records = []
    for kernel in kernels:
        what = f"{args.model} {shape.frames} x {args.height}x{args.width}, {kernel} attention"
        if args.max_k == DEFAULT_MAX_K and shipped_pipeline_profile(
                args.model, args.height, args.width, shape.frames, guidance, args.dtype, kernel) is not None:
            say(f"{what}: vramplan ships this profile; `plan` uses it (nothing to profile)")
            records.append({"kernel": kernel, "status": "shipped", "path": None, "stages": None})
            continue
        path = pipeline_cache_path(folder, args.model, args.height, args.width, shape.frames, guidance, args.dtype,
                                   kernel, args.max_k)
        found = path.exists()
        if not found:
            print(f"{what}: profiling the whole pipeline on meta tensors ...", file=sys.stderr, flush=True)
        prof = cached_pipeline_profile(args.model, args.height, args.width, shape.frames, guidance, args.dtype,
                                       kernel, max_k=args.max_k)
        stages = "; ".join(f"{st.stage} {len(st.profile.units)} units, original activation peak "
                           f"{_gib(st.profile.original_peak_bytes)} GiB" for st in prof.stages if st.profile)
        say(f"{what}: {'already in' if found else 'cached in'} {path} ({stages})")
        records.append({"kernel": kernel, "status": "already cached" if found else "cached", "path": str(path),
                        "stages": [{"stage": st.stage, "units": len(st.profile.units),
                                    "original_activation_peak_bytes": st.profile.original_peak_bytes}
                                   for st in prof.stages if st.profile]})
    _print_json(args, {"model": args.model, "height": args.height, "width": args.width, "frames": shape.frames,
                       "guidance": guidance, "dtype": args.dtype, "max_k": args.max_k, "profiles": records})
    if args.max_k != DEFAULT_MAX_K:
        say(f"note: `plan` reads profiles made with --max-k {DEFAULT_MAX_K}; this one is for --max-k {args.max_k}")
    else:
        say(f"`vramplan plan --model {args.model} --height {args.height} --width {args.width}"
              f"{f' --frames {args.frames}' if args.frames else ''}` now plans without profiling, for GPUs with "
              f"{' or '.join(kernels)} attention")
    return 0


def _print_json(args, data) -> None:
    if args.json:
        print(json.dumps(data, indent=1))


def pipeline_cache_path(folder: Path, model: str, height: int, width: int, frames: int, guidance: bool, dtype: str,
                        kernel: str, max_k: int) -> Path:
    """Where :func:`vramplan.runtime.profiler.cached_pipeline_profile` keeps this pipeline profile."""
    from .planner.pipelines import pipeline_source
    from .planner.plan import pipeline_profile_name
    from .runtime.profiler import PROFILER_VERSION

    name = pipeline_profile_name(pipeline_source(model).key, height, width, frames, guidance, dtype, kernel)
    return folder / name.replace(".pipeline.json", f"-k{max_k}-v{PROFILER_VERSION}.pipeline.json")


def cmd_schema(args) -> int:
    from .planner.schema import ModelProfile, Plan

    print(json.dumps((ModelProfile if args.profile else Plan).model_json_schema(), indent=2))
    return 0


def cmd_verify(args) -> int:
    from .planner.pipelines import check_number
    from .planner.schema import Plan

    check_number("--tolerance", args.tolerance, minimum=0)
    plan = Plan.load(args.plan, check=False)  # integrity is verify's first check: a failure exits 1
    from .runtime.verify import failures, integrity, verify_all

    say = functools.partial(print, file=sys.stderr) if args.json else print
    wrong, against_profile = integrity(plan)
    if wrong:
        print(f"\nFAILED: {args.plan} disagrees with itself or with its model (make a new plan):", file=sys.stderr)
        for problem in wrong:
            print(f"  {problem}", file=sys.stderr)
        return 1
    if against_profile:
        say(f"{plan.describe()}: every stated number recomputed from its profile and every field checked against it")
    else:
        say(f"{plan.describe()}: checked against itself (no profile of its model to recompute it from)")

    say(f"{plan.describe()}: executing every sliced component on meta tensors of the full-size model")
    reports = verify_all(plan, _trained_meta_models(plan) if plan.model_name == TRAINED else None,
                         progress=phase_printer())
    for report in reports:
        if report.component not in {c.component for c in plan.components}:
            say(f"\n{report.component}: runs whole")
        else:
            comp = plan.component(report.component)
            say(f"\n{comp.component}: {comp.shape.describe()}, {len(comp.slices)} sliced units, "
                  f"{len(comp.groups)} groups")
            if placement_summary(comp):
                say(f"  {placement_summary(comp)}")
        where = f"  (at {report.peak_label})" if report.peak_label else ""
        say(f"  measured activation peak   {_gib(report.measured_activation_bytes)} GiB{where}")
        say(f"  predicted activation peak  {_gib(report.predicted_activation_bytes)} GiB")
        if report.error is not None:
            say(f"  prediction error           {report.error * 100:+.2f} %")
        say(f"  allocator replay           {_gib(report.measured_needed_bytes)} GiB needed")
        if report.predicted_host_bytes or report.measured_host_bytes:
            error = "" if report.host_error is None else f" ({report.host_error * 100:+.2f} %)"
            say(f"  host memory                measured {_gib(report.measured_host_bytes)} GiB, predicted "
                  f"{_gib(report.predicted_host_bytes)} GiB{error}")
        say(f"  verified in {report.seconds:.1f} s")
    problems = failures(plan, reports, args.tolerance)
    if problems:
        print("\nFAILED:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        _verify_json(args, plan, reports, problems)
        return 1
    _verify_json(args, plan, reports, problems)
    if all(r.predicted_activation_bytes is None for r in reports):
        say("\nOK: every sliced component present and run (the plan has no predictions to check)")
    else:
        say(f"\nOK: every sliced component present, every prediction within {args.tolerance * 100:g} %")
    return 0


def phase_printer():
    """A line per phase on stderr, with the seconds since the command started it (stdout stays the result)."""
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    return say


def _verify_json(args, plan, reports, problems) -> None:
    """``verify --json``: what was measured and predicted per component, and the verdict."""
    if not args.json:
        return
    import dataclasses

    print(json.dumps({"plan": str(args.plan), "model": plan.describe(), "ok": not problems, "problems": problems,
                      "tolerance": args.tolerance,
                      "components": [dataclasses.asdict(r) for r in reports]}, indent=1, default=str))


def _trained_meta_models(plan) -> dict:
    """Meta-tensor copies of the shipped trained model's sliced components (it is not in the catalogue)."""
    from .cli_rehash import load
    from .runtime.models import meta_from_config

    pipe = load(plan)
    models = {}
    for comp in plan.components:
        module = getattr(pipe, comp.module_name)  # a stage's own plan (vae_encoder) runs on its attribute (vae)
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)  # transformers
        models[comp.component] = meta_from_config({**config, "_class_name": type(module).__name__}, comp.shape.dtype)
    return models


def cmd_run(args) -> int:
    from .planner.pipelines import check_number, pipeline_spec
    from .planner.schema import Plan

    plan = Plan.load(args.plan)
    spec = pipeline_spec(plan.pipeline)
    check_number("--steps", args.steps, integer=True, minimum=1, allow_none=True)
    check_number("--fps", args.fps, integer=True, minimum=1)
    check_video_out(args.out)
    if args.memory_snapshot:  # before loading anything: CUDA only
        check_output(args.memory_snapshot, "memory snapshot")
        from .runtime.runner import check_snapshot

        check_snapshot(args.memory_snapshot)
    if plan.rehash is not None and args.steps and args.steps != plan.rehash.steps:  # before loading weights
        raise InvalidArgumentError(f"--steps={args.steps}, but the plan's Step Rehash schedule is for "
                                   f"{plan.rehash.steps} steps: run with {plan.rehash.steps} or plan for {args.steps}")
    kwargs = {"num_inference_steps": args.steps} if args.steps else {}
    trained = plan.model_name == TRAINED  # the shipped demo model: not on the hub, loaded from the package
    if spec.conditioning == "image" and (args.prompt or args.negative_prompt):
        raise InvalidArgumentError(f"this {spec.pipeline} plan takes --image, not --prompt")
    if trained and not args.image:
        from .runtime.trained import heldout_example

        kwargs["image"] = heldout_example(0)[1]
    elif spec.conditioning == "prompt":
        if args.image:
            raise InvalidArgumentError(f"this {spec.pipeline} plan takes --prompt, not --image")
        if not args.prompt:
            raise InvalidArgumentError(f"this {spec.pipeline} plan needs --prompt (the text to animate)")
        kwargs.update(prompt=args.prompt, negative_prompt=args.negative_prompt)
    elif spec.conditioning == "image":
        if not args.image:
            raise InvalidArgumentError(f"this {spec.pipeline} plan needs --image (the conditioning image)")
        kwargs["image"] = read_image(args.image)

    import torch

    from .runtime.runner import run, save_video

    pipe = None
    if trained:
        from .cli_rehash import load, trained_kwargs

        pipe = load(plan)
        kwargs.update(trained_kwargs())
    print(f"{plan.describe()}: loading the pipeline, then running the plan ...", file=sys.stderr, flush=True)
    result = run(plan, pipe, allow_download=args.allow_download, memory_snapshot=args.memory_snapshot,
                 generator=torch.Generator().manual_seed(args.seed), **kwargs)
    written = save_video(result.frames, args.out, fps=args.fps)
    if args.json:
        print(result.report.model_dump_json(indent=1))
        print("wrote", written, file=sys.stderr)
        return 0
    print(result.report.summary())
    print("wrote", written)
    return 0


def check_video_out(path: str, flag: str = "--out") -> Path:
    """A GIF, or an MP4 with a video backend installed: checked before the run, not after it."""
    import importlib.util

    out = check_output(path, "video")
    suffix = out.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise InvalidArgumentError(f"{flag} {path}: write a .gif or an .mp4")
    if suffix == ".mp4" and not any(importlib.util.find_spec(m) for m in ("imageio_ffmpeg", "av")):
        raise InvalidArgumentError(f"{flag} {path}: writing .mp4 needs a video backend (pip install imageio-ffmpeg); "
                                   f"or write a .gif")
    return out


def read_image(path: str):
    """The conditioning image as RGB, or an InputFileError saying what is wrong with the file."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    if not file.is_file():
        raise InputFileError(f"--image {path}: {'is a folder' if file.is_dir() else 'no such file'}")
    try:
        with Image.open(file) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputFileError(f"--image {path} is not an image PIL can read ({type(err).__name__}: {err})") from err


# Modules with ``register(subparsers) -> {command: handler}``: each adds its own subcommands.
COMMAND_MODULES: tuple[str, ...] = ("vramplan.cli_rehash", "vramplan.cli_fleet")

COMMANDS = {
    "plan": cmd_plan, "gpus": cmd_gpus, "profile": cmd_profile, "schema": cmd_schema, "verify": cmd_verify,
    "run": cmd_run,
}

if __name__ == "__main__":
    sys.exit(main())
