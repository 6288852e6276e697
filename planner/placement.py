"""Host placement of values and weight streaming, chosen around the shortest-path solver. No torch.

For a fixed placement (values in host memory) and streamed set (blocks whose weights are copied in
just before use) the best slicing is the shortest path of :mod:`.solve`. Choosing the placement is
done greedily, only when the plan with nothing placed or streamed does not fit (so every plan that
fits today is unchanged):

1. **Trajectory.** Starting from nothing, take the minimax path (the smallest reachable peak) and
   its worst segment; among the values that segment holds and the blocks not yet streamed, take the
   one that saves the most bytes there per second it adds (streamed bytes the copy stream hides cost
   nothing), and repeat. No step raises the floor; when none lowers it the trajectory stops; its last state is
   everything placed and streamed, which is the floor (:func:`floor`). The trajectory does not depend
   on the budget, so it is computed once per cost model.
2. **Solve** at the first state of the trajectory whose floor fits the budget.
3. **Prune**: placed values that cross no boundary of the solution are dropped; then each remaining
   choice (most host-link time first) is dropped when the plan without it still fits and is no slower.
   Most of these trials are decided without a re-solve, exactly (:func:`_without_block`, :func:`_no_room`).

Budgets here, as in :func:`.solve.solve`, count every weight of the model as resident: streaming a
block adds its bytes to the budget and the streamed blocks present to each segment.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

from .costs import EMPTY, CostModel, Segment, SegmentCost
from .errors import InfeasibleError
from .faster_placement import faster_placement
from .fmt import human_bytes
from .solve import (
    Solution,
    _bounds,
    _cbc_available,
    _Costs,
    _fastest,
    _positions,
    _present_bytes,
    _spans,
    both_ways,
    covering,
    memory_minimax,
    solve,
    table,
)


@dataclass(frozen=True)
class Floor:
    """The smallest reachable peak of one model with everything placed and streamed, and what sets it."""

    needed_bytes: int  # like a budget: every weight counted resident (streamed weights present in, all streamed out)
    unit: str  # the unit where the peak occurs
    segment: Segment
    cost: SegmentCost
    host: frozenset[str]
    streamed: frozenset[str]
    resident_weight_bytes: int  # weights outside every streamable block: never leave the device
    present: tuple[str, ...]  # streamed blocks on the device at the peak

    @property
    def activation_bytes(self) -> int:
        """Needed bytes at the peak: allocator overhead and streamed weights present included."""
        return self.cost.needed_bytes

    def parts(self) -> dict[str, int]:
        """What the peak segment holds on the device (beyond context, margin and resident weights)."""
        c = self.cost
        overhead = c.needed_bytes - c.activation_bytes
        return {
            "streamed weights present": c.streamed_bytes,
            "values that cannot be placed": c.live_bytes,
            "slices and scratch": c.transient_bytes + overhead,
        }

    def describe(self, model: CostModel) -> str:
        """``<unit> (in the group ..): mostly <largest part>; <each part>`` for error messages."""
        c = self.cost
        seg = self.segment
        names = [u.name for u in model.units[seg.start : seg.stop + 1]]
        where = self.unit if len(names) == 1 else f"{self.unit} (in the group {names[0]} .. {names[-1]})"
        parts = self.parts()
        detail = []
        if c.streamed_bytes:
            detail.append(f"streamed weights {human_bytes(c.streamed_bytes)} ({', '.join(self.present)})")
        if c.live_bytes:
            kept = _unplaceable(model, seg, self.host)
            detail.append(f"values that cannot be placed {human_bytes(c.live_bytes)}" + (f" ({kept})" if kept else ""))
        detail.append(f"slices and scratch {human_bytes(parts['slices and scratch'])} at k={seg.k}")
        largest = max(parts, key=parts.get)
        return f"{where}: mostly {largest}; " + ", ".join(detail)


def _unplaceable(model: CostModel, seg: Segment, host: frozenset[str]) -> str:
    rules = model.rules_for(host)
    names = list(rules.on_device_before(seg.start))
    if model.profile.globals_bytes:
        names.insert(0, "the call's inputs and embeddings")
    seg_rules = rules.segment(seg.start, seg.stop)
    if seg.k > 1:  # the result's full buffer (unsliced, the result is the unit's own output)
        names += [model.units[j].name for j in range(seg.start, seg.stop + 1)
                  if seg_rules.escapes(j) and model.units[j].name == model.profile.result]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _everything(model: CostModel) -> tuple[frozenset[str], frozenset[str]]:
    return frozenset(model.placeable), frozenset(model.streamable)


def _memory_candidates(model: CostModel, max_group: int) -> list[Segment]:
    """Candidate segments for floors: depth only adds memory, so waves of one slice."""
    return [s for s in model.segments(max_group) if s.depth == 1]


def _adjusted(model: CostModel, host, streamed):
    credit = model.streamed_weight_bytes(streamed)
    present = _present_bytes(model, streamed) if streamed else None

    def value(s: Segment) -> int:  # as model.cost(s, host, streamed).needed_bytes - credit, without building it
        return model.cost(s, host).needed_bytes + (present(s.start, s.stop) if present else 0) - credit

    return value


def floor(model: CostModel, max_group: int = 8) -> Floor:
    """The smallest reachable peak with every placeable value on host and every block streamed."""
    key = ("_floor", max_group)
    if key in model.__dict__:
        return model.__dict__[key]
    host, streamed = _everything(model)
    peak, seg, _ = memory_minimax(model, host, streamed, max_group)
    cost = model.cost(seg, host, streamed)
    resident = model.profile.weight_bytes - model.streamed_weight_bytes(streamed)
    found = Floor(peak, model.units[cost.peak_unit].name, seg, cost, host, streamed, resident,
                  tuple(model.present_blocks(seg, streamed)))
    model.__dict__[key] = found
    return found


def trajectory(model: CostModel, max_group: int = 8) -> list[tuple[frozenset[str], frozenset[str], int]]:
    """Greedy states ``(host, streamed, floor)`` from nothing to everything, floors decreasing."""
    walk = _walk(model, max_group)
    while walk.step():
        pass
    return list(walk.states)


def _walk(model: CostModel, max_group: int) -> _Walk:
    key = ("_trajectory", max_group)
    if key not in model.__dict__:
        model.__dict__[key] = _Walk(model, max_group)
    return model.__dict__[key]


class _Walk:
    """The trajectory of :func:`trajectory`, walked only as far as asked (memoised on the cost model): a
    search needs the states up to the first that fits its budget, and each greedy step costs a minimax
    over the placement's candidates (most of a first plan of a 14B DiT when walked to the end)."""

    @property
    def model(self) -> CostModel:
        return self._model()

    def __init__(self, model: CostModel, max_group: int):
        self._model, self.max_group = weakref.ref(model), max_group  # the model keeps the walk: no cycle
        self.host, self.streamed = EMPTY, EMPTY
        self.peak, self.worst, _ = memory_minimax(model, EMPTY, EMPTY, max_group)
        self.states = [(EMPTY, EMPTY, self.peak)]
        self.bottom = floor(model, max_group).needed_bytes
        self.placeable = set(model.placeable)
        self.readers: dict[str, int] = {}
        for u in model.units:
            for name in set(u.inputs):
                self.readers[name] = self.readers.get(name, 0) + 1
        self.done = False

    def state(self, i: int):
        """The ``i``-th state, walking on as far as needed; None past the last."""
        while i >= len(self.states) and self.step():
            pass
        return self.states[i] if i < len(self.states) else None

    def step(self) -> bool:
        """One greedy step (a new state); False when the walk had already ended."""
        if self.done:
            return False
        model, host, streamed, worst = self.model, self.host, self.streamed, self.worst
        best = None
        if self.peak > self.bottom:
            here = _adjusted(model, host, streamed)(worst)
            _, exposed = model.streaming_seconds(streamed)
            for group in _host_options(model, worst, host, self.placeable):
                gain = here - _adjusted(model, host | group, streamed)(worst)
                seconds = sum(model.size[v] * (1 + self.readers.get(v, 1)) for v in group) / model.link_bytes_per_s
                best = _better(best, gain, seconds, ("host", group))
            for b in model.streamable:
                if b in streamed:
                    continue
                grown = streamed | {b}
                gain = here - _adjusted(model, host, grown)(worst)
                seconds = max(0.0, model.streaming_seconds(grown)[1] - exposed)
                best = _better(best, gain, seconds, ("streamed", b))
        if best is None:
            self.done = True
            if self.peak > self.bottom:
                self.states.append((*_everything(model), self.bottom))
                return True
            return False
        kind, name = best[2]
        if kind == "host":
            self.host = host | name
        else:
            self.streamed = streamed | {name}
        self.peak, self.worst, _ = memory_minimax(model, self.host, self.streamed, self.max_group)
        self.states.append((self.host, self.streamed, self.peak))
        return True


def _host_options(model: CostModel, seg: Segment, host: frozenset[str], placeable: set[str]) -> list[frozenset[str]]:
    """Values to try placing for ``seg``: each value it holds alone, and each escaping output with the
    input whose buffer it takes over (placing one of the two alone saves nothing: the buffer moves)."""
    names = sorted(placeable & model.relevant(seg) - host)
    options = [frozenset([v]) for v in names]
    rules = model.rules_for(host).segment(seg.start, seg.stop)
    kinds = rules.buffers(model._same_shape)
    for j, kind in zip(range(seg.start, seg.stop + 1), kinds, strict=True):
        out = model.units[j].name
        if kind not in (None, "new", "host") and out in placeable and kind in placeable:
            pair = frozenset([out, kind]) - host
            if len(pair) == 2:
                options.append(pair)
    return options


def _better(best, gain: int, seconds: float, choice):
    if gain <= 0:
        return best
    score = (gain / max(seconds, 1e-9), gain)
    return (score, seconds, choice) if best is None or score > best[0] else best


def search(
    model: CostModel,
    budget_bytes: int,
    max_latency_s: float | None = None,
    method: str = "auto",
    max_group: int = 8,
    min_streamed_bytes: int = 0,
    more_streaming: bool = True,
    min_placement_gain_s: float = 0.0,
) -> Solution:
    """The best plan within ``budget_bytes`` (every weight counted resident), placing values and
    streaming blocks only when the plan with neither does not fit. Raises :class:`InfeasibleError`
    with the floor (``min_needed_bytes``, ``unit``, ``floor``) when even everything placed and
    streamed does not fit.

    ``min_streamed_bytes``: weights that must be streamed whatever this model needs (another stage of
    the same component needs the room): the largest blocks are streamed first, and kept.
    ``more_streaming``: once streaming is needed, also try streaming more blocks than the budget needs
    when their copies hide behind compute and the memory they free makes the slicing faster
    (:func:`_faster_streaming`; more pinned host memory). Then, in both cases, also try placing more values
    when that makes a sliced plan faster (:func:`.faster_placement.faster_placement`), by at least
    ``min_placement_gain_s`` seconds per call (a pipeline asks for a share of the whole run)."""
    forced = forced_streaming(model, min_streamed_bytes)
    try:
        fits = solve(model, budget_bytes, max_latency_s, method, max_group, streamed=forced)
        return faster_placement(model, fits, budget_bytes, max_latency_s, method, max_group, min_placement_gain_s)
    except InfeasibleError as err:
        if not hasattr(err, "min_needed_bytes"):  # memory fits; the latency limit does not
            raise
        plain = err
    bottom = floor(model, max_group)
    if bottom.needed_bytes > budget_bytes:
        raise _infeasible(model, bottom, budget_bytes) from None
    if not (model.placeable or model.streamable):
        raise plain
    host, streamed, _ = _first_fitting(model, max_group, forced, budget_bytes)
    solution = solve(model, budget_bytes, max_latency_s, "dp", max_group, host=host, streamed=streamed)
    solution = prune(model, solution, budget_bytes, max_latency_s, max_group, keep=forced)
    if more_streaming:
        solution = _faster_streaming(model, solution, budget_bytes, max_latency_s, max_group, forced)
    solution = faster_placement(model, solution, budget_bytes, max_latency_s, "dp", max_group, min_placement_gain_s)
    if method == "ilp" or (method == "auto" and _cbc_available()):
        solution = solve(model, budget_bytes, max_latency_s, "ilp", max_group,
                         host=solution.host, streamed=solution.streamed)
    return solution


def _unbounded_seconds(model: CostModel, max_group: int) -> float:
    """Per call: the fastest plan with memory for everything (nothing placed or streamed), memoised."""
    key = ("_unbounded_seconds", max_group)
    if key not in model.__dict__:
        model.__dict__[key] = solve(model, 2**62, None, "dp", max_group, explain=False).latency_s
    return model.__dict__[key]


# Streaming more than the budget needs costs pinned host memory (which has its own budget): taken only
# when it saves at least this fraction of the call's time.
MORE_STREAMING_GAIN = 0.01


def _faster_streaming(model: CostModel, solution: Solution, budget_bytes: int, max_latency_s: float | None,
                      max_group: int, keep: frozenset[str]) -> Solution:
    """``solution``, or a faster one streaming more blocks: weights whose copy hides behind compute cost
    (almost) nothing, and the memory they free lets the slicing coarsen (fewer launches and copies).
    Tried with every streamable block streamed, then pruned back to the blocks that pay; kept when it
    saves at least ``MORE_STREAMING_GAIN`` of the call."""
    if max_latency_s is not None or not model.streamable or solution.streamed >= frozenset(model.streamable):
        return solution
    if solution.latency_s <= _unbounded_seconds(model, max_group) * (1 + 1e-9):
        return solution  # already as fast as with memory for everything
    trial = solve(model, budget_bytes, None, "dp", max_group, host=solution.host,
                  streamed=frozenset(model.streamable), explain=False)
    if trial is None or trial.latency_s >= solution.latency_s * (1 - MORE_STREAMING_GAIN):
        return solution
    trial = prune(model, trial, budget_bytes, None, max_group, keep=keep)
    return trial if trial.latency_s < solution.latency_s * (1 - MORE_STREAMING_GAIN) else solution


def _first_fitting(model: CostModel, max_group: int, forced: frozenset[str], budget_bytes: int):
    """The first state of :func:`trajectory` whose floor fits ``budget_bytes`` (else the last), with the
    ``forced`` blocks streamed in every state (its floor recomputed; memoised per forced set), walking
    the trajectory no further than that state."""
    walk = _walk(model, max_group)
    states = model.__dict__.setdefault("_forced_trajectories", {}).setdefault((forced, max_group), [])
    i = 0
    while True:
        if i == len(states):
            base = walk.state(i)
            if base is None:
                return states[-1]
            host, streamed, peak = base
            if forced - streamed:
                streamed = streamed | forced
                peak = memory_minimax(model, host, streamed, max_group)[0]
            states.append((host, streamed, peak))
        if states[i][2] <= budget_bytes:
            return states[i]
        i += 1


def forced_streaming(model: CostModel, min_bytes: int) -> frozenset[str]:
    """The fewest blocks (largest first) whose weights add up to ``min_bytes``; InfeasibleError if all do not."""
    if min_bytes <= 0:
        return EMPTY
    out, total = [], 0
    for b in sorted(model.streamable, key=lambda b: -model.profile.block_weights[b]):
        if total >= min_bytes:
            break
        out.append(b)
        total += model.profile.block_weights[b]
    if total < min_bytes:
        err = InfeasibleError(
            f"no plan fits: {human_bytes(min_bytes)} of weights must leave the GPU, but only "
            f"{human_bytes(total)} are in blocks that can be streamed"
        )
        err.min_needed_bytes, err.unit, err.budget_bytes = min_bytes, model.units[0].name, 0
        raise err
    return frozenset(out)


def host_bytes(model: CostModel, host: frozenset[str], segments=None) -> int:
    """Host memory the placed values take at most at once, as the executor allocates it.

    A host value's buffer appears in the segment that makes it and is released after the segment of
    its last reader; a host output that takes over a dying host input's buffer (the rulebook's
    :meth:`~.rules.SegmentRules.buffers`, sliced segments, not along rows) allocates nothing. The peak is at the
    end of some segment: what is alive at its start plus the buffers it makes. ``segments``: the
    plan's path (None: every unit alone, unsliced: no reuse, an upper bound)."""
    if not host:
        return 0
    if segments is None:
        segments = [Segment(i, i, 1) for i in range(model.n)]
    host = crossing(model, segments, host)  # as the plan lists them: values that leave their segment
    rules = model.rules_for(host)
    size = model.size
    peak = 0
    for seg in segments:
        alive = sum(size[v] for v in host if model.producer[v] < seg.start and rules.alive(v, seg.start))
        seg_rules = rules.segment(seg.start, seg.stop)
        first = model.units[seg.start]
        # along rows a slab's halo still reads its input's rows: outputs never take over an input's buffer
        takeover = first.axis not in (None, "rows") and min(seg.k, first.axis_length) > 1
        if takeover:
            kinds = seg_rules.buffers(model._same_shape)
            made = sum(model.units[j].output_bytes for j, kind in zip(range(seg.start, seg.stop + 1), kinds, strict=True)
                       if kind == "host")
        else:  # unsliced or rows: each escaping host output gets a new host buffer
            made = sum(model.units[j].output_bytes for j in range(seg.start, seg.stop + 1) if seg_rules.on_host(j))
        peak = max(peak, alive + made)
    return peak


def crossing(model: CostModel, segments, host: frozenset[str]) -> frozenset[str]:
    """The values of ``host`` that some segment of ``segments`` leaves behind (the others never
    leave the device: placing them changes nothing)."""
    out = set()
    for seg in segments:
        rules = model.rules.segment(seg.start, seg.stop)
        for j in range(seg.start, seg.stop + 1):
            name = model.units[j].name
            if name in host and rules.escapes(j):
                out.add(name)
    return frozenset(out)


def prune(model: CostModel, solution: Solution, budget_bytes: int, max_latency_s: float | None,
          max_group: int = 8, keep: frozenset[str] = EMPTY) -> Solution:
    """Drop placed values and streamed blocks the plan does not need (see the module docstring);
    blocks in ``keep`` stay streamed."""
    host = crossing(model, solution.segments, solution.host)
    if host != solution.host:
        solution = solve(model, budget_bytes, max_latency_s, "dp", max_group, host=host, streamed=solution.streamed)
    # largest first; ties in program order, never in set order (which follows the hash seed)
    position = {b: i for i, b in enumerate(model.block_order)}
    order = sorted(solution.host, key=lambda v: (-model.size[v], model.producer[v], v))
    order = [("host", v) for v in order] + [
        ("streamed", b) for b in sorted(solution.streamed - keep,
                                        key=lambda b: (-model.profile.block_weights.get(b, 0), position.get(b, -1), b))
    ]
    start = None  # what _without_block reads of the solution the trials start from
    for kind, name in order:
        host, streamed = solution.host, solution.streamed
        if kind == "host":
            if name not in host:
                continue
            host = host - {name}
        else:
            streamed = streamed - {name}
        trial = _RESOLVE
        if kind == "host" and _no_room(model, solution, host, budget_bytes, max_group):
            continue  # the re-solve would find no plan
        if kind == "host" and max_latency_s is None and _slower_unplaced(model, solution, host, budget_bytes, max_group):
            continue  # the re-solve would find no plan as fast
        if kind == "streamed" and max_latency_s is None and solution.method == "exact dynamic programming":
            if start is None or start.solution is not solution:
                start = _From(model, solution, budget_bytes, max_group)
            trial = _without_block(model, start, name, budget_bytes, max_group)
        if trial is _RESOLVE:
            try:
                trial = solve(model, budget_bytes, max_latency_s, "dp", max_group, host=host, streamed=streamed,
                              explain=False)
            except InfeasibleError:  # memory fits; the latency limit does not
                continue
        if trial is None:
            continue
        if trial.latency_s <= solution.latency_s * (1 + 1e-9):
            solution = trial
    return solution


_RESOLVE = object()  # _without_block cannot tell: solve

LAZY_UNPLACE = True  # False: every un-placement the room check leaves is re-solved (tests compare the two)


def _slower_unplaced(model: CostModel, solution: Solution, host: frozenset[str], budget_bytes: int,
                     max_group: int) -> bool:
    """True when the re-solve of :func:`prune`'s trial ``host`` (``solution.host`` less one value; the fastest
    plan) would be slower than the pruning accepts or find no plan, decided while costing few of the
    candidates whose span the dropped value touches (a re-solve costs all of them: most of a rows
    stage's pruning). Un-placing a value changes only those candidates; their seconds are never below
    their terms' sum (:meth:`.costs.CostModel.term_seconds`: the placement adds only host-link time), and
    their memory is unknown until costed. A shortest path with every unknown candidate at that bound and
    fitting is a lower bound on the re-solve's; the unknown candidates on it are costed exactly (the
    same memoised costs the re-solve reads) and the path found again, until it misses the pruning's
    tolerance (True) or holds known candidates only: then the re-solve decides (False)."""
    if not LAZY_UNPLACE or (host, solution.streamed, max_group) in model.__dict__.get("_solve_tables", {}):
        return False  # (a kept table: the re-solve is cheap)
    segs, needed, seconds = table(model, solution.host, solution.streamed, max_group)
    dropped = solution.host - host
    spans, of = _spans(model, max_group, segs)
    touched = {o for o, (a, b) in enumerate(spans) if not dropped.isdisjoint(model.relevant(Segment(a, b, 1)))}
    unknown = {i for i, o in enumerate(of) if o in touched}
    if not unknown:
        return False
    needed, seconds = list(needed), list(seconds)
    for i in unknown:
        needed[i], seconds[i] = -(1 << 62), model.term_seconds(segs[i])
    cap = budget_bytes + solution.streamed_weight_bytes
    present = _present_bytes(model, solution.streamed) if solution.streamed else None
    # the pruning accepts a trial at most this slow; 1e-12: the DP's per-unit tie tolerance (1e-15) summed
    limit = solution.latency_s * (1 + 1e-9) - solution.stream_exposed_s + 1e-12
    while True:
        found = _fastest(model, max_group, needed, cap, seconds)
        if found is None or found[0] > limit:
            return True
        open_ = [i for i in found[2] if i in unknown]
        if not open_:
            return False
        for i in open_:
            s = segs[i]
            c = model.cost(s, host)
            needed[i] = c.needed_bytes + (present(s.start, s.stop) if present else 0)
            seconds[i] = c.seconds
            unknown.discard(i)

ROOM_CHECKS = 2  # units _no_room looks at


def _no_room(model: CostModel, solution: Solution, host: frozenset[str], budget_bytes: int, max_group: int) -> bool:
    """True when, with ``host`` placed instead of ``solution.host`` (one value fewer), some unit has no
    candidate within the budget: no plan fits, which is what a re-solve would find after costing every
    segment the change touches (at tight budgets most of the pruning's un-placements). Only the candidates
    covering a unit of the tightest path segments the change touches are costed (the same memoised costs a
    re-solve reads); False when those do not decide it."""
    dropped = solution.host - host
    cap = budget_bytes + solution.streamed_weight_bytes
    present = _present_bytes(model, solution.streamed) if solution.streamed else (lambda a, b: 0)
    segs = model.segments(max_group)
    path_needed = solution.path[0] if solution.path is not None else [c.needed_bytes for c in solution.costs]
    touched = sorted(((b, seg) for seg, b in zip(solution.segments, path_needed, strict=True)
                      if not dropped.isdisjoint(model.relevant(seg))), key=lambda t: (-t[0], t[1].start))
    _, now, _ = table(model, solution.host, solution.streamed, max_group)
    cover = covering(model, max_group)
    for _, seg in touched[:ROOM_CHECKS]:
        candidates = sorted(cover[seg.start], key=now.__getitem__)  # the likeliest to fit first
        if all(model.cost(segs[j], host).needed_bytes + present(segs[j].start, segs[j].stop) > cap
               for j in candidates):
            return True
    return False


class _From:
    """What :func:`_without_block` reads of the solution a pruning's trials start from, computed once."""

    def __init__(self, model: CostModel, solution: Solution, budget_bytes: int, max_group: int):
        self.solution = solution
        _, self.needed, self.seconds = table(model, solution.host, solution.streamed, max_group)
        self.to, self.after = both_ways(model, self.needed, budget_bytes + solution.streamed_weight_bytes,
                                        self.seconds, max_group)
        where = _positions(model, max_group)
        self.at = [where[s] for s in solution.segments]
        # next_at[i]: position of the first streamed block at or after position i that is prefetched (None: none)
        order, gathered = model.block_order, model.profile.block_gathered
        self.next_at: list[int | None] = [None] * (len(order) + 1)
        for i in range(len(order) - 1, -1, -1):
            copied = order[i] in solution.streamed and order[i] not in gathered
            self.next_at[i] = i if copied else self.next_at[i + 1]


def _without_block(model: CostModel, start: _From, block: str, budget_bytes: int, max_group: int):
    """What :func:`prune`'s re-solve would give for ``start.solution`` (the fastest path at its placement
    and ``budget_bytes``) with ``block`` no longer streamed, where it can be had without a pass over every
    candidate; :data:`_RESOLVE` where it cannot, None where that re-solve would be rejected.

    Un-streaming a block takes its weights from the budget and its presence from the segments that touch or
    prefetch it (at most as many bytes: a gathered table's rows are within its weights), so no candidate
    gains room: the candidates that fit are a subset of the solution's. If its path still fits, the
    shortest path is that path (the same seconds, summed in the same order). If not, every path holds a
    candidate covering the first unit of each segment of the path that no longer fits; ``start.to`` and
    ``start.after`` (the fewest seconds to and from each unit among the solution's candidates) bound the
    fastest such path from below, and when that bound plus the exposed streaming already misses the
    pruning's tolerance the trial is rejected unsolved."""
    solution = start.solution
    streamed = solution.streamed - {block}
    credit = model.streamed_weight_bytes(streamed)
    cap = budget_bytes + credit
    spans, of = _spans(model, max_group, model.segments(max_group))
    starts, ends = _bounds(model, max_group)
    weights = model.present_weights
    position = model.block_order.index(block)
    gathered = block in model.profile.block_gathered
    after_block = start.next_at[position + 1]
    # prefetched instead of ``block`` by the segments that prefetch it: the next streamed block after it
    swap = weights.get(block, 0) - (weights.get(model.block_order[after_block], 0) if after_block is not None else 0)
    less: dict[int, int] = {}  # per span: the bytes present no longer

    def needed(i: int) -> int:
        o = of[i]
        d = less.get(o)
        if d is None:
            touched, last = model._touched(*spans[o])
            if block in touched:
                d = weights.get(block, 0)
            elif not gathered and start.next_at[last + 1] == position:
                d = swap
            else:
                d = 0
            less[o] = d
        return start.needed[i] - d

    at, seconds, to, after = start.at, start.seconds, start.to, start.after
    path_needed = [needed(i) for i in at]
    transfer, exposed = model.streaming_seconds(streamed)
    if all(b <= cap for b in path_needed):
        return Solution(solution.segments, _Costs(model, solution.segments, solution.host, streamed),
                        solution.method, solution.status, solution.gap, 0.0, solution.candidates, solution.host,
                        streamed, credit, transfer, exposed, (path_needed, [seconds[i] for i in at]))
    # 1e-12: the bound's sums are associated differently from a solve's (and a solve's ties allow 1e-15)
    limit = (solution.latency_s * (1 + 1e-9) - exposed) / (1 - 1e-12)
    cover = covering(model, max_group)
    for i, b in zip(at, path_needed, strict=True):
        if b <= cap:
            continue
        here = math.inf
        for j in cover[starts[i]]:
            v = to[starts[j]] + seconds[j] + after[ends[j]]
            if v < here and needed(j) <= cap:
                here = v
                if here <= limit:
                    break
        if here > limit:
            return None
    return _RESOLVE


def _infeasible(model: CostModel, bottom: Floor, budget_bytes: int) -> InfeasibleError:
    err = InfeasibleError(
        f"no plan fits: with every value that may leave the GPU in host memory and every block's weights "
        f"streamed, the smallest reachable peak needs {human_bytes(bottom.needed_bytes)} beyond context, "
        f"weights and margin (set by {bottom.describe(model)}), but only {human_bytes(budget_bytes)} is left. "
        f"Use a GPU with more memory, a smaller resolution or fewer frames."
    )
    err.min_needed_bytes, err.unit, err.budget_bytes, err.floor = bottom.needed_bytes, bottom.unit, budget_bytes, bottom
    return err
