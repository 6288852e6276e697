"""Per-block memory of a plan, as numbers (torch-free) and as a PNG (matplotlib, imported lazily).

The numbers are the ones ``vramplan plan`` prints: per sliced stage and per top-level block, the
activation peak of the unmodified model (measured by the profiler) and of the plan (the cost model's
peak over the segments that run the block's units). ``vramplan plan --plot mem.png`` draws them like
the paper's Fig. 2a, one panel per sliced stage with the memory the stage leaves for activations,
under an overview of every stage's peak against the GPU's usable memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .planner.alternatives import as_planned
from .planner.errors import VramplanError

GIB = 2**30


@dataclass(frozen=True)
class BlockRow:
    """One top-level block of a sliced component (``down_blocks.0``, ``decoder.up_blocks.3``, ...)."""

    block: str
    original_bytes: int | None  # activation peak of the unmodified model in this block (None: not profiled)
    planned_bytes: int | None  # activation peak of the plan's segments that run this block's units
    ks: tuple[int, ...]  # slice counts used by its units
    groups: int  # plan groups that start in this block...
    grouped_units: int  # ...and the units they hold
    streamed_bytes: int = 0  # streamed blocks' weights on the GPU at that peak (not in planned_bytes)
    why: str = ""  # when planned_bytes exceeds original_bytes: what makes it so


@dataclass(frozen=True)
class StageBlocks:
    """One sliced stage: its block rows and the memory it leaves for activations."""

    stage: str
    component: str
    shape: str
    rows: list[BlockRow]
    budget_bytes: int | None  # usable - (context + margin + weights + held): None without a target


def block_rows(comp, profile, model) -> list[BlockRow]:
    """Per block of ``profile``: original and planned activation peak, slice counts, groups.

    A segment's peak is the block's of the unit where it occurs; a group spanning blocks also bounds
    its other blocks (their row says where the group's peak is). Streamed weights on the GPU are
    weights, not activations: they are kept apart (``streamed_bytes``), so that ``planned_bytes``
    compares with the unmodified model's activations. A row whose plan exceeds the original says why.

    ``comp``: the plan's ComponentPlan; ``model``: a planner CostModel of ``profile``."""
    from .planner.plan import segments_of

    host, streamed = frozenset(comp.host), frozenset(comp.streamed)
    peaks: dict[str, tuple[int, int, str]] = {}  # block -> (activations, streamed weights, why)
    for seg in segments_of(model, comp):
        cost = model.cost(seg, host, streamed)
        act = cost.activation_bytes - cost.streamed_bytes
        at = model.units[cost.peak_unit]
        for block in dict.fromkeys(u.block for u in model.units[seg.start : seg.stop + 1]):
            if act + cost.streamed_bytes > sum(peaks.get(block, (0, 0))[:2]):
                peaks[block] = (act, cost.streamed_bytes, _why(model, seg, at, block))
    rows = []
    seen_groups: set[int] = set()
    for block in dict.fromkeys(u.block for u in profile.units):
        names = [u.name for u in profile.units if u.block == block]
        groups = [g for g in comp.groups if g.units[0] in names and id(g) not in seen_groups]
        seen_groups.update(id(g) for g in groups)
        original = profile.original_block_peaks.get(block)
        planned, present, why = peaks.get(block, (None, 0, ""))
        rows.append(BlockRow(
            block=block,
            original_bytes=original,
            planned_bytes=planned,
            ks=tuple(sorted({comp.k(n) for n in names})),
            groups=len(groups),
            grouped_units=sum(len(g.units) for g in groups),
            streamed_bytes=present,
            why=why if planned is not None and original is not None and planned > original else "",
        ))
    return rows


def _why(model, seg, at, block: str) -> str:
    """Why a segment's activation peak in ``block`` may exceed the unmodified model's there."""
    if at.block != block:
        return f"in a group whose peak is in {at.block} ({at.name})"
    first = model.units[seg.start]
    if seg.depth > 1:
        return f"depth {seg.depth}: {seg.depth} slices in flight at once"
    if first.axis is not None and min(seg.k, first.axis_length) > 1:
        return f"k={seg.k}: full-size output buffers are written slice by slice while their inputs live"
    return "unsliced (k=1): nothing saved here; values are released between units, not inside them"


def sliced_stages(plan) -> list[tuple[object, object, object, object]]:
    """(stage profile, component plan, ModelProfile, CostModel) of every sliced stage of a pipeline
    plan whose pipeline profile is shipped or cached (profiling a new one needs torch)."""
    from .api import find_pipeline_profile
    from .planner.costs import CostModel
    from .planner.gpus import find_gpu
    from .planner.pipelines import pipeline_spec

    if not plan.stages or plan.height is None:
        return []
    target = plan.target
    try:
        spec = pipeline_spec(plan.pipeline)
        denoiser = plan.component(next(c for s, c, _ in spec.stages if s == "denoise"))
        guidance = denoiser.shape.batch == spec.guidance_batch if denoiser.shape else True
        dtype = denoiser.shape.dtype if denoiser.shape else "fp16"
        profile = find_pipeline_profile(plan.model_name, plan.height, plan.width, plan.frames, guidance, dtype,
                                        target.attention_kernel)
    except (VramplanError, KeyError, StopIteration):
        return []
    gpu = find_gpu(target.gpu)
    profile = as_planned(profile, plan)  # each stage with alternatives under the plan this one took
    return [
        (stage, plan.component(stage.plan_name), stage.profile, CostModel(stage.profile, gpu, target.allocator))
        for stage in profile.stages
        if stage.profile is not None
    ]


def plot_data(plan) -> list[StageBlocks]:
    """The numbers :func:`plot_plan` draws, per sliced stage."""
    predicted = {s.stage: s for s in plan.stages}
    out = []
    for stage, comp, profile, model in sliced_stages(plan):
        pred = predicted.get(stage.stage)
        budget = None
        if pred is not None and plan.target is not None:
            budget = plan.target.usable_bytes - (pred.peak_bytes - pred.needed_bytes)
        out.append(StageBlocks(stage.stage, comp.component, comp.shape.describe() if comp.shape else "",
                               block_rows(comp, profile, model), budget))
    return out


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise VramplanError(
            "--plot needs matplotlib: pip install matplotlib (or pip install 'vramplan[runtime]')"
        ) from err
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_plan(plan, path: str | Path) -> Path:
    """Draw ``plan``'s memory to ``path`` (PNG): every stage's peak against the usable memory, then per
    sliced stage the per-block activation peak of the original vs the plan, with the stage's budget."""
    stages = plot_data(plan)
    if not plan.stages:
        raise VramplanError("--plot draws whole-pipeline plans (plan_for / vramplan plan); this plan has no stages")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise VramplanError(f"--plot writes a PNG: name the file *.png, not {path.name!r}")
    if not path.parent.exists():
        raise VramplanError(f"--plot: the folder {path.parent} does not exist")
    plt = _pyplot()
    heights = [2.6] + [3.2] * len(stages)
    fig, axes = plt.subplots(len(heights), 1, figsize=(13, sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    fig.suptitle(f"{plan.describe()} on {plan.target.gpu}: {plan.target.usable_bytes / GIB:.2f} GiB usable "
                 f"(allocator {plan.target.allocator})", fontsize=12)
    _overview(axes[0][0], plan)
    for ax, stage in zip(axes[1:, 0], stages, strict=True):
        _stage_panel(ax, stage)
    if not stages:
        axes[0][0].text(0.5, -0.35, "no pipeline profile found for the per-block panels", transform=axes[0][0].transAxes,
                        ha="center")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _overview(ax, plan) -> None:
    """Stacked per-stage peak: context + margin, weights, held tensors, activations (allocator included)."""
    pred = plan.prediction
    names = [s.stage for s in plan.stages]
    base = (pred.context_bytes + pred.margin_bytes) / GIB
    parts = [
        ("context + margin", [base] * len(names), "#bdbdbd"),
        ("weights on GPU", [s.weight_bytes / GIB for s in plan.stages], "#6baed6"),
        ("held from other stages", [s.held_bytes / GIB for s in plan.stages], "#fdae6b"),
        ("activations (planned)", [s.needed_bytes / GIB for s in plan.stages], "#31a354"),
    ]
    bottom = [0.0] * len(names)
    for label, values, color in parts:
        ax.bar(names, values, bottom=bottom, color=color, label=label, width=0.6)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for x, (st, top) in enumerate(zip(plan.stages, bottom, strict=True)):
        ax.text(x, top, f"{st.peak_bytes / GIB:.2f} ", ha="center", va="top", fontsize=8, color="white",
                fontweight="bold")  # inside the bar: a peak near the usable line would cover it
    usable = plan.target.usable_bytes / GIB
    ax.axhline(usable, color="#d62728", linestyle="--", linewidth=1.5, label=f"usable {usable:.2f} GiB")
    ax.set_ylim(0, max(usable, *bottom) * 1.12)
    ax.set_ylabel("GiB")
    ax.set_title("peak GPU memory per stage (plan)", fontsize=10, loc="left")
    _legend(ax)
    ax.grid(axis="y", alpha=0.3)


def _stage_panel(ax, stage: StageBlocks) -> None:
    rows = stage.rows
    xs = range(len(rows))
    width = 0.4
    original = [(r.original_bytes or 0) / GIB for r in rows]
    planned = [(r.planned_bytes or 0) / GIB for r in rows]
    ax.bar([x - width / 2 for x in xs], original, width, color="#9e9ac8", label="original (unsliced)")
    ax.bar([x + width / 2 for x in xs], planned, width, color="#31a354", label="plan")
    top = max([*original, *planned, 0.0])
    if stage.budget_bytes is not None:
        budget = stage.budget_bytes / GIB
        ax.axhline(budget, color="#d62728", linestyle="--", linewidth=1.5,
                   label=f"left for activations {budget:.2f} GiB")
        top = max(top, budget)
    ax.set_ylim(0, top * 1.1 if top else 1)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([_tick(r) for r in rows], fontsize=8)
    ax.set_ylabel("activation GiB")
    ax.set_title(f"{stage.stage} ({stage.component}: {stage.shape}): activation peak per block; "
                 f"k = slice counts", fontsize=10, loc="left")
    _legend(ax)
    ax.grid(axis="y", alpha=0.3)


def _tick(row: BlockRow) -> str:
    name = row.block.removeprefix("decoder.")
    ks = ",".join(map(str, row.ks))
    return name if ks == "1" else f"{name}\nk={ks}"


def _legend(ax) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
