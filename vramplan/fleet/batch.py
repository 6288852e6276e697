"""Run a file of jobs on a Ray cluster with a fleet plan's workers: resumable, retried, never lost.

``jobs.jsonl``: one JSON object per line, ``{"id": ..., "workload": ..., "image" | "prompt", "seed", ...}``
(a missing id becomes ``line-<n>``). Each (GPU type, workload) of the fleet plan gets as many Ray
actors as the plan's replicas (each with the plan's GPU fraction, on a node of that GPU type, its GPU
checked and its pipeline loaded once). Every finished attempt appends a line to ``reports.jsonl`` in
the output folder; a rerun skips the jobs reported done. A job that fails (an error, or its worker
killed) is tried again, up to ``retries`` more times, then reported failed with its error.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict, deque
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from ..planner.capacity import FleetError, FleetPlan
from ..planner.errors import VramplanError
from ..planner.schema import Plan
from . import require_ray
from .jobs import DEFAULT_FACTORY, check_gpu, execute, import_factory, safe_id
from .serve import demands, placement, placement_problems, workload_kinds

REPORTS = "reports.jsonl"


class BatchSummary(BaseModel):
    total: int
    skipped: int
    done: int
    failed: int
    reports: str


FINAL = "_final"  # a worker's result that retrying cannot change


def read_jobs(path: str | Path, kinds: dict[str, str]) -> list[dict]:
    """Jobs of a JSONL file, with ids, each checked like a served request (:mod:`.requests`; ``image`` may
    also be a file path here: the file is the operator's). ``kinds``: workload -> conditioning."""
    import stat

    from .requests import RequestInvalid, validate_job

    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block, a device never end
            raise FleetError(f"cannot read jobs file {path}: not a regular file")
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FleetError(f"cannot read jobs file {path}: {getattr(err, 'strerror', None) or err}") from err
    jobs, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            raise FleetError(f"{path}:{n} is not a JSON object ({str(err)[:200]})") from err
        if not isinstance(job, dict):
            raise FleetError(f"{path}:{n} must be a JSON object")
        job["id"] = safe_id(str(job.get("id", f"line-{n}"))[:200])
        if job["id"] in seen:
            raise FleetError(f"{path}:{n}: job id {job['id']!r} is used twice")
        if job.get("workload") not in kinds:
            raise FleetError(f"{path}:{n}: workload {str(job.get('workload'))[:80]!r} is not in the fleet plan "
                             f"({', '.join(sorted(kinds))})")
        try:
            request, options = validate_job({k: v for k, v in job.items() if k != "id"}, kinds)
        except RequestInvalid as err:
            raise FleetError(f"{path}:{n}: {str(err)[:500]} (pipeline arguments go in 'options')") from None
        seen.add(job["id"])
        jobs.append({**request.model_dump(exclude_none=True), "options": options, "id": job["id"]})
    return jobs


def finished_ids(reports: Path) -> set[str]:
    done: dict[str, str] = {}
    if reports.exists():
        for line in reports.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash: that job is simply run again
                continue
            done[rec.get("id")] = rec.get("status")
    return {i for i, s in done.items() if s == "done"}


class BatchWorker:
    def __init__(self, plan_json: str, factory: str, out_dir: str, declared_gpu: str | None):
        self.plan = Plan.model_validate_json(plan_json)
        self.gpu = check_gpu(self.plan, declared_gpu)
        self.pipe = import_factory(factory)(self.plan)
        self.out_dir = out_dir

    def ready(self) -> str:
        return self.gpu

    def run(self, job: dict) -> dict:
        t0 = time.perf_counter()
        try:
            result = execute(self.plan, self.pipe, job, self.out_dir)
        except VramplanError as err:  # a bad job (image, options, sizes): the same on every try
            return {"status": "failed", "error": f"{type(err).__name__}: {err}", "gpu": self.gpu, FINAL: True}
        except Exception as err:  # noqa: BLE001 - reported on the job, retried by the driver
            return {"status": "failed", "error": f"{type(err).__name__}: {err}", "gpu": self.gpu}
        return {"status": "done", "gpu": self.gpu, "seconds": round(time.perf_counter() - t0, 3), **result}


def run_batch(fleet: FleetPlan, jobs_path: str | Path, out_dir: str | Path = "videos", *,
              factory: str = DEFAULT_FACTORY, retries: int = 2, declared_gpu: str | None = None,
              placement_mode: str = "auto", progress: bool = True, start_timeout: float = 600.0,
              nodes_may_join: bool = False,
              on_dispatch: Callable[[dict, int, object], None] | None = None) -> BatchSummary:
    """Run every job not yet done; append one report line per finished job to ``<out_dir>/reports.jsonl``.
    ``on_dispatch(job, attempt, actor)`` is called as each attempt starts (monitoring, tests). Workers no
    node of the cluster can hold are a clear error at once (``nodes_may_join``, an autoscaling cluster:
    after ``start_timeout`` seconds of waiting for them)."""
    ray = require_ray()
    from ray.exceptions import GetTimeoutError, RayError
    from tqdm import tqdm

    fleet.check()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    reports = out / REPORTS
    jobs = read_jobs(jobs_path, workload_kinds(fleet))
    skip = finished_ids(reports)
    pending: dict[str, deque] = defaultdict(deque)
    for job in jobs:
        if job["id"] not in skip:
            pending[job["workload"]].append(job)

    if not nodes_may_join:  # a fixed cluster: say at once which workers no node can hold
        wanted = [d for d in demands(fleet, placement_mode) if pending[d["workload"]]]
        problems = placement_problems(wanted, ray.nodes())
        if problems:
            raise FleetError(f"the batch workers cannot be placed: {'; '.join(problems)}. Add nodes with those "
                             f"GPUs (--address), or --placement none.")
    remote = ray.remote(BatchWorker)
    idle: dict[str, deque] = defaultdict(deque)
    for (gpu, workload), (replicas, fraction, plan) in sorted(fleet.replicas().items()):
        for _ in range(min(replicas, len(pending[workload]))):
            idle[workload].append(remote.options(
                num_gpus=fraction, num_cpus=1, max_restarts=1, max_task_retries=0, **placement(gpu, placement_mode),
            ).remote(plan.model_dump_json(), factory, str(out), declared_gpu))
    try:
        ray.get([a.ready.remote() for q in idle.values() for a in q], timeout=start_timeout)
    except GetTimeoutError as err:
        for queue in idle.values():
            for actor in queue:
                ray.kill(actor)
        wanted = "; ".join(f"{workload} on {gpu}: num_gpus={frac} {placement(gpu, placement_mode)}"
                           for (gpu, workload), (_, frac, _) in sorted(fleet.replicas().items()))
        raise FleetError(
            f"the batch workers were not placed within {start_timeout:g} s: the cluster has no room for "
            f"({wanted}); it has {ray.cluster_resources()}. Add nodes with those GPUs, or --placement none."
        ) from err
    except RayError as err:
        cause = getattr(err, "cause", None) or err
        raise FleetError(f"a batch worker could not start: {cause}") from err

    attempts: dict[str, int] = defaultdict(int)
    running: dict = {}  # object ref -> (job, actor)
    counts = {"done": 0, "failed": 0}
    bar = tqdm(total=len(jobs), initial=len(jobs) - sum(map(len, pending.values())), disable=not progress,
               unit="video", desc="batch")
    with reports.open("a") as log:
        def record(job: dict, result: dict) -> None:
            rec = {"id": job["id"], "workload": job["workload"], "attempts": attempts[job["id"]], **result}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            counts[rec["status"]] += 1
            bar.update(1)

        while running or any(pending.values()):
            for workload, queue in pending.items():
                while queue and idle[workload]:
                    job, actor = queue.popleft(), idle[workload].popleft()
                    attempts[job["id"]] += 1
                    if on_dispatch is not None:
                        on_dispatch(job, attempts[job["id"]], actor)
                    running[actor.run.remote(job)] = (job, actor)
                if queue and not idle[workload] and not any(j["workload"] == workload for j, _ in running.values()):
                    while queue:  # every worker of this workload is gone: report, never lose, the jobs
                        record(queue.popleft(), {"status": "failed", "error": "no worker of this workload is left"})
            if not running:
                continue
            ready, _ = ray.wait(list(running), num_returns=1)
            job, actor = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
                idle[job["workload"]].append(actor)
            except RayError as err:  # the worker died (killed, OOM, node lost); Ray restarts it once
                result = {"status": "failed", "error": f"worker lost: {type(err).__name__}"}
                if _alive(ray, actor):
                    idle[job["workload"]].append(actor)
            if result.pop(FINAL, False) or result["status"] == "done" or attempts[job["id"]] > retries:
                record(job, result)
            else:
                pending[job["workload"]].appendleft(job)
    bar.close()
    return BatchSummary(total=len(jobs), skipped=len(jobs) - counts["done"] - counts["failed"] - sum(
        map(len, pending.values())), done=counts["done"], failed=counts["failed"], reports=str(reports))


def _alive(ray, actor, timeout: float = 300.0) -> bool:
    """Whether a worker that lost a job comes back (Ray restarts it once, reloading its pipeline)."""
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=timeout)
            return True
        except ActorUnavailableError:  # restarting
            time.sleep(0.5)
        except Exception:  # noqa: BLE001 - dead for good (restarts used up, constructor failed)
            return False
    return False
