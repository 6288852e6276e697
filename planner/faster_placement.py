"""Placing more values in host memory than the budget needs, when that makes the plan faster. No torch.

:func:`.placement.search` places values only when the plan without them does not fit. Where a sliced
plan fits without them, it may still be slower than one that moves a few large values to pinned host
memory: a value that stays on the GPU takes room the slicing could use (a rows group of a VAE's up
levels fits by holding every frame of its intermediate levels in each slice; with the values between
levels on host each level runs in its own, coarser slices). :func:`faster_placement` tries that, as
:func:`.placement._faster_streaming` does for weights: the fastest path with every placeable value a
sliced segment holds placed, then only the values that path leaves behind a segment boundary (a
second solve), kept when it saves at least :data:`MORE_PLACEMENT_GAIN` of the call. More pinned host
memory: a plan with a host budget gives it back step by step (:mod:`.host_budget`).

Bounded: at most two memoised solves, and only when the plan is sliced, the gain could pay (the plan
is that much slower than with memory for everything) and some sliced segment holds a placeable value
not yet placed. No pruning (:func:`.placement.prune`'s one-value-at-a-time trials re-cost every rows
group they touch: on the shipped SVD profiles' rows encodes it doubled planning time for plans within
0.1 % of these).
"""

from __future__ import annotations

from .costs import CostModel
from .errors import InfeasibleError
from .solve import Solution, _cbc_available, _present_bytes, solve

# Placing more than the budget needs costs pinned host memory (which has its own budget) and host-link
# copies: taken only when it saves at least this fraction of the call's time.
MORE_PLACEMENT_GAIN = 0.01


def candidates(model: CostModel, solution: Solution) -> frozenset[str]:
    """Placeable values not yet placed that some sliced segment of ``solution`` holds or makes."""
    placeable = frozenset(model.placeable) - solution.host
    if not placeable:
        return placeable
    held: set[str] = set()
    for seg in solution.segments:
        if seg.k > 1 and min(seg.k, max(model.units[j].axis_length for j in range(seg.start, seg.stop + 1))) > 1:
            held |= model.relevant(seg)
    return placeable & held


def faster_placement(model: CostModel, solution: Solution, budget_bytes: int, max_latency_s: float | None,
                     method: str, max_group: int, min_gain_s: float = 0.0) -> Solution:
    """``solution``, or a faster one with more values in host memory (see the module docstring), solved
    again by ``method`` ('ilp', or 'auto' with CBC available: the ILP, as the placement search ends)
    when it changed. The streamed blocks stay as they are. ``min_gain_s``: the least saving per call worth
    the pinned memory besides :data:`MORE_PLACEMENT_GAIN` of the call (a pipeline asks for a share of the
    whole run, so a stage that is a sliver of it does not pin gigabytes for a second)."""
    from .placement import _unbounded_seconds

    if max_latency_s is not None:
        return solution
    more = candidates(model, solution)
    if not more:
        return solution

    def pays(seconds: float) -> bool:
        return seconds < min(solution.latency_s * (1 - MORE_PLACEMENT_GAIN), solution.latency_s - min_gain_s)

    if not pays(_unbounded_seconds(model, max_group)):
        return solution  # no plan is faster than with memory for everything: the gain cannot pay
    try:
        trial = solve(model, budget_bytes, None, "dp", max_group, host=solution.host | more,
                      streamed=solution.streamed, explain=False)
    except InfeasibleError:
        return solution
    if trial is None or not pays(trial.latency_s):
        return solution
    host = _needed_on_path(model, trial, budget_bytes)
    if host != trial.host:
        trial = solve(model, budget_bytes, None, "dp", max_group, host=host, streamed=trial.streamed, explain=False)
    if trial is None or not pays(trial.latency_s):
        return solution
    if method == "ilp" or (method == "auto" and _cbc_available()):
        trial = solve(model, budget_bytes, None, "ilp", max_group, host=trial.host, streamed=trial.streamed)
    return trial


def _needed_on_path(model: CostModel, trial: Solution, budget_bytes: int) -> frozenset[str]:
    """The values of ``trial.host`` its path needs placed: those it leaves behind a segment boundary, less
    each (largest first) without which every segment of the path still fits (the same path without that
    value's copies is then a faster plan). Costs only the path's segments (memoised), where
    :func:`.placement.prune` re-solves per value (every candidate segment the value touches)."""
    from .placement import crossing

    host = crossing(model, trial.segments, trial.host)
    cap = budget_bytes + trial.streamed_weight_bytes
    present = _present_bytes(model, trial.streamed) if trial.streamed else None

    def fits(placed: frozenset[str]) -> bool:
        return all(model.cost(s, placed).needed_bytes + (present(s.start, s.stop) if present else 0) <= cap
                   for s in trial.segments)

    for v in sorted(host, key=lambda v: (-model.size[v], model.producer[v], v)):  # ties in program order
        if fits(host - {v}):
            host = host - {v}
    return host
