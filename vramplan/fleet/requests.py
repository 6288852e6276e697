"""What a client may ask, checked at the door: one pydantic model per route, errors per field.

A job is refused (HTTP 422, naming each field and its problem) before anything is stored or run: an
unknown workload, a seed outside 0..2**63-1, steps outside 1..MAX_STEPS, a format other than gif/mp4,
fps outside 1..MAX_FPS, an option the workload's pipeline does not take (or of the wrong type), an
image that is not PNG/JPEG/WEBP data within the size limits. Plain pydantic, no Ray, no torch.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .inputs import InputError

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes any 64-bit value; JSON clients handle int64
MAX_STEPS = 200
MAX_FPS = 60
MAX_PROMPT = 2000  # characters
JOB_ID = re.compile(r"[0-9a-f]{32}")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SvdOptions(_Closed):
    """Stable Video Diffusion call arguments a client may set (size, frames and decoding are the plan's)."""

    motion_bucket_id: int = Field(default=127, ge=0, le=1023)
    noise_aug_strength: float = Field(default=0.02, ge=0, le=1, allow_inf_nan=False)
    min_guidance_scale: float = Field(default=1.0, ge=0, le=30, allow_inf_nan=False)
    max_guidance_scale: float = Field(default=3.0, ge=0, le=30, allow_inf_nan=False)


class AnimateDiffOptions(_Closed):
    """AnimateDiff call arguments a client may set."""

    guidance_scale: float = Field(default=7.5, ge=0, le=30, allow_inf_nan=False)


OPTIONS: dict[str, type[_Closed]] = {"image": SvdOptions, "prompt": AnimateDiffOptions}


class JobRequest(_Closed):
    """``POST /jobs``: one video. ``image`` (base64 or a data URL) or ``image_path`` (a name under the
    server's data folder) for image-to-video workloads; ``prompt`` for text-to-video ones."""

    workload: str = Field(min_length=1, max_length=200)
    image: str | None = Field(default=None, min_length=1, description="PNG/JPEG/WEBP as base64 or data:image/...;base64,")
    image_path: str | None = Field(default=None, max_length=1024, description="a file under --data-dir")
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="default: the plan's")
    format: Literal["gif", "mp4"] = "gif"
    fps: int = Field(default=7, ge=1, le=MAX_FPS)
    options: dict[str, Any] = Field(default_factory=dict)


class JobPath(_Closed):
    """``GET /jobs/<id>`` and ``GET /jobs/<id>/video``."""

    id: str = Field(pattern=JOB_ID.pattern, description="the 32 hex digits POST /jobs answered")


class RequestInvalid(ValueError):
    """One or more fields refused; ``problems`` is a list of {"field", "problem"} (HTTP 422)."""

    def __init__(self, problems: list[dict[str, str]]):
        super().__init__("; ".join(f"{p['field']}: {p['problem']}" for p in problems))
        self.problems = problems


def _problems(err: ValidationError, prefix: str = "") -> list[dict[str, str]]:
    out = []
    for e in err.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in e["loc"])
        out.append({"field": f"{prefix}{where}" if where else prefix.rstrip(".") or "body", "problem": e["msg"]})
    return out


def validate_job(body: Any, kinds: dict[str, str], uploaded: bool = False) -> tuple[JobRequest, dict[str, Any]]:
    """A request body -> (the request, the pipeline options checked for its workload's pipeline).
    ``kinds`` maps each served workload to its conditioning ("image" or "prompt"); ``uploaded``: the
    image came as a multipart file part."""
    if not isinstance(body, dict):
        raise RequestInvalid([{"field": "body", "problem": "must be a JSON object"}])
    try:
        job = JobRequest.model_validate(body)
    except ValidationError as err:
        raise RequestInvalid(_problems(err)) from None
    problems = []
    kind = kinds.get(job.workload)
    if kind is None:
        names = ", ".join(sorted(kinds))
        raise RequestInvalid([{"field": "workload", "problem": f"unknown; this server runs {names[:400]}"}])
    given = [name for name in ("image", "image_path") if getattr(job, name) is not None] + ["upload"] * uploaded
    if kind == "image":
        if len(given) != 1:
            problems.append({"field": "image", "problem": "give exactly one of 'image' (base64 data), an "
                                                         "uploaded 'image' file part and 'image_path' (a file under "
                                                         "the server's data folder)"})
        for name in ("prompt", "negative_prompt"):
            if getattr(job, name) is not None:
                problems.append({"field": name, "problem": f"workload {job.workload!r} takes an image, not a prompt"})
    else:
        if not job.prompt:
            problems.append({"field": "prompt", "problem": f"workload {job.workload!r} needs a prompt"})
        for name in given:
            problems.append({"field": name, "problem": f"workload {job.workload!r} takes a prompt, not an image"})
    try:
        options = OPTIONS[kind].model_validate(job.options).model_dump(exclude_unset=True)
    except ValidationError as err:
        problems += _problems(err, "options.")
        options = {}
    if problems:
        raise RequestInvalid(problems)
    return job, options


def check_job_id(job_id: str) -> str:
    try:
        return JobPath(id=job_id).id
    except ValidationError:
        raise RequestInvalid([{"field": "id", "problem": "a job id is the 32 hex digits POST /jobs answered"}]) from None


def input_problem(err: InputError) -> RequestInvalid:
    return RequestInvalid([{"field": err.field, "problem": err.problem}])
