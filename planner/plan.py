"""From a ModelProfile and a GpuProfile to a Plan with its prediction. No torch."""

from __future__ import annotations

from collections.abc import Iterable

from ..profiles import read_json
from .costs import CostModel, Segment
from .errors import InfeasibleError
from .fmt import human_bytes
from .placement import crossing, host_bytes, search
from .schema import (
    ComponentPlan,
    Group,
    ModelProfile,
    PipelineProfile,
    Plan,
    Prediction,
    SolverInfo,
    Target,
)
from .solve import Solution

# Headroom kept free beyond the modelled allocator overhead: other processes, cuBLAS workspaces
# growing on first use, allocator bookkeeping.
MARGIN_FRACTION = 0.02
SHIPPED_DIR = "models"


def pipeline_profile_name(model: str, height: int, width: int, frames: int, guidance: bool, dtype: str, kernel: str) -> str:
    return f"{model}-{height}x{width}-f{frames}-{'cfg' if guidance else 'nocfg'}-{dtype}-{kernel}.pipeline.json"


def shipped_pipeline_profile(model: str, height: int, width: int, frames: int, guidance: bool, dtype: str,
                             kernel: str) -> PipelineProfile | None:
    """A whole-pipeline profile shipped in ``vramplan/profiles/models``, or None."""
    name = pipeline_profile_name(model.lower(), height, width, frames, guidance, dtype, kernel)
    try:
        data = read_json(f"{SHIPPED_DIR}/{name}")
    except FileNotFoundError:
        return None
    return PipelineProfile.model_validate(data)


def shipped_profiles() -> list[str]:
    from importlib import resources

    folder = resources.files("vramplan.profiles").joinpath(SHIPPED_DIR)
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".pipeline.json"))


def make_plan(
    profile: ModelProfile,
    gpu,
    *,
    usable_bytes: int | None = None,
    steps: int = 25,
    max_latency_s: float | None = None,
    allocator: str = "expandable_segments",
    method: str = "auto",
    pinned: bool = True,
    host_ram_bytes: int | None = None,
) -> Plan:
    """Plan one model (``profile``) for ``gpu``: fastest within memory, or smallest peak within
    ``max_latency_s`` (for ``steps`` calls). Whole pipelines: :func:`.pipeline.plan_pipeline`.
    ``pinned=False``: host-link copies at the pageable rate (pinned memory unavailable).
    ``host_ram_bytes``: pinned host memory the plan may use (placed values, streamed weights); a plan
    needing more gives it back step by step (:func:`.host_budget.model_within_host`), else is refused."""
    usable = usable_bytes if usable_bytes is not None else gpu.memory_usable_bytes
    margin = int(usable * MARGIN_FRACTION)
    base = gpu.cuda_context_bytes + profile.weight_bytes + margin
    budget = usable - base
    model = CostModel(profile, gpu, allocator, pinned=pinned)
    per_call = None if max_latency_s is None else max_latency_s / steps
    fixed = base - model.streamed_weight_bytes(frozenset(model.streamable))
    try:
        if fixed >= usable:
            raise InfeasibleError("")
        solution = search(model, budget, per_call, method=method)
    except InfeasibleError as err:
        raise _explain(err, profile, gpu, usable, base, model) from None
    if host_ram_bytes is not None:
        from .host_budget import model_within_host, stage_host

        need = sum(stage_host(model, solution))
        fitted = model_within_host(model, solution, budget, host_ram_bytes, per_call)
        if fitted is None:
            err = InfeasibleError(
                f"{profile.model.name} fits {gpu.name} ({human_bytes(usable)} usable) only with {human_bytes(need)} "
                f"of pinned host memory (placed values, streamed weights), beyond the host memory budget of "
                f"{human_bytes(host_ram_bytes)}. Give more host memory, a GPU with more memory, or a smaller shape."
            )
            err.part, err.host_bytes, err.host_ram_bytes = "pinned host memory", need, host_ram_bytes
            raise err
        solution = fitted

    peak_cost = max(solution.costs, key=lambda c: c.needed_bytes)
    needed = peak_cost.needed_bytes
    resident = profile.weight_bytes - solution.streamed_weight_bytes
    prediction = Prediction(
        peak_bytes=base - solution.streamed_weight_bytes + needed,
        context_bytes=gpu.cuda_context_bytes,
        weight_bytes=resident,
        live_bytes=peak_cost.live_bytes,
        transient_bytes=peak_cost.transient_bytes,
        streamed_bytes=peak_cost.streamed_bytes,
        allocator_bytes=needed - peak_cost.activation_bytes,
        margin_bytes=margin,
        activation_peak_bytes=max(c.activation_bytes for c in solution.costs),
        peak_unit=model.units[peak_cost.peak_unit].name,
        original_activation_peak_bytes=profile.original_peak_bytes,
        unet_call_s=round(solution.latency_s, 6),
        latency_s=round(solution.latency_s * steps, 4),
        host_bytes=host_bytes(model, solution.host, solution.segments) + solution.streamed_weight_bytes,
        transfer_s=round(solution.transfer_s * steps, 4),
        latency_calibrated=gpu.calibrated,
        allocator_model=f"{allocator}: factor from {profile.allocator.method}",
    )
    component = ComponentPlan(component=profile.component, model=profile.model, shape=profile.shape,
                              **plan_fields(model, solution))
    return Plan(
        model_name=profile.model.name,
        components=[component],
        target=Target(
            gpu=gpu.name,
            usable_bytes=usable,
            max_latency_s=max_latency_s,
            objective="min_peak" if max_latency_s is not None else "min_latency",
            allocator=allocator,
            attention_kernel=profile.attention_kernel,
            steps=steps,
            pinned=pinned,
            host_ram_bytes=host_ram_bytes,
            host_ram_source="given" if host_ram_bytes is not None else None,
        ),
        prediction=prediction,
        solver=SolverInfo(
            method=solution.method,
            status=solution.status,
            gap=solution.gap,
            solve_seconds=round(solution.seconds, 4),
            candidates=solution.candidates,
        ),
    )


def to_component(model: CostModel, segments: Iterable[Segment]) -> tuple[dict[str, int], list[Group]]:
    """Slice counts and groups (with their depth) of a path of segments."""
    slices: dict[str, int] = {}
    groups: list[Group] = []
    for seg in segments:
        units = model.units[seg.start : seg.stop + 1]
        if seg.k > 1:
            slices.update({u.name: seg.k for u in units})
        if len(units) > 1:
            groups.append(Group(units=[u.name for u in units], axis=units[0].axis, k=seg.k, depth=seg.depth))
    return slices, groups


def plan_fields(model: CostModel, solution: Solution) -> dict:
    """The ComponentPlan fields of a solution: slices, groups, recompute, host and streamed, the last
    two in execution order (host: only values that leave their segment)."""
    slices, groups = to_component(model, solution.segments)
    recompute = [model.units[j].name for c in solution.costs for j in c.recompute]
    host = crossing(model, solution.segments, solution.host)
    return {
        "slices": slices,
        "groups": groups,
        "recompute": recompute,
        "host": [u.name for u in model.units if u.name in host],
        "streamed": [b for b in model.block_order if b in solution.streamed],
    }


def segments_of(model: CostModel, comp: ComponentPlan) -> list[Segment]:
    """The cost-model segments of a component plan (groups with their depth, else single units)."""
    start_of = {g.units[0]: g for g in comp.groups}
    out, i = [], 0
    while i < model.n:
        name = model.units[i].name
        if name in start_of:
            g = start_of[name]
            out.append(Segment(i, i + len(g.units) - 1, g.k, g.depth))
            i += len(g.units)
        else:
            out.append(Segment(i, i, comp.k(name) if model.units[i].axis else 1))
            i += 1
    return out


def component_costs(model: CostModel, comp: ComponentPlan) -> list:
    """Per segment of ``comp``: (segment, its cost with the plan's placement and streaming)."""
    host, streamed = frozenset(comp.host), frozenset(comp.streamed)
    return [(seg, model.cost(seg, host, streamed)) for seg in segments_of(model, comp)]


def component_seconds(model: CostModel, comp: ComponentPlan) -> float:
    """Predicted seconds of one call of ``comp``: its segments (placed values' copies included) and
    the weight copies of its streamed blocks that compute does not hide."""
    return sum(c.seconds for _, c in component_costs(model, comp)) + model.streaming_seconds(frozenset(comp.streamed))[1]


def _explain(err: InfeasibleError, profile: ModelProfile, gpu, usable: int, base: int, model: CostModel) -> InfeasibleError:
    floor = getattr(err, "min_needed_bytes", None)
    if floor is None:  # weights that cannot be streamed + context alone do not fit
        unstreamable = profile.weight_bytes - model.streamed_weight_bytes(frozenset(model.streamable))
        return InfeasibleError(
            f"{profile.model.name or profile.model.class_name} does not fit {gpu.name} at all: CUDA context "
            f"{human_bytes(gpu.cuda_context_bytes)} + weights that cannot be streamed {human_bytes(unstreamable)} "
            f"+ margin already exceed the {human_bytes(usable)} usable."
        ) if not str(err) else err
    if not str(err).startswith("no plan fits"):
        return err
    total = base + floor
    what = err.floor.describe(model) if getattr(err, "floor", None) is not None else err.unit
    out = InfeasibleError(
        f"{profile.model.name or profile.model.class_name} at {profile.shape.describe()} cannot fit "
        f"{gpu.name} ({human_bytes(usable)} usable): the smallest reachable peak, with every value that may "
        f"leave the GPU in host memory and every block's weights streamed, is {human_bytes(total)} "
        f"(set by {what}; context, margin and resident weights included). Use a GPU with at least "
        f"{human_bytes(total)}, a smaller resolution or fewer frames."
    )
    out.min_peak_bytes, out.unit = total, err.unit
    out.floor = getattr(err, "floor", None)
    return out
