"""The HTTP front of a served fleet, as plain Python: authenticate, bound, validate, store, then dispatch.

``Front.handle(request)`` takes a Starlette request and answers a Starlette response; the Ray Serve
ingress (:class:`vramplan.fleet.serve.FleetAPI`) only wires it to the job board and the workers, so
everything a client can reach is tested here without Ray. Order of the checks (nothing is read,
stored or run before the ones above it pass):

1. the bearer token (401, before the body is read; compared in constant time, as SHA-256 digests);
2. the route and method (404 / 405);
3. the body size: Content-Length first, then counted while reading, under a read timeout (413 / 408);
4. the JSON (or multipart: a ``job`` JSON part and an ``image`` file part) and its fields (422, per field);
5. the image: base64 data, the uploaded part, or a name under the data folder, bounded (422);
6. the job stored (committed) -> 202 with its id; only then is it handed to a worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..planner.errors import VramplanError
from .inputs import DataDir, InputError, Limits, decode_base64_image, image_size
from .requests import RequestInvalid, check_job_id, input_problem, validate_job

log = logging.getLogger(__name__)
TOKEN_ENV = "VRAMPLAN_TOKEN"
MIN_TOKEN = 16
ROUTES = "POST /jobs, GET /jobs/<id>, GET /jobs/<id>/video, GET /"


class AuthError(VramplanError):
    """A serve command that would expose the API without a usable token."""


class Board(Protocol):
    async def create(self, job_id: str, workload: str, request: dict, image: bytes | None) -> dict: ...
    async def get(self, job_id: str) -> dict | None: ...
    async def video(self, job_id: str) -> tuple[bytes, str] | None: ...


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def resolve_token(token: str | None, env: dict, host: str, insecure: bool) -> tuple[str | None, bool]:
    """(token or None, generated?) for a server on ``host``: the given token, $VRAMPLAN_TOKEN, or a new
    one; none only with ``insecure``. Beyond loopback a token must be given (clients must know it)."""
    token = token or env.get(TOKEN_ENV) or None
    if insecure:
        if token:
            raise AuthError(f"--insecure serves without authentication: drop --token / ${TOKEN_ENV}, or --insecure")
        return None, False
    if token is not None:
        if len(token) < MIN_TOKEN or not token.isprintable() or " " in token:
            raise AuthError(f"the token must be at least {MIN_TOKEN} printable characters without spaces "
                            f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        return token, False
    if not is_loopback(host):
        raise AuthError(f"--host {host} listens beyond this machine: give a token (${TOKEN_ENV} or --token) that "
                        f"clients send as 'Authorization: Bearer <token>', or --insecure to serve without one")
    return secrets.token_urlsafe(32), True


def _json(data: Any, status: int = 200, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(data, status_code=status, headers=headers)


def _error(code: int, message: str, **extra):
    headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
    return _json({"error": message, **extra}, code, headers)


class BodyTooLarge(Exception):
    pass


class Front:
    """Routes, checks and answers; ``board`` stores jobs, ``dispatch(id, workload)`` hands one to a worker."""

    def __init__(self, kinds: dict[str, str], board: Board, dispatch: Callable[[str, str], Any], *,
                 token_sha256: str | None, limits: Limits | None = None, data_dir: str | None = None,
                 info: dict | None = None):
        self.kinds, self.board, self.dispatch = kinds, board, dispatch
        self.expected = None if token_sha256 is None else bytes.fromhex(token_sha256)
        self.limits = limits or Limits()
        self.data_dir = None if data_dir is None else DataDir(data_dir)
        self.info = info or {}

    # -- checks ------------------------------------------------------------------------------------

    def authorized(self, request) -> bool:
        if self.expected is None:
            return True
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(presented.strip().encode()).digest()
        return hmac.compare_digest(given, self.expected) and scheme.lower() == "bearer"

    async def body(self, request) -> bytes:
        """The body, at most ``max_body_bytes`` (Content-Length checked first, then counted), in time."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestInvalid([{"field": "Content-Length", "problem": "not a number"}])
            if int(declared) > limit:
                raise BodyTooLarge

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge
                chunks.append(chunk)
            return b"".join(chunks)

        return await asyncio.wait_for(read(), self.limits.read_timeout_s)

    async def _within(self, fn: Callable, *args) -> Any:
        """Run blocking input work (decoding, a data-folder read) in a thread, under the read timeout."""
        return await asyncio.wait_for(asyncio.to_thread(fn, *args), self.limits.read_timeout_s)

    async def parse(self, request, raw: bytes) -> tuple[dict, bytes | None]:
        """(job object, uploaded image bytes or None) from a JSON or multipart body."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            return await self._multipart(request, raw)
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise RequestInvalid([{"field": "Content-Type", "problem": "send application/json (or multipart/form-data "
                                                                       "with a 'job' JSON part and an 'image' file)"}])
        return _loads(raw), None

    async def _multipart(self, request, raw: bytes) -> tuple[dict, bytes | None]:
        from starlette.requests import Request

        sent = False

        async def receive():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        try:
            form = await Request(request.scope, receive).form(max_files=1, max_fields=2,
                                                              max_part_size=self.limits.max_body_bytes)
        except AssertionError:  # python-multipart missing
            raise RequestInvalid([{"field": "Content-Type", "problem": "this server takes JSON bodies only"}]) from None
        except Exception:  # noqa: BLE001 - malformed multipart (starlette raises HTTPException / MultiPartException)
            raise RequestInvalid([{"field": "body", "problem": "malformed multipart/form-data (send a 'job' JSON "
                                                              "part and at most one 'image' file part)"}]) from None
        try:
            unknown = sorted(set(form) - {"job", "image"})
            if unknown:
                raise RequestInvalid([{"field": unknown[0][:40], "problem": "unknown part; send 'job' and 'image'"}])
            job_text = form.get("job")
            if not isinstance(job_text, str):
                raise RequestInvalid([{"field": "job", "problem": "a JSON text part is required"}])
            upload = form.get("image")
            if upload is None:
                return _loads(job_text.encode()), None
            if isinstance(upload, str):
                raise RequestInvalid([{"field": "image", "problem": "send the image as a file part"}])
            return _loads(job_text.encode()), await upload.read()
        finally:
            await form.close()

    async def image(self, job, uploaded: bytes | None) -> bytes | None:
        """The job's image bytes, checked (format, bytes, pixels), or None for a prompt workload."""
        try:
            if uploaded is not None:
                data = uploaded
            elif job.image is not None:
                data = await self._within(decode_base64_image, job.image, self.limits)
            elif job.image_path is not None:
                if self.data_dir is None:
                    raise InputError("image_path", "this server takes no file names (it was started without "
                                                   "--data-dir); send the image as base64 data or a file upload")
                data = await self._within(self.data_dir.read, job.image_path, self.limits)
            else:
                return None
            field = "image_path" if job.image_path is not None else "image"
            await self._within(image_size, data, self.limits, field)
            return data
        except InputError as err:
            raise input_problem(err) from None
        except TimeoutError:
            field = "image_path" if job.image_path is not None else "image"
            raise RequestInvalid([{"field": field, "problem": f"reading the image took longer than "
                                                              f"{self.limits.read_timeout_s:g} s"}]) from None

    # -- routes ------------------------------------------------------------------------------------

    async def handle(self, request):
        if not self.authorized(request):
            return _error(401, "missing or wrong token: send 'Authorization: Bearer <token>'")
        parts = [p for p in request.url.path.split("/") if p]
        method = request.method
        try:
            if parts == ["jobs"]:
                return await self.submit(request) if method == "POST" else _error(405, "POST /jobs")
            if len(parts) in (2, 3) and parts[0] == "jobs" and (len(parts) == 2 or parts[2] == "video"):
                if method != "GET":
                    return _error(405, "GET /jobs/<id>")
                job_id = check_job_id(parts[1])
                return await (self.status(job_id) if len(parts) == 2 else self.video(job_id))
            if not parts:
                return _json({"workloads": sorted(self.kinds), **self.info}) if method == "GET" else _error(405, "GET /")
        except RequestInvalid as err:
            return _error(422, "invalid request", fields=err.problems)
        except BodyTooLarge:
            return _error(413, f"the body is larger than the limit of {self.limits.max_body_bytes} bytes")
        except TimeoutError:
            return _error(408, f"the body did not arrive within {self.limits.read_timeout_s:g} s")
        except Exception:  # noqa: BLE001 - the store or a worker handle failed: say so, show nothing inside
            log.exception("%s %s failed", method, request.url.path[:200])
            return _error(503, "the job store is not reachable right now; try again")
        return _error(404, f"routes: {ROUTES}")

    async def submit(self, request):
        raw = await self.body(request)
        body, uploaded = await self.parse(request, raw)
        job, options = validate_job(body, self.kinds, uploaded=uploaded is not None)
        image = await self.image(job, uploaded)
        job_id = uuid.uuid4().hex
        fields = job.model_dump(exclude={"image", "options"}, exclude_none=True)
        fields["options"] = options
        await self.board.create(job_id, job.workload, fields, image)  # on disk before the 202
        result = self.dispatch(job_id, job.workload)
        if isinstance(result, Awaitable):
            await result
        return _json({"id": job_id, "status": "queued", "url": f"/jobs/{job_id}"}, 202,
                     headers={"Location": f"/jobs/{job_id}"})

    async def status(self, job_id: str):
        record = await self.board.get(job_id)
        return _error(404, "no such job") if record is None else _json(record)

    async def video(self, job_id: str):
        from starlette.responses import Response

        found = await self.board.video(job_id)
        if found is None:
            record = await self.board.get(job_id)
            return _error(404, "no such job" if record is None else "no video (yet)",
                          **({} if record is None else {"status": record["status"]}))
        data, fmt = found
        return Response(data, media_type="image/gif" if fmt == "gif" else "video/mp4")


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise RequestInvalid([{"field": "body", "problem": "not valid JSON (UTF-8)"}]) from None
