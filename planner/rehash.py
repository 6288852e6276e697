"""Step Rehash, the torch-free half: reuse programs, calibrations, schedules. No torch here.

On a *key* step the whole UNet runs and the value at a **cut** (the output of a temporal layer or
motion module in the up path) is cached; on the other steps only the ops the result still needs
*given* the cut run, and the cached value stands in for it. Which ops those are is a dependency
walk over ``(name, inputs)`` pairs, the same for the runtime's unit program (ops) and the
planner's ``ModelProfile`` units, so the planner counts exactly the FLOPs the runtime skips.

Metrics (our choice; the paper publishes neither):

- **similarity** of a cut's feature between steps ``a`` and ``s``: cosine similarity of the two
  features flattened over the whole CFG batch (1 = same direction). The greedy key-step search
  (the paper's Algorithm 1) makes step ``s`` key when its similarity to the last key step drops
  below a threshold (default :data:`GREEDY_THRESHOLD`).
- **error** of reusing step ``a``'s feature at step ``s``: the relative L2 error
  ``||g' - g|| / ||g||`` of the *guided* noise prediction ``g`` (after classifier-free guidance),
  measured on the full trajectory's inputs (the plain sum over reused steps: :func:`schedule_error`).

What a schedule does to the video is predicted from these and from how the scheduler and the VAE
carry an error to the frames (:mod:`.rehash_quality`); with a calibration the cut, key count and key
steps are searched together by that prediction (:mod:`.rehash_search`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .costs import EMPTY, CostModel, Segment
from .errors import (
    InfeasibleError,
    InvalidArgumentError,
    InvalidPlanError,
    PlanMismatchError,
    UnsupportedArgumentError,
)
from .plan import component_seconds, segments_of
from .schema import SCHEMA_VERSION, ModelRef, SampleShape, _JsonFile, _Strict

Mode = Literal["off", "uniform", "greedy", "optimal"]
GREEDY_THRESHOLD = 0.95  # cosine similarity to the last key step below which a step becomes key
DEFAULT_INTERVAL = 2  # DeepCache's interval when nothing else says how many key steps
DEFAULT_MAX_GAP = 4  # steps a calibration measures reuse over (s - a = 1 .. max_gap)


class RehashCutError(InvalidPlanError):
    """A cut the model does not have, one the result does not depend on, or one a group crosses."""


class CalibrationMismatchError(PlanMismatchError):
    """A calibration made for another model, shape or step count than the plan."""


class RehashStepsError(PlanMismatchError):
    """A run whose denoising steps disagree with the rehash schedule of its plan."""


class CfgReuseError(UnsupportedArgumentError):
    """Per-step CFG reuse on a pipeline that does not call the model twice per step."""


class SchedulerOrderError(UnsupportedArgumentError):
    """A scheduler that calls the UNet more than once per step (Heun, DPM2): the schedule counts steps."""


# ---------------------------------------------------------------------------------- reuse program
RESIDUAL = "->"  # a residual cut's name: "<start>-><end>" (unit names never contain it)


def residual_cut(start: str, end: str) -> str:
    """The name of the residual cut over the span ``start`` .. ``end``."""
    return f"{start}{RESIDUAL}{end}"


CFG = "cfg"  # per-step CFG reuse: "cfg" alone, or "cfg+<cut>" with a cut for the first call of a step


def cfg_cut(base: str | None = None) -> str:
    """The name of per-step CFG reuse, alone or on top of the cut ``base``."""
    return CFG if base is None else f"{CFG}+{base}"


def cfg_split(cut: str) -> tuple[bool, str | None]:
    """(whether ``cut`` reuses the CFG offset, the model cut its first call uses: None for none).

    **Per-step CFG reuse** is for pipelines that call the model twice per step (Wan: conditional, then
    unconditional). At key steps both calls run whole and the second call's offset from the first
    (``uncond - cond``) is cached; at reuse steps the second call does not run: its output is the
    first call's plus that offset. The first call runs whole, or under ``base`` (a residual cut)."""
    if cut == CFG:
        return True, None
    if cut.startswith(CFG + "+"):
        return True, cut[len(CFG) + 1:]
    return False, cut


def residual_span(cut: str) -> tuple[str, str] | None:
    """``(start, end)`` of a residual cut (alone or under CFG reuse), None for a feature cut.

    A **residual cut** caches the span's residual ``end - start`` at key steps; a reuse step computes
    everything but the units strictly inside the span, and ``end = start + residual`` (DBCache's
    first-F / last-B blocks of a DiT). A **feature cut** caches one value and the reuse step reads it."""
    cut = cfg_split(cut)[1] or ""
    if RESIDUAL not in cut:
        return None
    start, _, end = cut.partition(RESIDUAL)
    return start, end


def reuse_names(nodes: Sequence[tuple[str, Sequence[str]]], result: str, cut: str) -> list[str]:
    """The ops (by output name, in program order) that compute ``result`` when ``cut`` is given.

    A backward walk from the result that stops at the cut and at the program's inputs. For a residual
    cut the walk does not stop at the span's start (the reuse step computes it) and takes the span's
    end as made from its start alone (``start + residual``): the units strictly inside the span are the
    ones skipped. Raises :class:`RehashCutError` when no op makes ``cut`` (either end) or the result
    does not depend on it (a residual span's end not on its start).
    """
    made = {name: tuple(inputs) for name, inputs in nodes}
    span = residual_span(cut)
    stop = cut if span is None else span[1]
    for name in (stop,) if span is None else span:
        if name not in made:
            raise RehashCutError(f"the model has no value {name!r} to cut at; choose one of its rehash cuts")
    if stop == result:
        raise RehashCutError(f"{stop!r} is the model's result: reusing it would skip the whole model")
    if span is not None and span[0] not in _ancestors(made, span[1]):
        raise RehashCutError(f"{span[1]!r} does not depend on {span[0]!r}: no residual span {cut!r}")
    needed: set[str] = set()
    stack, reaches_cut = [result], False
    while stack:
        name = stack.pop()
        if name == stop:
            reaches_cut = True
            if span is not None:
                stack.append(span[0])
            continue
        if name in needed or name not in made:
            continue
        needed.add(name)
        stack.extend(made[name])
    if not reaches_cut:
        raise RehashCutError(f"the model's result does not depend on {stop!r}; it cannot be a rehash cut")
    return [name for name, _ in nodes if name in needed]


def _ancestors(made: dict[str, tuple[str, ...]], name: str) -> set[str]:
    seen: set[str] = set()
    stack = list(made.get(name, ()))
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(made.get(n, ()))
    return seen


def stream_points(nodes: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    """Values that carry the whole state of the program: no later op reads anything made before them
    (a DiT's block outputs; in a UNet the skip connections leave almost none). Program order."""
    index = {name: i for i, (name, _) in enumerate(nodes)}
    last_read = [-1] * len(nodes)
    for j, (_, inputs) in enumerate(nodes):
        for i in inputs:
            if i in index:
                last_read[index[i]] = max(last_read[index[i]], j)
    out, reach = [], -1  # reach: the last op reading a value made before i
    for i, (name, _) in enumerate(nodes):
        if reach <= i and last_read[i] > i:
            out.append(name)
        reach = max(reach, last_read[i])
    return out


# Blocks run before the span (DBCache's F; 0, listed last: every block from the first, MagCache's and
# TeaCache's shape, whose reuse step runs only the prologue and the head).
RESIDUAL_FIRST = (1, 2, 4, 8, 0)
RESIDUAL_LAST = (0, 1, 2, 4, 8)  # blocks run after it (DBCache's B)


def residual_candidates(nodes: Sequence[tuple[str, Sequence[str]]], kinds: dict[str, str],
                        block_end: str = "ffn") -> list[str]:
    """Candidate residual cuts: the block ends (stream points of kind ``block_end``) ``b_0 .. b_{n-1}``;
    first-F blocks run, then the span ``b_{F-1} .. b_{n-1-B}`` is cached as a residual, then the last B
    blocks (F in :data:`RESIDUAL_FIRST`, B in :data:`RESIDUAL_LAST`, at least one block in the span).
    F = 0: the span starts at the first stream point, the prologue's output (a DiT's patch embedding)."""
    points = stream_points(nodes)
    ends = [n for n in points if kinds.get(n) == block_end]
    n = len(ends)
    starts = {f: ends[f - 1] for f in RESIDUAL_FIRST if 0 < f <= n}
    if ends and points[0] != ends[0]:
        starts[0] = points[0]
    return [residual_cut(starts[f], ends[n - 1 - b])
            for f in RESIDUAL_FIRST if f in starts for b in RESIDUAL_LAST if n - 1 - b > f - 1]


def reads_inputs(nodes: Sequence[tuple[str, Sequence[str]]], names: Iterable[str], cut: str) -> bool:
    """Whether the ops ``names`` read a program input (not the cut): only then does a reused step
    still see its own latents. A cut after the last skip connection would replay a stale output."""
    made = {name for name, _ in nodes}
    inputs = dict(nodes)
    return any(i not in made and i != cut for n in names for i in inputs[n])


def valid_cuts(nodes: Sequence[tuple[str, Sequence[str]]], result: str, cuts: Iterable[str]) -> list[str]:
    """The candidate cuts whose reuse program still reads the step's own inputs."""
    return [c for c in cuts if reads_inputs(nodes, reuse_names(nodes, result, c), c)]


def candidate_cuts(units) -> list[str]:
    """Candidate cuts from unit kinds (profiles carry no adapter): in the up path, the outputs of
    motion modules, of second temporal res-block halves and of projections closing a temporal
    transformer; and residual cuts over the block ends of a residual stream (:func:`residual_candidates`).
    The adapters' ``rehash_cuts`` list the same (a test checks it)."""
    kind = {u.name: u.kind for u in units}
    out = []
    for u in units:
        if not u.name.startswith("up_blocks."):
            continue
        first = kind.get(u.inputs[0], "") if u.inputs else ""
        if (
            u.kind == "motion"
            or (u.kind == "temporal_conv" and first == "temporal_conv")
            or (u.kind == "proj" and first == "temporal_attention")
        ):
            out.append(u.name)
    size = {u.name: getattr(u, "output_bytes", 0) for u in units}  # op lists carry no sizes
    return out + [c for c in residual_candidates(profile_nodes(units), kind)
                  if len({size[v] for v in cut_values(c)}) == 1]  # a residual: start and end alike


def profile_nodes(units) -> list[tuple[str, list[str]]]:
    return [(u.name, list(u.inputs)) for u in units]


def cut_index(names: Sequence[str], cut: str) -> int:
    try:
        return list(names).index(cut)
    except ValueError:
        raise RehashCutError(f"the model has no unit {cut!r} to cut at") from None


def cut_values(cut: str) -> tuple[str, ...]:
    """The values a cut needs whole: the cut, or a residual span's start and end (under CFG reuse: its
    base cut's, none for CFG reuse alone)."""
    base = cfg_split(cut)[1]
    if base is None:
        return ()
    span = residual_span(base)
    return (base,) if span is None else span


def held_bytes(model: CostModel, cut: str, calls: int = 1) -> int:
    """Bytes the cache holds through denoising: one per model call of a step (Wan's CFG: two), as the
    runtime keeps them; per-step CFG reuse holds its base cut's once (the first call's) and one offset."""
    return cut_bytes(model, cut) * (1 if cfg_split(cut)[0] else calls)


def cut_indices(names: Sequence[str], cut: str) -> list[int]:
    return [cut_index(names, c) for c in cut_values(cut)]


def cut_bytes(model: CostModel, cut: str) -> int:
    """Bytes of the cache: the cut's value, or a residual span's residual (its end's size); per-step CFG
    reuse: one call's output (the offset) plus its base cut's cache (the first call's)."""
    cfg, base = cfg_split(cut)
    if cfg:
        out = model.units[model.index[model.profile.result]].output_bytes
        return out + (0 if base is None else cut_bytes(model, base))
    return model.units[model.index[cut_values(cut)[-1]]].output_bytes


def check_groups(groups: Iterable[tuple[str, Sequence[str]]], cut: str) -> None:
    """Refuse a slicing group that runs past the cut (either end of a residual span): the cut would
    exist one slice at a time only. ``groups``: (label, unit names in order)."""
    for label, names in groups:
        names = list(names)
        for value in cut_values(cut):
            if value in names and names[-1] != value:
                raise RehashCutError(
                    f"the slicing group {label} runs across the rehash cut {value!r} (the cut is not its last "
                    f"unit), so the cut never exists whole to be cached. Plan with the cut (plan_for(..., "
                    f"rehash=...) keeps groups off it) or split the group after {value!r}."
                )


# ---------------------------------------------------------------------------------- calibration
class CutCalibration(_Strict):
    """What one trajectory measured at one candidate cut."""

    cut: str
    similarity: list[list[float]] = Field(description="[a][s]: cosine similarity of the cut's feature at steps a, s")
    error: list[list[float | None]] = Field(
        description="[a][s]: relative L2 error of the guided noise prediction at step s when it reuses step a's "
        "feature; null unless 1 <= s - a <= max_gap"
    )


MAX_MEASURED = 512  # schedules one calibration may store as measured (vramplan calibrate --refine)
MAX_PSNR = 200.0  # a measured PSNR is stored capped here (an identical video is infinite)


class MeasuredSchedule(_Strict):
    """A schedule the calibration ran (``vramplan calibrate --refine``): its PSNR against the full run on the
    calibration's own call (prompt or image, seed), measured; the planner prefers it over the prediction."""

    cut: str
    key_steps: list[int] = Field(min_length=1)
    half_steps: list[int] = Field(default_factory=list)
    psnr: float = Field(ge=0.0, le=MAX_PSNR, description="measured PSNR of the video vs the full run, dB (capped)")
    predicted_psnr: float | None = Field(default=None, description="what the predictor said before measuring, dB")

    @property
    def key(self) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
        return self.cut, tuple(self.key_steps), tuple(self.half_steps)


class Calibration(_JsonFile):
    """Measured step-to-step similarity and reuse error per candidate cut, for one model, shape and
    step count (one full trajectory of the user's pipeline)."""

    schema_version: int = SCHEMA_VERSION
    model: ModelRef
    shape: SampleShape = Field(description="the UNet's input at each call (CFG batch)")
    pipeline: str
    scheduler: str
    steps: int = Field(ge=1)
    max_gap: int = Field(ge=1)
    seed: int | None = None
    calls_per_step: int | None = Field(
        default=None, ge=1, description="model calls per denoising step (2 for Wan's CFG: conditional, unconditional)")
    similarity_metric: str = "cosine similarity of the cut feature, flattened over the CFG batch"
    error_metric: str = "relative L2 error ||g' - g|| / ||g|| of the guided noise prediction"
    cuts: list[CutCalibration] = Field(min_length=1)
    # How an error of the noise prediction reaches the video (for the quality predictor; absent in
    # calibrations made before it, which then predict no PSNR).
    noise_norm: list[float] | None = Field(
        default=None, description="[s]: L2 norm of the guided noise prediction at step s (the full run)")
    step_gain: list[float] | None = Field(
        default=None, description="[s]: L2 change of the latent the scheduler's step s makes per unit L2 change of "
        "the noise prediction (its coefficient, measured on the scheduler itself)")
    sigmas: list[float] | None = Field(default=None, description="[s]: the scheduler's noise level at step s")
    flow_matching: bool | None = Field(
        default=None, description="sigmas of a flow-matching scheduler (x = (1 - sigma) x0 + sigma noise), not of "
        "x = x0 + sigma noise")
    latent_rms: float | None = Field(default=None, description="RMS of the full run's final latent (the data's scale)")
    decode_gain: float | None = Field(
        default=None, description="L2 change of the decoded frames (range [-1, 1]) per L2 change of the final latent, "
        "measured on a small random perturbation of the full run's final latent")
    frame_values: int | None = Field(default=None, ge=1, description="values of the decoded video (for the MSE)")
    measured: list[MeasuredSchedule] = Field(
        default_factory=list, max_length=MAX_MEASURED,
        description="schedules run on the calibration's call and measured (vramplan calibrate --refine)")

    @model_validator(mode="after")
    def _measured_schedules(self) -> Calibration:
        cuts = {c.cut for c in self.cuts}
        seen = set()
        for m in self.measured:
            keys, halves = m.key_steps, m.half_steps
            where = f"measured schedule {m.cut!r} {keys}"
            if m.cut not in cuts:
                raise ValueError(f"{where}: the calibration has no cut {m.cut!r}")
            if keys != sorted(set(keys)) or keys[0] != 0 or keys[-1] >= self.steps:
                raise ValueError(f"{where}: key_steps must be increasing, start at 0 and lie below steps={self.steps}")
            if halves and (halves != sorted(set(halves)) or halves[-1] >= self.steps or set(halves) & set(keys)):
                raise ValueError(f"{where}: half_steps must be increasing, below steps={self.steps} and not key steps")
            if m.key in seen:
                raise ValueError(f"{where}: measured twice")
            seen.add(m.key)
        return self

    def cut(self, name: str) -> CutCalibration:
        for c in self.cuts:
            if c.cut == name:
                return c
        raise RehashCutError(f"the calibration has no cut {name!r}; it has {[c.cut for c in self.cuts]}")

    def reference(self, path: str | Path | None = None) -> str:
        digest = hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]
        where = f"{Path(path).name} " if path else ""
        return f"{where}sha256:{digest}"

    def check(self, model: ModelRef, shape: SampleShape, steps: int) -> None:
        """Refuse a calibration made for another model, UNet shape or step count."""
        if (model.class_name, model.config_hash) != (self.model.class_name, self.model.config_hash):
            raise CalibrationMismatchError(
                f"this calibration was made for {self.model.describe()}, but the plan is for {model.describe()}. "
                f"Calibrate this model (vramplan calibrate)."
            )
        mine = (self.shape.batch, self.shape.frames, self.shape.latent_height, self.shape.latent_width)
        theirs = (shape.batch, shape.frames, shape.latent_height, shape.latent_width)
        if mine != theirs:
            raise CalibrationMismatchError(
                f"this calibration was made for {self.shape.describe()}, but the plan is for {shape.describe()}. "
                f"Calibrate at the plan's shape."
            )
        if steps != self.steps:
            raise CalibrationMismatchError(
                f"this calibration was made for {self.steps} steps, but the plan has {steps}. "
                f"Calibrate with the plan's step count."
            )


# ---------------------------------------------------------------------------------- schedules
def uniform_keys(steps: int, keys: int | None = None, interval: int | None = None) -> list[int]:
    """DeepCache's schedule: every ``interval``-th step is key; or ``keys`` evenly spaced key steps
    (first and last included; 13 of 25 is interval 2, 9 of 25 interval 3)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if interval is not None:
        return list(range(0, steps, max(1, interval)))
    keys = steps if keys is None else max(1, min(keys, steps))
    if keys == 1:
        return [0]
    return sorted({round(i * (steps - 1) / (keys - 1)) for i in range(keys)})


def greedy_keys(similarity: Sequence[Sequence[float]], threshold: float = GREEDY_THRESHOLD) -> list[int]:
    """The paper's key-step search: step 0 is key; a step becomes key when the cosine similarity of
    its cut feature to the last key step's drops below ``threshold``."""
    keys = [0]
    for s in range(1, len(similarity)):
        if similarity[keys[-1]][s] < threshold:
            keys.append(s)
    return keys


def greedy_for_count(similarity: Sequence[Sequence[float]], max_keys: int) -> tuple[list[int], float]:
    """The greedy schedule with the highest threshold that makes at most ``max_keys`` key steps."""
    values = sorted({v for row in similarity for v in row}, reverse=True)
    for v in values:  # thresholds just above each measured similarity, highest first
        t = math.nextafter(v, math.inf)
        keys = greedy_keys(similarity, t)
        if len(keys) <= max_keys:
            return keys, t
    return [0], -math.inf


def arc_error(error: Sequence[Sequence[float | None]], a: int, b: int) -> float:
    """Error of reusing key ``a``'s feature on steps ``a+1 .. b-1`` (inf where not calibrated)."""
    total = 0.0
    for s in range(a + 1, b):
        e = error[a][s]
        if e is None:
            return math.inf
        total += e
    return total


def schedule_error(error: Sequence[Sequence[float | None]], keys: Sequence[int]) -> float | None:
    """Predicted error of a schedule (sum over reused steps); None if a gap was not calibrated."""
    n = len(error)
    bounds = [*keys, n]
    total = sum(arc_error(error, a, b) for a, b in zip(bounds, bounds[1:], strict=False))
    return None if math.isinf(total) else total


def optimal_keys(error: Sequence[Sequence[float | None]], max_keys: int) -> tuple[list[int], float]:
    """Key steps (step 0 always key) minimising the summed calibrated error with at most
    ``max_keys`` keys: an exact DP over arcs "key a, next key b". Fewer keys win ties."""
    n = len(error)
    max_keys = max(1, min(max_keys, n))
    inf = math.inf
    best = [[inf] * n for _ in range(max_keys + 1)]  # best[j][b]: steps < b, j keys, the last at b
    end = [inf] * (max_keys + 1)  # end[j]: every step, j keys
    back: dict[tuple[int, int], int] = {}
    end_back: dict[int, int] = {}
    best[1][0] = 0.0
    for j in range(1, max_keys + 1):
        for a in range(n):
            if math.isinf(best[j][a]):
                continue
            for b in range(a + 1, n + 1):
                arc = arc_error(error, a, b)
                if math.isinf(arc):
                    break  # a longer arc from a is no more calibrated
                cost = best[j][a] + arc
                if b == n:
                    if cost < end[j]:
                        end[j], end_back[j] = cost, a
                elif j < max_keys and cost < best[j + 1][b]:
                    best[j + 1][b], back[(j + 1, b)] = cost, a
    j = min(range(1, max_keys + 1), key=lambda j: (end[j], j))
    if math.isinf(end[j]):
        raise InvalidPlanError(
            f"no schedule with at most {max_keys} key steps keeps every reuse within the calibrated gap; "
            f"allow more key steps or calibrate with a larger max_gap"
        )
    total, a = end[j], end_back[j]
    keys = [a]
    while a != 0:
        a = back[(j, a)]
        j -= 1
        keys.append(a)
    return sorted(keys), total


# ---------------------------------------------------------------------------------- costs
def reuse_indices(model: CostModel, cut: str) -> list[int]:
    names = reuse_names(profile_nodes(model.units), model.profile.result, cut)
    return [model.index[n] for n in names]


CFG_CALLS = 2  # per-step CFG reuse: a step calls the model twice (conditional, unconditional)


def reuse_flops(model: CostModel, cut: str) -> int:
    """FLOPs of one reuse call at ``cut``. Per-step CFG reuse is priced per call as the mean of a reuse
    step's two calls (the first whole or under its base cut, the second no model work), as the runtime's
    ``measure_cuts`` counts it."""
    cfg, base = cfg_split(cut)
    if cfg:
        first = sum(u.flops for u in model.units) if base is None else reuse_flops(model, base)
        return first // CFG_CALLS
    return sum(model.units[i].flops for i in reuse_indices(model, cut))


def split_at_cut(segments: Sequence[Segment], cut_at: int) -> list[Segment]:
    """Segments with any one that runs across unit ``cut_at`` split after it, slice count and depth
    kept (an estimate for cuts the slicing was not planned around)."""
    out = []
    for seg in segments:
        if seg.start <= cut_at < seg.stop:
            out += [Segment(seg.start, cut_at, seg.k, seg.depth), Segment(cut_at + 1, seg.stop, seg.k, seg.depth)]
        else:
            out.append(seg)
    return out


def _split_at(segments: Sequence[Segment], cut_ats: Iterable[int]) -> list[Segment]:
    for c in cut_ats:
        segments = split_at_cut(segments, c)
    return list(segments)


def reuse_segments(model: CostModel, segments: Sequence[Segment], cut: str) -> list[Segment]:
    """The plan's segments restricted to the reuse program: each run of consecutive reuse units of a
    segment, with its slice count and depth (as the runtime's ``reuse_segments`` keeps them). Per-step CFG
    reuse: the first call's (all of them, or its base cut's)."""
    cfg, base = cfg_split(cut)
    if cfg:
        return list(segments) if base is None else reuse_segments(model, segments, base)
    keep = set(reuse_indices(model, cut))
    out = []
    for seg in segments:
        run: list[int] = []
        for i in [*range(seg.start, seg.stop + 1), None]:
            if i is not None and i in keep:
                run.append(i)
                continue
            if run:
                out.append(Segment(run[0], run[-1], seg.k, seg.depth))
                run = []
    return out


def reuse_streaming_seconds(model: CostModel, cut: str, streamed: frozenset[str]) -> tuple[float, float]:
    """(transfer, exposed) seconds per reuse call of streaming ``streamed``: the runtime copies in only
    the streamed blocks the reuse program touches, and prefetches the next one *it* uses, so the
    reuse program is priced as a model of its own (its units, its compute clock; see
    :meth:`.costs.CostModel.streaming_seconds`)."""
    if not streamed:
        return 0.0, 0.0
    cfg, base = cfg_split(cut)
    if cfg:  # the first call's, shared by the step's two calls
        whole = model.streaming_seconds(frozenset(streamed)) if base is None else \
            reuse_streaming_seconds(model, base, streamed)
        return whole[0] / CFG_CALLS, whole[1] / CFG_CALLS
    cache = model.__dict__.setdefault("_reuse_models", {})
    if cut not in cache:
        units = [model.units[i] for i in reuse_indices(model, cut)]
        cache[cut] = CostModel(model.profile.model_copy(update={"units": units}), model.gpu, model.allocator,
                               pinned=model.pinned)
    return cache[cut].streaming_seconds(frozenset(streamed))


def reuse_seconds(model: CostModel, segments: Sequence[Segment], cut: str, host: Iterable[str] = EMPTY,
                  streamed: Iterable[str] = EMPTY) -> float:
    """Predicted time of one reuse call: the plan's segments restricted to the reuse program (with
    ``host`` placed and ``streamed`` blocks), and the weight copies of the streamed blocks the reuse
    program touches that its compute does not hide."""
    host, streamed = frozenset(host), frozenset(streamed)
    runs = reuse_segments(model, segments, cut)
    compute = sum(model.cost(s, host, streamed).seconds for s in runs)
    if cfg_split(cut)[0]:  # per call: the mean of the step's two calls
        compute /= CFG_CALLS
    return compute + reuse_streaming_seconds(model, cut, streamed)[1]


class CutCostModel(CostModel):
    """A cost model whose candidate segments never run across the rehash cut."""

    def __init__(self, profile, gpu, allocator: str, cut: str, *, pinned: bool = True):
        super().__init__(profile, gpu, allocator, pinned=pinned)
        self.cut = cut
        self.cut_ats = cut_indices([u.name for u in profile.units], cut)

    def segments(self, max_group: int = 8) -> list[Segment]:
        return [s for s in super().segments(max_group) if not any(s.start <= c < s.stop for c in self.cut_ats)]


@dataclass
class StageRehash:
    """A chosen schedule as the pipeline planner prices it: ``keys`` full calls, ``halves`` half steps (CFG
    reuse over a cut: the first call whole, the second reused) and the rest reuse calls; the cached cut is
    held through the whole denoising stage. A pipeline with several per-step stages (Wan 2.2's two experts)
    prices each stage for the steps it runs: ``parts`` (stage, keys, halves, steps) per stage."""

    cut: str
    keys: int
    steps: int
    calls: int = 1  # model calls per step, each with its own cache (Wan's CFG: 2)
    halves: int = 0
    parts: tuple[tuple[str, int, int, int], ...] = ()

    def constrain(self, model: CostModel, stage: str | None = None) -> CostModel:
        out = CutCostModel(model.profile, model.gpu, model.allocator, self.cut, pinned=model.pinned)
        out.rehash_stage = stage  # which part of the schedule the stage runs
        return out

    def part(self, model: CostModel) -> tuple[int, int, int]:
        """(keys, halves, steps) of the stage ``model`` prices (as :meth:`constrain` tagged it)."""
        stage = getattr(model, "rehash_stage", None)
        for name, keys, halves, steps in self.parts:
            if name == stage:
                return keys, halves, steps
        return self.keys, self.halves, self.steps

    def cache_bytes(self, model: CostModel) -> int:
        return held_bytes(model, self.cut, self.calls)

    def seconds(self, model: CostModel, solution) -> float:
        """The denoising stage: ``keys`` full calls, half steps and the rest reuse calls, each with the
        solution's placement and streamed blocks (the reuse calls' own weight copies)."""
        keys, halves, steps = self.part(model)
        full = solution.latency_s
        reuse = reuse_seconds(model, solution.segments, self.cut, solution.host, solution.streamed)
        half = reuse_seconds(model, solution.segments, cfg_cut(), solution.host, solution.streamed) if halves else 0.0
        return self.calls * (keys * full + halves * half + (steps - keys - halves) * reuse)

    def transfer_s(self, model: CostModel, solution) -> float:
        """Host-link seconds of the denoising stage not hidden behind compute: placed values' copies
        and exposed weight streaming of ``keys`` full calls and of the rest, reuse calls."""
        keys, halves, steps = self.part(model)
        host, streamed = frozenset(solution.host), frozenset(solution.streamed)

        def per_call(cut: str) -> float:
            runs = reuse_segments(model, solution.segments, cut)
            copies = sum(model.cost(s, host, streamed).transfer_s for s in runs)
            if cfg_split(cut)[0]:  # per call: the mean of the step's two calls
                copies /= CFG_CALLS
            return copies + reuse_streaming_seconds(model, cut, streamed)[1]

        half = per_call(cfg_cut()) if halves else 0.0
        return self.calls * (keys * solution.transfer_s + halves * half + (steps - keys - halves) * per_call(self.cut))

    @classmethod
    def of(cls, rehash, profile, steps: int | None = None) -> StageRehash:
        """The stage pricing of a plan's ``rehash`` section (or a search's option: ``cut``, ``keys``,
        ``halves``, and ``steps``) on its pipeline ``profile``."""
        steps = rehash.steps if steps is None else steps
        parts = expert_parts(profile, steps)
        keys = set(getattr(rehash, "key_steps", None) or rehash.keys)
        halves = set(getattr(rehash, "half_steps", None) or getattr(rehash, "halves", ()))
        calls = max(1, parts[0][3]) if parts else 1
        return cls(rehash.cut, len(keys), steps, calls, len(halves),
                   tuple((name, len(keys & set(r)), len(halves & set(r)), len(r)) for name, r, _, _ in parts)
                   if len(parts) > 1 else ())


def expert_parts(profile, steps: int) -> list[tuple[str, range, object, int]]:
    """Per per-step stage of ``profile``: (stage name, the steps it runs, the stage, model calls per step of
    its own). One stage runs every step; Wan 2.2's two experts split them at the boundary: ``transformer``
    the high-noise steps, ``transformer_2`` the rest (:func:`.pipelines.expert_steps`)."""
    from .errors import UnsupportedModelError
    from .pipelines import pipeline_spec

    stages = [s for s in profile.stages if s.per_step and s.profile is not None]
    try:
        spec = pipeline_spec(profile.pipeline)
    except UnsupportedModelError:
        return [(s.stage, range(steps), s, 1) for s in stages]
    if len(stages) == 1:
        return [(stages[0].stage, range(steps), stages[0],
                 max(1, spec.stage_calls(stages[0].stage, True, steps, profile.guidance) // steps))]
    cfg = 2 if profile.guidance else 1  # the experts: two calls per step of their own under CFG
    out, first = [], 0
    for s in stages:
        own = spec.stage_calls(s.stage, True, steps, profile.guidance) // cfg
        out.append((s.stage, range(first, first + own), s, cfg))
        first += own
    return out


def expert_firsts(profile, steps: int) -> list[int]:
    """The first step of each per-step stage after the first (Wan 2.2's low-noise expert): a key step of any
    schedule, as a residual or offset of the other expert's cannot be reused there."""
    return [r.start for _, r, _, _ in expert_parts(profile, steps)[1:] if len(r)]


# ---------------------------------------------------------------------------------- planning
class CalibrationRequiredError(InvalidArgumentError):
    """A schedule that needs measured similarity or error (greedy, optimal) asked for without one."""


@dataclass
class _Option:
    cut: str
    keys: list[int]
    error: float | None
    threshold: float | None
    cost: float  # the schedule's UNet work: predicted seconds (planner) or FLOPs (runtime)
    psnr: float | None = None  # predicted PSNR against the full run (calibrated)
    name: str | None = None  # the schedule, named honestly
    halves: tuple[int, ...] = ()  # half steps (CFG reuse over a cut: only the second call reused)
    measured: float | None = None  # the PSNR the calibration measured for it (then ``psnr`` is the prediction)


# with a calibration, the schedule families each mode searches (cut and key count searched jointly)
MODE_KINDS = {"uniform": ("uniform",), "greedy": ("greedy",), "optimal": ("optimal", "greedy", "uniform")}


def rank_cuts(reuse_at: dict[str, float], full: float, steps: int, mode: Mode, keys: int | None,
              budget: float | None, calibration: Calibration | None, threshold: float | None,
              min_psnr: float | None = None, firsts: Sequence[int] = ()) -> list[_Option]:
    """Schedules of ``mode`` within ``budget`` (UNet work of all steps, in the unit of ``full`` and
    ``reuse_at``: seconds or FLOPs) and at most ``keys`` key steps, best first. ``keys`` without a budget
    means the work of ``keys`` key steps at the cheapest cut: a shallower cut (less error, less saved)
    gets fewer keys, so quality cannot trade the whole saving away.

    With a calibration, cut, key count and key steps are searched jointly (:mod:`.rehash_search`): the
    best predicted quality first, or with ``min_psnr`` the least work predicted to reach it. Without one,
    per cut the schedule of ``mode`` with as many key steps as allowed, most key steps first. ``firsts``: steps
    every schedule has as key steps (where Wan 2.2's second expert takes over: :func:`expert_firsts`)."""
    if budget is None and keys is not None and reuse_at:
        budget = keys * full + (steps - keys) * min(reuse_at.values())
    if calibration is not None:
        return _searched(reuse_at, full, steps, mode, keys, budget, calibration, threshold, min_psnr, firsts)
    if min_psnr is not None:
        raise CalibrationRequiredError("min_psnr needs a calibration (the quality predictor); vramplan calibrate")
    options = []
    for c, reuse in reuse_at.items():
        allowed = keys
        if budget is not None:
            if reuse >= full:
                continue
            allowed = min(keys or steps, steps, math.floor((budget - steps * reuse) / (full - reuse) + 1e-9))
            if allowed < 1:
                continue
        cal = calibration.cut(c) if calibration is not None else None
        try:
            key_steps, thr = schedule_for(mode, steps, allowed, cal, threshold)
        except InvalidPlanError:  # no schedule within the calibrated gaps at this cut
            continue
        if firsts and mode == "uniform":  # fewer evenly spaced keys, so that the forced ones fit the count
            key_steps = next((k for c in range(len(key_steps), 0, -1)
                              if len(k := sorted({*uniform_keys(steps, keys=c), *firsts})) <= (allowed or steps)),
                             None)
            if key_steps is None:
                continue
        error = schedule_error(cal.error, key_steps) if cal is not None else None
        n = len(key_steps)
        options.append(_Option(c, key_steps, error, thr, n * full + (steps - n) * reuse,
                               name=schedule_name(mode, key_steps, thr)))
    if calibration is not None:
        options.sort(key=lambda o: (math.inf if o.error is None else o.error, o.cost))
    else:
        options.sort(key=lambda o: (-len(o.keys), o.cost))
    return options


def schedule_name(kind: str, keys, threshold: float | None = None) -> str:
    from .rehash_search import schedule_name as name

    return name(kind, keys, threshold)


def _searched(reuse_at, full, steps, mode, keys, budget, calibration, threshold, min_psnr, firsts=()) -> list[_Option]:
    from .rehash_quality import QualityModel
    from .rehash_search import candidates, ranked

    if budget is None and min_psnr is None:  # nothing bounds the work: the mode's default schedule
        if mode == "uniform":
            keys = len(uniform_keys(steps, interval=DEFAULT_INTERVAL))
            budget = keys * full + (steps - keys) * min(reuse_at.values(), default=full)
        elif mode == "greedy" and threshold is None:
            threshold = GREEDY_THRESHOLD
        elif mode == "optimal":
            raise InvalidArgumentError("rehash='optimal' needs a latency or FLOPs limit, keys, or min_psnr")
    model = QualityModel(calibration)
    cands = candidates(model, reuse_at, full, kinds=MODE_KINDS[mode], max_keys=keys, threshold=threshold)
    cands = [c for c in cands if set(firsts) <= set(c.keys)]  # a schedule keys every expert's first step
    return [_Option(c.cut, list(c.keys), c.error, c.threshold, c.cost, c.predicted if c.measured else c.psnr,
                    c.name, c.halves, c.psnr if c.measured else None)
            for c in ranked(cands, budget, min_psnr)]


def plan_rehash(
    profile,
    gpu,
    *,
    mode: Mode,
    calibration: Calibration | None = None,
    calibration_ref: str | None = None,
    keys: int | None = None,
    threshold: float | None = None,
    usable_bytes: int | None = None,
    steps: int = 25,
    max_latency_s: float | None = None,
    allocator: str = "expandable_segments",
    method: str = "auto",
    cut: str | None = None,
    pinned: bool = True,
    min_psnr: float | None = None,
):
    """A pipeline plan with a Step Rehash schedule (see :func:`vramplan.plan_for`).

    The fastest plan within memory gives the cost of a full and of a reuse UNet call at each cut;
    per cut the schedule allows as many key steps as the latency target permits, or, with ``keys``, as
    fit in the UNet time of ``keys`` key steps at the cheapest cut (never more than ``keys``):
    ``uniform`` spreads them evenly (DeepCache), ``greedy`` raises the similarity threshold as far
    as that count allows, ``optimal`` minimises the calibrated error (exact DP). The cut with the
    least calibrated error wins (uncalibrated: the most key steps, then the fastest). The pipeline
    is then planned again with that schedule priced in (groups kept off the cut, the cache held
    through denoising), minimising the peak under the latency target. ``cut`` fixes the cut.
    Both calls are priced with the plan's placement (values on host, streamed blocks, depth); a
    reuse call copies in only the streamed blocks its program touches. ``pinned=False``: host-link
    copies at the pageable rate, as :func:`.pipeline.plan_pipeline`.

    With a calibration the cut, key count and key steps are chosen together by the quality predictor
    (:mod:`.rehash_search`): the best predicted PSNR within the latency target, or with ``min_psnr`` the
    fastest schedule predicted to reach it (:class:`.rehash_search.QualityFloorError` names the best
    reachable when none does).
    """
    from .pipeline import plan_pipeline

    if mode not in ("uniform", "greedy", "optimal"):
        raise InvalidArgumentError(f"rehash={mode!r}: choose off, uniform, greedy or optimal")
    if mode != "uniform" and calibration is None:
        raise CalibrationRequiredError(
            f"rehash={mode!r} needs a calibration (vramplan calibrate, or vramplan.runtime.calibrate); "
            f"without one only rehash='uniform' is offered, and its quality is uncalibrated."
        )
    if mode == "optimal" and keys is None and max_latency_s is None and min_psnr is None:
        raise InvalidArgumentError("rehash='optimal' needs max_latency_s, keys (how many full UNet steps) or min_psnr")
    if keys is not None and not 1 <= keys <= steps:
        raise InvalidArgumentError(f"keys={keys} must lie in 1..steps ({steps})")
    stage = next(s for s in profile.stages if s.per_step and s.profile is not None)
    unet = stage.profile
    if calibration is not None:
        calibration.check(unet.model, unet.shape, steps)
    base = plan_pipeline(profile, gpu, usable_bytes=usable_bytes, steps=steps, allocator=allocator, method=method,
                         pinned=pinned)
    model = CostModel(unet, gpu, allocator, pinned=pinned)
    comp = base.component(stage.component)
    segments = segments_of(model, comp)
    full = component_seconds(model, comp)
    calls = calls_per_step(profile, stage, steps)  # Wan's CFG: two DiT calls per step, each priced
    other = base.prediction.latency_s - calls * steps * full
    nodes = profile_nodes(model.units)
    cuts = valid_cuts(nodes, unet.result, candidate_cuts(model.units))
    offered = cuts + (cfg_cuts(cuts) if calls == CFG_CALLS else [])
    if cut is not None:
        if cut not in offered:
            why = (" (per-step CFG reuse needs a pipeline that calls the model twice per step)"
                   if cfg_split(cut)[0] else "")
            raise RehashCutError(f"{cut!r} is not a rehash cut of this model{why}; its cuts: {', '.join(offered)}")
        cuts = [cut]
    elif calibration is not None and calibration.calls_per_step == CFG_CALLS:
        cuts = offered  # per-step CFG reuse: searched where the calibration measured two calls per step
    if calibration is not None:
        measured = {c.cut for c in calibration.cuts}
        cuts = [c for c in cuts if c in measured]
    reuse_at = {c: reuse_seconds(model, _split_at(segments, [model.index[v] for v in cut_values(c)]), c,
                                 comp.host, comp.streamed) for c in cuts}
    budget = None if max_latency_s is None else (max_latency_s - other) / calls  # per call of a step
    options = rank_cuts(reuse_at, full, steps, mode, keys, budget, calibration, threshold, min_psnr,
                        expert_firsts(profile, steps))
    if not options:
        if max_latency_s is None:
            raise InvalidPlanError(
                f"no cut has a schedule with at most {keys} key steps within the calibrated gaps "
                f"({calibration.max_gap if calibration else '-'}); allow more key steps or calibrate with a larger max_gap"
            )
        raise InfeasibleError(
            f"no Step Rehash schedule meets max_latency_s={max_latency_s:g}: one full UNet call takes {full:.2f} s "
            f"and the other stages {other:.2f} s, and no cut's reuse call is cheap enough"
            + (" (within the calibrated gaps)" if calibration is not None else "") + ". Raise the latency limit."
        )
    last_error = None
    for option in options[:8]:
        choice = StageRehash.of(option, profile, steps)
        try:
            plan = plan_pipeline(
                profile, gpu, usable_bytes=usable_bytes, steps=steps, max_latency_s=max_latency_s,
                allocator=allocator, method=method, rehash=choice, pinned=pinned,
            )
        except InfeasibleError as err:  # the cut-respecting slicing is slower than estimated
            last_error = err
            continue
        return _attach(plan, stage, unet, gpu, allocator, mode, option, steps, calibration, calibration_ref, pinned,
                       profile)
    raise last_error


def cfg_cuts(cuts: Iterable[str]) -> list[str]:
    """Per-step CFG reuse options over a model's cuts: alone, and on top of each residual cut (a UNet's
    feature cuts hold the CFG batch in one call: no second call to skip). The runtime's ``cfg_cuts``."""
    return [cfg_cut(), *(cfg_cut(c) for c in cuts if residual_span(c) is not None)]


def offered_cut(cut: str, cuts: Sequence[str]) -> bool:
    """Whether ``cut`` is one of ``cuts`` (a model's valid cuts) or per-step CFG reuse over one of them."""
    cfg, base = cfg_split(cut)
    if not cfg:
        return cut in cuts
    return base is None or (base in cuts and residual_span(base) is not None)


def calls_per_step(profile, stage, steps: int) -> int:
    """Model calls per denoising step of ``stage`` as the pipeline makes them (Wan's CFG: 2, each expert of
    Wan 2.2 at its own steps; a UNet's CFG batch: 1); 1 for a pipeline the planner has no spec of."""
    return next((calls for name, _, _, calls in expert_parts(profile, steps) if name == stage.stage), 1)


def schedule_for(mode, steps, allowed, cal, threshold) -> tuple[list[int], float | None]:
    """Key steps of ``mode`` with at most ``allowed`` keys (None: the mode's default), and the greedy threshold."""
    if mode == "uniform":
        if allowed is None:
            return uniform_keys(steps, interval=DEFAULT_INTERVAL), None
        return uniform_keys(steps, keys=allowed), None
    if mode == "greedy":
        if allowed is None or threshold is not None:
            keys = greedy_keys(cal.similarity, GREEDY_THRESHOLD if threshold is None else threshold)
            if allowed is None or len(keys) <= allowed:
                return keys, GREEDY_THRESHOLD if threshold is None else threshold
        return greedy_for_count(cal.similarity, allowed)
    return optimal_keys(cal.error, allowed)[0], None


def _attach(plan, stage, unet, gpu, allocator, mode, option, steps, calibration, calibration_ref, pinned=True,
            profile=None):
    from .schema import RehashPlan

    numbers = rehash_numbers(profile, plan, gpu, allocator, pinned, option.cut, option.keys, option.halves, steps)
    rehash = RehashPlan(
        mode=mode, cut=option.cut, steps=steps, key_steps=option.keys, half_steps=list(option.halves),
        quality="calibrated" if calibration is not None else "uncalibrated",
        predicted_error=None if option.error is None else round(option.error, 6),
        predicted_psnr=_psnr(option.psnr), schedule=option.name, measured_psnr=_psnr(option.measured),
        threshold=None if option.threshold is None or math.isinf(option.threshold) else round(option.threshold, 6),
        **{k: round(v, 6 if k.endswith("call_s") else 4) if isinstance(v, float) else v for k, v in numbers.items()},
        calibration=(calibration_ref or calibration.reference()) if calibration is not None else None,
    )
    return plan.model_copy(update={"rehash": rehash})


def rehash_numbers(profile, plan, gpu, allocator: str, pinned: bool, cut: str, keys, halves, steps: int) -> dict:
    """A schedule's numbers as a plan states them (the integrity check recomputes them here too): FLOPs of
    one call per step, the first per-step stage's key and reuse call, and the seconds saved and the cache
    held over every per-step stage, each for the steps it runs (Wan 2.2's experts) and its model calls."""
    keys, halves = set(keys), set(halves)
    out = {"original_unet_flops": 0, "unet_flops": 0, "latency_saved_s": 0.0}
    for i, (_, own, stage, calls) in enumerate(expert_parts(profile, steps)):
        model = CutCostModel(stage.profile, gpu, allocator, cut, pinned=pinned)
        comp = plan.component(stage.component)
        segs = segments_of(model, comp)
        full = component_seconds(model, comp)
        reuse = reuse_seconds(model, segs, cut, comp.host, comp.streamed)
        n, h = len(keys & set(own)), len(halves & set(own))
        half = reuse_seconds(model, segs, cfg_cut(), comp.host, comp.streamed) if h else full
        flops = sum(u.flops for u in model.units)
        out["original_unet_flops"] += len(own) * flops
        out["unet_flops"] += n * flops + h * reuse_flops(model, cfg_cut()) + (len(own) - n - h) * reuse_flops(model, cut)
        out["latency_saved_s"] += calls * ((len(own) - n - h) * (full - reuse) + h * (full - half))
        if i == 0:
            out.update(key_call_s=full, reuse_call_s=reuse, cache_bytes=held_bytes(model, cut, calls))
    return out


def _psnr(value: float | None) -> float | None:
    """A predicted PSNR for the plan's JSON (every step key: no error, capped at 200 dB)."""
    return None if value is None else round(min(value, 200.0), 3)


def rehash_summary(plan) -> str:
    """Lines for the plan table."""
    r = plan.rehash
    if r is None:
        return ""
    ratio = r.original_unet_flops / max(1, r.unet_flops)
    if r.quality != "calibrated":
        quality = "uncalibrated (run vramplan calibrate for greedy/optimal schedules)"
    elif r.measured_psnr is not None:
        quality = (f"calibrated, measured {r.measured_psnr:.1f} dB PSNR vs the full run on the calibration's call"
                   + (f" (predicted {r.predicted_psnr:.1f})" if r.predicted_psnr is not None else ""))
    elif r.predicted_psnr is not None:
        quality = f"calibrated, predicted {r.predicted_psnr:.1f} dB PSNR vs the full run"
    else:
        quality = f"calibrated, predicted error {r.predicted_error:.3g}"
    return "\n".join([
        f"rehash           {r.mode}: {len(r.key_steps)} of {r.steps} steps key, cut {r.cut}"
        + (f"; {r.schedule}" if r.schedule else ""),
        f"                 key steps {r.key_steps}" + (f"; half steps {r.half_steps}" if r.half_steps else ""),
        f"                 denoiser FLOPs {_flops(r.unet_flops)} per video ({ratio:.2f}x fewer); "
        + (f"{r.latency_saved_s:.2f} s saved; " if r.latency_saved_s is not None else "")
        + f"cache {r.cache_bytes / 2**20:.1f} MiB; {quality}",
    ])


def load_calibration(calibration) -> tuple[Calibration | None, str | None]:
    """A Calibration and its reference from a Calibration, a JSON path, or None."""
    if calibration is None or isinstance(calibration, Calibration):
        return calibration, calibration.reference() if calibration is not None else None
    cal = Calibration.load(calibration)
    return cal, cal.reference(calibration)


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n / 1e6:.3g} MFLOP"
