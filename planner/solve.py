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

import logging
import time
import warnings
from dataclasses import dataclass

from .costs import CostModel, Segment, SegmentCost
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

    @property
    def needed_bytes(self) -> int:
        return max(c.needed_bytes for c in self.costs)

    @property
    def latency_s(self) -> float:
        return sum(c.seconds for c in self.costs)


def solve(
    model: CostModel,
    budget_bytes: int,
    max_latency_s: float | None = None,
    method: str = "auto",
    max_group: int = 8,
) -> Solution:
    """The best plan: fastest within ``budget_bytes``, or, given ``max_latency_s``, the smallest
    peak that meets it (still within the budget). Raises :class:`InfeasibleError` with the
    smallest reachable peak and the unit that sets it."""
    started = time.perf_counter()
    candidates = model.segments(max_group)
    costs = {s: model.cost(s) for s in candidates}
    fitting = [s for s in candidates if costs[s].needed_bytes <= budget_bytes]
    if not _covers(fitting, model.n):
        raise _infeasible(model, candidates, costs, budget_bytes)

    if method == "auto":
        method = "ilp" if _cbc_available() else "dp"
        if method == "dp":
            log.warning("PuLP's CBC solver is not available: using the exact dynamic-programming solver")
    if method == "ilp":
        chosen, status, gap = _ilp(fitting, costs, model.n, max_latency_s)
        name = "ILP (PuLP/CBC)"
    elif method == "dp":
        chosen, status, gap = _dp(fitting, costs, model.n, max_latency_s)
        name = "exact dynamic programming"
    else:
        raise ValueError(f"unknown method {method!r}: 'auto', 'ilp' or 'dp'")
    if chosen is None:
        fastest, _, _ = _dp(fitting, costs, model.n, None)
        best = sum(costs[s].seconds for s in fastest)
        raise InfeasibleError(
            f"no plan meets max_latency_s={max_latency_s:g}: the fastest plan within the budget takes "
            f"{best:.3f} s per UNet call. Raise the latency limit or give more memory."
        )
    return Solution(
        chosen, [costs[s] for s in chosen], name, status, gap, time.perf_counter() - started, len(candidates)
    )


def _covers(segments: list[Segment], n: int) -> bool:
    reach = [False] * (n + 1)
    reach[0] = True
    for s in sorted(segments, key=lambda s: s.start):
        if reach[s.start]:
            reach[s.stop + 1] = True
    return reach[n]


def _shortest(segments, costs, n, weight) -> tuple[float, list[Segment]] | None:
    best: list[tuple[float, list[Segment]] | None] = [None] * (n + 1)
    best[0] = (0.0, [])
    by_start: dict[int, list[Segment]] = {}
    for s in segments:
        by_start.setdefault(s.start, []).append(s)
    for i in range(n):
        if best[i] is None:
            continue
        base, path = best[i]
        for s in by_start.get(i, []):
            value = base + weight(s)
            j = s.stop + 1
            if best[j] is None or value < best[j][0] - 1e-15:
                best[j] = (value, path + [s])
    return best[n]


def _dp(segments, costs, n, max_latency_s):
    fastest = _shortest(segments, costs, n, lambda s: costs[s].seconds)
    if max_latency_s is None:
        return fastest[1], "Optimal", 0.0
    if fastest[0] > max_latency_s:
        return None, "Infeasible", None
    # Smallest peak P whose segments still allow a path within the latency limit.
    peaks = sorted({costs[s].needed_bytes for s in segments})
    lo, hi, best = 0, len(peaks) - 1, fastest[1]
    while lo <= hi:
        mid = (lo + hi) // 2
        allowed = [s for s in segments if costs[s].needed_bytes <= peaks[mid]]
        found = _shortest(allowed, costs, n, lambda s: costs[s].seconds) if _covers(allowed, n) else None
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
    import pulp

    objective = "min_peak" if max_latency_s is not None else "min_latency"
    prob = pulp.LpProblem("vramplan", pulp.LpMinimize)
    y = {s: _variable(prob, f"y_{s.start}_{s.stop}_{s.k}", cat="Binary") for s in segments}
    starts: dict[int, list] = {}
    ends: dict[int, list] = {}
    for s, var in y.items():
        starts.setdefault(s.start, []).append(var)
        ends.setdefault(s.stop + 1, []).append(var)
    prob += pulp.lpSum(starts.get(0, [])) == 1
    prob += pulp.lpSum(ends.get(n, [])) == 1
    for i in range(1, n):
        prob += pulp.lpSum(ends.get(i, [])) == pulp.lpSum(starts.get(i, []))
    latency = pulp.lpSum(costs[s].seconds * var for s, var in y.items())
    if objective == "min_latency":
        prob += latency
    else:
        scale = 2**30
        peak = _variable(prob, "peak_gib", lowBound=0)
        for s, var in y.items():
            prob += peak >= (costs[s].needed_bytes / scale) * var
        prob += latency <= max_latency_s
        # Ties in peak are broken towards lower latency (a term far smaller than any peak step).
        prob += peak + 1e-9 * latency
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        prob.solve(_cbc(msg=False, gapRel=0.0, timeLimit=60))
    status = pulp.LpStatus[prob.status]
    if status != "Optimal":
        return None, status, None
    chosen = sorted((s for s, var in y.items() if var.value() > 0.5), key=lambda s: s.start)
    return chosen, status, 0.0


def min_needed(model: CostModel, max_group: int = 8) -> tuple[int, str]:
    """The smallest reachable needed-memory peak of ``model`` and the unit that sets it."""
    candidates = model.segments(max_group)
    err = _infeasible(model, candidates, {s: model.cost(s) for s in candidates}, 0)
    return err.min_needed_bytes, err.unit


def _infeasible(model: CostModel, candidates, costs, budget_bytes) -> InfeasibleError:
    # Minimax path: the smallest reachable peak, and the segment that sets it.
    best: list[tuple[int, Segment | None] | None] = [None] * (model.n + 1)
    best[0] = (0, None)
    for s in sorted(candidates, key=lambda s: s.start):
        if best[s.start] is None:
            continue
        value = max(best[s.start][0], costs[s].needed_bytes)
        worst = s if costs[s].needed_bytes >= best[s.start][0] else best[s.start][1]
        if best[s.stop + 1] is None or value < best[s.stop + 1][0]:
            best[s.stop + 1] = (value, worst)
    floor, seg = best[model.n]
    unit = model.units[costs[seg].peak_unit].name
    err = InfeasibleError(
        f"no plan fits: the smallest reachable activation peak is {human_bytes(floor)} "
        f"(set by {unit}, even at its largest profiled slice count), but only {human_bytes(budget_bytes)} "
        f"is left for activations after context, weights and margin. Use a GPU with more memory, "
        f"a smaller resolution or fewer frames.",
    )
    err.min_needed_bytes, err.unit, err.budget_bytes = floor, unit, budget_bytes
    return err
