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


def _give_back(models: dict, solutions: dict[str, Solution], budgets: dict[str, int], keeps: dict,
               weights: dict[str, int], host_ram_bytes: int, max_latency_s: float | None = None,
               max_steps: int = 256) -> dict[str, Solution] | None:
    """``solutions`` (name -> a stage's or model's plan) changed one step at a time, the step that costs
    the least time (per call x ``weights``: the calls of a run) per pinned byte saved, until
    :func:`run_host` fits ``host_ram_bytes``; each within its GPU budget (and ``max_latency_s`` per
    call). None when no sequence of steps gets there."""
    solutions = dict(solutions)
    parts = {n: stage_host(models[n], solutions[n]) for n in solutions}
    for _ in range(max_steps):
        total = run_host(parts)
        if total <= host_ram_bytes:
            return solutions
        best = None
        for name, current in solutions.items():
            for trial in _steps(models[name], current, budgets[name], keeps[name]):
                if trial is None or (max_latency_s is not None and trial.latency_s > max_latency_s):
                    continue
                part = stage_host(models[name], trial)
                saved = total - run_host({**parts, name: part})
                if saved <= 0:
                    continue
                score = (max(0.0, trial.latency_s - current.latency_s) * weights[name] / saved, -saved)
                if best is None or score < best[0]:
                    best = (score, name, trial, part)
        if best is None:
            return None
        _, name, trial, part = best
        solutions[name], parts[name] = trial, part
    return None


def model_within_host(model, solution: Solution, budget: int, host_ram_bytes: int,
                      max_latency_s: float | None = None, max_steps: int = 256) -> Solution | None:
    """One model's ``solution`` changed step by step (as :func:`within_host`) until its pinned host memory
    fits ``host_ram_bytes``, within the GPU ``budget`` and ``max_latency_s`` per call; None if it cannot."""
    found = _give_back({"m": model}, {"m": solution}, {"m": budget}, {"m": frozenset()}, {"m": 1},
                       host_ram_bytes, max_latency_s, max_steps)
    return None if found is None else found["m"]


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
    found = _give_back(planner.models, {n: solutions[n] for n in stages}, budgets, keeps,
                       {n: planner.calls(stages[n]) for n in stages}, planner.host_ram_bytes, max_steps=max_steps)
    if found is None:
        return None
    memo[key] = found
    solutions.update(found)
    return planner.results(resident, solutions, cap)
