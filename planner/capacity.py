"""Capacity planning for a mix of workloads on a mix of GPUs: an ILP over packing patterns. No torch, no ray.

Inputs: workloads (model, shape, steps, a rate in videos/hour, an optional latency bound) and a GPU
inventory (types, how many are available, $/hour). For every workload w and GPU type g a vramplan
plan is made (``plan_for`` on the shipped profiles): the smallest peak whose latency is within
``slack`` of the fastest plan on g (and within w's bound). Its peak ``P[w,g]`` is guaranteed, so
jobs can share a GPU when their peaks sum under its memory.

Formulation (column enumeration, then one integer program):

* A *pattern* p of GPU type g is a multiset of workloads run side by side on one GPU of type g,
  each in its own process: the sum of their peaks (each includes its own CUDA context) fits
  g's usable memory, at most ``max_jobs`` jobs. A pattern of copies of one workload only is left
  out: it is dominated by the single job (same throughput, more memory, slower).
* Throughput when packed (the conservative assumption, stated in every fleet plan): co-located
  jobs **time-share the GPU's compute**. With every job busy, the GPU runs one video of each slot
  per cycle of ``C[p] = sum of the slots' solo latencies``; each slot's latency becomes ``C[p]``
  and it delivers ``3600 / C[p]`` videos/hour. Packing therefore never adds throughput; it lets
  workloads with small rates share a GPU instead of each paying for a whole one. A pattern is
  admissible only if ``C[p]`` meets the latency bound of every workload in it.
* Variables: ``x[g,p]`` integer >= 0, GPUs of type g running pattern p.
  minimise   sum price[g] * x[g,p]
  subject to sum_{g,p} m[p,w] * 3600 / C[p] * x[g,p] >= rate[w]     for every served workload w
             sum_p x[g,p] <= count[g]                                for every GPU type with a count
* CBC solves it to within a relative gap (default 2 %): it finds the cheapest fleet in seconds, but
  proving it optimal can take minutes on a 20 x 18 mix (``gap=0`` asks for the proof).
* A workload that no GPU type can serve (memory or latency) is reported in ``unserved``, not
  dropped silently. If the inventory cannot meet the rates, a second program minimises the
  shortfall so that the error can name each workload and how many videos/hour are missing.

Queueing delay is not modelled: latencies are service times of one video; keep utilisation below
one by asking for a little more rate than the mean.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pulp
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from .errors import InfeasibleError, VramplanError
from .fmt import human_bytes
from .gpus import all_gpus, find_gpu
from .schema import Plan
from .solve import _cbc, _variable

log = logging.getLogger(__name__)

FLEET_SCHEMA_VERSION = 1
FRACTION_STEP = 1e-4  # Ray accepts GPU fractions to 4 decimals

# $/hour for one GPU, on demand. ASSUMPTIONS (typical 2025 cloud/marketplace list prices for a
# single-GPU instance, rounded; they move often and differ by provider and region): put your own
# prices in the inventory file. Consumer cards: community-cloud marketplace prices.
DEFAULT_PRICES: dict[str, float] = {
    "GTX 1080 Ti": 0.15,
    "RTX 2080 Ti": 0.20,
    "T4": 0.35,  # GCP n1 + T4 is about $0.35/h for the GPU
    "RTX 3060 12GB": 0.12,
    "RTX 3080 10GB": 0.18,
    "RTX 3090": 0.30,
    "A10G": 1.01,  # AWS g5.xlarge on demand, us-east-1 (whole instance)
    "L4": 0.71,  # GCP g2-standard-4 (whole instance)
    "RTX 4080": 0.30,
    "RTX 4090": 0.45,
    "RTX A6000": 0.80,
    "A100 40GB": 1.30,
    "A100 80GB": 1.80,
    "L40S": 1.00,
    "H100 SXM": 3.00,
    "H100 PCIe": 2.50,
    "H200": 3.80,
    "RTX 5090": 0.70,
}
PRICE_NOTE = ("default $/hour are assumptions (typical 2025 on-demand prices of one GPU, rounded); "
              "set price_per_hour in the inventory")
TIME_SHARING_NOTE = ("jobs packed on one GPU time-share its compute: each packed job's latency is the sum of "
                     "its pattern's solo latencies, and each delivers 3600 / that sum videos per hour")
QUEUE_NOTE = "queueing delay is not modelled: latencies are the predicted service time of one video"
HOST_RAM_NOTE = ("jobs packed on one GPU share its machine's pinned host memory: their plans' host memory (placed "
                 "values, streamed weights) sums within the GPU type's host_ram_gb")
HOST_RAM_ASSUMED_NOTE = ("host_ram_gb not given for a GPU type: {gb:g} GiB of pinned host memory assumed per machine "
                         "(a 32 GiB machine, 75 % pinnable); set host_ram_gb in the inventory")


class FleetError(VramplanError):
    """A fleet request that cannot be planned or a fleet plan that cannot be used as written."""


class WorkloadError(FleetError, ValueError):
    """A workload file entry that is malformed or asks for something no model can do."""


class InventoryError(FleetError):
    """An inventory that is malformed or cannot meet the workloads' rates."""


class FleetPlanError(FleetError, ValueError):
    """A fleet plan file that is corrupt or was edited into something unsafe (packed beyond memory)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Workload(_Strict):
    """One kind of request the fleet must serve at a sustained rate."""

    name: str = Field(min_length=1, description="unique name; used for deployments and job routing")
    model: str = Field(description="a shipped model: svd, svd-xt, animatediff")
    height: int = Field(default=576, strict=True, gt=0)
    width: int = Field(default=1024, strict=True, gt=0)
    frames: int | None = Field(default=None, strict=True, gt=0, description="default: the model's")
    steps: int = Field(default=25, strict=True, ge=1)
    guidance: bool = Field(default=True, strict=True)
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    rate: float = Field(strict=True, gt=0, allow_inf_nan=False, description="videos per hour to sustain")
    p95_latency_s: float | None = Field(default=None, strict=True, gt=0, allow_inf_nan=False,
                                        description="latency bound of one video, seconds")


class GpuOffer(_Strict):
    gpu: str = Field(description="GPU type, any name `vramplan gpus` knows")
    count: int | None = Field(default=None, strict=True, ge=0, description="available; null: unlimited")
    price_per_hour: float | None = Field(default=None, strict=True, ge=0, allow_inf_nan=False,
                                         description="$/hour; null: the default (an assumption)")
    host_ram_gb: float | None = Field(default=None, strict=True, gt=0, allow_inf_nan=False,
                                      description="pinned host memory (GiB) a job's plan may use on a machine with "
                                                  "this GPU; null: plan_for's assumption (ASSUMED_HOST_RAM_GB)")
    _price_assumed: bool = PrivateAttr(default=False)  # set by parse_inventory when it filled in a default


def _offer(gpu: str, count: int | None, price: float, assumed: bool, host_ram_gb: float | None = None) -> GpuOffer:
    offer = GpuOffer(gpu=gpu, count=count, price_per_hour=price, host_ram_gb=host_ram_gb)
    offer._price_assumed = assumed
    return offer


class JobSlot(_Strict):
    """One job process on a GPU: its workload, its vramplan plan and what it delivers there."""

    workload: str
    plan: Plan
    peak_bytes: int
    solo_latency_s: float
    packed_latency_s: float = Field(description="latency while its GPU time-shares with the pattern's other jobs")
    videos_per_hour: float = Field(description="per GPU running this packing")
    num_gpus: float = Field(gt=0, le=1, description="Ray GPU fraction of the job's process")


class Packing(_Strict):
    count: int = Field(ge=1, description="GPUs of this type running this packing")
    jobs: list[JobSlot] = Field(min_length=1)


class GpuAllocation(_Strict):
    gpu: str
    count: int = Field(ge=0)
    price_per_hour: float
    usable_bytes: int
    packings: list[Packing]


class Unserved(_Strict):
    workload: str
    reason: str


class FleetSolver(_Strict):
    status: str
    planning_seconds: float = Field(description="making the per workload x GPU plans")
    solve_seconds: float = Field(description="enumerating patterns and solving the ILP")
    patterns: int
    slack: float
    max_jobs: int
    gap: float = Field(default=0.0, description="relative optimality gap the ILP was asked to close")


class FleetPlan(_Strict):
    """Per GPU type: how many, which packings of workloads, and the vramplan plan of each job."""

    schema_version: int = FLEET_SCHEMA_VERSION
    kind: Literal["vramplan-fleet"] = "vramplan-fleet"
    workloads: list[Workload]
    gpus: list[GpuAllocation]
    unserved: list[Unserved] = Field(default_factory=list)
    cost_per_hour: float
    solver: FleetSolver
    assumptions: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> FleetPlan:
        if self.schema_version != FLEET_SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not {FLEET_SCHEMA_VERSION}")
        names = {w.name for w in self.workloads}
        for alloc in self.gpus:
            for packing in alloc.packings:
                for job in packing.jobs:
                    if job.workload not in names:
                        raise ValueError(f"{alloc.gpu} runs workload {job.workload!r}, which the plan does not list")
        return self

    def workload(self, name: str) -> Workload:
        for w in self.workloads:
            if w.name == name:
                return w
        raise FleetError(f"the fleet plan has no workload {name!r}; it has {', '.join(w.name for w in self.workloads)}")

    def check(self) -> FleetPlan:
        """Refuse a plan (e.g. edited by hand) whose packings exceed a GPU's memory or its Ray fractions;
        every job's peak is first re-derived from its embedded plan (:func:`.fleet.rederive_job_peaks`)."""
        from .fleet import rederive_job_peaks

        rederive_job_peaks(self)
        for alloc in self.gpus:
            gpu = find_gpu(alloc.gpu)
            for packing in alloc.packings:
                names = ", ".join(j.workload for j in packing.jobs)
                if any(j.plan.target is None or j.plan.prediction is None for j in packing.jobs):
                    raise FleetPlanError(f"{alloc.gpu} packs {names}: every job's plan needs its target and "
                                         f"prediction; re-plan the fleet (vramplan fleet).")
                wrong = [j.workload for j in packing.jobs if find_gpu(j.plan.target.gpu).name != gpu.name]
                if wrong:
                    raise FleetPlanError(f"{alloc.gpu} packs {', '.join(wrong)} with plans made for another GPU; "
                                         f"re-plan the fleet (vramplan fleet).")
                peaks = sum(j.plan.prediction.peak_bytes for j in packing.jobs)
                if peaks > gpu.memory_usable_bytes:
                    raise FleetPlanError(
                        f"{alloc.gpu} packs {names}: their plans' peaks sum to {human_bytes(peaks)}, beyond the "
                        f"{human_bytes(gpu.memory_usable_bytes)} the GPU has. Remove a job from the packing or "
                        f"re-plan the fleet (vramplan fleet)."
                    )
                host = sum(j.plan.prediction.host_bytes for j in packing.jobs)
                limits = [j.plan.target.host_ram_bytes for j in packing.jobs if j.plan.target.host_ram_bytes is not None]
                if limits and host > min(limits):
                    raise FleetPlanError(
                        f"{alloc.gpu} packs {names}: their plans need {human_bytes(host)} of pinned host memory, "
                        f"beyond the {human_bytes(min(limits))} their host memory budget allows. Remove a job from "
                        f"the packing or re-plan the fleet (vramplan fleet)."
                    )
                share = sum(j.num_gpus for j in packing.jobs)
                if share > 1 + 1e-9:
                    raise FleetPlanError(f"{alloc.gpu} packs {names} with GPU fractions summing to {share:.4f} > 1")
        return self

    def replicas(self) -> dict[tuple[str, str], tuple[int, float, Plan]]:
        """(GPU type, workload) -> (replicas, Ray GPU fraction, plan): one Ray deployment each."""
        out: dict[tuple[str, str], tuple[int, float, Plan]] = {}
        for alloc in self.gpus:
            for packing in alloc.packings:
                for job in packing.jobs:
                    n, frac, plan = out.get((alloc.gpu, job.workload), (0, 0.0, job.plan))
                    out[(alloc.gpu, job.workload)] = (n + packing.count, max(frac, job.num_gpus), plan)
        return out

    def capacity(self, workload: str) -> float:
        """Videos/hour the fleet delivers for ``workload``."""
        return sum(p.count * j.videos_per_hour for a in self.gpus for p in a.packings for j in p.jobs
                   if j.workload == workload)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.model_dump_json(indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FleetPlan:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as err:
            raise FleetPlanError(f"cannot read fleet plan {path}: {err.strerror}") from err
        except json.JSONDecodeError as err:
            raise FleetPlanError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict) or data.get("kind") != "vramplan-fleet":
            raise FleetPlanError(f"{path} is not a vramplan fleet plan (make one with `vramplan fleet --workloads`)")
        try:
            plan = cls.model_validate(data)
        except ValidationError as err:
            raise FleetPlanError(f"{path} is not a valid fleet plan: {_describe(err)}") from err
        return plan.check()


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:4]:
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        parts.append(f"'{where[:80]}': {e['msg']} (got {_short(e.get('input'))})")
    return "; ".join(parts)


def _short(value: Any, width: int = 60) -> str:
    """A bounded repr of a value read from a file: nested or shared structures never expand in full."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 3, 3, width, width
    text = r.repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


# -- reading workload and inventory files -----------------------------------------------------------


MAX_DOCUMENT_BYTES = 1 << 20  # workload and inventory files are a few KiB
MAX_DOCUMENT_NODES = 100_000  # values after expanding YAML aliases: a billion laughs stops here
MAX_DOCUMENT_DEPTH = 64


def read_document(path: str | Path) -> Any:
    """JSON, or YAML when PyYAML is installed (a clear error when it is not). Bounded: a regular file
    of at most MAX_DOCUMENT_BYTES, at most MAX_DOCUMENT_NODES values once YAML aliases are expanded,
    nested at most MAX_DOCUMENT_DEPTH deep; refused before anything formats or walks the expansion."""
    import stat

    path = Path(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise FleetError(f"cannot read {path}: not a regular file")
        if st.st_size > MAX_DOCUMENT_BYTES:
            raise FleetError(f"{path} is {st.st_size} bytes; workload and inventory files may have at most "
                             f"{MAX_DOCUMENT_BYTES}")
        with open(path, "rb") as f:
            raw = f.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as err:
        raise FleetError(f"cannot read {path}: {err.strerror}") from err
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise FleetError(f"{path} has more than {MAX_DOCUMENT_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FleetError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise FleetError(f"{path} is YAML, which needs PyYAML (pip install pyyaml); or write it as JSON") from err
        try:
            loader = yaml.SafeLoader(text)
            try:
                node = loader.get_single_node()
                _check_yaml_size(node, path)
                return None if node is None else loader.construct_document(node)
            finally:
                loader.dispose()
        except yaml.YAMLError as err:
            raise FleetError(f"{path} is not valid YAML: {_short(str(err), 300)}") from err
        except RecursionError as err:
            raise FleetError(f"{path} nests deeper than {MAX_DOCUMENT_DEPTH} levels") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise FleetError(f"{path} is not valid JSON: {err} (YAML files must end in .yaml or .yml)") from err
    except RecursionError as err:
        raise FleetError(f"{path} nests deeper than {MAX_DOCUMENT_DEPTH} levels") from err
    _check_depth(data, path)
    return data


def _check_yaml_size(root, path: Path) -> None:
    """Count the values a YAML graph expands to (aliases counted each time they are used), without
    expanding it: sizes are memoised per node, so a billion laughs costs its node count."""
    import yaml

    if root is None:
        return
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    order, stack, seen = [], [(root, 1)], set()
    while stack:  # children before parents, iteratively (no recursion limit)
        node, d = stack.pop()
        if d > MAX_DOCUMENT_DEPTH:
            raise FleetError(f"{path} nests deeper than {MAX_DOCUMENT_DEPTH} levels")
        if id(node) in seen:
            continue
        seen.add(id(node))
        order.append(node)
        if isinstance(node, yaml.SequenceNode):
            stack.extend((c, d + 1) for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend((c, d + 1) for kv in node.value for c in kv)
    for node in reversed(order):
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [c for kv in node.value for c in kv]
        else:
            children = []
        total = 1 + sum(size.get(id(c), 1) for c in children)
        size[id(node)] = min(total, MAX_DOCUMENT_NODES + 1)
        depth[id(node)] = 1 + max((depth.get(id(c), 1) for c in children), default=0)
        if size[id(node)] > MAX_DOCUMENT_NODES:
            raise FleetError(f"{path} expands to more than {MAX_DOCUMENT_NODES} values (YAML anchors and aliases "
                             f"repeated into a huge document); write the workloads out")
        if depth[id(node)] > MAX_DOCUMENT_DEPTH:
            raise FleetError(f"{path} nests deeper than {MAX_DOCUMENT_DEPTH} levels")


def _check_depth(data: Any, path: Path) -> None:
    stack = [(data, 1)]
    while stack:
        value, d = stack.pop()
        if d > MAX_DOCUMENT_DEPTH:
            raise FleetError(f"{path} nests deeper than {MAX_DOCUMENT_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, d + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, d + 1) for v in value)


def parse_workloads(data: Any, source: str = "workloads") -> list[Workload]:
    """A list of workloads (or ``{"workloads": [...]}``), each checked, names unique, models known."""
    from ..profiles import model_catalogue

    if isinstance(data, dict) and "workloads" in data:
        data = data["workloads"]
    if not isinstance(data, list) or not data:
        raise WorkloadError(f"{source} must hold a non-empty list of workloads (or {{'workloads': [...]}})")
    out: list[Workload] = []
    for i, entry in enumerate(data):
        label = entry.get("name", f"#{i + 1}") if isinstance(entry, dict) else f"#{i + 1}"
        try:
            w = Workload.model_validate(entry)
        except ValidationError as err:
            raise WorkloadError(f"{source}: workload {_short(label)}: {_describe(err)}") from None
        if w.model.lower() not in model_catalogue():
            raise WorkloadError(f"{source}: workload {_short(w.name)} asks for unknown model {_short(w.model)}; "
                                f"fleet planning "
                                f"knows the shipped models: {', '.join(sorted(model_catalogue()))}")
        out.append(w)
    names = [w.name for w in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise WorkloadError(f"{source}: workload names must be unique; repeated: {', '.join(d[:80] for d in dupes[:10])}")
    return out


def parse_inventory(data: Any | None, source: str = "inventory") -> list[GpuOffer]:
    """GPU offers with canonical names and prices; None: every known GPU with a default price (laptop
    GPUs have none), unlimited, at the default prices."""
    if data is None:
        return [_offer(g.name, None, DEFAULT_PRICES[g.name], True) for g in all_gpus() if g.name in DEFAULT_PRICES]
    if isinstance(data, dict) and "gpus" in data:
        data = data["gpus"]
    if not isinstance(data, list) or not data:
        raise InventoryError(f"{source} must hold a non-empty list of GPUs (or {{'gpus': [...]}})")
    offers: dict[str, GpuOffer] = {}
    for i, entry in enumerate(data):
        try:
            offer = GpuOffer.model_validate(entry)
        except ValidationError as err:
            raise InventoryError(f"{source}: GPU #{i + 1}: {_describe(err)}") from None
        name = find_gpu(offer.gpu).name
        if name in offers:
            raise InventoryError(f"{source}: {name} is listed twice; give it once with its count")
        price = offer.price_per_hour if offer.price_per_hour is not None else DEFAULT_PRICES.get(name)
        if price is None:
            raise InventoryError(f"{source}: no default price for {name}; give its price_per_hour")
        offers[name] = _offer(name, offer.count, price, offer.price_per_hour is None, offer.host_ram_gb)
    return list(offers.values())


# -- the per workload x GPU plans --------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """What workload ``w`` needs on GPU type ``g``: one job's plan, peak and solo latency."""

    workload: int
    gpu: str
    peak_bytes: int
    usable_bytes: int
    latency_s: float
    bound_s: float  # the workload's latency bound (inf if none)
    plan: Plan | None = None
    host_bytes: int = 0  # pinned host memory the plan needs (placed values, streamed weights)
    host_ram_bytes: int | None = None  # what the GPU type's machine may pin (None: no limit)

    @property
    def fraction(self) -> float:
        """Share of the GPU's memory, rounded up to Ray's fraction resolution."""
        return math.ceil(self.peak_bytes / self.usable_bytes / FRACTION_STEP - 1e-9) * FRACTION_STEP


# (gpu, model, h, w, frames, guidance, dtype, steps, host RAM GiB or None, latency bound or None)
_PLANS: dict[tuple, Plan | VramplanError] = {}


def _plan_or_error(key: tuple) -> Plan | VramplanError:
    from ..api import plan_for

    gpu, model, height, width, frames, guidance, dtype, steps, host_ram_gb, max_latency_s = key
    try:
        return plan_for(gpu=gpu, model=model, height=height, width=width, frames=frames, guidance=guidance,
                        dtype=dtype, steps=steps, max_latency_s=max_latency_s, host_ram_gb=host_ram_gb)
    except VramplanError as err:
        return err


def _plan_all(keys: list[tuple]) -> None:
    """Plan every key not planned yet (serially: plan_options plans the many in worker processes)."""
    todo = list(dict.fromkeys(k for k in keys if k not in _PLANS))
    _PLANS.update((k, _plan_or_error(k)) for k in todo)


def _bounded_key(key: tuple, bound: float, fastest: Plan, slack: float) -> tuple:
    """The key of the smallest-peak plan within ``slack`` of ``fastest`` (and within ``bound``)."""
    return (*key[:-1], round(min(bound, fastest.prediction.latency_s * (1 + slack)), 4))


def _plan_pairs(tasks: list[tuple[tuple, float, float]]) -> list[tuple[tuple, Plan | VramplanError]]:
    """Plan each ``(fastest key, workload bound, slack)``: the fastest plan and, when it meets the bound,
    the smallest peak within ``slack`` of it. One call gets the tasks of one (model shape, GPU) and runs
    them one after another in one process, so that they share the cost models and their memoised
    searches (:func:`.pipeline.cost_model`), and a worker keeps the GPU-independent memory of every
    segment (:class:`.costs.Shared`) for the next GPU type of the same shape, instead of re-solving."""
    done: dict[tuple, Plan | VramplanError] = {}  # workloads of one shape often share a key (steps, bound)

    def plan(key: tuple) -> Plan | VramplanError:
        if key not in done:
            done[key] = _PLANS[key] if key in _PLANS else _plan_or_error(key)
        return done[key]

    for key, bound, slack in tasks:
        fastest = plan(key)
        if isinstance(fastest, Plan) and fastest.prediction.latency_s <= bound:
            plan(_bounded_key(key, bound, fastest, slack))
    return list(done.items())


PARALLEL_MIN_PLANS = 24  # fewer plans than this are made in this process (a worker starts in ~1 s)


def _plan_groups(groups: list[list[tuple[tuple, float, float]]]) -> None:
    """Plan every group (see :func:`_plan_pairs`), in worker processes when there are many."""
    groups = [g for g in groups if g]
    workers = min(os.cpu_count() or 1, 8, len(groups))
    pairs = sum(map(len, groups))
    parallel = pairs > PARALLEL_MIN_PLANS and workers > 1
    log.info("planning %d (workload, GPU) pairs%s", pairs, f" in {workers} processes" if parallel else "")
    bar = _bar(pairs, "planning (workload, GPU) pairs")
    if parallel:
        groups.sort(key=len, reverse=True)  # the largest first (stable: a shape's groups stay together)
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for group, done in zip(groups, pool.map(_plan_pairs, groups), strict=True):
                _PLANS.update(done)
                bar.update(len(group))
    else:
        for group in groups:
            _PLANS.update(_plan_pairs(group))
            bar.update(len(group))
    bar.close()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str):
    """A tqdm bar on stderr when it is a terminal (tqdm comes with the runtime extra), else nothing."""
    import sys

    if not sys.stderr.isatty():
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit="pair")


def plan_options(workloads: list[Workload], offers: list[GpuOffer], slack: float = 0.05
                 ) -> tuple[dict[tuple[int, str], Option], dict[int, str]]:
    """Options per (workload index, GPU), and why each workload without any option cannot be served."""
    gpus = [find_gpu(o.gpu) for o in offers]

    host_ram = {find_gpu(o.gpu).name: o.host_ram_gb for o in offers}

    def key(w: Workload, gpu, bound: float | None) -> tuple:
        return (gpu.name, w.model.lower(), w.height, w.width, w.frames, w.guidance, w.dtype, w.steps,
                host_ram[gpu.name], bound)

    groups: dict[tuple, list] = {}  # per (model shape, GPU): plans that share cost models
    for w in workloads:
        bound = w.p95_latency_s if w.p95_latency_s is not None else math.inf
        for g in gpus:
            k = key(w, g, None)
            groups.setdefault((*k[1:7], g.name), []).append((k, bound, slack))
    # one group per task keeps both workers busy to the end (a group per shape, with every GPU type in it,
    # shares more memory across GPU types but finished later on 2 cores: 222 s vs 171 s for 20 x 6); a
    # worker keeps each profile's shared memory (costs.Shared) for the next group of the same shape
    _plan_groups([groups[k] for k in sorted(groups, key=str)])
    options: dict[tuple[int, str], Option] = {}
    too_big: dict[int, list[str]] = {}
    too_slow: dict[int, list[str]] = {}
    compact: dict[tuple[int, str], tuple] = {}
    for i, w in enumerate(workloads):
        bound = w.p95_latency_s if w.p95_latency_s is not None else math.inf
        for gpu in gpus:
            fastest = _PLANS[key(w, gpu, None)]
            if isinstance(fastest, InfeasibleError):
                need = getattr(fastest, "min_peak_bytes", 0)
                too_big.setdefault(i, []).append(f"{gpu.name}: needs {human_bytes(need)}" if need else gpu.name)
                continue
            if isinstance(fastest, VramplanError):
                raise WorkloadError(f"workload {w.name!r}: {fastest}")
            best = fastest.prediction.latency_s
            if best > bound:
                too_slow.setdefault(i, []).append(f"{gpu.name}: {best:.1f} s")
                continue
            compact[(i, gpu.name)] = _bounded_key(key(w, gpu, None), bound, fastest, slack)
    _plan_all(list(compact.values()))
    for (i, name), k in compact.items():
        plan = _PLANS[k]
        if isinstance(plan, VramplanError):  # pragma: no cover - the fastest plan met this bound
            raise WorkloadError(f"workload {workloads[i].name!r}: {plan}")
        usable = find_gpu(name).memory_usable_bytes
        bound = workloads[i].p95_latency_s if workloads[i].p95_latency_s is not None else math.inf
        options[(i, name)] = Option(i, name, plan.prediction.peak_bytes, usable, plan.prediction.latency_s, bound, plan,
                                    plan.prediction.host_bytes, plan.target.host_ram_bytes)
    reasons = {}
    for i, w in enumerate(workloads):
        if any(k[0] == i for k in options):
            continue
        if too_slow.get(i):
            reasons[i] = (f"no offered GPU meets p95_latency_s={w.p95_latency_s:g} even alone (fastest plan per "
                          f"GPU: {', '.join(too_slow[i])}; the others do not fit it)")
        else:
            reasons[i] = f"fits no offered GPU ({'; '.join(too_big.get(i, []))})"
    return options, reasons


# -- the ILP -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    gpu: str
    slots: tuple[int, ...]  # workload indices, sorted, repeats allowed
    cycle_s: float  # sum of the slots' solo latencies

    def per_hour(self) -> float:
        return 3600.0 / self.cycle_s


def enumerate_patterns(options: dict[tuple[int, str], Option], gpus: list[str], max_jobs: int) -> list[Pattern]:
    """Every admissible multiset per GPU type (memory, latency bounds), without pure repeats of one job."""
    out = []
    for g in gpus:
        items = sorted((o for (_, gg), o in options.items() if gg == g), key=lambda o: o.workload)

        def grow(start: int, slots: list[int], frac: float, cycle: float, bound: float, host: int, g=g,
                 items=items) -> None:
            if slots and (len(slots) == 1 or len(set(slots)) > 1):
                out.append(Pattern(g, tuple(slots), cycle))
            if len(slots) == max_jobs:
                return
            for j in range(start, len(items)):
                o = items[j]
                f, c, b, h = frac + o.fraction, cycle + o.latency_s, min(bound, o.bound_s), host + o.host_bytes
                if f <= 1 + 1e-9 and c <= b and _host_fits(h, o):
                    grow(j, slots + [o.workload], f, c, b, h)

        grow(0, [], 0.0, 0.0, math.inf, 0)
    return out


def _host_fits(host_bytes: int, option: Option) -> bool:
    """Jobs packed on one GPU share its machine's pinned host memory: their plans' host bytes must fit it."""
    return option.host_ram_bytes is None or host_bytes <= option.host_ram_bytes


def _solver(time_limit: float, gap: float = 1e-9):
    return _cbc(msg=False, timeLimit=time_limit, gapRel=max(gap, 1e-9))


def solve_patterns(patterns: list[Pattern], rates: dict[int, float], offers: list[GpuOffer],
                   time_limit: float = 60.0, gap: float = 0.0) -> tuple[dict[Pattern, int], str]:
    """Integer GPU counts per pattern at least cost (within the relative ``gap`` of the optimum: CBC
    finds the best fleet fast but can take minutes proving it on large mixes), or InventoryError
    naming each short workload."""
    price = {o.gpu: o.price_per_hour for o in offers}
    count = {o.gpu: o.count for o in offers}
    prob = pulp.LpProblem("fleet", pulp.LpMinimize)
    x = {p: _variable(prob, f"x{i}", lowBound=0, upBound=count[p.gpu], cat="Integer") for i, p in enumerate(patterns)}
    prob += pulp.lpSum(price[p.gpu] * v for p, v in x.items())
    supply = {w: [] for w in rates}
    for p, v in x.items():
        for w in set(p.slots):
            supply[w].append(p.slots.count(w) * p.per_hour() * v)
    for w, rate in rates.items():
        prob += pulp.lpSum(supply[w]) >= rate, f"rate_{w}"
    for g, n in count.items():
        used = [v for p, v in x.items() if p.gpu == g]
        if n is not None and used:
            prob += pulp.lpSum(used) <= n, f"count_{g}".replace(" ", "_")
    prob.solve(_solver(time_limit, gap))
    status = pulp.LpStatus[prob.status]
    if status == "Optimal" or (status == "Not Solved" and prob.sol_status == pulp.LpSolutionIntegerFeasible):
        chosen = {p: round(v.value()) for p, v in x.items() if v.value() and round(v.value()) > 0}
        if prob.sol_status != pulp.LpSolutionOptimal:
            return chosen, "time limit: best found"
        return chosen, f"optimal within {gap:.1%}" if gap > 0 else "optimal"
    err = InventoryError("the inventory cannot meet the rates")
    err.shortfall = _shortfall(patterns, rates, offers, time_limit)
    raise err


def _shortfall(patterns, rates, offers, time_limit) -> dict[int, float]:
    """Most of every rate the inventory can serve; the rest, per workload, goes in the message."""
    count = {o.gpu: o.count for o in offers}
    prob = pulp.LpProblem("shortfall", pulp.LpMinimize)
    x = {p: _variable(prob, f"x{i}", lowBound=0, upBound=count[p.gpu], cat="Integer") for i, p in enumerate(patterns)}
    short = {w: _variable(prob, f"s{w}", lowBound=0) for w in rates}
    prob += pulp.lpSum(s / rates[w] for w, s in short.items())  # relative shortfall, so no workload is favoured
    for w, rate in rates.items():
        prob += pulp.lpSum(p.slots.count(w) * p.per_hour() * v for p, v in x.items() if w in p.slots) + short[w] >= rate
    for g, n in count.items():
        used = [v for p, v in x.items() if p.gpu == g]
        if n is not None and used:
            prob += pulp.lpSum(used) <= n
    prob.solve(_solver(time_limit, 0.02))
    return {w: short[w].value() or 0.0 for w in rates}


# -- the whole request ---------------------------------------------------------------------------


def plan_fleet(workloads: list[Workload], offers: list[GpuOffer] | None = None, *, slack: float = 0.05,
               max_jobs: int = 3, gap: float = 0.02, time_limit: float = 60.0) -> FleetPlan:
    """The cheapest fleet that sustains every workload's rate within its latency bound."""
    offers = offers if offers is not None else parse_inventory(None)
    if max_jobs < 1:
        raise FleetError(f"max_jobs={max_jobs}: at least one job per GPU")
    if not 0 <= gap < 1 or not 0 <= slack < 10:
        raise FleetError(f"gap={gap}, slack={slack}: give 0 <= gap < 1 and 0 <= slack < 10")
    t0 = time.perf_counter()
    options, reasons = plan_options(workloads, offers, slack)
    planning = time.perf_counter() - t0
    t0 = time.perf_counter()
    patterns = enumerate_patterns(options, [o.gpu for o in offers], max_jobs)
    served = {i: w.rate for i, w in enumerate(workloads) if i not in reasons}
    if served:
        try:
            chosen, status = solve_patterns(patterns, served, offers, time_limit, gap)
        except InventoryError as err:
            raise InventoryError(_explain_shortfall(err.shortfall, workloads, offers)) from None
    else:
        chosen, status = {}, "nothing to serve"
    solve = time.perf_counter() - t0
    return _assemble(workloads, offers, options, reasons, chosen, FleetSolver(
        status=status, planning_seconds=round(planning, 3), solve_seconds=round(solve, 3),
        patterns=len(patterns), slack=slack, max_jobs=max_jobs, gap=gap,
    ))


def _explain_shortfall(shortfall: dict[int, float], workloads: list[Workload], offers: list[GpuOffer]) -> str:
    lines = [f"workload {workloads[w].name!r} is short by {short:.1f} of {workloads[w].rate:g} videos/hour"
             for w, short in shortfall.items() if short > 1e-6]
    have = ", ".join(f"{o.count if o.count is not None else 'unlimited'} x {o.gpu}" for o in offers)
    if not lines:  # the integer program failed though its relaxation is feasible (time limit)
        lines = ["the solver found no integer solution within its time limit"]
    return (f"the inventory ({have}) cannot meet the rates: " + "; ".join(lines) +
            ". Add GPUs to the inventory (or raise their counts), or lower the rates.")


def _assemble(workloads, offers, options, reasons, chosen: dict[Pattern, int], solver: FleetSolver) -> FleetPlan:
    solo_only: dict[tuple[str, int], bool] = {}
    for p in chosen:
        for w in p.slots:
            solo_only[(p.gpu, w)] = solo_only.get((p.gpu, w), True) and len(p.slots) == 1
    allocations = []
    for offer in offers:
        mine = sorted(((p, n) for p, n in chosen.items() if p.gpu == offer.gpu), key=lambda pn: (-pn[1], pn[0].slots))
        if not mine:
            continue
        packings = []
        for p, n in mine:
            jobs = []
            for w in p.slots:
                o = options[(w, p.gpu)]
                jobs.append(JobSlot(
                    workload=workloads[w].name, plan=o.plan, peak_bytes=o.peak_bytes,
                    solo_latency_s=round(o.latency_s, 3), packed_latency_s=round(p.cycle_s, 3),
                    videos_per_hour=round(p.per_hour(), 4),
                    num_gpus=1.0 if solo_only[(p.gpu, w)] else round(o.fraction, 4),
                ))
            packings.append(Packing(count=n, jobs=jobs))
        allocations.append(GpuAllocation(
            gpu=offer.gpu, count=sum(n for _, n in mine), price_per_hour=offer.price_per_hour,
            usable_bytes=find_gpu(offer.gpu).memory_usable_bytes, packings=packings,
        ))
    cost = sum(a.count * a.price_per_hour for a in allocations)
    notes = [TIME_SHARING_NOTE, QUEUE_NOTE, HOST_RAM_NOTE]
    if any(o.host_ram_gb is None for o in offers):
        from ..api import ASSUMED_HOST_RAM_GB

        notes.append(HOST_RAM_ASSUMED_NOTE.format(gb=ASSUMED_HOST_RAM_GB))
    if any(o._price_assumed for o in offers):
        notes.append(PRICE_NOTE)
    return FleetPlan(
        workloads=workloads, gpus=allocations, cost_per_hour=round(cost, 4), solver=solver, assumptions=notes,
        unserved=[Unserved(workload=workloads[i].name, reason=r) for i, r in sorted(reasons.items())],
    ).check()


def brute_force_cost(options: dict[tuple[int, str], Option], rates: dict[int, float], offers: list[GpuOffer],
                     max_jobs: int, max_gpus: int) -> float | None:
    """Least cost over every fleet of at most ``max_gpus`` GPUs (each running any admissible multiset,
    pure repeats included): the reference the ILP is tested against on small cases."""
    configs = []
    for offer in offers:
        items = [o for (_, g), o in options.items() if g == offer.gpu]
        for size in range(1, max_jobs + 1):
            for combo in itertools.combinations_with_replacement(items, size):
                cycle = sum(o.latency_s for o in combo)
                host = sum(o.host_bytes for o in combo)
                if (sum(o.fraction for o in combo) <= 1 + 1e-9 and all(cycle <= o.bound_s for o in combo)
                        and all(_host_fits(host, o) for o in combo)):
                    supply = {w: sum(3600.0 / cycle for o in combo if o.workload == w) for w in rates}
                    configs.append((offer.gpu, offer.price_per_hour, supply))
    count = {o.gpu: o.count for o in offers}
    best = None
    for n in range(1, max_gpus + 1):
        for fleet in itertools.combinations_with_replacement(range(len(configs)), n):
            used: dict[str, int] = {}
            for c in fleet:
                used[configs[c][0]] = used.get(configs[c][0], 0) + 1
            if any(count[g] is not None and k > count[g] for g, k in used.items()):
                continue
            if all(sum(configs[c][2][w] for c in fleet) >= rate - 1e-9 for w, rate in rates.items()):
                cost = sum(configs[c][1] for c in fleet)
                best = cost if best is None else min(best, cost)
    return best
