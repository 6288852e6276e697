"""The served API as an adversarial client meets it, without Ray: authentication, body limits, validation
at the door, contained image inputs, the SQLite job store surviving a killed process, the worker's time
limit, hardened fleet files and deployment names. (The same attacks over real HTTP on a local Ray
cluster: tests/test_fleet_ray.py.)"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import multiprocessing
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from vramplan.fleet.front import AuthError, Front, digest, is_loopback, resolve_token
from vramplan.fleet.inputs import NOT_UNDER_DATA_DIR, DataDir, InputError, Limits, load_image
from vramplan.fleet.store import JobStore

TOKEN = "s3cret-token-for-tests-0123456789"
KINDS = {"hd": "image", "视频": "image", "anim": "prompt"}
LIMITS = Limits(max_body_bytes=256 * 1024, max_image_bytes=64 * 1024, max_pixels=512 * 512, max_side=1024,
                read_timeout_s=2.0)


def png(w: int = 8, h: int = 8, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class LocalBoard:
    """The board's interface on a JobStore in this process (what the Ray actor wraps)."""

    def __init__(self, store: JobStore):
        self.store = store

    async def create(self, job_id, workload, request, image):
        return self.store.create(job_id, workload, request, image)

    async def get(self, job_id):
        return self.store.get(job_id)

    async def video(self, job_id):
        return self.store.video(job_id)


class Client:
    """Calls Front.handle with Starlette requests built from raw parts; counts body reads."""

    def __init__(self, front: Front):
        self.front, self.reads = front, 0

    def __call__(self, method: str, path: str, body: bytes | None = None, *, token: str | None = TOKEN,
                 headers: dict | None = None, chunks: list[bytes] | None = None, delay: float = 0.0):
        from starlette.requests import Request

        hdrs = {"content-type": "application/json", **(headers or {})}
        if token is not None:
            hdrs.setdefault("authorization", f"Bearer {token}")
        if body is not None and chunks is None:
            hdrs.setdefault("content-length", str(len(body)))
            chunks = [body]
        chunks = list(chunks or [b""])
        scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in hdrs.items()], "scheme": "http",
                 "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000), "root_path": ""}

        async def receive():
            self.reads += 1
            if delay:
                await asyncio.sleep(delay)
            if not chunks:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

        response = asyncio.run(self.front.handle(Request(scope, receive)))
        data = json.loads(response.body) if response.media_type == "application/json" else response.body
        return response.status_code, data, response

    def post(self, job: dict | list | str, **kw):
        body = job.encode() if isinstance(job, str) else json.dumps(job).encode()
        return self("POST", "/jobs", body, **kw)


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(png())
    (root / "sub" / "ok2.png").write_bytes(png(16, 4))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png())  # a readable image: the worst case if it leaked
    (root / "link-in.png").symlink_to(root / "ok.png")
    (root / "link-out.png").symlink_to(outside / "secret.png")
    (root / "dir-out").symlink_to(outside)
    (root / "zero").symlink_to("/dev/zero")
    (root / "big.png").write_bytes(b"\x89PNG" + b"\0" * (LIMITS.max_image_bytes + 10))
    os.mkfifo(root / "fifo.png")
    return root


@pytest.fixture
def server(tmp_path, data_dir):
    store = JobStore(tmp_path / "out")
    dispatched = []

    def dispatch(job_id, workload):
        assert store.get(job_id)["status"] == "queued"  # stored before it is handed out (and before the 202)
        dispatched.append(job_id)

    front = Front(KINDS, LocalBoard(store), dispatch, token_sha256=digest(TOKEN), limits=LIMITS,
                  data_dir=str(data_dir))
    client = Client(front)
    client.store, client.dispatched = store, dispatched
    yield client
    store.close()


def nothing_stored(client) -> bool:
    return client.store.counts() == {} and client.dispatched == []


# -- authentication ----------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [None, "", "Bearer", "Bearer wrong-token-0123456789", f"Basic {TOKEN}",
                                  f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"bearer{TOKEN}"])
@pytest.mark.parametrize("method, path", [("GET", "/"), ("POST", "/jobs"), ("GET", "/jobs/" + "a" * 32),
                                          ("GET", "/jobs/" + "a" * 32 + "/video"), ("GET", "/nope"),
                                          ("DELETE", "/jobs")])
def test_every_route_answers_401_before_reading_anything(server, auth, method, path):
    headers = {} if auth is None else {"authorization": auth}
    body = json.dumps({"workload": "hd", "image": b64(png())}).encode()
    status, data, response = server(method, path, body, token=None, headers=headers)
    assert status == 401 and response.headers["www-authenticate"] == "Bearer"
    assert server.reads == 0 and nothing_stored(server)  # the body was never read, nothing stored
    assert "wrong-token" not in json.dumps(data)


def test_the_right_token_passes(server):
    status, data, _ = server("GET", "/")
    assert status == 200 and data["workloads"] == sorted(KINDS)
    assert server("GET", "/", token=TOKEN.upper())[0] == 401


def test_without_a_token_only_with_insecure(tmp_path):
    store = JobStore(tmp_path)
    open_front = Client(Front(KINDS, LocalBoard(store), lambda *a: None, token_sha256=None))
    assert open_front("GET", "/", token=None)[0] == 200


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                            ("127.8.9.1", True), ("0.0.0.0", False), ("::", False),
                                            ("192.168.1.5", False), ("example.com", False), ("", False)])
def test_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_resolve_token():
    assert resolve_token(None, {}, "127.0.0.1", False)[1] is True  # generated, printed once by the caller
    first, second = resolve_token(None, {}, "127.0.0.1", False)[0], resolve_token(None, {}, "::1", False)[0]
    assert first != second and len(first) >= 40
    assert resolve_token(None, {"VRAMPLAN_TOKEN": TOKEN}, "0.0.0.0", False) == (TOKEN, False)
    assert resolve_token(TOKEN, {}, "0.0.0.0", False) == (TOKEN, False)
    assert resolve_token(None, {}, "0.0.0.0", True) == (None, False)
    with pytest.raises(AuthError, match="listens beyond this machine"):
        resolve_token(None, {}, "0.0.0.0", False)
    with pytest.raises(AuthError, match="at least 16"):
        resolve_token("short", {}, "127.0.0.1", False)
    with pytest.raises(AuthError, match="drop --token"):
        resolve_token(TOKEN, {}, "127.0.0.1", True)


# -- bodies ---------------------------------------------------------------------------------------------


def test_a_declared_body_above_the_limit_is_413_unread(server):
    status, data, _ = server("POST", "/jobs", b"{}", headers={"content-length": str(60 * 2**20)})
    assert status == 413 and str(LIMITS.max_body_bytes) in data["error"]
    assert server.reads == 0 and nothing_stored(server)


def test_a_body_above_the_limit_is_413_while_reading(server):
    chunk = b" " * 65536
    chunks = [chunk] * 8  # 512 KiB without a Content-Length (chunked)
    status, _, _ = server("POST", "/jobs", chunks=chunks)
    assert status == 413 and server.reads <= 5 and nothing_stored(server)  # stopped at the limit, not the end
    lying = [b'{"workload": "hd",' + b" " * LIMITS.max_body_bytes + b"}"]
    assert server("POST", "/jobs", chunks=lying, headers={"content-length": "20"})[0] == 413


def test_a_slow_body_times_out(server):
    server.front.limits = Limits(read_timeout_s=0.2)
    status, data, _ = server("POST", "/jobs", chunks=[b"{", b"}"], delay=0.15)
    assert status == 408 and nothing_stored(server)


@pytest.mark.parametrize("body", [b"not json", b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000, b"[1, 2]", b'"x"',
                                  b"null"])
def test_a_body_that_is_no_json_object_is_422(server, body):
    status, data, _ = server("POST", "/jobs", body)
    assert status == 422 and data["fields"][0]["field"] == "body" and nothing_stored(server)


def test_content_type_is_checked(server):
    status, data, _ = server("POST", "/jobs", b"{}", headers={"content-type": "text/plain"})
    assert status == 422 and data["fields"][0]["field"] == "Content-Type"


# -- validation at the door ----------------------------------------------------------------------------


GOOD = {"workload": "hd", "image": b64(png()), "seed": 1, "steps": 2}


@pytest.mark.parametrize("change, field", [
    ({"seed": 2**80}, "seed"), ({"seed": -1}, "seed"), ({"seed": "abc"}, "seed"), ({"seed": 1.5}, "seed"),
    ({"seed": True}, "seed"), ({"seed": None}, "seed"), ({"steps": 0}, "steps"), ({"steps": 10**6}, "steps"),
    ({"steps": "5"}, "steps"), ({"format": "exe"}, "format"), ({"format": "GIF "}, "format"), ({"fps": 0}, "fps"),
    ({"fps": -3}, "fps"), ({"fps": 10**9}, "fps"), ({"fps": 7.5}, "fps"), ({"options": ["a"]}, "options"),
    ({"options": "x"}, "options"), ({"options": {"height": 64}}, "options.height"),
    ({"options": {"num_frames": 7}}, "options.num_frames"), ({"options": {"__class__": 1}}, "options.__class__"),
    ({"options": {"motion_bucket_id": "high"}}, "options.motion_bucket_id"),
    ({"options": {"noise_aug_strength": float("nan")}}, "options.noise_aug_strength"),
    ({"options": {"motion_bucket_id": 10**9}}, "options.motion_bucket_id"),
    ({"workload": "nope"}, "workload"), ({"workload": 3}, "workload"), ({"workload": "x" * 10_000}, "workload"),
    ({"image": None}, "image"), ({"image_path": "ok.png"}, "image"), ({"prompt": "a cat"}, "prompt"),
    ({"sed": 3}, "sed"), ({"id": "../../x"}, "id"), ({"image": 5}, "image"),
])
def test_each_bad_field_is_422_naming_it(server, change, field):
    status, data, _ = server.post({**GOOD, **change})
    assert status == 422, data
    assert field in [f["field"] for f in data["fields"]], data
    assert nothing_stored(server)
    assert len(json.dumps(data)) < 2000  # the problem, never the input echoed back


def test_prompt_workloads(server):
    assert server.post({"workload": "anim", "prompt": "a cat", "seed": 3})[0] == 202
    status, data, _ = server.post({"workload": "anim", "prompt": "a cat", "image": b64(png())})
    assert status == 422 and data["fields"][0]["field"] == "image"
    assert server.post({"workload": "anim"})[1]["fields"][0]["field"] == "prompt"
    assert server.post({"workload": "anim", "prompt": "x" * 5000})[1]["fields"][0]["field"] == "prompt"


# -- images as data -------------------------------------------------------------------------------------


def _ihdr_bomb(w: int, h: int) -> bytes:
    """A valid PNG header claiming w x h pixels (checksums right), a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = zlib.compress(b"\0" * 1000)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


def _zeros_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


@pytest.mark.parametrize("image, problem", [
    ("/etc/shadow", "not base64"), ("/etc/passwd", "not base64"), ("../../../../etc/hostname", "not base64"),
    ("/nonexistent/file.png", "not base64"), ("file:///etc/passwd", "not base64"), (b64(b"hello world"), "not a readable"),
    ("data:text/html;base64," + b64(png()), "data URL"), (b64(png(fmt="GIF")), "not a readable"),
    (b64(png(fmt="BMP")), "not a readable"), (b64(png(fmt="TIFF")), "not a readable"),
    (b64(_ihdr_bomb(100_000, 100_000)), "pixels"), (b64(_ihdr_bomb(2000, 2000)), "pixels"),
    (b64(_zeros_png(2000)), "pixels"), (b64(png())[:-3], "not base64"), (b64(png()[:30]), "not a readable"), ("", "at least 1"),
    (b64(b"\x89PNG" + b"\0" * (LIMITS.max_image_bytes + 1)), "larger than"),
])
def test_images_are_data_and_bounded(server, image, problem):
    status, data, _ = server.post({**GOOD, "image": image})
    assert status == 422 and data["fields"][0]["field"] == "image", data
    assert problem in data["fields"][0]["problem"], data
    assert nothing_stored(server)


_OPENED: list[str] | None = None


def _audit(event, args):
    if _OPENED is not None and event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], str):
        _OPENED.append(args[0])


def test_a_path_as_image_data_never_touches_the_disk(server):
    global _OPENED
    import sys

    if not getattr(sys, "_vramplan_audit", False):
        sys.addaudithook(_audit)  # audit hooks stay: this one records only while _OPENED is a list
        sys._vramplan_audit = True
    _OPENED = []
    try:
        pairs = [("/etc/passwd", "/etc/nopezz"), ("/etc/hostname", "/etc/nonexist"), ("/etc/os-release", "/etc/no-release")]
        answers = [{json.dumps(server.post({**GOOD, "image": p})[1]) for p in pair} for pair in pairs]
    finally:
        opened, _OPENED = _OPENED, None
    assert all(len(a) == 1 for a in answers)  # one answer whether the file exists or not
    assert not [p for p in opened if p.startswith(("/etc", "/root"))], opened


def test_a_good_image_is_stored_with_the_job(server):
    image = png(40, 20)
    status, data, response = server.post({**GOOD, "image": "data:image/png;base64," + b64(image)})
    assert status == 202 and response.headers["location"] == f"/jobs/{data['id']}"
    assert server.dispatched == [data["id"]]
    row = server.store.db.execute("SELECT image, request FROM jobs").fetchone()
    assert row["image"] == image and json.loads(row["request"])["seed"] == 1
    assert load_image(image).size == (40, 20)
    status, record, _ = server("GET", f"/jobs/{data['id']}")
    assert status == 200 and record["status"] == "queued" and "image" not in record["request"]
    assert server("GET", f"/jobs/{data['id']}/video")[1] == {"error": "no video (yet)", "status": "queued"}
    assert server("GET", "/jobs/" + "0" * 32)[0] == 404
    for bad in ("..", "..%2F..%2Fetc%2Fpasswd", "A" * 32, "x", "0" * 33):
        assert server("GET", f"/jobs/{bad}")[0] in (404, 422)


# -- server-side files: only under --data-dir ---------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside/secret.png", "link-out.png", "dir-out/secret.png", "fifo.png",
                                  "zero", "sub", ".", "", "missing.png", "sub/../../outside/secret.png",
                                  "/etc/passwd", "/etc/shadow", "/dev/zero", "/proc/self/environ", "ok.png\x00.txt",
                                  "sub/../link-out.png", "//etc/passwd", "./../data/../outside/secret.png",
                                  "%2e%2e/outside/secret.png", "..\\outside\\secret.png", "\uff0e\uff0e/outside/secret.png",
                                  "sub/./../../outside/secret.png", "~/.ssh/id_rsa", "ok.png/.."])
def test_names_outside_or_not_files_get_one_answer(server, data_dir, name):
    t0 = time.monotonic()
    status, data, _ = server.post({**GOOD, "image": None, "image_path": name})
    assert time.monotonic() - t0 < 1.5  # a FIFO is never opened: nothing blocks
    assert status == 422 and data["fields"] == [{"field": "image_path", "problem": NOT_UNDER_DATA_DIR}]
    assert nothing_stored(server)


@pytest.mark.parametrize("name", ["ok.png", "sub/ok2.png", "link-in.png", "sub/../ok.png", "./ok.png"])
def test_names_inside_are_read(server, data_dir, name):
    status, data, _ = server.post({**GOOD, "image": None, "image_path": name})
    assert status == 202, data
    absolute = server.post({**GOOD, "image": None, "image_path": str(data_dir / "ok.png")})
    assert absolute[0] == 202


def test_a_big_file_inside_is_refused_by_size(server):
    status, data, _ = server.post({**GOOD, "image": None, "image_path": "big.png"})
    assert status == 422 and "larger than" in data["fields"][0]["problem"]


def test_no_data_dir_no_names(tmp_path):
    store = JobStore(tmp_path)
    client = Client(Front(KINDS, LocalBoard(store), lambda *a: None, token_sha256=digest(TOKEN)))
    status, data, _ = client.post({**GOOD, "image": None, "image_path": "ok.png"})
    assert status == 422 and "without --data-dir" in data["fields"][0]["problem"]


def test_data_dir_read_directly(data_dir):
    folder = DataDir(data_dir)
    assert folder.read("ok.png", LIMITS) == (data_dir / "ok.png").read_bytes()
    for name in ("fifo.png", "link-out.png", "../outside/secret.png"):
        with pytest.raises(InputError) as err:
            folder.read(name, LIMITS)
        assert err.value.problem == NOT_UNDER_DATA_DIR


def test_a_slow_data_folder_read_times_out(server, monkeypatch):
    server.front.limits = Limits(read_timeout_s=0.2)

    def slow(self, name, limits, field="image_path"):
        time.sleep(0.6)
        return png()

    monkeypatch.setattr(DataDir, "read", slow)
    status, data, _ = server.post({**GOOD, "image": None, "image_path": "ok.png"})
    assert status == 422 and "longer than" in data["fields"][0]["problem"] and nothing_stored(server)


# -- multipart upload -----------------------------------------------------------------------------------


def _multipart(parts: list[tuple[str, bytes, str | None]]) -> tuple[bytes, str]:
    boundary = "vramplan-test-boundary"
    out = b""
    for name, value, filename in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_upload(server):
    pytest.importorskip("python_multipart")
    image = png(24, 24)
    body, ctype = _multipart([("job", json.dumps({"workload": "hd", "seed": 5}).encode(), None),
                              ("image", image, "cat.png")])
    status, data, _ = server("POST", "/jobs", body, headers={"content-type": ctype})
    assert status == 202, data
    assert server.store.db.execute("SELECT image FROM jobs").fetchone()["image"] == image
    for parts, field in [
        ([("job", b'{"workload": "hd"}', None), ("image", image, "a.png"), ("image", image, "b.png")], "body"),
        ([("job", b'{"workload": "hd"}', None), ("other", b"x", None)], "other"),
        ([("job", b'{"workload": "hd"}', None), ("image", b"not an image", "a.png")], "image"),
        ([("job", b'{"workload": "hd", "image_path": "ok.png"}', None), ("image", image, "a.png")], "image"),
        ([("image", image, "a.png")], "job"),
        ([("job", b"[[[", None), ("image", image, "a.png")], "body"),
    ]:
        body, ctype = _multipart(parts)
        status, data, _ = server("POST", "/jobs", body, headers={"content-type": ctype})
        assert status == 422 and data["fields"][0]["field"] == field, (parts[-1][0], data)
    assert server.store.counts() == {"queued": 1}


# -- load: 50 concurrent submissions and polls ----------------------------------------------------------


def test_fifty_concurrent_submissions_and_polls(server):
    async def one(i):
        from starlette.requests import Request

        body = json.dumps({**GOOD, "seed": i}).encode()
        scope = {"type": "http", "method": "POST", "path": "/jobs", "raw_path": b"/jobs", "query_string": b"",
                 "headers": [(b"authorization", f"Bearer {TOKEN}".encode()), (b"content-type", b"application/json")],
                 "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1), "root_path": ""}
        sent = []

        async def receive():
            sent.append(1)
            return {"type": "http.request", "body": body if len(sent) == 1 else b"", "more_body": False}

        response = await server.front.handle(Request(scope, receive))
        job_id = json.loads(response.body)["id"]
        poll = dict(scope, method="GET", path=f"/jobs/{job_id}", raw_path=f"/jobs/{job_id}".encode())
        record = json.loads((await server.front.handle(Request(poll, receive))).body)
        return job_id, record

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(50)))

    results = asyncio.run(all_of_them())
    ids = [job_id for job_id, _ in results]
    assert len(set(ids)) == 50 and sorted(server.dispatched) == sorted(ids)
    assert all(record["id"] == job_id and record["request"]["seed"] == i for i, (job_id, record) in enumerate(results))
    assert server.store.counts() == {"queued": 50}


# -- the job store: a killed process loses nothing, nothing runs twice ------------------------------------


def _crash_mid_job(out: str, image: bytes) -> None:
    store = JobStore(out)
    for i in range(3):
        store.create(f"{i:032x}", "hd", {"seed": i}, image)
    assert store.claim(f"{0:032x}", "w1", 60) is not None
    assert store.finish(f"{0:032x}", "w1", "done", video=b"GIF89a-video", fmt="gif", report={"ok": 1})
    assert store.claim(f"{1:032x}", "w1", 0.3)["image_bytes"] == image  # running when the process dies
    os.kill(os.getpid(), 9)


def test_a_killed_process_loses_nothing_and_requeues_once(tmp_path):
    out = tmp_path / "out"
    child = multiprocessing.get_context("fork").Process(target=_crash_mid_job, args=(str(out), png()))
    child.start()
    child.join(60)
    assert child.exitcode == -9
    done, running, queued = (f"{i:032x}" for i in range(3))
    store = JobStore(out)  # the restarted server
    assert store.get(done)["status"] == "done" and store.video(done) == (b"GIF89a-video", "gif")
    assert store.get(done)["report"] == {"ok": 1} and store.get(done)["attempts"] == 1
    assert store.get(running)["status"] == "running" and store.queued() == [(queued, "hd")]
    time.sleep(0.35)
    assert store.expire() == [(running, "hd")]  # its lease lapsed: back in the queue, once
    assert store.expire() == []
    assert [j for j, _ in store.queued()] == [running, queued]
    assert store.claim(running, "w2", 60)["attempt"] == 2
    assert store.claim(running, "w3", 60) is None  # a second delivery does not run it again
    assert store.claim(running, "w2", 60)["attempt"] == 2  # the same claim retried (a board restart)
    assert not store.finish(running, "w1", "done", video=b"stale")  # the lost worker's late result is refused
    assert store.finish(running, "w2", "done", video=b"GIF89a-2")
    assert store.video(running) == (b"GIF89a-2", "gif") and store.get(running)["requeues"] == 1
    assert store.claim(done, "w9", 60) is None  # a finished job never runs again
    store.close()
    assert not list(out.glob(".*.tmp"))
    assert oct((out / "jobs.sqlite3").stat().st_mode & 0o777) == "0o600"


def test_a_job_that_loses_its_worker_twice_fails(tmp_path):
    store = JobStore(tmp_path)
    store.create("a" * 32, "hd", {}, None)
    for owner in ("w1", "w2"):
        assert store.claim("a" * 32, owner, 0.01) is not None
        time.sleep(0.02)
        store.expire()
    record = store.get("a" * 32)
    assert record["status"] == "failed" and "lost 2 times" in record["error"] and record["attempts"] == 2
    assert not store.heartbeat("a" * 32, "w2", 10)


# -- a worker's time limit frees it -------------------------------------------------------------------------


class AsyncStore:
    def __init__(self, store):
        self.store = store

    def __getattr__(self, name):
        async def call(*args, **kwargs):
            return getattr(self.store, name)(*args, **kwargs)

        return call


def _worker(tmp_path, monkeypatch, work):
    from vramplan.fleet import serve
    from vramplan.fleet.serve import FleetWorker, ServeSettings

    def execute(plan, pipe, job, out_dir, progress, stop):
        result = work(job, progress, stop)
        path = Path(out_dir) / f"{job['id']}.gif"
        path.write_bytes(b"GIF89a" + job["id"].encode())
        return {"video_path": str(path), "report": {"result": result}}

    monkeypatch.setattr(serve, "execute", execute)
    worker = FleetWorker.__new__(FleetWorker)
    worker.plan, worker.pipe, worker.gpu, worker.workload, worker.wedged = None, None, "A10G", "hd", None
    worker.settings = ServeSettings(token_sha256=None, job_timeout_s=0.3, lease_s=0.4)
    store = JobStore(tmp_path)
    worker.board = AsyncStore(store)
    for i in range(3):
        store.create(f"{i:032x}", "hd", {"seed": i}, png())
    return worker, store


def test_a_job_past_its_time_limit_stops_and_frees_the_worker(tmp_path, monkeypatch):
    from vramplan.fleet.jobs import JobTimeoutError

    def work(job, progress, stop):
        if job["seed"] == 1:
            raise ValueError("bad job")
        while job["seed"] == 0:
            progress(1, 10)
            if stop():
                raise JobTimeoutError("stopped")
            time.sleep(0.01)
        return "ok"

    worker, store = _worker(tmp_path, monkeypatch, work)
    assert asyncio.run(worker.run(f"{0:032x}")) == "failed"
    assert "time limit of 0.3 s" in store.get(f"{0:032x}")["error"] and worker.wedged is None
    assert asyncio.run(worker.run(f"{1:032x}")) == "failed" and "ValueError: bad job" in store.get(f"{1:032x}")["error"]
    assert asyncio.run(worker.run(f"{2:032x}")) == "done"  # the worker went on
    assert store.video(f"{2:032x}")[0] == b"GIF89a" + f"{2:032x}".encode()
    assert asyncio.run(worker.run(f"{2:032x}")) == "skipped"  # delivered again: not run again
    worker.check_health()


def test_a_job_that_does_not_stop_marks_its_replica_for_replacement(tmp_path, monkeypatch):
    stuck = threading.Event()

    def work(job, progress, stop):
        stuck.wait(5)  # ignores stop(): a kernel that never returns
        return "late"

    worker, store = _worker(tmp_path, monkeypatch, work)

    async def first():
        t0 = time.monotonic()
        status = await worker.run(f"{0:032x}")
        seconds = time.monotonic() - t0
        stuck.set()  # let the thread end, so the event loop can close
        return status, seconds

    status, seconds = asyncio.run(first())
    assert status == "failed" and seconds < 4  # limit 0.3 s + 2 s to stop
    assert worker.wedged and "did not stop" in worker.wedged
    with pytest.raises(RuntimeError, match="did not stop"):
        worker.check_health()  # Serve replaces the replica
    assert asyncio.run(worker.run(f"{1:032x}")) == "refused" and store.get(f"{1:032x}")["status"] == "queued"
