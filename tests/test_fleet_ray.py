"""Fleet plans on a local Ray cluster (CPU only; logical GPUs and an A10G accelerator label declared at
ray.init): tiny pipelines batched and served over HTTP on 127.0.0.1 (never another address): packing, GPU
checks, failures and retries, the issue's attacks refused with no side effect, a job board and a whole
server killed mid-job, 50 concurrent clients. One cluster and one served application for the module."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import os
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
                      max_jobs=2, slack=0.01)  # (slack 0.01: half the planning of the default)
    return tiny_fleet(real)


@pytest.fixture(scope="module")
def elsewhere() -> FleetPlan:
    """A fleet for a GPU type the test cluster does not have."""
    from vramplan.fleet.testing import tiny_fleet

    return tiny_fleet(plan_fleet(parse_workloads(WORKLOADS[:1]), parse_inventory([{"gpu": "RTX 4090"}]), slack=0.01))


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


TOKEN = "ray-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    outside = tmp_path_factory.mktemp("outside")
    (root / "in.png").write_bytes(_png(32, 32))
    (outside / "secret.png").write_bytes(_png(32, 32))
    (root / "out.png").symlink_to(outside / "secret.png")
    os.mkfifo(root / "fifo.png")
    return root


@pytest.fixture(scope="module")
def served(cluster, fleet, data_dir, tmp_path_factory):
    from vramplan.fleet.front import digest
    from vramplan.fleet.serve import ServeSettings, start

    port = _free_port()
    out = tmp_path_factory.mktemp("jobs")
    settings = ServeSettings(token_sha256=digest(TOKEN), data_dir=str(data_dir), lease_s=3.0, sweep_s=0.5)
    said = []
    url = start(fleet, factory=FACTORY, out_dir=str(out), port=port, declared_gpu="A10G", settings=settings,
                say=said.append)
    assert url == f"http://127.0.0.1:{port}"
    return {"url": url, "out": out, "settings": settings, "port": port}


def _png(w: int = 32, h: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


def _image_b64() -> str:
    return base64.b64encode(_png()).decode()


def _http(url: str, body: dict | bytes | None = None, token: str | None = TOKEN, headers: dict | None = None):
    """One request to 127.0.0.1 (never elsewhere): (status, body bytes)."""
    assert url.startswith("http://127.0.0.1:")
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {}),
            **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _wait(base: str, job_id: str, timeout: float = 60.0, until=("done", "failed")) -> dict:
    deadline = time.monotonic() + timeout
    record = None
    while time.monotonic() < deadline:
        record = json.loads(_http(f"{base}/jobs/{job_id}")[1])
        if record["status"] in until:
            return record
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach {until}: {record}")


def _board():
    from vramplan.fleet import NAMESPACE
    from vramplan.fleet.serve import BOARD_NAME

    return ray.get_actor(BOARD_NAME, namespace=NAMESPACE)


def _counts() -> dict:
    return ray.get(_board().counts.remote())


def test_fleet_packs_both_workloads_on_one_gpu(fleet):
    (alloc,) = fleet.gpus
    assert alloc.gpu == "A10G" and alloc.count == 1 and len(alloc.packings[0].jobs) == 2
    fractions = [j.num_gpus for j in alloc.packings[0].jobs]
    assert all(0 < f < 1 for f in fractions) and sum(fractions) <= 1


def test_batch_resumable_with_retries(cluster, fleet, tmp_path):
    from vramplan.fleet.batch import run_batch

    jobs = tmp_path / "jobs.jsonl"
    image = _image_b64()
    lines = [{"id": "a", "workload": "hd", "image": image, "steps": 2},
             {"id": "b", "workload": "sq", "image": image, "steps": 1},
             {"id": "bad", "workload": "hd", "image": "no/such/image.png"}]  # (one worker per workload)
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
    assert "JobError" in reports["bad"]["error"] and "image" in reports["bad"]["error"]
    assert (out / "a.gif").exists() and (out / "b.gif").exists()
    again = run_batch(FleetPlan.load(fleet_path), jobs, out, factory=FACTORY, retries=0, declared_gpu="A10G",
                      progress=False)
    assert (again.skipped, again.done, again.failed) == (2, 0, 1)  # done jobs skipped, the failed one retried


def test_batch_workers_that_cannot_be_placed_are_a_clear_error(cluster, elsewhere, tmp_path):
    from vramplan.fleet.batch import run_batch

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "x", "workload": "hd", "image": _image_b64()}) + "\n")
    t0 = time.monotonic()
    with pytest.raises(FleetError, match=r"cannot be placed: deployment hd--RTX-4090-\w+: 1 of 1.*GeForce-RTX-4090"):
        run_batch(elsewhere, jobs, tmp_path / "out", factory=FACTORY, progress=False)
    assert time.monotonic() - t0 < 5  # said at once, no worker started
    with pytest.raises(FleetError, match=r"not placed within 1 s.*hd on RTX 4090.*GeForce-RTX-4090"):
        run_batch(elsewhere, jobs, tmp_path / "out", factory=FACTORY, progress=False, start_timeout=1,
                  nodes_may_join=True)  # an autoscaling cluster: waited for, then the same error


# -- serving: these run after the batch tests (the load test leaves jobs queued) --------------------------


def test_serve_end_to_end(served, fleet, cluster):
    base = served["url"]
    assert _http(f"{base}/", token=None)[0] == 401
    status, body = _http(f"{base}/")
    assert status == 200 and json.loads(body)["workloads"] == ["hd", "sq"]
    ids = []
    status, body = _http(f"{base}/jobs", {"workload": "hd", "image": _image_b64(), "steps": 2, "seed": 1})
    assert status == 202, body
    ids.append(json.loads(body)["id"])
    status, body = _http(f"{base}/jobs", {"workload": "sq", "image_path": "in.png", "steps": 1})  # under --data-dir
    assert status == 202, body
    ids.append(json.loads(body)["id"])
    boundary = "b0undary"
    form = (f'--{boundary}\r\nContent-Disposition: form-data; name="job"\r\n\r\n'
            f'{{"workload": "hd", "steps": 1}}\r\n--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="a.png"\r\n\r\n').encode() + _png() + f"\r\n--{boundary}--\r\n".encode()
    status, body = _http(f"{base}/jobs", form, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 202, body
    ids.append(json.loads(body)["id"])
    for job_id in ids:
        record = _wait(base, job_id)
        assert record["status"] == "done" and record["attempts"] == 1, record
        assert record["step"] == record["steps"] == record["request"].get("steps"), json.dumps({k: v for k, v in record.items() if k != "report"})
        assert len(record["report"]["step_seconds"]) == record["steps"] and record["gpu"] == "A10G"
        status, video = _http(f"{base}/jobs/{job_id}/video")
        assert status == 200 and video[:3] == b"GIF"
        assert (served["out"] / f"{job_id}.gif").read_bytes() == video
    # packing respected: Ray holds exactly the packed fractions of the declared GPUs
    used = 2 - cluster.available_resources().get("GPU", 0)
    assert used == pytest.approx(sum(j.num_gpus for j in fleet.gpus[0].packings[0].jobs), abs=1e-3)  # Ray rounds


def _raw(port: int, head: str, body: bytes = b"") -> int:
    """Send raw headers (and a body) to 127.0.0.1; the status answered."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("POST", "/jobs")
        for line in head.strip().splitlines():
            key, _, value = line.partition(":")
            conn.putheader(key.strip(), value.strip())
        conn.endheaders()
        if body:
            try:
                conn.send(body)
            except (BrokenPipeError, ConnectionResetError):
                pass
        return conn.getresponse().status
    finally:
        conn.close()


def test_the_issue_attacks_are_refused_with_no_side_effect(served):
    from ray import serve

    base, port = served["url"], served["port"]
    before = _counts()
    good = {"workload": "hd", "image": _image_b64(), "steps": 1}
    attacks = [
        ({"workload": "hd", "image": "/etc/shadow"}, 422, "image"),
        ({"workload": "hd", "image": "/etc/passwd"}, 422, "image"),
        ({"workload": "hd", "image": "../../etc/hostname"}, 422, "image"),
        ({"workload": "hd", "image_path": "../../../../etc/passwd"}, 422, "image_path"),
        ({"workload": "hd", "image_path": "/etc/passwd"}, 422, "image_path"),
        ({"workload": "hd", "image_path": "out.png"}, 422, "image_path"),  # a symlink leading outside
        ({"workload": "hd", "image_path": "fifo.png"}, 422, "image_path"),  # never opened: nothing blocks
        ({**good, "seed": 2**80}, 422, "seed"), ({**good, "seed": "abc"}, 422, "seed"),
        ({**good, "format": "exe"}, 422, "format"), ({**good, "fps": 0}, 422, "fps"),
        ({**good, "options": ["x"]}, 422, "options"), ({**good, "options": {"num_frames": 7}}, 422, "options.num_frames"),
        ({**good, "workload": "视频"}, 422, "workload"),
    ]
    t0 = time.monotonic()
    for body, code, field in attacks:
        status, answer = _http(f"{base}/jobs", body)
        assert status == code and field in [f["field"] for f in json.loads(answer)["fields"]], (body, answer)
    assert time.monotonic() - t0 < 20
    outside = [json.loads(_http(f"{base}/jobs", {"workload": "hd", "image_path": p})[1])
               for p in ("../../../../etc/passwd", "../../../../etc/nope-zz", "out.png", "fifo.png", "missing.png")]
    assert all(a == outside[0] for a in outside)  # one answer: nothing tells whether a file outside exists
    for token in (None, "wrong-token-0123456789abcdef", TOKEN + "x"):
        assert _http(f"{base}/jobs", good, token=token)[0] == 401
        assert _http(f"{base}/", token=token)[0] == 401
    assert _raw(port, f"Authorization: Bearer {TOKEN}\nContent-Type: application/json\n"
                      f"Content-Length: {60 * 2**20}") == 413  # declared: refused before reading
    big = b'{"workload": "hd", "image": "' + b"A" * (17 * 2**20) + b'"}'
    assert _raw(port, f"Authorization: Bearer {TOKEN}\nContent-Type: application/json\nContent-Length: {len(big)}",
                big) == 413
    for path in ("/jobs/..%2F..%2Fetc%2Fpasswd", "/jobs/../../etc/passwd/video", "/etc/passwd"):
        assert _http(f"{base}{path}")[0] in (404, 422)
    assert _counts() == before  # nothing stored, nothing run
    assert serve.status().applications["vramplan"].status == "RUNNING"


def test_a_replica_on_the_wrong_gpu_refuses(cluster, fleet):
    """The check every Serve replica and batch worker runs in its constructor, before loading anything
    (a Serve replica failing it: the application fails with its message, see wait_ready)."""
    from vramplan.fleet.batch import BatchWorker
    from vramplan.fleet.jobs import GpuMismatchError, check_gpu

    plan = fleet.gpus[0].packings[0].jobs[0].plan
    with pytest.raises(GpuMismatchError, match="runs on 'T4' but its plan .* was made for A10G"):
        check_gpu(plan, declared="T4")
    worker = ray.remote(BatchWorker).options(num_cpus=1, num_gpus=0).remote(plan.model_dump_json(), FACTORY, "/tmp", "T4")
    with pytest.raises(ray.exceptions.RayActorError, match="was made for A10G"):
        ray.get(worker.ready.remote())


def test_the_job_board_killed_mid_job_loses_nothing(served):
    base = served["url"]
    status, body = _http(f"{base}/jobs", {"workload": "sq", "image": _image_b64(), "steps": 25, "seed": 7})
    job_id = json.loads(body)["id"]
    _wait(base, job_id, until=("running",))
    ray.kill(_board(), no_restart=False)  # Ray restarts it; it reopens the store
    record = _wait(base, job_id)
    assert record["status"] == "done" and record["attempts"] == 1 and record["requeues"] == 0, record


def test_a_restart_keeps_finished_jobs_and_requeues_the_unfinished_once(served, fleet):
    from ray import serve

    from vramplan.fleet.serve import APP_NAME, deployment_name, start

    base = served["url"]
    finished = [r["id"] for r in ray.get(_board().queued.remote())]  # (none queued now)
    assert finished == []
    done_id = json.loads(_http(f"{base}/jobs", {"workload": "hd", "image": _image_b64(), "steps": 1})[1])["id"]
    done_record = _wait(base, done_id)
    video = _http(f"{base}/jobs/{done_id}/video")[1]
    running = json.loads(_http(f"{base}/jobs", {"workload": "hd", "image": _image_b64(), "steps": 30})[1])["id"]
    queued = json.loads(_http(f"{base}/jobs", {"workload": "hd", "image": _image_b64(), "steps": 1})[1])["id"]
    _wait(base, running, until=("running",))
    # everything that holds this job's state dies at once: the board, the front and the job's worker
    ray.kill(_board(), no_restart=True)
    victims = ("#FleetAPI#", f"#{deployment_name('A10G', 'hd')}#")
    killed = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
              if a["namespace"] == "serve" and f"::{APP_NAME}#" in a["name"] and any(v in a["name"] for v in victims)]
    for name in killed:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    assert len(killed) == 2, killed
    start(fleet, factory=FACTORY, out_dir=str(served["out"]), port=served["port"], declared_gpu="A10G",
          settings=served["settings"])  # what a restarted `vramplan serve` does
    assert serve.status().applications[APP_NAME].status == "RUNNING"
    again = json.loads(_http(f"{base}/jobs/{done_id}")[1])
    assert again == done_record and _http(f"{base}/jobs/{done_id}/video")[1] == video  # kept, not rerun
    record = _wait(base, running)
    assert record["status"] == "done" and (record["attempts"], record["requeues"]) == (2, 1), record
    record = _wait(base, queued)
    assert record["status"] == "done" and (record["attempts"], record["requeues"]) == (1, 0), record
    survivor = json.loads(_http(f"{base}/jobs", {"workload": "sq", "image": _image_b64(), "steps": 1})[1])["id"]
    assert _wait(base, survivor)["status"] == "done"  # a worker that lived through it finds the new board


def test_fifty_concurrent_submissions_and_polls(served):
    base = served["url"]
    before = sum(_counts().values())

    def submit_and_poll(i):
        status, body = _http(f"{base}/jobs", {"workload": "sq", "image": _image_b64(), "steps": 1, "seed": i})
        assert status == 202, body
        job_id = json.loads(body)["id"]
        status, record = _http(f"{base}/jobs/{job_id}")
        return job_id, status, json.loads(record)

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(submit_and_poll, range(50)))
    ids = [job_id for job_id, _, _ in results]
    assert len(set(ids)) == 50
    assert all(status == 200 and record["id"] == job_id and record["request"]["seed"] == i
               for i, (job_id, status, record) in enumerate(results))
    assert sum(_counts().values()) == before + 50


def test_a_fleet_that_cannot_be_placed_is_named_within_seconds(served, elsewhere):
    from vramplan.fleet.serve import start

    t0 = time.monotonic()
    with pytest.raises(FleetError, match=r"deployment hd--RTX-4090-\w+: 1 of 1 replica\(s\) cannot be placed.*"
                                         r"GeForce-RTX-4090.*the cluster has node 1: CPU 6.*A10G"):
        start(elsewhere, factory=FACTORY, out_dir=str(served["out"]), port=served["port"])
    assert time.monotonic() - t0 < 10
