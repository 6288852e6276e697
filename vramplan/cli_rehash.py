"""Step Rehash commands: ``calibrate``, ``compare`` and ``trained-plan`` (registered by ``vramplan.cli``).

``trained-plan`` makes a plan for the small trained demo model that ships with vramplan (it has no
full-size profile to plan from); ``calibrate`` and ``compare`` take any plan, and load the trained
model for plans made by ``trained-plan``, the plan's pipeline otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .planner.errors import VramplanError

TRAINED = "trained-svd"  # model_name of plans for the shipped trained demo model
TRAINED_WAN = "trained-tiny-wan"  # ... for the shipped trained tiny Wan (runtime.trained_wan.rehash_plan)
PROMPTED = ("AnimateDiffPipeline", "WanPipeline")  # pipelines that take a text prompt


def register(sub) -> dict:
    p = sub.add_parser("calibrate", help="Step Rehash: measure step-to-step similarity and reuse error (one full run)")
    p.add_argument("plan", help="the plan whose shape and steps to calibrate")
    _input_args(p)
    p.add_argument("--max-gap", type=int, default=4, help="reuse distances measured (steps)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the plan's)")
    p.add_argument("--cuts", nargs="+", help="measure only these cuts (default: every candidate; each costs "
                   "max-gap reuse calls per step)")
    p.add_argument("-o", "--output", help="calibration JSON (default: beside the cached profiles)")
    p.add_argument("--plot", help="heatmap PNG (default: the JSON's name with .png)")
    p.add_argument("--frontier", action="store_true", help="also print the Pareto frontier of schedules (cut, key "
                   "steps) by predicted PSNR vs UNet FLOPs, and plot it (--frontier-plot)")
    p.add_argument("--frontier-plot", help="frontier PNG (default: the JSON's name with -frontier.png)")
    p.add_argument("--refine", type=int, metavar="N", help="measured, then predicted: at each FLOPs level of the "
                   "predicted frontier run the N best-predicted schedules on the calibration's own call, store "
                   "their measured PSNR in the calibration; the planner ranks those by the measurement (1..16)")
    p.add_argument("--from", dest="existing", metavar="CALIBRATION",
                   help="use this calibration JSON instead of measuring one (with --frontier)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (with --frontier: the frontier)")

    p = sub.add_parser("compare", help="run the original pipeline and the plan on one seed: PSNR/SSIM, FLOPs, time")
    p.add_argument("plan")
    _input_args(p)
    p.add_argument("--gif", help="write original | planned side by side")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON (PSNR/SSIM per frame, FLOPs, "
                   "seconds, what was timed)")

    p = sub.add_parser("trained-plan", help="plan the shipped trained demo model (uniform slicing + Step Rehash)")
    p.add_argument("--rehash", choices=["off", "uniform", "greedy", "optimal"], default="uniform")
    p.add_argument("--keys", type=int, help="steps that run the whole UNet (default: every other step)")
    p.add_argument("--calibration", help="calibration JSON (greedy and optimal need one)")
    p.add_argument("--min-psnr", type=float, help="with --calibration: the fewest FLOPs predicted to keep this PSNR "
                   "(dB) against the full run")
    p.add_argument("--slices", type=int, default=1, help="slice every sliceable unit this many ways (grouped)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("-o", "--output", default="trained-plan.json")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of the summary (still written)")
    return {"calibrate": cmd_calibrate, "compare": cmd_compare, "trained-plan": cmd_trained_plan}


def _input_args(p) -> None:
    p.add_argument("--image", help="conditioning image (SVD; default for the trained model: a held-out clip's frame)")
    p.add_argument("--prompt", help="text prompt (AnimateDiff, Wan; default for the trained tiny Wan: a held-out "
                   "prompt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-download", action="store_true")


def trained_plan(pipe, *, rehash: str = "uniform", keys: int | None = None, calibration=None, slices: int = 1,
                 steps: int | None = None, **choice):
    """A plan for the trained demo pipeline: every sliceable unit ``slices`` ways (grouped, groups kept
    off the cut), and a Step Rehash schedule chosen as the planner does (``choice``: ``cut``,
    ``threshold``, ``max_unet_flops`` of :func:`vramplan.runtime.rehash.with_rehash`)."""
    from .runtime import trained
    from .runtime.apply import uniform_pipeline_plan
    from .runtime.rehash import with_rehash

    steps = steps or trained.NUM_INFERENCE_STEPS
    plan = uniform_pipeline_plan(pipe, slices, trained.HEIGHT, trained.WIDTH, trained.NUM_FRAMES)
    plan = plan.model_copy(update={"model_name": TRAINED})
    if rehash == "off":
        return plan
    if slices > 1:  # end every group at the cuts so that each cut can be cached
        from .runtime.rehash import rehash_cuts, split_groups_at

        unet = plan.component("unet")
        comps = [split_groups_at(unet, rehash_cuts(pipe.unet)) if c.component == "unet" else c
                 for c in plan.components]
        plan = plan.model_copy(update={"components": comps})
    return with_rehash(plan, pipe.unet, mode=rehash, steps=steps, keys=keys, calibration=calibration, **choice)


def load(plan, allow_download: bool = False):
    """The plan's pipeline: the shipped trained model for ``trained-plan`` plans."""
    if plan.model_name == TRAINED:
        from .runtime.trained import trained_svd_pipeline

        return trained_svd_pipeline()
    if plan.model_name == TRAINED_WAN:
        from .runtime.trained_wan import load_trained_wan

        return load_trained_wan()
    from .runtime.runner import load_pipeline

    return load_pipeline(plan, allow_download)


def call_inputs(plan, args) -> dict:
    """The pipeline's inputs from the command line (image or prompt), with the trained model's defaults."""
    kwargs: dict = {}
    if plan.model_name == TRAINED_WAN:  # default: the first held-out prompt, at the model's guidance
        from .runtime import trained_wan

        return {"prompt": args.prompt or trained_wan.prompt(*trained_wan.heldout_combinations()[0]),
                "guidance_scale": trained_wan.GUIDANCE_SCALE}
    if plan.pipeline in PROMPTED:
        if not args.prompt:
            raise VramplanError(f"a {plan.pipeline} plan needs --prompt")
        return {"prompt": args.prompt}
    if args.image:
        from .cli import read_image

        kwargs["image"] = read_image(args.image)
    elif plan.model_name == TRAINED:
        from .runtime.trained import heldout_example

        kwargs["image"] = heldout_example(0)[1]
    else:
        raise VramplanError("a Stable Video Diffusion plan needs --image (the conditioning image)")
    if plan.model_name == TRAINED:
        kwargs.update(trained_kwargs())
    return kwargs


def trained_kwargs() -> dict:
    from .runtime import trained

    return dict(fps=trained.FPS, motion_bucket_id=trained.MOTION_BUCKET_ID,
                noise_aug_strength=trained.NOISE_AUG_STRENGTH)


def _check_trained_args(args) -> None:
    """Refuse counts the schedule would silently clamp or replace, before loading the model."""
    from .cli import check_output
    from .planner.pipelines import check_number

    check_number("--steps", args.steps, integer=True, minimum=1)
    check_number("--slices", args.slices, integer=True, minimum=1)
    check_number("--keys", args.keys, integer=True, minimum=1, allow_none=True)
    check_number("--min-psnr", args.min_psnr, positive=True, allow_none=True)
    if args.min_psnr is not None and args.calibration is None:
        raise VramplanError("--min-psnr needs --calibration (the quality predictor works from a calibration)")
    if args.keys is not None and args.keys > args.steps:
        raise VramplanError(f"--keys={args.keys} must lie in 1..--steps ({args.steps})")
    for flag, value in (("--keys", args.keys), ("--calibration", args.calibration)):
        if value is not None and args.rehash == "off":
            raise VramplanError(f"{flag} needs --rehash (uniform, greedy or optimal); --rehash off plans no Step Rehash")
    check_output(args.output, "plan file")


def _check_run_args(args, *outputs: tuple[str | None, str]) -> None:
    """``calibrate``/``compare`` inputs that would fail late (after loading the model, or in a traceback)."""
    from .cli import check_output

    for path, what in outputs:
        if path:
            check_output(path, what)


def _progress(pipe, message: str) -> None:
    """Say what the long run does and show the pipeline's step bar (the trained model ships with it off)."""
    print(message + " ...", file=sys.stderr, flush=True)
    pipe.set_progress_bar_config(**{**getattr(pipe, "_progress_bar_config", {}), "disable": False})


def cmd_trained_plan(args) -> int:
    from .runtime.trained import trained_svd_pipeline

    _check_trained_args(args)
    pipe = trained_svd_pipeline()
    plan = trained_plan(pipe, rehash=args.rehash, keys=args.keys, calibration=args.calibration,
                        slices=args.slices, steps=args.steps, min_psnr=args.min_psnr)
    written = plan.save(args.output)
    if args.json:
        print(plan.model_dump_json(indent=1))
        print("wrote", written, file=sys.stderr)
        return 0
    if plan.rehash is not None:
        from .planner.rehash import rehash_summary

        print(rehash_summary(plan))
    print("wrote", written)
    return 0


def cmd_calibrate(args) -> int:
    import json

    from .planner.pipelines import check_number
    from .planner.rehash import Calibration
    from .planner.schema import Plan
    from .runtime.calibrate import calibrate, default_path, plot_calibration

    plan = Plan.load(args.plan)
    check_number("--steps", args.steps, integer=True, minimum=1, allow_none=True)
    check_number("--max-gap", args.max_gap, integer=True, minimum=1)
    _check_run_args(args, (args.output, "calibration file"), (args.plot, "plot file"),
                    (args.frontier_plot, "frontier plot file"))
    if (args.existing or args.frontier_plot) and not args.frontier:
        raise VramplanError("--from and --frontier-plot go with --frontier")
    check_number("--refine", args.refine, integer=True, minimum=1, allow_none=True)
    if args.refine is not None and args.existing:
        raise VramplanError("--refine runs schedules on the calibration's own call: calibrate with it (not --from)")
    if args.refine is not None and args.refine > 16:
        raise VramplanError(f"--refine {args.refine}: measure at most 16 schedules per FLOPs level")
    cal = Calibration.load(args.existing) if args.existing else None  # a bad file fails before the model loads
    inputs = call_inputs(plan, args) if cal is None else {}
    pipe = load(plan, args.allow_download)
    if cal is None:
        _progress(pipe, f"calibrating {len(args.cuts) if args.cuts else 'every candidate'} cut(s): one run of the "
                        f"pipeline, each step also reruns the model's tail from up to {args.max_gap} earlier steps "
                        f"per cut")
        cal = calibrate(pipe, plan=plan, num_inference_steps=args.steps, cuts=args.cuts, max_gap=args.max_gap,
                        seed=args.seed, model_name=plan.model_name, **inputs)
        if args.refine:
            from .runtime.calibrate import refine

            print(f"refining: running the {args.refine} best-predicted schedules at each FLOPs level of the "
                  f"frontier on the same call ...", file=sys.stderr, flush=True)
            cal = refine(pipe, cal, args.refine, plan=plan, **inputs)
        out = Path(args.output) if args.output else default_path(cal, plan.model_name)
        cal.save(out)
        plot = plot_calibration(cal, args.plot or out.with_suffix(".png"))
        if not args.json:
            print(f"calibrated {len(cal.cuts)} cuts over {cal.steps} steps ({cal.scheduler}); wrote {out} and {plot}")
            if cal.measured:
                print(f"measured {len(cal.measured)} schedules on the calibration's call (--refine {args.refine})")
            for row in _cut_rows(cal):
                print(f"  {row['cut']:<55} adjacent similarity {row['adjacent_similarity_min']:.4f}.."
                      f"{row['adjacent_similarity_max']:.4f}, reuse error (gap 1) {row['reuse_error_gap1_mean']:.4f} mean")
    else:
        out = Path(args.existing)
    if not args.frontier:
        if args.json:
            print(json.dumps({"calibration": str(out), "steps": cal.steps, "scheduler": cal.scheduler,
                              "cuts": _cut_rows(cal)}, indent=1))
        return 0
    from .runtime.calibrate import denoiser, frontier_rows, plot_frontier, schedule_candidates

    cands, full = schedule_candidates(denoiser(pipe), cal)
    rows = frontier_rows(cands, full, cal.steps)
    plot = plot_frontier(cands, full, cal.steps, args.frontier_plot or out.with_name(out.stem + "-frontier.png"))
    if args.json:
        print(json.dumps({"calibration": str(out), "frontier": rows, "plot": str(plot)}, indent=1))
        return 0
    print(f"Pareto frontier of {len(cands)} schedules (cut, key steps) by PSNR vs the full run (measured on the "
          f"calibration's call where --refine ran the schedule, else predicted):")
    print(f"  {'FLOPs':>7} {'PSNR':>7} {'':<9} {'keys':>4}  {'cut':<48} schedule")
    for r in rows:
        p = r["psnr"]
        psnr = "-" if p is None else "exact" if p >= 200 else f"{p:.1f}"
        print(f"  {r['flops_fewer']:>6.2f}x {psnr:>7} {r['psnr_source']:<9} {r['keys']:>4}  {r['cut']:<48} "
              f"{r['schedule']}")
    print(f"wrote {plot}")
    return 0


def _cut_rows(cal) -> list[dict]:
    """Per cut: the step-to-step similarity range and the mean error of reusing the previous step."""
    rows = []
    for entry in cal.cuts:
        adjacent = [entry.similarity[s - 1][s] for s in range(1, cal.steps)] or [1.0]
        errors = [entry.error[s - 1][s] for s in range(1, cal.steps)] or [0.0]
        rows.append({"cut": entry.cut, "adjacent_similarity_min": min(adjacent),
                     "adjacent_similarity_max": max(adjacent), "reuse_error_gap1_mean": sum(errors) / len(errors)})
    return rows


def cmd_compare(args) -> int:
    from .planner.schema import Plan
    from .runtime.compare import compare, side_by_side

    plan = Plan.load(args.plan)
    if args.gif:
        from .cli import check_video_out

        check_video_out(args.gif, "--gif")
    import json
    import time

    started = time.perf_counter()
    inputs = call_inputs(plan, args)
    pipe = load(plan, args.allow_download)
    _progress(pipe, "running the plan (FLOPs counted), the original (FLOPs counted), then each once more timed, "
                    "on one seed")
    result = compare(plan, pipe, seed=args.seed, **inputs)
    total = time.perf_counter() - started
    timed = ("'wall clock' is one whole pipeline call each (conditioning, the denoising loop, decoding), run "
             "without counters; 'UNet' the UNet calls inside it")
    if args.json:
        print(json.dumps({
            "psnr": result.psnr, "ssim": result.ssim, "original_unet_flops": result.original_unet_flops,
            "planned_unet_flops": result.planned_unet_flops, "original_seconds": result.original_seconds,
            "planned_seconds": result.planned_seconds, "original_unet_seconds": result.original_unet_seconds,
            "planned_unet_seconds": result.planned_unet_seconds, "timed": timed, "command_seconds": round(total, 2),
        }, indent=1))
    else:
        print(result.summary())
        print(f"timed       {timed}; this command took {total:.1f} s in all (loading the model, four pipeline "
              f"calls: two with FLOP counters, two timed, and the comparison)")
    if args.gif:
        print("wrote", side_by_side(result, args.gif), file=sys.stderr if args.json else sys.stdout)
    return 0
