"""Choose slice counts and groups: an ILP over segments (PuLP/CBC), with an exact fallback.

A plan is a path through the units cut into segments (see :mod:`.costs`). Binary ``y_s`` picks
segment ``s``; flow constraints make the chosen segments tile the units exactly once. Memory is
per segment, so the budget removes segments; latency adds up along the path.

- ``min_latency``: minimise the summed latency of segments that fit the budget.
- ``min_peak`` (a latency limit given): minimise ``P`` with ``P >= needed_s * y_s``.

Without PuLP's CBC the same problems are solved exactly by dynamic programming (a shortest path;
for ``min_peak`` a binary search over the candidate peaks). Both report the solver used.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from .costs import EMPTY, CostModel, Segment, SegmentCost
from .errors import InfeasibleError
from .fmt import human_bytes

log = logging.getLogger(__name__)


@dataclass
class Solution:
    segments: list[Segment]
    costs: list[SegmentCost]
    method: str
    status: str
    gap: float | None
    seconds: float
    candidates: int
    host: frozenset[str] = EMPTY  # values placed in host memory
    streamed: frozenset[str] = EMPTY  # blocks whose weights are streamed
    streamed_weight_bytes: int = 0  # weights off the device (the budget grows by as much)
    stream_transfer_s: float = 0.0  # per call: copying the streamed blocks in...
    stream_exposed_s: float = 0.0  # ...and the part of it not hidden behind compute
    # the path's needed bytes and seconds from the solve's table (the same numbers as ``costs``'), so that a
    # trial only compared by latency never builds its segments' costs; None: read ``costs``
    path: tuple[list[int], list[float]] | None = None

    @property
    def needed_bytes(self) -> int:
        return max(self.path[0]) if self.path is not None else max(c.needed_bytes for c in self.costs)

    @property
    def latency_s(self) -> float:
        """Per call: the segments (host-link time of placed values included) + exposed weight streaming."""
        seconds = self.path[1] if self.path is not None else [c.seconds for c in self.costs]
        return sum(seconds) + self.stream_exposed_s

    @property
    def transfer_s(self) -> float:
        """Per call: host-link seconds not hidden behind compute."""
        return sum(c.transfer_s for c in self.costs) + self.stream_exposed_s


class _Costs(Sequence):
    """A solution's segment costs, built on first use (most of the placement search's trials are only
    compared by latency, which the solve's table already has)."""

    def __init__(self, model: CostModel, segments: list[Segment], host: frozenset[str], streamed: frozenset[str]):
        # the model memoises its solutions: a strong reference back would make a cycle that keeps an evicted
        # model (and all it memoised) alive until a full garbage collection
        self._args, self._costs = (weakref.ref(model), segments, host, streamed), None

    def _built(self) -> list[SegmentCost]:
        if self._costs is None:
            model_ref, segments, host, streamed = self._args
            model = model_ref()
            if model is None:  # pragma: no cover - a solution is used while its planner holds the model
                raise RuntimeError("a solution's segment costs were asked for after its cost model was freed")
            self._costs = [model.cost(s, host, streamed) for s in segments]
        return self._costs

    def __getitem__(self, i):
        return self._built()[i]

    def __len__(self) -> int:
        return len(self._args[1])

    def __iter__(self):
        return iter(self._built())

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __reduce__(self):  # pickled (a worker process's result) as the plain list, without the cost model
        return list, (list(self),)


def solve(
    model: CostModel,
    budget_bytes: int,
    max_latency_s: float | None = None,
    method: str = "auto",
    max_group: int = 8,
    *,
    host: frozenset[str] = EMPTY,
    streamed: frozenset[str] = EMPTY,
    explain: bool = True,
) -> Solution | None:
    """The best plan for one placement: fastest within ``budget_bytes``, or, given ``max_latency_s``,
    the smallest peak that meets it (still within the budget). Raises :class:`InfeasibleError` with
    the smallest reachable peak and the unit that sets it.

    ``budget_bytes`` is what activations may use with every weight of the model on the device;
    streaming ``streamed`` blocks adds their bytes to it (and the blocks present to each segment).
    ``host``: values placed in host memory. :func:`.placement.search` chooses both.
    ``explain=False``: return None when nothing fits instead of finding the floor to say why (the
    placement search's trials only need to know)."""
    started = time.perf_counter()
    segs, needed, seconds = table(model, host, streamed, max_group)
    credit = model.streamed_weight_bytes(streamed)
    transfer, exposed = model.streaming_seconds(streamed)
    cap = budget_bytes + credit
    memo = None
    if max_latency_s is None and method == "dp":  # the placement search's trials: memoised per set of fitting segments
        memo = model.__dict__.setdefault("_solve_memo", {})
        mkey = (host, streamed, max_group, _rank(model, host, streamed, max_group, needed, cap))
        if mkey in memo:
            found = memo[mkey]
            if found is None and explain:
                raise _infeasible(model, segs, needed, cap, host)
            return found
    fastest = _fastest(model, max_group, needed, cap, seconds)
    if fastest is None:
        if memo is not None:
            _remember(memo, mkey, None)
        if not explain:
            return None
        raise _infeasible(model, segs, needed, cap, host)
    limit = None if max_latency_s is None else max_latency_s - exposed

    if method == "auto":
        method = "ilp" if _cbc_available() else "dp"
        if method == "dp":
            log.warning("PuLP's CBC solver is not available: using the exact dynamic-programming solver")
    at = None
    if limit is not None and limit <= 0:
        chosen, status, gap, name = None, "Infeasible", None, method
    elif method == "ilp" and limit is None and UNIQUE_SKIPS_CBC and _unique(model, max_group, needed, cap, seconds,
                                                                          fastest):
        chosen, status, gap, at = fastest[1], "Optimal", 0.0, fastest[2]
        name = UNIQUE_METHOD
    elif method == "ilp":
        fitting = [i for i, b in enumerate(needed) if b <= cap]
        chosen, status, gap = _ilp([segs[i] for i in fitting], {segs[i]: (needed[i], seconds[i]) for i in fitting},
                                   model.n, limit)
        name = "ILP (PuLP/CBC)"
    elif method == "dp":
        if limit is None:
            chosen, status, gap, at = fastest[1], "Optimal", 0.0, fastest[2]
        else:
            fitting = [i for i, b in enumerate(needed) if b <= cap]
            chosen, status, gap = _dp(segs, fitting, needed, seconds, model.n, limit, fastest[:2])
        name = "exact dynamic programming"
    else:
        raise ValueError(f"unknown method {method!r}: 'auto', 'ilp' or 'dp'")
    if chosen is None:
        best = fastest[0] + exposed
        raise InfeasibleError(
            f"no plan meets max_latency_s={max_latency_s:g}: the fastest plan within the budget takes "
            f"{best:.3f} s per UNet call. Raise the latency limit or give more memory."
        )
    if at is None:
        where = _positions(model, max_group)
        at = [where[s] for s in chosen]
    solution = Solution(
        chosen, _Costs(model, chosen, host, streamed), name, status, gap, time.perf_counter() - started,
        len(segs), host, streamed, credit, transfer, exposed, ([needed[i] for i in at], [seconds[i] for i in at]),
    )
    if memo is not None:
        _remember(memo, mkey, solution)
    return solution


# The fastest-path ILP has one optimum when every other path is slower by more than this (relative): CBC's
# tolerances are far tighter (and the flow LP's vertices are paths), so its answer is the DP's path.
UNIQUE_MARGIN = 1e-6
UNIQUE_SKIPS_CBC = True  # False: CBC solves every fastest-path ILP (tests compare the two)
UNIQUE_METHOD = "exact dynamic programming (the ILP's unique optimum)"


def _unique(model: CostModel, max_group: int, needed: list[int], cap: int, seconds: list[float], fastest) -> bool:
    """True when the fastest path within ``cap`` (``fastest``: :func:`_fastest`'s) beats every other path
    by more than :data:`UNIQUE_MARGIN`: the ILP's only optimum, so CBC would return that path. Every other
    path holds a candidate off it; the fastest through candidate ``i`` takes ``to[start] + seconds[i] +
    after[stop + 1]`` (:func:`both_ways`). Exact ties (two groupings of the same seconds) go to CBC, which
    picks among them its own way."""
    best, on = fastest[0], set(fastest[2])
    to, after = both_ways(model, needed, cap, seconds, max_group)
    starts, ends = _bounds(model, max_group)
    limit = best * (1 + UNIQUE_MARGIN) + 1e-12
    for i, b in enumerate(needed):
        if b <= cap and i not in on and to[starts[i]] + seconds[i] + after[ends[i]] <= limit:
            return False
    return True


SOLVES_KEPT = 8192  # memoised trial solves per cost model (a solution holds its path, not its costs, until asked)


def _remember(memo: dict, key, found) -> None:
    if len(memo) >= SOLVES_KEPT:
        memo.pop(next(iter(memo)))
    memo[key] = found


def _rank(model: CostModel, host, streamed, max_group: int, needed: list[int], cap: int) -> int:
    """How many distinct needed bytes of the table are within ``cap``: two caps of the same rank let the same
    segments fit, so a solve's answer is the same (memoised sorted values per table)."""
    cache = model.__dict__.setdefault("_solve_sorted", {})
    key = (host, streamed, max_group)
    values = cache.get(key)
    if values is None:
        if len(cache) >= TABLES_KEPT:
            cache.pop(next(iter(cache)))
        values = cache[key] = sorted(set(needed))
    return bisect.bisect_right(values, cap)


def _bounds(model: CostModel, max_group: int) -> tuple[list[int], list[int]]:
    """Each candidate's first unit and one past its last (memoised): what a shortest path reads."""
    key = ("_solve_bounds", max_group)
    found = model.__dict__.get(key)
    if found is None:
        segs = model.segments(max_group)
        found = model.__dict__[key] = ([s.start for s in segs], [s.stop + 1 for s in segs])
    return found


def _fastest(model: CostModel, max_group: int, needed: list[int], cap: int, seconds: list[float]):
    """``(seconds, path, indices)`` of the fastest path through the candidates within ``cap``, or None: the
    same path and seconds as :func:`_shortest` over the fitting candidates, in one pass over the table."""
    segs = model.segments(max_group)
    starts, ends = _bounds(model, max_group)
    n = model.n
    inf = math.inf
    value = [inf] * (n + 1)
    last = [-1] * (n + 1)
    value[0] = 0.0
    for i, b in enumerate(needed):
        if b > cap:
            continue
        here = value[starts[i]]
        if here == inf:
            continue
        v = here + seconds[i]
        j = ends[i]
        if v < value[j] - 1e-15:
            value[j], last[j] = v, i
    if value[n] == inf:
        return None
    at, j = [], n
    while j > 0:
        i = last[j]
        at.append(i)
        j = starts[i]
    at.reverse()
    return value[n], [segs[i] for i in at], at


def covering(model: CostModel, max_group: int) -> list[list[int]]:
    """For each unit, the candidates (indices into ``model.segments(max_group)``) whose span holds it: every
    path has exactly one of them (memoised)."""
    key = ("_solve_covering", max_group)
    found = model.__dict__.get(key)
    if found is None:
        found = [[] for _ in range(model.n)]
        for i, s in enumerate(model.segments(max_group)):
            for u in range(s.start, s.stop + 1):
                found[u].append(i)
        model.__dict__[key] = found
    return found


def both_ways(model: CostModel, needed: list[int], cap: int, seconds: list[float], max_group: int = 8
              ) -> tuple[list[float], list[float]]:
    """``(to, after)``: the fewest seconds from the first unit to each unit and from each unit past the last,
    through the candidates within ``cap`` (inf where none reaches): any path through a candidate ``i`` takes
    at least ``to[start] + seconds[i] + after[stop + 1]``, also among fewer candidates."""
    starts, ends = _bounds(model, max_group)
    n, inf = model.n, math.inf
    to, after = [inf] * (n + 1), [inf] * (n + 1)
    to[0], after[n] = 0.0, 0.0
    fitting = [i for i, b in enumerate(needed) if b <= cap]
    for i in fitting:  # by start
        v = to[starts[i]] + seconds[i]
        if v < to[ends[i]]:
            to[ends[i]] = v
    for i in reversed(fitting):  # a candidate's end is after its start: every later start is done
        v = after[ends[i]] + seconds[i]
        if v < after[starts[i]]:
            after[starts[i]] = v
    return to, after


def _positions(model: CostModel, max_group: int) -> dict[Segment, int]:
    """Each candidate's index in ``model.segments(max_group)`` (memoised)."""
    key = ("_solve_positions", max_group)
    found = model.__dict__.get(key)
    if found is None:
        found = model.__dict__[key] = {s: i for i, s in enumerate(model.segments(max_group))}
    return found


def table(model: CostModel, host: frozenset[str] = EMPTY, streamed: frozenset[str] = EMPTY, max_group: int = 8
          ) -> tuple[list[Segment], list[int], list[float]]:
    """Every candidate segment with its needed bytes and seconds for one placement: what a solve reads.

    Memoised per (placement, streamed set) on ``model``: a bisection over budgets, the placement
    search and its pruning re-solve the same placements many times, and a segment's cost never
    depends on the budget. Streamed weights present are added per (start, stop) of a segment (they do
    not depend on its slicing), which is what makes a table cheap to build."""
    cache = model.__dict__.setdefault("_solve_tables", {})
    key = (host, streamed, max_group)
    found = cache.get(key)
    if found is not None:
        return found
    if len(cache) >= TABLES_KEPT:
        cache.pop(next(iter(cache)))
    segs = model.segments(max_group)
    needed, seconds = _host_table(model, host, max_group, segs)
    if streamed:  # per span (a few hundred), then per candidate (thousands)
        present = _present_bytes(model, streamed)
        spans, of = _spans(model, max_group, segs)
        extra = [present(a, b) for a, b in spans]
        needed = [b + extra[o] for b, o in zip(needed, of, strict=True)]
    found = cache[key] = (segs, needed, seconds)
    return found


HOST_TABLES_KEPT = 64


def _spans(model: CostModel, max_group: int, segs) -> tuple[list[tuple[int, int]], list[int]]:
    """The distinct (start, stop) of the candidates and each candidate's index among them (memoised):
    a segment's relevant values depend on its span only."""
    key = ("_solve_spans", max_group)
    found = model.__dict__.get(key)
    if found is None:
        index: dict[tuple[int, int], int] = {}
        of = [index.setdefault((s.start, s.stop), len(index)) for s in segs]
        found = model.__dict__[key] = (list(index), of)
    return found


def _nearest(tables, host: frozenset[str]):
    """``(table, differing values)`` of the kept ``(placement, table)`` closest to ``host`` (the latest of
    equals), or None when none is kept. Deriving from any kept table is exact: a segment's cost depends
    only on the placed values relevant to it; the closest re-costs the fewest segments."""
    best = None
    for h, table_ in tables:
        diff = h ^ host
        if best is None or len(diff) <= len(best[1]):
            best = (table_, diff)
            if not diff:
                break
    return best


def _host_table(model: CostModel, host: frozenset[str], max_group: int, segs) -> tuple[list[int], list[float]]:
    """Needed bytes and seconds of every candidate with ``host`` placed (nothing streamed), memoised.

    A segment's cost depends only on the placed values relevant to its span, so a placement's table is
    derived from the kept one of the closest placement (:func:`_nearest`): it copies the entries of every segment whose
    span none of the differing values touches and costs only the others: the same numbers as
    costing every segment, without looking each one up."""
    cache = model.__dict__.setdefault("_host_tables", {})
    key = (host, max_group)
    found = cache.get(key)
    if found is not None:
        return found
    parent = _nearest(((h, t) for (h, g), t in cache.items() if g == max_group), host)
    if parent is not None:
        parent, diff = parent
    if parent is None:
        base = [model.cost(s, host) for s in segs]  # memoised per (segment, placement relevant to it)
        found = ([c.needed_bytes for c in base], [c.seconds for c in base])
    else:
        spans, of = _spans(model, max_group, segs)
        touched = [not diff.isdisjoint(model.relevant(Segment(a, b, 1))) for a, b in spans]
        needed, seconds = list(parent[0]), list(parent[1])
        for i, s in enumerate(segs):
            if touched[of[i]]:
                c = model.cost(s, host)
                needed[i], seconds[i] = c.needed_bytes, c.seconds
        found = (needed, seconds)
    if len(cache) >= HOST_TABLES_KEPT:
        cache.pop(next(iter(cache)))
    cache[key] = found
    return found


TABLES_KEPT = 96  # placements whose tables a cost model keeps (~200 KB each for ~3000 candidates)


MEMORY_TABLES_KEPT = 128  # placements whose needed-bytes tables a profile's Shared store keeps


def _memory_order(model: CostModel, max_group: int) -> list[int]:
    """Indices of the memory candidates (waves of one slice) in ``model.segments(max_group)``, by start
    (a stable sort: the order :func:`minimax` visits them)."""
    key = ("_memory_order", max_group)
    order = model.__dict__.get(key)
    if order is None:
        segs = model.segments(max_group)
        order = model.__dict__[key] = sorted((i for i, s in enumerate(segs) if s.depth == 1),
                                             key=lambda i: segs[i].start)
    return order


def memory_table(model: CostModel, host: frozenset[str] = EMPTY, max_group: int = 8) -> list[int]:
    """Needed bytes (nothing streamed) of the memory candidates (:func:`_memory_order`; 0 at the other
    indices of ``model.segments(max_group)``) with ``host`` placed: the same on every GPU, so kept in the
    profile's :class:`~.costs.Shared` store and derived, like :func:`_host_table`, from the kept table of the
    closest placement (only segments whose span the differing values touch are looked up)."""
    cache = model.shared.tables
    cut = getattr(model, "cut", None)  # a rehash cut's cost model has fewer candidates
    key = ("needed", host, max_group, cut)
    found = cache.get(key)
    if found is not None:
        return found
    segs = model.segments(max_group)
    order = _memory_order(model, max_group)
    parent = _nearest(((k[1], t) for k, t in cache.items()
                       if k[0] == "needed" and k[2] == max_group and k[3] == cut), host)
    if parent is not None:
        parent, diff = parent
    if parent is None:
        found = [0] * len(segs)
        for i in order:
            found[i] = model.needed(segs[i], host)
    else:
        spans, of = _spans(model, max_group, segs)
        touched = [not diff.isdisjoint(model.relevant(Segment(a, b, 1))) for a, b in spans]
        found = list(parent)
        for i in order:
            if touched[of[i]]:
                found[i] = model.needed(segs[i], host)
    tables = [k for k in cache if k[0] == "needed"]
    if len(tables) >= MEMORY_TABLES_KEPT:
        cache.pop(tables[0])
    cache[key] = found
    return found


def memory_minimax(model: CostModel, host: frozenset[str] = EMPTY, streamed: frozenset[str] = EMPTY,
                   max_group: int = 8) -> tuple[int, Segment, list[Segment]] | None:
    """:func:`minimax` over the memory candidates (waves of one slice) of ``needed - streamed credit``
    with ``host`` placed and ``streamed`` blocks streamed: the smallest reachable peak of a placement,
    what :func:`.placement.trajectory` and :func:`.placement.floor` walk. The same value, segment and
    path as ``minimax`` with a per-segment function (same order, same comparisons), from tables, and
    kept per placement in the profile's :class:`~.costs.Shared` store (the same on every GPU)."""
    cache = model.shared.tables
    cut = getattr(model, "cut", None)
    key = ("minimax", host, streamed, max_group, cut)
    if key in cache:
        return cache[key]
    segs = model.segments(max_group)
    needed = memory_table(model, host, max_group)
    credit = model.streamed_weight_bytes(streamed)
    spans, of = _spans(model, max_group, segs)
    if streamed:
        present = _present_bytes(model, streamed)
        extra = [present(a, b) - credit for a, b in spans]
    else:
        extra = [-credit] * len(spans)
    order = _memory_order(model, max_group)
    n = model.n
    best: list[tuple | None] = [None] * (n + 1)  # (peak, index of the worst, index of the last)
    best[0] = (-(2**62), -1, -1)
    for i in order:
        s = segs[i]
        here = best[s.start]
        if here is None:
            continue
        v = needed[i] + extra[of[i]]
        peak, worst = (v, i) if v >= here[0] else (here[0], here[1])
        end = best[s.stop + 1]
        if end is None or peak < end[0]:
            best[s.stop + 1] = (peak, worst, i)
    if best[n] is None:
        found = None
    else:
        path, j = [], n
        while j > 0:
            seg = segs[best[j][2]]
            path.append(seg)
            j = seg.start
        found = (best[n][0], segs[best[n][1]], path[::-1])
    minimaxes = [k for k in cache if k[0] == "minimax"]
    if len(minimaxes) >= 4 * MEMORY_TABLES_KEPT:
        cache.pop(minimaxes[0])
    cache[key] = found
    return found


def _present_bytes(model: CostModel, streamed: frozenset[str]):
    """``(start, stop) -> bytes`` of streamed weights on the device while a segment runs: the streamed
    blocks it touches and the next streamed block (prefetched), as :meth:`CostModel.present_blocks`."""
    order = model.block_order
    weights = model.present_weights
    after = [0] * (len(order) + 1)  # after[i]: weights of the first streamed block at index >= i
    for i in range(len(order) - 1, -1, -1):
        copied = order[i] in streamed and order[i] not in model.profile.block_gathered  # as present_blocks
        after[i] = weights.get(order[i], 0) if copied else after[i + 1]
    memo: dict[tuple[int, int], int] = {}

    def present(start: int, stop: int) -> int:
        key = (start, stop)
        found = memo.get(key)
        if found is None:
            touched, last = model._touched(start, stop)
            found = memo[key] = sum(weights.get(b, 0) for b in touched if b in streamed) + after[last + 1]
        return found

    return present


def _shortest(segs, allowed, seconds, n) -> tuple[float, list[Segment]] | None:
    """The fastest path over units ``0..n-1`` through the candidates ``allowed`` (indices into ``segs``,
    in the order of ``segs``: by start), and its seconds; None if they do not tile the units."""
    best = [None] * (n + 1)  # (seconds, index of the last segment)
    best[0] = (0.0, -1)
    for i in allowed:
        s = segs[i]
        here = best[s.start]
        if here is None:
            continue
        value = here[0] + seconds[i]
        j = s.stop + 1
        if best[j] is None or value < best[j][0] - 1e-15:
            best[j] = (value, i)
    if best[n] is None:
        return None
    path, j = [], n
    while j > 0:
        seg = segs[best[j][1]]
        path.append(seg)
        j = seg.start
    return best[n][0], path[::-1]


def _dp(segs, fitting, needed, seconds, n, max_latency_s, fastest=None):
    fastest = fastest or _shortest(segs, fitting, seconds, n)
    if max_latency_s is None:
        return fastest[1], "Optimal", 0.0
    if fastest[0] > max_latency_s:
        return None, "Infeasible", None
    # Smallest peak P whose segments still allow a path within the latency limit.
    peaks = sorted({needed[i] for i in fitting})
    lo, hi, best = 0, len(peaks) - 1, fastest[1]
    while lo <= hi:
        mid = (lo + hi) // 2
        found = _shortest(segs, [i for i in fitting if needed[i] <= peaks[mid]], seconds, n)
        if found is not None and found[0] <= max_latency_s:
            best, hi = found[1], mid - 1
        else:
            lo = mid + 1
    return best, "Optimal", 0.0


def _cbc(**options):
    """PuLP's bundled CBC. PuLP 3.3 marks PULP_CBC_CMD deprecated in favour of COIN_CMD with a
    separately installed CBC; the bundled one is what solves offline, so prefer COIN_CMD only
    where it is available."""
    import pulp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        coin = pulp.COIN_CMD(**options)
        if coin.available():
            return coin
        return pulp.PULP_CBC_CMD(**options)


def _cbc_available() -> bool:
    try:
        return bool(_cbc(msg=False).available())
    except Exception:  # noqa: BLE001 - any import/solver problem means: fall back
        return False


def _variable(prob, name: str, **kwargs):
    import pulp

    if hasattr(prob, "add_variable"):  # PuLP >= 3.3
        return prob.add_variable(name, **kwargs)
    return pulp.LpVariable(name, **kwargs)


def _ilp(segments, costs, n, max_latency_s):
    """``costs``: segment -> (needed bytes, seconds). The ``min_latency`` problem goes to CBC without a
    PuLP model (:mod:`.ilp_mps`: the same file, the same answer); ``min_peak`` through PuLP."""
    if max_latency_s is None and FAST_MPS and any(c[1] != 0 for c in costs.values()):
        from .ilp_mps import solve_min_latency  # (an empty objective: PuLP adds a dummy variable)

        chosen, status = solve_min_latency(segments, {s: c[1] for s, c in costs.items()}, n,
                                           _cbc(msg=False, gapRel=0.0, timeLimit=60))
        return (chosen, status, 0.0) if chosen is not None else (None, status, None)
    prob, y = _pulp_problem(segments, costs, n, max_latency_s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        prob.solve(_cbc(msg=False, gapRel=0.0, timeLimit=60))
    import pulp

    status = pulp.LpStatus[prob.status]
    if status != "Optimal":
        return None, status, None
    chosen = sorted((s for s, var in y.items() if var.value() > 0.5), key=lambda s: s.start)
    return chosen, status, 0.0


FAST_MPS = True  # False: every ILP through PuLP (tests compare the two)


def _pulp_problem(segments, costs, n, max_latency_s):
    """The PuLP model of :func:`_ilp` and its binaries per segment."""
    import pulp

    objective = "min_peak" if max_latency_s is not None else "min_latency"
    prob = pulp.LpProblem("vramplan", pulp.LpMinimize)
    y = {s: _variable(prob, f"y_{s.start}_{s.stop}_{s.k}_{s.depth}", cat="Binary") for s in segments}
    starts: dict[int, list] = {}
    ends: dict[int, list] = {}
    for s, var in y.items():
        starts.setdefault(s.start, []).append(var)
        ends.setdefault(s.stop + 1, []).append(var)
    prob += pulp.lpSum(starts.get(0, [])) == 1
    prob += pulp.lpSum(ends.get(n, [])) == 1
    for i in range(1, n):
        prob += pulp.lpSum(ends.get(i, [])) == pulp.lpSum(starts.get(i, []))
    latency = pulp.lpSum(costs[s][1] * var for s, var in y.items())
    if objective == "min_latency":
        prob += latency
    else:
        scale = 2**30
        peak = _variable(prob, "peak_gib", lowBound=0)
        for s, var in y.items():
            prob += peak >= (costs[s][0] / scale) * var
        prob += latency <= max_latency_s
        # Ties in peak are broken towards lower latency (a term far smaller than any peak step).
        prob += peak + 1e-9 * latency
    return prob, y


def min_needed(model: CostModel, max_group: int = 8) -> tuple[int, str]:
    """The smallest reachable needed-memory peak of ``model`` with every value that may be placed on
    host and every streamable block streamed, and the unit that sets it. Like a budget, it counts
    every weight as resident: streamed weights present are in it, all streamed weights are taken
    off (so it can be below the activations, even negative). :func:`.placement.floor` says more."""
    from .placement import floor

    found = floor(model, max_group)
    return found.needed_bytes, found.unit


def minimax(n: int, candidates, value) -> tuple[int, Segment, list[Segment]] | None:
    """The path of segments over units ``0..n-1`` whose largest ``value(segment)`` is smallest: that
    value, the segment that sets it and the path (ties: the first found). None if no path exists."""
    best: list[tuple[int, Segment | None, Segment | None] | None] = [None] * (n + 1)  # (peak, worst, last)
    best[0] = (-(2**62), None, None)
    for s in sorted(candidates, key=lambda s: s.start):
        here = best[s.start]
        if here is None:
            continue
        v = value(s)
        peak, worst = (v, s) if v >= here[0] else (here[0], here[1])
        if best[s.stop + 1] is None or peak < best[s.stop + 1][0]:
            best[s.stop + 1] = (peak, worst, s)
    if best[n] is None:
        return None
    path, i = [], n
    while i > 0:
        seg = best[i][2]
        path.append(seg)
        i = seg.start
    return best[n][0], best[n][1], path[::-1]


def _infeasible(model: CostModel, segs, needed, budget_bytes, host=EMPTY) -> InfeasibleError:
    # Minimax path: the smallest reachable peak, and the segment that sets it (memoised per table).
    cache = model.__dict__.setdefault("_solve_floors", {})
    key = id(needed)  # tables are kept while the model lives; a table's needed list is never rebuilt
    if key not in cache or cache[key][0] is not needed:
        if len(cache) >= TABLES_KEPT:
            cache.clear()
        value = dict(zip(segs, needed, strict=True))
        cache[key] = (needed, *minimax(model.n, segs, value.__getitem__)[:2])
    _, floor, seg = cache[key]
    unit = model.units[model.cost(seg, host).peak_unit].name
    err = InfeasibleError(
        f"no plan fits: the smallest reachable activation peak is {human_bytes(floor)} "
        f"(set by {unit}, even at its largest profiled slice count), but only {human_bytes(budget_bytes)} "
        f"is left for activations after context, weights and margin. Use a GPU with more memory, "
        f"a smaller resolution or fewer frames.",
    )
    err.min_needed_bytes, err.unit, err.budget_bytes = floor, unit, budget_bytes
    return err
