"""Pinned host memory as a constraint where plans are chosen, not only a check on the plan chosen. No torch.

A stage's search (:func:`.placement.search`) picks the fastest plan within the GPU's budget; it may place
values and stream blocks' weights in pinned host memory (more than it must, when streaming more pays).
When a residency's plan needs more pinned host memory than the budget (``host_ram_bytes``: every
streamed block, held all run, plus the largest stage's placed values), :func:`within_host` gives back
host memory step by step instead of dropping the residency: it un-places one value or un-streams one
block (the forced blocks an unsliced stage needs stay streamed) at a time, keeping the GPU budget and
the latency limit, choosing the step that costs the least time per pinned byte saved, until the run
fits the host budget or no step helps. A plan over the host budget is therefore chosen only when no
plan reachable this way fits it (then the error names pinned host memory).
"""

from __future__ import annotations

from .placement import forced_streaming, host_bytes
from .solve import Solution, solve


def stage_host(model, solution: Solution) -> tuple[int, int]:
    """(placed, streamed): pinned host bytes of a stage's placed values at most at once, and of its blocks."""
    return host_bytes(model, solution.host, solution.segments), solution.streamed_weight_bytes


def run_host(parts: dict[str, tuple[int, int]]) -> int:
    """Pinned host memory of a run: every stage's streamed blocks plus the largest stage's placed values."""
    return max((p for p, _ in parts.values()), default=0) + sum(s for _, s in parts.values())


def _steps(model, solution: Solution, budget: int, keep: frozenset[str]):
    """Every solution one step away with less placed or streamed (None where nothing fits)."""
    for v in sorted(solution.host):
        yield solve(model, budget, None, "dp", host=solution.host - {v}, streamed=solution.streamed, explain=False)
    for b in sorted(solution.streamed - keep):
        yield solve(model, budget, None, "dp", host=solution.host, streamed=solution.streamed - {b}, explain=False)


def model_within_host(model, solution: Solution, budget: int, host_ram_bytes: int,
                      max_latency_s: float | None = None, max_steps: int = 256) -> Solution | None:
    """One model's ``solution`` changed step by step (as :func:`within_host`) until its pinned host memory
    fits ``host_ram_bytes``, within the GPU ``budget`` and ``max_latency_s`` per call; None if it cannot."""
    current = solution
    for _ in range(max_steps):
        have = sum(stage_host(model, current))
        if have <= host_ram_bytes:
            return current
        best = None
        for trial in _steps(model, current, budget, frozenset()):
            if trial is None or (max_latency_s is not None and trial.latency_s > max_latency_s):
                continue
            saved = have - sum(stage_host(model, trial))
            if saved > 0:
                score = (max(0.0, trial.latency_s - current.latency_s) / saved, -saved)
                if best is None or score < best[0]:
                    best = (score, trial)
        if best is None:
            return None
        current = best[1]
    return None


def within_host(planner, resident: dict[str, bool], solutions: dict[str, Solution], cap: int,
                max_steps: int = 256):
    """``planner.results`` for ``solutions`` changed to fit ``planner.host_ram_bytes`` (see the module
    docstring), or None when no sequence of steps gets there. ``solutions`` is updated in place."""
    limit = min(cap, planner.usable)
    stages = {s.stage: s for s in planner.profile.stages if s.stage in solutions}
    budgets, keeps = {}, {}
    for name, stage in stages.items():  # as PipelinePlanner.evaluate gives each stage's search
        budgets[name] = limit - planner._base(stage, resident, {})
        need = max((int(other.activation_bytes * planner._factor()) + planner._base(other, resident, {}) - limit
                    for other in planner.profile.stages
                    if other.component == stage.component and other.profile is None), default=0)
        keeps[name] = forced_streaming(planner.models[name], need)
    memo = planner.__dict__.setdefault("_within_host", {})
    key = (tuple(resident.items()), tuple((n, budgets[n], keeps[n], id(solutions[n])) for n in stages))
    if key in memo:  # a bisection over the budget asks again with the same stage solutions
        found = memo[key]
        if found is None:
            return None
        solutions.update(found)
        return planner.results(resident, solutions, cap)
    memo[key] = None
    kept = dict(solutions)  # the cache keys above hold these objects' ids
    memo[("ids", key)] = kept
    parts = {name: stage_host(planner.models[name], solutions[name]) for name in stages}
    for _ in range(max_steps):
        if run_host(parts) <= planner.host_ram_bytes:
            memo[key] = {n: solutions[n] for n in stages}
            return planner.results(resident, solutions, cap)
        best = None
        total = run_host(parts)
        for name in stages:
            model, current = planner.models[name], solutions[name]
            for trial in _steps(model, current, budgets[name], keeps[name]):
                if trial is None:
                    continue
                part = stage_host(model, trial)
                saved = total - run_host({**parts, name: part})
                if saved <= 0:
                    continue
                score = (max(0.0, trial.latency_s - current.latency_s) * planner.calls(stages[name]) / saved, -saved)
                if best is None or score < best[0]:
                    best = (score, name, trial, part)
        if best is None:
            return None
        _, name, trial, part = best
        solutions[name], parts[name] = trial, part
    return None
