"""Lower bounds on what a sliced stage's search can return, cheap enough to skip searches that cannot win. No torch.

:func:`.placement.search` at a budget returns a plan no faster than the shortest path through the
candidates of a *relaxation*: every candidate at its seconds with nothing placed or streamed (placing a
value adds host-link seconds to a segment's own, streaming adds exposed copy time; the segment's
compute terms are the same), allowed when it fits the budget with every placeable value on host and
every block streamed (the floor's placement: placing or streaming more never raises a segment's need
beyond the credit it gives). A depth-``d`` candidate is allowed with its depth-1 twin (depth only adds
memory). The bound falls as the budget grows and is exact where the fastest path fits.

Whole-pipeline planning uses it to skip a residency whose stages cannot meet a latency limit (or beat a
plan already found) before searching the expensive stage (a decode along rows), and to skip a stage
alternative that cannot win (:mod:`.alternatives`).
"""

from __future__ import annotations

import bisect
import math

from .costs import EMPTY, CostModel, Segment
from .solve import _bounds, _present_bytes, _spans, memory_table, table

# Relative slack for sums taken in another order than the solve's (a bound is only used to skip).
SLACK = 1e-9


class _Relaxed:
    """A model's relaxation, built once per cost model: each candidate's need (floor placement, depth-1
    twin) and seconds (nothing placed), the distinct needs sorted, and the bound per rank memoised."""

    def __init__(self, model: CostModel, max_group: int):
        segs = model.segments(max_group)
        _, _, seconds = table(model, EMPTY, EMPTY, max_group)
        host, streamed = frozenset(model.placeable), frozenset(model.streamable)
        mem = memory_table(model, host, max_group)  # depth-1 candidates only
        index = {s: i for i, s in enumerate(segs)}
        credit = model.streamed_weight_bytes(streamed)
        present = _present_bytes(model, streamed) if streamed else (lambda a, b: 0)
        spans, of = _spans(model, max_group, segs)
        extra = [present(a, b) - credit for a, b in spans]
        placeable = frozenset(model.placeable)
        size, rate = model.size, model.link_bytes_per_s
        need, link_need, link, per_byte = [], [], [], []
        for i, s in enumerate(segs):
            # without a placed value the segment reads or writes (its core): the others placed only lower its
            # entry, at no host-link time; with one, at least that value crosses the host link once
            core = model._core(s) & placeable
            c = model.cost(s, EMPTY)
            d = sum(size[v] for v in (model.relevant(s) & placeable) - core)
            factor = max(1.0, model.allocator_factor(s.k))
            link_need.append(int((c.activation_bytes - d) * model.allocator_factor(s.k)) + extra[of[i]])
            link.append(min((size[v] for v in core), default=math.inf) / rate)
            per_byte.append(1 / (factor * rate))
            # everything placed is not always the least (a unit reading a dying input whole stages it in full):
            # placing a value lowers a state by at most its bytes (x the allocator factor)
            twin = i if s.depth == 1 else index[Segment(s.start, s.stop, s.k)]
            least = math.floor(link_need[-1] - sum(size[v] for v in core) * factor) - len(core) - 1
            need.append(min(mem[twin] + extra[of[i]], least))
        self.need, self.seconds, self.link_need, self.link = need, seconds, link_need, link
        self.per_byte = per_byte
        self.levels = sorted(set(need) | set(link_need))  # (between two, a solve's answer is the same)
        self.starts, self.ends = _bounds(model, max_group)
        self.n = model.n
        self.memo: dict[int, float] = {}

    def at(self, budget: int) -> float:
        """The bound at every budget from the last level at most ``budget`` to the next (memoised): the
        candidates within the one, host-link time charged for what is over the other (no more than over
        ``budget``)."""
        rank = bisect.bisect_right(self.levels, budget)
        found = self.memo.get(rank)
        if found is None:
            levels = self.levels
            found = self.memo[rank] = self._shortest(levels[rank - 1] if rank else -math.inf,
                                                     levels[rank] if rank < len(levels) else math.inf)
        return found

    def _shortest(self, cap, above) -> float:
        value = [math.inf] * (self.n + 1)
        value[0] = 0.0
        starts, ends, seconds, link_need, link = self.starts, self.ends, self.seconds, self.link_need, self.link
        per_byte = self.per_byte
        for i, b in enumerate(self.need):  # candidates by start: every start is final when read
            if b > cap:
                continue
            over = link_need[i] - above
            # placing a value lowers a state by at most its bytes (x the allocator factor): the values placed
            # must add up to what is over, and each crosses the host link
            v = value[starts[i]] + (seconds[i] if over <= 0 else seconds[i] + max(link[i], (over - 1) * per_byte[i]))
            if v < value[ends[i]]:
                value[ends[i]] = v
        return value[self.n]


def unbounded(model: CostModel, max_group: int = 8) -> float:
    """Per call: no plan of ``model`` at any budget is faster than this (the fastest path with nothing placed or
    streamed and memory for everything), up to :data:`SLACK`. Reads only the table of seconds the search's
    first solve reads (no table of needs with everything placed)."""
    key = ("_unbounded_bound", max_group)
    found = model.__dict__.get(key)
    if found is None:
        _, _, seconds = table(model, EMPTY, EMPTY, max_group)
        starts, ends = _bounds(model, max_group)
        value = [math.inf] * (model.n + 1)
        value[0] = 0.0
        for i, t in enumerate(seconds):
            v = value[starts[i]] + t
            if v < value[ends[i]]:
                value[ends[i]] = v
        found = model.__dict__[key] = value[model.n] * (1 - SLACK)
    return found


def seconds_bound(model: CostModel, budget_bytes: int, max_group: int = 8) -> float:
    """Per call: no plan :func:`.placement.search` returns for ``model`` within ``budget_bytes`` (every weight
    counted resident, as the search's budget) is faster than this (inf: none fits), up to :data:`SLACK`."""
    key = ("_relaxed", max_group)
    relaxed = model.__dict__.get(key)
    if relaxed is None:
        relaxed = model.__dict__[key] = _Relaxed(model, max_group)
    return relaxed.at(budget_bytes) * (1 - SLACK)
