"""``vramplan fleet`` (capacity planning: one model, or workloads x inventory), ``serve``, ``batch``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .planner.errors import VramplanError

GIB = 2**30
# Options of the one-model table; a workload file gives them per workload (ignored there, so refused).
SINGLE_OPTIONS = ("model", "height", "width", "frames", "no_guidance", "dtype", "steps", "rate", "gpus")
MIX_OPTIONS = ("max_jobs", "slack", "gap")  # only the workload-mix planner uses these
SINGLE_DEFAULTS: dict = {}


def register(sub) -> dict:
    from .cli import _shape_args

    p = sub.add_parser("fleet", help="capacity planning: one model per GPU type, or a workload mix at least cost",
                       description="Without --workloads: which GPUs fit one job, how fast, how many for --rate. "
                                   "With --workloads: the cheapest fleet (GPU types, counts, packing) for every "
                                   "workload's rate and latency bound.")
    _shape_args(p)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--rate", type=float, help="videos per hour to sustain")
    p.add_argument("--gpus", nargs="+", help="GPUs to consider (default: all known)")
    p.add_argument("--workloads", help="workload file (YAML or JSON): name, model, height, width, steps, rate, "
                                       "p95_latency_s per workload")
    p.add_argument("--inventory", help="GPU inventory file (YAML or JSON): gpu, count, price_per_hour "
                                       "(default: every known GPU, unlimited, default prices)")
    p.add_argument("--max-jobs", type=int, default=3, help="most jobs packed on one GPU (default 3)")
    p.add_argument("--slack", type=float, default=0.05,
                   help="latency a job may give up for a smaller peak, as a fraction of its fastest plan")
    p.add_argument("--gap", type=float, default=0.02,
                   help="stop when the fleet is within this fraction of the cheapest (default 0.02; 0: prove it)")
    p.add_argument("-o", "--output", help="write the fleet plan (JSON)")
    p.add_argument("--json", action="store_true", help="print the fleet plan (without --workloads: the rows of the "
                                                     "one-model table) as JSON instead of a table")
    p.add_argument("--emit", choices=["ray"], help="print (or with -o, write) a Ray Serve config file instead")
    p.add_argument("--fleet", help="with --emit ray: an existing fleet plan instead of planning one")
    p.add_argument("--schema", action="store_true", help="print the fleet plan file's JSON Schema")
    _http_args(p, emit=True)
    SINGLE_DEFAULTS.update({dest: p.get_default(dest) for dest in SINGLE_OPTIONS + MIX_OPTIONS})

    p = sub.add_parser("serve", help="serve a fleet plan on Ray Serve (HTTP: POST /jobs, GET /jobs/<id>)")
    p.add_argument("fleet", help="fleet plan file (vramplan fleet -o fleet.json)")
    _ray_args(p)
    _http_args(p)
    p.add_argument("--job-timeout", type=float,
                   help="seconds one job may run (default: ten times its predicted latency, at least 120)")
    p.add_argument("--start-timeout", type=float, default=600.0,
                   help="seconds to wait for every deployment to be up (default 600)")

    p = sub.add_parser("batch", help="run a JSONL file of jobs on a Ray cluster with a fleet plan's workers")
    p.add_argument("jobs", help="JSONL: one job per line: id, workload, image or prompt, seed, steps, options")
    p.add_argument("--fleet", required=True, help="fleet plan file")
    _ray_args(p)
    p.add_argument("--retries", type=int, default=2, help="tries after a failure before a job is reported failed")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--start-timeout", type=float, default=600.0,
                   help="seconds to wait for the workers to be placed and loaded (default 600)")
    return {"fleet": cmd_fleet, "serve": cmd_serve, "batch": cmd_batch}


def _ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local cluster)")
    p.add_argument("--out-dir", default="videos", help="where videos (and batch reports) are written")
    p.add_argument("--factory", default="vramplan.runtime.runner:load_pipeline",
                   help="pipeline factory 'module:function' taking the plan (default: load the plan's pipeline)")
    p.add_argument("--declare-gpu", help="GPU name replicas assume instead of asking NVML (test clusters)")
    p.add_argument("--tiny", action="store_true",
                   help="try the fleet on CPUs: every job runs a tiny random-weight pipeline (its plan swapped in; "
                        "GPU targets and packing kept)")
    p.add_argument("--placement", choices=["auto", "labels", "accelerator_type", "none"], default="auto",
                   help="how replicas ask for their GPU type (auto: labels on Ray >= 2.49)")


def _http_args(p: argparse.ArgumentParser, emit: bool = False) -> None:
    pre = "with --emit ray: " if emit else ""
    p.add_argument("--host", default=None, help=f"{pre}address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help=f"{pre}port (default 8000)")
    p.add_argument("--token", help=f"{pre}bearer token clients must send (default: $VRAMPLAN_TOKEN, else a new one "
                                   "printed once; prefer the variable: arguments show in `ps`)")
    p.add_argument("--insecure", action="store_true", help=f"{pre}serve without authentication")
    p.add_argument("--data-dir", help=f"{pre}folder whose files jobs may name as image_path (default: none; "
                                      "images come as data)")


def cmd_fleet(args) -> int:
    if args.schema:
        from .planner.capacity import FleetPlan

        print(json.dumps(FleetPlan.model_json_schema(), indent=2))
        return 0
    http = [f for f, v in (("--host", args.host), ("--port", args.port), ("--token", args.token),
                           ("--insecure", args.insecure), ("--data-dir", args.data_dir)) if v]
    if http and not args.emit:
        raise VramplanError(f"{', '.join(http)} go with --emit ray (the Serve config); `vramplan serve` takes them too")
    if args.workloads or args.fleet:
        given = ["--" + d.replace("_", "-") for d in SINGLE_OPTIONS if getattr(args, d) != SINGLE_DEFAULTS[d]]
        if given:
            raise VramplanError(f"{', '.join(given)} belong to the one-model table (without --workloads); "
                                "give model, shape, steps and rate per workload in the workload file")
        return _fleet_mix(args)
    if args.emit or args.inventory or args.output:
        raise VramplanError("--inventory, -o and --emit need --workloads (or --fleet for --emit)")
    mix = ["--" + d.replace("_", "-") for d in MIX_OPTIONS if getattr(args, d) != SINGLE_DEFAULTS[d]]
    if mix:
        raise VramplanError(f"{', '.join(mix)} tune the workload-mix planner: they need --workloads")
    return _fleet_single(args)


def _fleet_single(args) -> int:
    from .cli import _gib
    from .planner.fleet import capacity
    from .planner.pipelines import check_number

    check_number("--rate", args.rate, positive=True, allow_none=True)
    check_number("--steps", args.steps, integer=True, minimum=1)
    from .planner.gpus import all_gpus

    count = len(args.gpus) if args.gpus else len(all_gpus())
    print(f"planning {args.model} for {count} GPU types ...", file=sys.stderr, flush=True)
    from .api import default_dtype

    args.dtype = args.dtype or default_dtype(args.model)
    rows = capacity(model=args.model, height=args.height, width=args.width, frames=args.frames, steps=args.steps,
                    guidance=not args.no_guidance, dtype=args.dtype, videos_per_hour=args.rate, gpus=args.gpus)
    if args.json:
        print(json.dumps({"model": args.model, "height": args.height, "width": args.width, "frames": args.frames,
                          "steps": args.steps, "guidance": not args.no_guidance, "dtype": args.dtype,
                          "videos_per_hour": args.rate, "rows": [r.model_dump(mode="json") for r in rows]},
                         indent=1))
        return 0
    print(f"{args.model}, {args.height}x{args.width}, {args.steps} steps: fastest plan per GPU "
          f"(latency uncalibrated unless marked)")
    print(f"{'gpu':<16}{'fits':<6}{'peak GiB':>9}{'s/video':>9}{'videos/h':>10}{'GPUs needed':>13}")
    for r in rows:
        needed = "-" if r.gpus_needed is None else str(r.gpus_needed)
        print(f"{r.gpu:<16}{'yes' if r.fits else 'no':<6}{_gib(r.peak_bytes):>9}"
              f"{'-' if r.seconds_per_video is None else f'{r.seconds_per_video:.1f}':>9}"
              f"{'-' if r.videos_per_hour is None else f'{r.videos_per_hour:.1f}':>10}{needed:>13}  {r.note}")
    return 0


def _fleet_mix(args) -> int:
    from .planner.capacity import FleetPlan, parse_inventory, parse_workloads, plan_fleet, read_document

    if args.fleet:
        if not args.emit:
            raise VramplanError("--fleet (an existing plan) goes with --emit ray; to plan, give --workloads")
        fleet, fleet_path = FleetPlan.load(args.fleet), args.fleet
    else:
        if args.output:
            from .cli import check_output

            check_output(args.output, "output file")
        workloads = parse_workloads(read_document(args.workloads), source=args.workloads)
        offers = parse_inventory(read_document(args.inventory), args.inventory) if args.inventory else None
        print(f"planning {len(workloads)} workloads ...", file=sys.stderr)
        fleet = plan_fleet(workloads, offers, slack=args.slack, max_jobs=args.max_jobs, gap=args.gap)
        fleet_path = args.output if args.output and not args.emit else None
        if fleet_path:
            fleet.save(fleet_path)
    if args.emit == "ray":
        return _emit_ray(args, fleet, fleet_path)
    print(fleet.model_dump_json(indent=1) if args.json else fleet_table(fleet))
    if args.output:
        print(f"\nwrote {args.output}", file=sys.stderr)
    return 0


def _emit_ray(args, fleet, fleet_path) -> int:
    from pathlib import Path

    from .fleet.serve import dump_config, serve_config

    if not any(alloc.count for alloc in fleet.gpus):
        raise VramplanError("the fleet plan serves no workload (every one is unserved): no Ray Serve config to "
                            "write; relax the latency bounds or offer faster GPUs")
    if fleet_path is None:  # the config points at a fleet plan file: write it next to the config
        fleet_path = Path(args.output or ".").with_suffix("").as_posix() + ".fleet.json" if args.output else "fleet.json"
        fleet.save(fleet_path)
        print(f"wrote {fleet_path}", file=sys.stderr)
    import os

    from .fleet.front import digest, resolve_token

    host, port = args.host or "127.0.0.1", args.port or 8000
    _check_port(port)
    token, generated = resolve_token(args.token, os.environ, host, args.insecure)
    if generated:
        print(f"token (shown once; the config holds only its SHA-256): {token}", file=sys.stderr)
    text = dump_config(serve_config(fleet_path, fleet, host=host, port=port, data_dir=args.data_dir,
                                    token_sha256=None if token is None else digest(token)))
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output} (deploy with: serve deploy {args.output})", file=sys.stderr)
    else:
        print(text)
    return 0


def fleet_table(fleet) -> str:
    lines = [f"{'gpu':<16}{'count':>6}{'$/h':>8}  packing (jobs per GPU: workload  peak GiB  latency s packed/alone)"]
    for alloc in fleet.gpus:
        for i, packing in enumerate(alloc.packings):
            head = (f"{alloc.gpu:<16}{alloc.count:>6}{alloc.price_per_hour * alloc.count:>8.2f}" if i == 0
                    else " " * 30)
            jobs = ", ".join(f"{j.workload} {j.peak_bytes / GIB:.1f} {j.packed_latency_s:.0f}/{j.solo_latency_s:.0f}"
                             for j in packing.jobs)
            lines.append(f"{head}  {packing.count} x [{jobs}]")
    lines += ["", f"{'workload':<20}{'rate/h':>8}{'capacity/h':>12}{'p95 bound s':>13}"]
    for w in fleet.workloads:
        bound = "-" if w.p95_latency_s is None else f"{w.p95_latency_s:g}"
        lines.append(f"{w.name:<20}{w.rate:>8g}{fleet.capacity(w.name):>12.1f}{bound:>13}")
    for u in fleet.unserved:
        lines.append(f"UNSERVED {u.workload}: {u.reason}")
    s = fleet.solver
    lines += ["", f"cost ${fleet.cost_per_hour:.2f}/hour for {sum(a.count for a in fleet.gpus)} GPUs; solver {s.status} "
                  f"({s.patterns} patterns; plans {s.planning_seconds:.1f} s, ILP {s.solve_seconds:.2f} s)"]
    lines += [f"assumption: {a}" for a in fleet.assumptions]
    return "\n".join(lines)


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise VramplanError(f"--port={port}: give a TCP port, 1..65535")


def cmd_serve(args) -> int:
    import os
    import signal

    from .fleet import connect
    from .fleet.front import digest, resolve_token
    from .fleet.inputs import DataDir
    from .fleet.serve import ServeSettings, start, stop
    from .planner.capacity import FleetPlan

    fleet = _tiny(args, FleetPlan.load(args.fleet))
    host, port = args.host or "127.0.0.1", args.port or 8000
    _check_port(port)
    if args.job_timeout is not None and not args.job_timeout > 0:
        raise VramplanError(f"--job-timeout={args.job_timeout}: give seconds > 0")
    if args.data_dir:
        DataDir(args.data_dir)  # a folder, checked before Ray starts
    token, generated = resolve_token(args.token, os.environ, host, args.insecure)
    settings = ServeSettings(token_sha256=None if token is None else digest(token),
                             data_dir=args.data_dir and os.path.realpath(args.data_dir), job_timeout_s=args.job_timeout)
    local = not (args.address or os.environ.get("RAY_ADDRESS"))
    ray = None
    try:
        ray = connect(args.address)
        _warn_without_gpus(ray, args.placement)
        print(f"starting {len(fleet.replicas())} deployments (each loads its pipeline) ...", file=sys.stderr, flush=True)
        url = start(fleet, factory=args.factory, out_dir=args.out_dir, host=host, port=port,
                    declared_gpu=args.declare_gpu, placement_mode=args.placement, settings=settings,
                    nodes_may_join=not local, wait_s=args.start_timeout,
                    say=lambda m: print(m, file=sys.stderr, flush=True))
        auth = "no authentication (--insecure)" if token is None else "send 'Authorization: Bearer <token>'"
        if generated:
            print(f"token (shown once): {token}", file=sys.stderr)
        print(f"ready: {url} ({auth}; jobs kept in {os.path.realpath(args.out_dir)}). POST /jobs, GET /jobs/<id>. "
              f"Ctrl-C stops.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping ...", file=sys.stderr, flush=True)
        return 0
    finally:
        if ray is not None:
            signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # a second Ctrl-C: leave at once
            try:
                stop(local)
            except Exception as err:  # noqa: BLE001 - stopping: say it, never a traceback
                print(f"while stopping: {type(err).__name__}: {err}", file=sys.stderr)


def cmd_batch(args) -> int:
    import os

    from .fleet import connect
    from .fleet.batch import read_jobs, run_batch
    from .fleet.serve import workload_kinds
    from .planner.capacity import FleetPlan

    fleet = _tiny(args, FleetPlan.load(args.fleet))
    if args.retries < 0:
        raise VramplanError(f"--retries={args.retries}: give 0 or more")
    if not read_jobs(args.jobs, workload_kinds(fleet)):  # a missing file or a typo: before Ray starts
        raise VramplanError(f"{args.jobs} holds no jobs (one JSON object per line)")
    _warn_without_gpus(connect(args.address), args.placement)
    workers = sum(replicas for replicas, _, _ in fleet.replicas().values())
    print(f"starting up to {workers} workers; each loads its pipeline before the first job (up to "
          f"--start-timeout {args.start_timeout:g} s) ...", file=sys.stderr, flush=True)
    summary = run_batch(fleet, args.jobs, args.out_dir, factory=args.factory, retries=args.retries,
                        declared_gpu=args.declare_gpu, placement_mode=args.placement, progress=not args.no_progress,
                        start_timeout=args.start_timeout,
                        nodes_may_join=bool(args.address or os.environ.get("RAY_ADDRESS")))
    print(json.dumps(summary.model_dump()))
    return 0 if summary.failed == 0 else 1


def _tiny(args, fleet):
    """With --tiny: the tiny pipelines and plans for them (a real plan does not fit a tiny model)."""
    if not args.tiny:
        return fleet
    from .fleet.testing import tiny_fleet

    args.factory = "vramplan.fleet.testing:tiny_pipeline"
    return tiny_fleet(fleet)


def _warn_without_gpus(ray, placement: str) -> None:
    """Replicas wait for GPU nodes; say so up front on a cluster that has none (an autoscaler may add them)."""
    if ray.cluster_resources().get("GPU", 0) == 0:
        print("warning: this Ray cluster has no GPUs yet; the workers need nodes with their GPU types. "
              "To try a fleet on CPUs: ray start --head --num-gpus 2 --labels ray.io/accelerator-type=<type>, "
              "then --address, --declare-gpu <GPU> and --tiny (tiny random-weight pipelines).", file=sys.stderr)
