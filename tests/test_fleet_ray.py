"""Fleet plans on a local Ray cluster (CPU only; logical GPUs and an A10G accelerator label declared at
ray.init): tiny pipelines served over HTTP and batched, packing, GPU checks, failures and retries."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the fleet extra: pip install 'vramplan[fleet]'")

from PIL import Image  # noqa: E402
from vramplan.planner.capacity import FleetError, FleetPlan, parse_inventory, parse_workloads, plan_fleet  # noqa: E402

FACTORY = "vramplan.fleet.testing:tiny_pipeline"
WORKLOADS = [
    {"name": "hd", "model": "svd", "height": 576, "width": 1024, "rate": 3.0},
    {"name": "sq", "model": "svd", "height": 512, "width": 512, "rate": 2.0},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fleet() -> FleetPlan:
    from vramplan.fleet.testing import tiny_fleet

    real = plan_fleet(parse_workloads(WORKLOADS), parse_inventory([{"gpu": "A10G", "count": 2}]),
                      max_jobs=2)
    return tiny_fleet(real)


@pytest.fixture(scope="module")
def cluster():
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")  # Ray >= 2.52 turns token auth on by default
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    from vramplan.fleet import connect

    connect(num_cpus=6, num_gpus=2, labels={"ray.io/accelerator-type": "A10G"},
            resources={"accelerator_type:A10G": 2}, include_dashboard=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()
        mp.undo()


@pytest.fixture(scope="module")
def served(cluster, fleet, tmp_path_factory):
    from vramplan.fleet.serve import start

    port = _free_port()
    start(fleet, factory=FACTORY, out_dir=str(tmp_path_factory.mktemp("videos")), port=port, declared_gpu="A10G")
    return f"http://127.0.0.1:{port}"


def _image_b64() -> str:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8")).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _http(url: str, body: dict | None = None):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _wait(base: str, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = json.loads(_http(f"{base}/jobs/{job_id}")[1])
        if record["status"] in ("done", "failed"):
            return record
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {record}")


def test_fleet_packs_both_workloads_on_one_gpu(fleet):
    (alloc,) = fleet.gpus
    assert alloc.gpu == "A10G" and alloc.count == 1 and len(alloc.packings[0].jobs) == 2
    fractions = [j.num_gpus for j in alloc.packings[0].jobs]
    assert all(0 < f < 1 for f in fractions) and sum(fractions) <= 1


def test_serve_end_to_end(served, fleet, cluster):
    status, body = _http(f"{served}/")
    assert status == 200 and json.loads(body)["workloads"] == ["hd", "sq"]
    ids = {}
    for workload in ("hd", "sq"):
        status, body = _http(f"{served}/jobs", {"workload": workload, "image": _image_b64(), "steps": 2, "seed": 1})
        assert status == 200, body
        ids[workload] = json.loads(body)["id"]
    for job_id in ids.values():
        record = _wait(served, job_id)
        assert record["status"] == "done", record
        assert (record["step"], record["steps"]) == (2, 2)
        assert len(record["report"]["step_seconds"]) == 2 and record["gpu"] == "A10G"
        status, video = _http(f"{served}/jobs/{job_id}/video")
        assert status == 200 and video[:3] == b"GIF"
    # packing respected: Ray holds exactly the packed fractions of the declared GPUs
    used = 2 - cluster.available_resources().get("GPU", 0)
    assert used == pytest.approx(sum(j.num_gpus for j in fleet.gpus[0].packings[0].jobs), abs=1e-4)


def test_a_crashing_job_fails_alone(served):
    from ray import serve

    status, body = _http(f"{served}/jobs", {"workload": "hd", "image": _image_b64(), "options": {"num_frames": 7}})
    bad = _wait(served, json.loads(body)["id"])
    assert bad["status"] == "failed" and "PlanMismatchError" in bad["error"]
    status, body = _http(f"{served}/jobs", {"workload": "hd", "image": "not an image"})
    assert _wait(served, json.loads(body)["id"])["status"] == "failed"
    status, body = _http(f"{served}/jobs", {"workload": "hd", "image": _image_b64(), "steps": 1})
    assert _wait(served, json.loads(body)["id"])["status"] == "done"
    app = serve.status().applications["vramplan"]
    assert app.status == "RUNNING"
    assert _http(f"{served}/jobs", {"workload": "nope"})[0] == 400
    assert _http(f"{served}/jobs/unknown")[0] == 404


def test_a_replica_on_the_wrong_gpu_refuses(cluster, served, fleet):
    from vramplan.fleet.jobs import GpuMismatchError, check_gpu

    plan = fleet.gpus[0].packings[0].jobs[0].plan
    with pytest.raises(GpuMismatchError, match="runs on 'T4' but its plan .* was made for A10G"):
        check_gpu(plan, declared="T4")
    from ray import serve

    from vramplan.fleet.serve import build_app

    app = build_app(fleet, factory=FACTORY, declared_gpu="T4")  # replicas that believe they sit on a T4
    with pytest.raises(RuntimeError, match="wrong-gpu failed"):
        serve.run(app, name="wrong-gpu", route_prefix="/wrong")
    messages = [d.message for d in serve.status().applications["wrong-gpu"].deployments.values()]
    assert any("GpuMismatchError" in m and "runs on 'T4'" in m and "made for A10G" in m for m in messages)
    serve.delete("wrong-gpu")
    assert serve.status().applications["vramplan"].status == "RUNNING"  # the good application is untouched
    from vramplan.fleet.batch import BatchWorker

    worker = ray.remote(BatchWorker).options(num_cpus=1, num_gpus=0).remote(plan.model_dump_json(), FACTORY, "/tmp", "T4")
    with pytest.raises(ray.exceptions.RayActorError, match="was made for A10G"):
        ray.get(worker.ready.remote())


def test_batch_resumable_with_retries(cluster, fleet, tmp_path):
    from vramplan.fleet.batch import run_batch

    jobs = tmp_path / "jobs.jsonl"
    image = _image_b64()
    lines = [{"id": "a", "workload": "hd", "image": image, "steps": 2},
             {"id": "b", "workload": "sq", "image": image, "steps": 1},
             {"id": "bad", "workload": "sq", "image": image, "options": {"height": 64}}]
    jobs.write_text("\n".join(json.dumps(j) for j in lines) + "\n")
    killed = []

    def kill_first_attempt(job, attempt, actor):
        if job["id"] == "a" and attempt == 1:  # the worker dies under its first job
            ray.kill(actor, no_restart=False)
            killed.append(job["id"])

    fleet_path = tmp_path / "fleet.json"
    fleet.save(fleet_path)
    out = tmp_path / "out"
    summary = run_batch(FleetPlan.load(fleet_path), jobs, out, factory=FACTORY, retries=1, declared_gpu="A10G",
                        progress=False, on_dispatch=kill_first_attempt)
    assert killed == ["a"]
    assert (summary.done, summary.failed, summary.skipped) == (2, 1, 0)
    reports = {r["id"]: r for r in map(json.loads, (out / "reports.jsonl").read_text().splitlines())}
    assert reports["a"]["status"] == "done" and reports["a"]["attempts"] == 2
    assert reports["bad"]["status"] == "failed" and reports["bad"]["attempts"] == 1  # a bad job: retrying cannot help
    assert set(reports["bad"]) == {"id", "workload", "attempts", "status", "error", "gpu"}
    assert "PlanMismatchError" in reports["bad"]["error"]
    assert (out / "a.gif").exists() and (out / "b.gif").exists()
    again = run_batch(FleetPlan.load(fleet_path), jobs, out, factory=FACTORY, retries=0, declared_gpu="A10G",
                      progress=False)
    assert (again.skipped, again.done, again.failed) == (2, 0, 1)  # done jobs skipped, the failed one retried


def test_batch_workers_that_cannot_be_placed_are_a_clear_error(cluster, tmp_path):
    from vramplan.fleet.batch import run_batch
    from vramplan.fleet.testing import tiny_fleet

    elsewhere = tiny_fleet(plan_fleet(parse_workloads(WORKLOADS[:1]), parse_inventory([{"gpu": "RTX 4090"}])))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "x", "workload": "hd", "image": _image_b64()}) + "\n")
    with pytest.raises(FleetError, match=r"not placed within 2 s.*hd on RTX 4090.*GeForce-RTX-4090"):
        run_batch(elsewhere, jobs, tmp_path / "out", factory=FACTORY, progress=False, start_timeout=2)
