"""Step Rehash's joint search (torch-free): cut, key count and schedule chosen together by predicted quality.

Per calibrated cut and per key count, three families of key steps: **uniform** (evenly spaced; only
an every-N-th-step schedule is DeepCache's), **greedy** (the paper's Algorithm 1 at the highest
similarity threshold that gives that count) and **optimal** (the schedule the quality predictor
rates best: an exact DP over "key a, next key b" arcs, for every key count at once). Each candidate
is priced (UNet work of all steps, in seconds or FLOPs: ``keys`` full calls plus the rest reuse calls
at its cut) and rated (:class:`~.rehash_quality.QualityModel`). The planner takes the best predicted
quality within the work budget, or, given a quality floor, the least work that reaches it; the
Pareto frontier over all candidates is what ``vramplan calibrate --frontier`` shows.

A "cut" here is any reuse option with a price: a UNet feature cut, a DiT residual cut, or per-step CFG
reuse (``cfg``, ``cfg+<residual cut>``, priced per model call as the mean of a reuse step's two calls),
offered where the calibration measured two calls per step (``plan_rehash``, ``with_rehash``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InfeasibleError
from .rehash_quality import QualityModel

KINDS = ("uniform", "greedy", "optimal")


class QualityFloorError(InfeasibleError):
    """No schedule within the limits reaches the asked-for predicted PSNR."""


@dataclass(frozen=True)
class Candidate:
    """One (cut, key steps) schedule, priced and rated."""

    cut: str
    keys: tuple[int, ...]
    kind: str  # uniform | greedy | optimal
    cost: float  # UNet work of all steps (the unit of the prices given: seconds or FLOPs)
    error: float  # predicted L2 error of the final latent (finite)
    psnr: float | None  # predicted PSNR against the full run, dB (None: the calibration cannot say)
    threshold: float | None = None  # greedy: the similarity threshold

    @property
    def name(self) -> str:
        return schedule_name(self.kind, self.keys, self.threshold)

    @property
    def quality(self) -> float:
        """Higher is better: the predicted PSNR, else minus the predicted error."""
        return self.psnr if self.psnr is not None else -self.error


def schedule_name(kind: str, keys, threshold: float | None = None) -> str:
    """An honest name: 'DeepCache's schedule' only for key steps every N-th step from step 0."""
    keys = list(keys)
    n = len(keys)
    if kind == "uniform":
        step = keys[1] - keys[0] if n > 1 else None
        if step is not None and keys == list(range(0, keys[-1] + 1, step)):
            return f"uniform, every {_nth(step)} step (DeepCache's schedule)"
        if n == 1:
            return "one key step (step 0)"
        return f"uniform, {n} evenly spaced key steps (not DeepCache's: uneven intervals)"
    if kind == "greedy":
        shown = f", similarity threshold {threshold:.4g}" if threshold is not None and math.isfinite(threshold) else ""
        return f"greedy (the paper's Algorithm 1{shown})"
    if kind == "optimal":
        return "optimal (best predicted quality for its key count)"
    return kind


def _nth(k: int) -> str:
    return {1: "", 2: "2nd", 3: "3rd"}.get(k, f"{k}th") if k > 1 else "single"


def candidates(model: QualityModel, reuse_at: dict[str, float], full: float, *,
               kinds=KINDS, max_keys: int | None = None, threshold: float | None = None) -> list[Candidate]:
    """Every schedule of ``kinds`` at every cut of ``reuse_at`` (the cost of one reuse call there; ``full``:
    one full call) with at most ``max_keys`` key steps and at least one reused step; duplicates (same cut and keys) kept once, the
    first kind of ``kinds`` naming them. ``threshold`` fixes the greedy schedule's threshold."""
    from .rehash import greedy_keys, uniform_keys

    steps = model.cal.steps
    top = steps - 1 if max_keys is None else max(1, min(max_keys, steps - 1))  # a schedule reuses some step
    seen: dict[tuple[str, tuple[int, ...]], Candidate] = {}
    for cut, reuse in reuse_at.items():
        if reuse >= full:
            continue
        entry = model.cal.cut(cut)
        found: list[tuple[str, list[int], float | None]] = []
        for kind in kinds:
            if kind == "uniform":
                found += [("uniform", uniform_keys(steps, keys=n), None) for n in range(1, top + 1)]
            elif kind == "greedy":
                found += [("greedy", keys, t) for keys, t in _greedy(entry.similarity, top, threshold, greedy_keys)]
            elif kind == "optimal":
                found += [("optimal", keys, None) for keys in optimal_by_count(model, cut, top).values()]
        for kind, keys, t in found:
            k = (cut, tuple(keys))
            if k in seen:
                continue
            n = len(keys)
            seen[k] = Candidate(cut, tuple(keys), kind, n * full + (steps - n) * reuse,
                                model.latent_error(cut, keys), model.psnr(cut, keys), t)
    return list(seen.values())


def _greedy(similarity, top: int, threshold: float | None, greedy_keys):
    """Per key count up to ``top``, the greedy schedule with the highest threshold giving it."""
    if threshold is not None:
        keys = greedy_keys(similarity, threshold)
        return [(keys, threshold)] if len(keys) <= top else []
    out: dict[int, tuple[list[int], float]] = {}
    for v in sorted({v for row in similarity for v in row}, reverse=True):
        t = math.nextafter(v, math.inf)
        keys = greedy_keys(similarity, t)
        if len(keys) <= top and len(keys) not in out:
            out[len(keys)] = (keys, t)
    return list(out.values())


def optimal_by_count(model: QualityModel, cut: str, top: int) -> dict[int, list[int]]:
    """For each key count 1..``top``, the key steps (step 0 key) minimising the predicted error: an
    exact DP over arcs, whose errors add (:meth:`QualityModel.arc_cost`)."""
    n = model.cal.steps
    arc = [[0.0] * (n + 1) for _ in range(n)]
    for a in range(n):
        for b in range(a + 1, n + 1):
            arc[a][b] = model.arc_cost(cut, a, b)
    inf = math.inf
    best = [[inf] * n for _ in range(top + 1)]  # best[j][b]: steps < b covered, j keys, the last at b
    back: dict[tuple[int, int], int] = {}
    best[1][0] = 0.0
    for j in range(1, top):
        for a in range(n):
            if best[j][a] == inf:
                continue
            for b in range(a + 1, n):
                cost = best[j][a] + arc[a][b]
                if cost < best[j + 1][b]:
                    best[j + 1][b], back[(j + 1, b)] = cost, a
    out = {}
    for j in range(1, top + 1):
        ends = [(best[j][a] + arc[a][n], a) for a in range(n) if best[j][a] < inf]
        if not ends:
            continue
        _, a = min(ends)
        keys, jj = [a], j
        while jj > 1:
            a = back[(jj, a)]
            jj -= 1
            keys.append(a)
        out[j] = sorted(keys)
    return out


def frontier(cands: list[Candidate]) -> list[Candidate]:
    """The Pareto frontier: cheapest first, each better in predicted quality than every cheaper one."""
    out: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (c.cost, -c.quality)):
        if not out or c.quality > out[-1].quality:
            out.append(c)
    return out


def ranked(cands: list[Candidate], budget: float | None = None, min_psnr: float | None = None) -> list[Candidate]:
    """Candidates within ``budget`` best first: the highest predicted quality (then the least work); with
    ``min_psnr``, those predicted to reach it, the least work first (then the higher quality). A floor
    that nothing within the budget reaches raises :class:`QualityFloorError` naming the best reachable."""
    within = [c for c in cands if budget is None or c.cost <= budget * (1 + 1e-9)]
    if min_psnr is None:
        return sorted(within, key=lambda c: (-c.quality, c.cost))
    if within and all(c.psnr is None for c in within):
        raise QualityFloorError(
            "this calibration predicts no PSNR (it was made before the quality predictor: no scheduler and decoder "
            "measurements); recalibrate (vramplan calibrate) to plan for a quality floor")
    good = [c for c in within if c.psnr is not None and c.psnr >= min_psnr]
    if not good:
        best = max((c for c in within if c.psnr is not None), key=lambda c: c.psnr, default=None)
        reach = (f"the best reachable is {best.psnr:.1f} dB ({best.name}, {len(best.keys)} key steps, cut {best.cut})"
                 if best is not None else "no schedule is within the limits at all")
        raise QualityFloorError(
            f"no Step Rehash schedule is predicted to reach {min_psnr:g} dB PSNR within the limits; {reach}. "
            f"Lower the quality floor, allow more time or key steps, or plan without Step Rehash.")
    return sorted(good, key=lambda c: (c.cost, -c.quality))
