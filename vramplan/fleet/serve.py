"""Serve a fleet plan on Ray Serve: one deployment per (GPU type, workload), an HTTP job API in front.

Placement: each worker deployment asks for its GPU type through Ray's accelerator label
(``label_selector={"ray.io/accelerator-type": ...}``, Ray >= 2.49; ``accelerator_type`` on older Ray)
and for ``num_gpus`` = the job's GPU fraction from the fleet plan (its memory share when the ILP
packs it, 1 when it runs alone), so Ray co-locates replicas only where their plans' peaks fit.
Replicas: the plan's count is the autoscaling maximum and initial size; one video runs at a time per
replica (``max_ongoing_requests=1``: the plan's peak is for one job, and a video takes minutes), the
rest wait in Serve's queues. Each replica checks its GPU against its plan before loading anything.

HTTP (JSON): ``POST /jobs`` {"workload", "image" | "prompt", "seed", "steps", "options"} -> {"id"};
``GET /jobs/<id>`` -> status (queued, running, done, failed), progress (step k of n), the video path
and the RunReport, or the job's error; ``GET /jobs/<id>/video`` -> the video bytes; ``GET /`` -> the
workloads. A failing job is recorded as failed; the replica goes on serving.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import uuid
from pathlib import Path

from ..planner.capacity import FleetError, FleetPlan
from ..planner.gpus import find_gpu
from ..planner.schema import Plan
from . import NAMESPACE, require_ray
from .jobs import DEFAULT_FACTORY, check_gpu, execute, import_factory

APP_NAME = "vramplan"
BOARD_NAME = "vramplan-jobs"
WORKER_MAX_ONGOING = 1  # one minute-long video at a time per replica: the plan's peak is for one job
CONSTRUCTOR_RETRIES = 2


def deployment_name(gpu: str, workload: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{workload}--{gpu}")


def ray_accelerator_type(gpu: str) -> str:
    """The accelerator type Ray detects for this GPU (its NVML name run through Ray's own rule)."""
    profile = find_gpu(gpu)
    nvml = next((a for a in profile.aliases if a.startswith("NVIDIA ")), f"NVIDIA {profile.name}")
    try:
        from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

        found = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(nvml)
        if found:
            return found
    except (ImportError, AttributeError):  # pragma: no cover - Ray internals moved
        pass
    return re.sub(r"^NVIDIA\s+", "", nvml).replace(" ", "-")


def _labels_supported() -> bool:
    ray = require_ray()
    major, minor = (int(p) for p in ray.__version__.split(".")[:2])
    return (major, minor) >= (2, 49)


def placement(gpu: str, mode: str = "auto") -> dict:
    """Ray actor options that put a replica on a node with this GPU type."""
    if mode == "none":
        return {}
    acc = ray_accelerator_type(gpu)
    if mode == "labels" or (mode == "auto" and _labels_supported()):
        return {"label_selector": {"ray.io/accelerator-type": acc}}
    return {"accelerator_type": acc}


def deployment_options(fleet: FleetPlan, placement_mode: str = "auto") -> dict[str, dict]:
    """Serve options per worker deployment, from the fleet plan (also what ``--emit ray`` writes)."""
    out = {}
    for (gpu, workload), (replicas, fraction, _) in sorted(fleet.replicas().items()):
        out[deployment_name(gpu, workload)] = {
            "max_ongoing_requests": WORKER_MAX_ONGOING,
            "autoscaling_config": {"min_replicas": 1, "initial_replicas": replicas, "max_replicas": replicas,
                                   "target_ongoing_requests": 1},
            "ray_actor_options": {"num_gpus": fraction, "num_cpus": 1, **placement(gpu, placement_mode)},
            "health_check_period_s": 30,
            "graceful_shutdown_timeout_s": 600,  # let a running video finish
        }
        if _constructor_retries_supported():  # a replica on the wrong GPU will not get better by retrying
            out[deployment_name(gpu, workload)]["max_constructor_retry_count"] = CONSTRUCTOR_RETRIES
    return out


def _constructor_retries_supported() -> bool:
    import inspect

    from ray.serve.deployment import Deployment

    return "max_constructor_retry_count" in inspect.signature(Deployment.options).parameters


def _board_class():
    ray = require_ray()

    @ray.remote(num_cpus=0)
    class JobBoard:
        """Every job's record: status, progress, result or error. Updated by workers, read by the API."""

        def __init__(self):
            self.jobs: dict[str, dict] = {}

        def create(self, job_id: str, workload: str) -> None:
            self.jobs[job_id] = {"id": job_id, "workload": workload, "status": "queued", "step": 0, "steps": None,
                                 "submitted": time.time()}

        def update(self, job_id: str, **fields) -> None:
            self.jobs.setdefault(job_id, {"id": job_id}).update(fields)

        def get(self, job_id: str) -> dict | None:
            return self.jobs.get(job_id)

    return JobBoard


def job_board():
    return _board_class().options(name=BOARD_NAME, namespace=NAMESPACE, get_if_exists=True,
                                  lifetime="detached").remote()


class FleetWorker:
    """One (GPU type, workload) replica: checks its GPU, loads its pipeline once, runs one job at a time."""

    def __init__(self, plan_json: str, workload: str, factory: str = DEFAULT_FACTORY, out_dir: str = "videos",
                 declared_gpu: str | None = None):
        self.plan = Plan.model_validate_json(plan_json)
        self.gpu = check_gpu(self.plan, declared_gpu)  # refuse before loading anything
        self.workload, self.out_dir = workload, out_dir
        self.pipe = import_factory(factory)(self.plan)
        self.board = job_board()

    def _run(self, job: dict) -> dict:
        job_id = job["id"]
        self.board.update.remote(job_id, status="running", gpu=self.gpu, started=time.time())

        def progress(k: int, n: int) -> None:
            self.board.update.remote(job_id, step=k, steps=n)

        try:
            result = execute(self.plan, self.pipe, job, self.out_dir, progress)
        except Exception as err:  # noqa: BLE001 - a bad job fails alone; the replica goes on
            record = {"status": "failed", "error": f"{type(err).__name__}: {err}", "finished": time.time()}
        else:
            record = {"status": "done", "finished": time.time(), **result}
        self.board.update.remote(job_id, **record)
        return record

    async def run(self, job: dict) -> dict:
        return await asyncio.to_thread(self._run, job)


class FleetAPI:
    """The HTTP front: submit, poll, fetch the video. Routes each job to a deployment of its workload."""

    def __init__(self, workers: dict, weights: dict, workloads: list[str]):
        self.workers, self.weights, self.workloads = workers, weights, workloads
        self.board = job_board()
        self.tasks: set = set()

    async def submit(self, job: dict) -> str:
        workload = job.get("workload")
        if workload not in self.workloads:
            raise KeyError(f"unknown workload {workload!r}; this fleet serves {', '.join(self.workloads)}")
        names = [n for n in self.workers if self.weights[n][0] == workload]
        if not names:
            raise KeyError(f"workload {workload!r} has no deployment (the fleet plan left it unserved)")
        job = {**job, "id": uuid.uuid4().hex}
        await self.board.create.remote(job["id"], workload)
        name = random.choices(names, weights=[self.weights[n][1] for n in names])[0]
        task = asyncio.get_running_loop().create_task(self._dispatch(name, job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return job["id"]

    async def _dispatch(self, name: str, job: dict) -> None:
        try:
            await self.workers[name].run.remote(job)
        except Exception as err:  # noqa: BLE001 - the replica died or was removed: record it on the job
            await self.board.update.remote(job["id"], status="failed", error=f"{type(err).__name__}: {err}")

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response

        parts = [p for p in request.url.path.split("/") if p]
        if request.method == "POST" and parts == ["jobs"]:
            try:
                body = await request.json()
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
                return JSONResponse({"id": await self.submit(body)})
            except (ValueError, KeyError) as err:
                return JSONResponse({"error": str(err).strip("'\"")}, status_code=400)
        if request.method == "GET" and len(parts) in (2, 3) and parts[0] == "jobs":
            record = await self.board.get.remote(parts[1])
            if record is None:
                return JSONResponse({"error": f"no job {parts[1]!r}"}, status_code=404)
            if len(parts) == 2:
                return JSONResponse(record)
            if parts[2] == "video" and record.get("video_path"):
                return Response(Path(record["video_path"]).read_bytes(), media_type="image/gif"
                                if record["video_path"].endswith(".gif") else "video/mp4")
            return JSONResponse({"error": "no video (yet)", "status": record.get("status")}, status_code=404)
        if request.method == "GET" and not parts:
            return JSONResponse({"workloads": self.workloads, "deployments": sorted(self.workers)})
        return JSONResponse({"error": "routes: POST /jobs, GET /jobs/<id>, GET /jobs/<id>/video"}, status_code=404)


def build_app(fleet: FleetPlan, factory: str = DEFAULT_FACTORY, out_dir: str = "videos",
              declared_gpu: str | None = None, placement_mode: str = "auto"):
    """The Serve application of a fleet plan (checked for packing beyond memory first)."""
    require_ray()
    from ray import serve

    fleet.check()
    options = deployment_options(fleet, placement_mode)
    worker_cls = serve.deployment(FleetWorker)
    workers, weights = {}, {}
    for (gpu, workload), (replicas, _, plan) in sorted(fleet.replicas().items()):
        name = deployment_name(gpu, workload)
        workers[name] = worker_cls.options(name=name, **options[name]).bind(
            plan.model_dump_json(), workload, factory, str(Path(out_dir).resolve()), declared_gpu)
        weights[name] = (workload, replicas)
    api = serve.deployment(FleetAPI).options(name="FleetAPI", ray_actor_options={"num_cpus": 0})
    return api.bind(workers, weights, [w.name for w in fleet.workloads])


def app_builder(args: dict):
    """For Ray Serve config files: ``import_path: vramplan.fleet.serve:app_builder`` with
    ``args: {fleet: path, factory: ..., out_dir: ...}``."""
    fleet = FleetPlan.load(args["fleet"])
    return build_app(fleet, args.get("factory", DEFAULT_FACTORY), args.get("out_dir", "videos"),
                     args.get("declared_gpu"), args.get("placement", "auto"))


def serve_config(fleet_path: str | Path, fleet: FleetPlan, factory: str = DEFAULT_FACTORY,
                 out_dir: str = "videos", port: int = 8000) -> dict:
    """A Ray Serve config file (``serve deploy``) building the same application."""
    deployments = [{"name": name, **opts} for name, opts in deployment_options(fleet).items()]
    return {
        "http_options": {"host": "0.0.0.0", "port": port},
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": "vramplan.fleet.serve:app_builder",
            "args": {"fleet": str(Path(fleet_path).resolve()), "factory": factory, "out_dir": out_dir},
            "deployments": deployments,
        }],
    }


def start(fleet: FleetPlan, *, factory: str = DEFAULT_FACTORY, out_dir: str = "videos", host: str = "127.0.0.1",
          port: int = 8000, declared_gpu: str | None = None, placement_mode: str = "auto", blocking: bool = False):
    """Deploy the fleet's application on the connected Ray cluster; returns the ingress handle."""
    require_ray()
    from ray import serve

    app = build_app(fleet, factory, out_dir, declared_gpu, placement_mode)
    serve.start(http_options={"host": host, "port": port})
    try:
        return serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)
    except RuntimeError as err:  # Serve names the failed deployments; their messages say why
        status = serve.status().applications.get(APP_NAME)
        why = [f"{name}: {d.message.strip().splitlines()[-1]}" for name, d in (status.deployments if status else {}).items()
               if d.message]
        raise FleetError(f"{err} " + " | ".join(why)) from err


def dump_config(config: dict) -> str:
    """YAML when PyYAML is there (what ``serve deploy`` reads), JSON otherwise (also valid YAML)."""
    try:
        import yaml

        return yaml.safe_dump(config, sort_keys=False)
    except ImportError:
        return json.dumps(config, indent=2)
