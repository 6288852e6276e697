"""Serve a fleet plan on Ray Serve: one deployment per (GPU type, workload), an HTTP job API in front.

Placement: each worker deployment asks for its GPU type through Ray's accelerator label
(``label_selector={"ray.io/accelerator-type": ...}``, Ray >= 2.49; ``accelerator_type`` on older Ray)
and for ``num_gpus`` = the job's GPU fraction from the fleet plan (its memory share when the ILP
packs it, 1 when it runs alone), so Ray co-locates replicas only where their plans' peaks fit.
Replicas: the plan's count is the autoscaling maximum and initial size; one video runs at a time per
replica (``max_ongoing_requests=1``: the plan's peak is for one job). Each replica checks its GPU
against its plan before loading anything. Before deploying, :func:`placement_problems` checks that
every replica fits some node of the cluster, and says which does not and why.

HTTP (:mod:`.front`, bearer token on every route): ``POST /jobs`` -> 202 {"id"}; ``GET /jobs/<id>``
-> status (queued, running, done, failed), progress, attempts, the RunReport or the error;
``GET /jobs/<id>/video``; ``GET /``. Jobs live in a SQLite store in the output folder (:mod:`.store`),
owned by one job board actor: a worker claims a job under a lease it renews, so a job runs once even
when delivered twice, and a job whose worker (or the whole server) died goes back to the queue once.
A job past its time limit stops at its next step; one that does not stop marks its replica unhealthy,
and Serve replaces it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..planner.capacity import FleetError, FleetPlan
from ..planner.gpus import find_gpu
from ..planner.schema import Plan
from . import NAMESPACE, require_ray
from .front import Front, digest
from .inputs import Limits
from .jobs import DEFAULT_FACTORY, check_gpu, execute, import_factory
from .store import JobStore

log = logging.getLogger(__name__)

APP_NAME = "vramplan"
BOARD_NAME = "vramplan-jobs"
WORKER_MAX_ONGOING = 1  # one minute-long video at a time per replica: the plan's peak is for one job
CONSTRUCTOR_RETRIES = 2
API_MAX_ONGOING = 64  # submissions and polls are short; Serve's default of 5 would queue pollers behind uploads
HEALTH_CHECK_S = 5


@dataclass(frozen=True)
class ServeSettings:
    """What the front and the workers need to know beyond the fleet plan (picklable: Ray ships it)."""

    token_sha256: str | None  # None: no authentication (--insecure)
    out_dir: str = "videos"  # the job store and the videos (on the job board's node)
    data_dir: str | None = None
    limits: Limits = field(default_factory=Limits)
    job_timeout_s: float | None = None  # None: from each plan's predicted latency
    lease_s: float = 30.0  # a running job whose worker is silent this long goes back to the queue
    sweep_s: float = 2.0  # how often the front re-queues lapsed jobs and hands out queued ones


def deployment_name(gpu: str, workload: str) -> str:
    """Readable and unique for any names: an ASCII slug plus a hash of the exact (workload, GPU)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{workload}--{gpu}").strip("-.")[:48].strip("-.") or "workload"
    exact = hashlib.sha256(json.dumps([workload, gpu]).encode()).hexdigest()[:8]
    return f"{slug}-{exact}"


def deployment_names(fleet: FleetPlan) -> dict[tuple[str, str], str]:
    """Deployment name per (GPU type, workload), checked unique (one would replace another in Serve)."""
    names = {key: deployment_name(*key) for key in sorted(fleet.replicas())}
    seen: dict[str, tuple[str, str]] = {}
    for key, name in names.items():
        if name in seen:
            raise FleetError(f"workloads {seen[name][1]!r:.80} and {key[1]!r:.80} map to one deployment name "
                             f"{name!r}; rename one of them")
        seen[name] = key
    return names


def workload_kinds(fleet: FleetPlan) -> dict[str, str]:
    """Conditioning ("image" or "prompt") of every served workload."""
    from ..planner.pipelines import pipeline_spec

    return {workload: pipeline_spec(plan.pipeline).conditioning
            for (_, workload), (_, _, plan) in fleet.replicas().items()}


def time_limit(plan: Plan, steps: int | None, settings: ServeSettings) -> float:
    """A job's time limit: the operator's, or ten times its predicted latency (at least two minutes)."""
    if settings.job_timeout_s:
        return settings.job_timeout_s
    plan_steps = plan.target.steps if plan.target else 25
    predicted = plan.prediction.latency_s if plan.prediction else 60.0
    return max(120.0, 10 * predicted * (steps or plan_steps) / max(plan_steps, 1))


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
    out, names = {}, deployment_names(fleet)
    for (gpu, workload), (replicas, fraction, _) in sorted(fleet.replicas().items()):
        out[names[(gpu, workload)]] = {
            "max_ongoing_requests": WORKER_MAX_ONGOING,
            "autoscaling_config": {"min_replicas": 1, "initial_replicas": replicas, "max_replicas": replicas,
                                   "target_ongoing_requests": 1},
            "ray_actor_options": {"num_gpus": fraction, "num_cpus": 1, **placement(gpu, placement_mode)},
            "health_check_period_s": HEALTH_CHECK_S,  # a replica wedged by a job past its limit goes soon
            "graceful_shutdown_timeout_s": 60,  # a video cut short is re-queued from the store
        }
        if _constructor_retries_supported():  # a replica on the wrong GPU will not get better by retrying
            out[names[(gpu, workload)]]["max_constructor_retry_count"] = CONSTRUCTOR_RETRIES
    return out


def _constructor_retries_supported() -> bool:
    import inspect

    from ray.serve.deployment import Deployment

    return "max_constructor_retry_count" in inspect.signature(Deployment.options).parameters


# -- placement, checked before deploying ----------------------------------------------------------


def demands(fleet: FleetPlan, placement_mode: str = "auto") -> list[dict]:
    """What each worker deployment asks of a node, per replica: resources and labels."""
    out = []
    for (gpu, workload), (replicas, fraction, _) in sorted(fleet.replicas().items()):
        where = placement(gpu, placement_mode)
        resources = {"CPU": 1.0, "GPU": float(fraction)}
        if "accelerator_type" in where:
            resources[f"accelerator_type:{where['accelerator_type']}"] = 0.001
        out.append({"deployment": deployment_name(gpu, workload), "workload": workload, "replicas": replicas,
                    "resources": resources, "labels": where.get("label_selector", {})})
    return out


def placement_problems(wanted: list[dict], nodes: list[dict]) -> list[str]:
    """Which replicas no node of the cluster can hold (first fit, largest first, on the nodes' totals),
    each with what it asks and what the cluster has. Empty: every replica fits."""
    free = [dict(n.get("Resources", {})) for n in nodes if n.get("Alive", True)]
    labels = [n.get("Labels") or {} for n in nodes if n.get("Alive", True)]
    unplaced: dict[str, int] = {}
    replicas = [d for d in wanted for _ in range(d["replicas"])]
    for d in sorted(replicas, key=lambda d: (-d["resources"].get("GPU", 0), -d["resources"].get("CPU", 0))):
        for res, lab in zip(free, labels, strict=True):
            if all(lab.get(k) == v for k, v in d["labels"].items()) and \
                    all(res.get(k, 0) + 1e-9 >= v for k, v in d["resources"].items()):
                for k, v in d["resources"].items():
                    res[k] = res.get(k, 0) - v
                break
        else:
            unplaced[d["deployment"]] = unplaced.get(d["deployment"], 0) + 1
    if not unplaced:
        return []
    have = "; ".join(
        f"node {i + 1}: " + ", ".join(f"{k} {v:g}" for k, v in sorted(n.get("Resources", {}).items())
                                      if k in ("CPU", "GPU") or k.startswith("accelerator_type:"))
        + "".join(f", label {k}={v}" for k, v in sorted((n.get("Labels") or {}).items()) if k != "ray.io/node-id")
        for i, n in enumerate(x for x in nodes if x.get("Alive", True)))
    out = []
    for d in wanted:
        if d["deployment"] in unplaced:
            asks = ", ".join(f"{k} {v:g}" for k, v in d["resources"].items()) + "".join(
                f", label {k}={v}" for k, v in d["labels"].items())
            out.append(f"deployment {d['deployment']}: {unplaced[d['deployment']]} of {d['replicas']} replica(s) "
                       f"cannot be placed; each asks {asks}")
    return out + [f"the cluster has {have or 'no nodes'}"]


# -- the job board: one actor owning the SQLite store ----------------------------------------------


class JobBoard:
    """The store behind a Ray actor (one writer). Restarted by Ray when it dies; it reopens the file."""

    def __init__(self, out_dir: str):
        self.store = JobStore(out_dir)

    def where(self) -> str:
        return str(self.store.dir)

    def create(self, job_id, workload, request, image):
        return self.store.create(job_id, workload, request, image)

    def get(self, job_id):
        return self.store.get(job_id)

    def video(self, job_id):
        return self.store.video(job_id)

    def queued(self):
        return self.store.queued()

    def fail_queued(self, job_id, error):
        return self.store.fail_queued(job_id, error)

    def expire(self):
        return self.store.expire()

    def claim(self, job_id, owner, lease_s, gpu=None):
        return self.store.claim(job_id, owner, lease_s, gpu)

    def heartbeat(self, job_id, owner, lease_s, step=None, steps=None):
        return self.store.heartbeat(job_id, owner, lease_s, step, steps)

    def finish(self, job_id, owner, status, **fields):
        return self.store.finish(job_id, owner, status, **fields)

    def counts(self):
        return self.store.counts()


def ensure_board(out_dir: str | Path, pin: bool = True):
    """The job board actor for ``out_dir`` (an existing one for another folder is replaced), on this
    node when ``pin`` (the store is a local file). Waits until its store is open."""
    ray = require_ray()
    out = str(Path(out_dir).resolve())
    try:
        existing = ray.get_actor(BOARD_NAME, namespace=NAMESPACE)
    except ValueError:
        existing = None
    if existing is not None:
        if ray.get(existing.where.remote(), timeout=60) == out:
            return existing
        ray.kill(existing, no_restart=True)
        _wait_gone(ray)
    options = {"name": BOARD_NAME, "namespace": NAMESPACE, "lifetime": "detached", "num_cpus": 0,
               "max_restarts": -1, "max_task_retries": -1, "get_if_exists": True}
    if pin:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                        soft=False)
    board = ray.remote(JobBoard).options(**options).remote(out)
    ray.get(board.where.remote(), timeout=60)
    return board


def _wait_gone(ray, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(BOARD_NAME, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.1)


class RemoteBoard:
    """Awaitable calls on the board actor, found by name or created for ``out_dir`` when missing (a config
    deploy has no driver to create it). Ray retries calls across the board's restarts."""

    def __init__(self, out_dir: str):
        self._out_dir, self._actor = out_dir, None

    def __getattr__(self, method: str):
        async def call(*args, **kwargs):
            from ray.exceptions import ActorDiedError

            for attempt in range(2):
                try:
                    return await getattr(self._handle(), method).remote(*args, **kwargs)
                except ActorDiedError:  # killed for good (a restarted server made a new one): look it up again
                    self._actor = None
                    if attempt:
                        raise

        return call

    def _handle(self):
        if self._actor is None:
            ray = require_ray()
            self._actor = ray.remote(JobBoard).options(
                name=BOARD_NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0, max_restarts=-1,
                max_task_retries=-1, get_if_exists=True).remote(str(Path(self._out_dir).resolve()))
        return self._actor


# -- the deployments -------------------------------------------------------------------------------


class FleetWorker:
    """One (GPU type, workload) replica: checks its GPU, loads its pipeline once, runs one job at a time
    under a lease on the job board, within the job's time limit."""

    def __init__(self, plan_json: str, workload: str, factory: str = DEFAULT_FACTORY,
                 declared_gpu: str | None = None, settings: ServeSettings | None = None):
        self.plan = Plan.model_validate_json(plan_json)
        self.gpu = check_gpu(self.plan, declared_gpu)  # refuse before loading anything
        self.workload = workload
        self.settings = settings or ServeSettings(token_sha256=None)
        self.pipe = import_factory(factory)(self.plan)
        self.board = RemoteBoard(self.settings.out_dir)
        self.wedged: str | None = None

    def check_health(self) -> None:
        if self.wedged:  # Serve replaces this replica: its pipeline is held by a job that did not stop
            raise RuntimeError(self.wedged)

    async def run(self, job_id: str) -> str:
        if self.wedged:
            return "refused"  # stays queued; the front hands it out again
        owner, lease = uuid.uuid4().hex, self.settings.lease_s
        job = await self.board.claim(job_id, owner, lease, self.gpu)
        if job is None:
            return "skipped"  # delivered twice, or already run: never run twice
        progress = {"step": 0, "steps": None}
        stop = threading.Event()
        beat = asyncio.create_task(self._heartbeat(job_id, owner, progress, stop))
        tmp = tempfile.mkdtemp(prefix="vramplan-job-")
        limit = time_limit(self.plan, job.get("steps"), self.settings)
        fields: dict = {}
        try:
            work = asyncio.get_running_loop().run_in_executor(
                None, lambda: execute(self.plan, self.pipe, job, tmp, lambda k, n: progress.update(step=k, steps=n),
                                      stop.is_set))
            try:
                result = await asyncio.wait_for(asyncio.shield(work), timeout=limit)
            except TimeoutError:
                stop.set()
                try:
                    await asyncio.wait_for(asyncio.shield(work), timeout=max(2.0, lease))
                except Exception:  # noqa: BLE001 - stopped (JobTimeoutError) or failed on the way out
                    pass
                if not work.done():
                    work.add_done_callback(lambda f: f.cancelled() or f.exception())  # whatever it ends with
                    self.wedged = f"a job ran past its time limit of {limit:g} s and did not stop"
                status, fields = "failed", {"error": f"the job ran past its time limit of {limit:g} s"}
            except Exception as err:  # noqa: BLE001 - a bad job fails alone; the replica goes on
                status, fields = "failed", {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
            else:
                path = Path(result["video_path"])
                status, fields = "done", {"report": result["report"], "video": path.read_bytes(),
                                          "fmt": path.suffix.lstrip(".")}
        finally:
            stop.set()
            beat.cancel()
            shutil.rmtree(tmp, ignore_errors=True)
        await self.board.finish(job_id, owner, status, step=progress["step"], steps=progress["steps"], **fields)
        return status

    async def _heartbeat(self, job_id: str, owner: str, progress: dict, stop: threading.Event) -> None:
        lease = self.settings.lease_s
        while not stop.is_set():
            await asyncio.sleep(min(1.0, lease / 4))
            try:
                mine = await self.board.heartbeat(job_id, owner, lease, progress["step"], progress["steps"])
            except Exception:  # noqa: BLE001 - the board is restarting: the next beat goes through
                log.warning("job %s: heartbeat failed; retrying", job_id, exc_info=True)
                continue
            if not mine:  # the lease lapsed and the job went back to the queue: stop this copy
                stop.set()


class FleetAPI:
    """The HTTP front (:class:`.front.Front`) wired to the board and the worker deployments."""

    def __init__(self, workers: dict, weights: dict, kinds: dict[str, str], settings: ServeSettings,
                 info: dict | None = None):
        self.workers, self.weights, self.settings = workers, weights, settings
        self.board = RemoteBoard(settings.out_dir)
        self.front = Front(kinds, self.board, self.dispatch, token_sha256=settings.token_sha256,
                           limits=settings.limits, data_dir=settings.data_dir, info=info)
        self.inflight: set[str] = set()
        self.sweeper = None
        self._start_sweeper()

    def _start_sweeper(self) -> None:
        if self.sweeper is None:
            try:
                self.sweeper = asyncio.get_running_loop().create_task(self._sweep())
            except RuntimeError:  # no loop yet: started with the first request
                pass

    async def __call__(self, request):
        self._start_sweeper()
        return await self.front.handle(request)

    async def check_health(self) -> None:
        self._start_sweeper()
        if self.sweeper is not None and self.sweeper.done():
            raise RuntimeError(f"the job sweeper stopped: {self.sweeper.exception()!r}")

    def dispatch(self, job_id: str, workload: str) -> None:
        """Hand a stored job to a replica of its workload (in the background; the store is the truth)."""
        names = [n for n in self.workers if self.weights[n][0] == workload]
        if job_id in self.inflight:
            return
        self.inflight.add(job_id)
        task = asyncio.get_running_loop().create_task(self._deliver(job_id, workload, names))
        task.add_done_callback(lambda _t: self.inflight.discard(job_id))

    async def _deliver(self, job_id: str, workload: str, names: list[str]) -> None:
        if not names:
            await self.board.fail_queued(job_id, f"workload {workload!r:.80} is no longer served")
            return
        name = random.choices(names, weights=[self.weights[n][1] for n in names])[0]
        try:
            await self.workers[name].run.remote(job_id)
        except Exception:  # noqa: BLE001 - the replica died or was replaced: the sweeper hands the job out again
            log.warning("job %s: delivery to %s failed; it stays in the store", job_id, name, exc_info=True)

    async def _sweep(self) -> None:
        """Re-queue jobs whose worker went silent (once), hand out queued jobs nobody holds (after a restart)."""
        while True:
            try:
                await self.board.expire()
                for job_id, workload in await self.board.queued():
                    if job_id not in self.inflight:
                        self.dispatch(job_id, workload)
            except Exception:  # noqa: BLE001 - the board is restarting: try again next round
                log.warning("job sweep failed; retrying", exc_info=True)
            await asyncio.sleep(self.settings.sweep_s)


def build_app(fleet: FleetPlan, factory: str = DEFAULT_FACTORY, declared_gpu: str | None = None,
              placement_mode: str = "auto", settings: ServeSettings | None = None, front_node: str | None = None):
    """The Serve application of a fleet plan (checked for packing beyond memory first). ``front_node``:
    the IP of the node the HTTP front must run on (where the data folder is)."""
    require_ray()
    from ray import serve

    fleet.check()
    settings = settings or ServeSettings(token_sha256=None)
    options = deployment_options(fleet, placement_mode)
    names = deployment_names(fleet)
    worker_cls = serve.deployment(FleetWorker)
    workers, weights = {}, {}
    for (gpu, workload), (replicas, _, plan) in sorted(fleet.replicas().items()):
        name = names[(gpu, workload)]
        workers[name] = worker_cls.options(name=name, **options[name]).bind(
            plan.model_dump_json(), workload, factory, declared_gpu, settings)
        weights[name] = (workload, replicas)
    info = {"deployments": sorted(workers), "auth": "none" if settings.token_sha256 is None else "bearer",
            "image_paths": settings.data_dir is not None, "max_body_bytes": settings.limits.max_body_bytes}
    front_options = {"num_cpus": 0}
    if front_node:  # Ray gives every node a resource named after its IP: asking a sliver of it pins the front
        front_options["resources"] = {f"node:{front_node}": 0.001}
    api = serve.deployment(FleetAPI).options(name="FleetAPI", ray_actor_options=front_options,
                                             health_check_period_s=HEALTH_CHECK_S,
                                             max_ongoing_requests=API_MAX_ONGOING)
    return api.bind(workers, weights, workload_kinds(fleet), settings, info)


def app_builder(args: dict):
    """For Ray Serve config files: ``import_path: vramplan.fleet.serve:app_builder`` with ``args``:
    ``fleet`` (path), ``out_dir``, ``token_sha256`` (SHA-256 of the bearer token: the file never holds
    the token) or ``insecure: true``, and optionally ``factory``, ``data_dir``, ``declared_gpu``,
    ``placement``, ``job_timeout_s``."""
    from .front import TOKEN_ENV

    token_sha256 = args.get("token_sha256")
    if token_sha256 is None and args.get("token_env"):
        import os

        token = os.environ.get(args["token_env"])
        token_sha256 = digest(token) if token else None
    if token_sha256 is None and not args.get("insecure"):
        raise FleetError(f"the Serve config's args need token_sha256 (`vramplan fleet --emit ray` writes it; clients "
                         f"send the token as 'Authorization: Bearer <token>'), token_env (e.g. {TOKEN_ENV}), or "
                         f"insecure: true to serve without authentication")
    if token_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", str(token_sha256)):
        raise FleetError("token_sha256 must be 64 hex digits (hashlib.sha256(token.encode()).hexdigest())")
    fleet = FleetPlan.load(args["fleet"])
    settings = ServeSettings(token_sha256=None if args.get("insecure") else token_sha256,
                             out_dir=str(Path(args.get("out_dir", "videos")).resolve()),
                             data_dir=args.get("data_dir"), job_timeout_s=args.get("job_timeout_s"))
    return build_app(fleet, args.get("factory", DEFAULT_FACTORY), args.get("declared_gpu"),
                     args.get("placement", "auto"), settings)


def serve_config(fleet_path: str | Path, fleet: FleetPlan, factory: str = DEFAULT_FACTORY,
                 out_dir: str = "videos", port: int = 8000, host: str = "127.0.0.1",
                 token_sha256: str | None = None, data_dir: str | None = None) -> dict:
    """A Ray Serve config file (``serve deploy``) building the same application: loopback unless told,
    and the token's SHA-256 (never the token) unless ``token_sha256`` is None (then: insecure)."""
    deployments = [{"name": name, **opts} for name, opts in deployment_options(fleet).items()]
    args = {"fleet": str(Path(fleet_path).resolve()), "factory": factory, "out_dir": out_dir}
    args.update({"token_sha256": token_sha256} if token_sha256 else {"insecure": True})
    if data_dir:
        args["data_dir"] = str(Path(data_dir).resolve())
    return {
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": "vramplan.fleet.serve:app_builder",
            "args": args, "deployments": deployments,
        }],
    }


# -- starting, waiting until ready, stopping -------------------------------------------------------


def start(fleet: FleetPlan, *, factory: str = DEFAULT_FACTORY, out_dir: str = "videos", host: str = "127.0.0.1",
          port: int = 8000, declared_gpu: str | None = None, placement_mode: str = "auto",
          settings: ServeSettings | None = None, nodes_may_join: bool = False, wait_s: float = 600.0,
          say: Callable[[str], None] = log.warning) -> str:
    """Deploy the fleet's application on the connected cluster and wait until every deployment is up;
    returns the URL. Replicas no node can hold are an error at once (``nodes_may_join``: a warning, and
    the wait goes on, up to ``wait_s``); a replica that fails to start is an error naming it."""
    ray = require_ray()
    from ray import serve

    fleet.check()
    deployment_names(fleet)
    problems = placement_problems(demands(fleet, placement_mode), ray.nodes())
    if problems:
        message = "; ".join(problems)
        if not nodes_may_join:
            raise FleetError(f"{message}. Give a cluster with room for them (--address), or fewer replicas.")
        say(f"warning: {message}; waiting up to {wait_s:g} s for nodes to join (an autoscaler may add them)")
    settings = replace(settings or ServeSettings(token_sha256=None), out_dir=str(Path(out_dir).resolve()))
    ensure_board(settings.out_dir, pin=True)
    app = build_app(fleet, factory, declared_gpu, placement_mode, settings, front_node=ray.util.get_node_ip_address())
    serve.start(http_options={"host": host, "port": port})
    host, port = _serving_at(host, port, settings, say)
    serve._run(app, name=APP_NAME, route_prefix="/", _blocking=False)
    wait_ready(wait_s, say)
    return f"http://{host}:{port}"


def _serving_at(host: str, port: int, settings: ServeSettings, say: Callable[[str], None]) -> tuple[str, int]:
    """Where Serve's proxy really listens: a cluster's Serve keeps the HTTP options it started with."""
    from .front import is_loopback

    try:
        from ray.serve.context import _get_global_client

        config = _get_global_client().http_config
        actual = (config.host, int(config.port))
    except Exception:  # noqa: BLE001 - Serve internals moved: trust the options given
        return host, port
    if actual != (host, port):
        say(f"warning: Serve already runs on this cluster with HTTP on {actual[0]}:{actual[1]} (one HTTP config per "
            f"cluster); the application is served there. To change it: `serve shutdown` first.")
    if settings.token_sha256 is None and not is_loopback(actual[0]):
        raise FleetError(f"Serve on this cluster listens on {actual[0]}, beyond this machine, and this server has no "
                         f"token: give one (VRAMPLAN_TOKEN) or shut that Serve down first")
    return actual


def wait_ready(wait_s: float, say: Callable[[str], None], poll_s: float = 0.5, report_after_s: float = 5.0) -> None:
    """Until the application runs: its failure (with each deployment's message), or every
    ``report_after_s`` (then every 30 s) which deployments are still starting and the cluster's free resources."""
    ray = require_ray()
    from ray import serve

    t0 = time.monotonic()
    next_report = t0 + report_after_s
    while True:
        app = serve.status().applications.get(APP_NAME)
        state = getattr(app, "status", None)
        if state == "RUNNING":
            return
        pending = {n: d for n, d in (app.deployments if app else {}).items() if d.status != "HEALTHY"}
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            why = [f"{n}: {_last_line(d.message)}" for n, d in pending.items() if d.message]
            raise FleetError(f"the application failed to start: {' | '.join(why) or _last_line(app.message)}")
        now = time.monotonic()
        if now > t0 + wait_s:
            raise FleetError(f"not ready after {wait_s:g} s: {_pending(pending)}; the cluster has "
                             f"{_free(ray)} free")
        if now >= next_report:
            say(f"waiting for {_pending(pending)}; free on the cluster: {_free(ray)}")
            next_report = now + 30
        time.sleep(poll_s)


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1][:500] if lines else ""


def _pending(pending: dict) -> str:
    return ", ".join(f"{n} ({getattr(d.status, 'value', d.status)}: {dict(d.replica_states)}{' ' + _last_line(d.message) if d.message else ''})"
                     for n, d in pending.items()) or "the application"


def _free(ray) -> str:
    free = ray.available_resources()
    return ", ".join(f"{k} {v:g}" for k, v in sorted(free.items()) if k in ("CPU", "GPU")) or "nothing"


def stop(local: bool) -> None:
    """Take the application (and the board; its store stays on disk) down; a local cluster entirely."""
    ray = require_ray()
    from ray import serve

    try:
        try:
            serve.delete(APP_NAME)
        except Exception:  # noqa: BLE001 - Serve never started (placement refused, Ctrl-C early): nothing to delete
            pass
        try:
            ray.kill(ray.get_actor(BOARD_NAME, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass
        if local:
            serve.shutdown()
    finally:
        if local:
            ray.shutdown()


def dump_config(config: dict) -> str:
    """YAML when PyYAML is there (what ``serve deploy`` reads), JSON otherwise (also valid YAML)."""
    try:
        import yaml

        return yaml.safe_dump(config, sort_keys=False)
    except ImportError:
        return json.dumps(config, indent=2)
