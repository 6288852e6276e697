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
from .rehash import cfg_cut, cfg_split
from .rehash_quality import QualityModel, half_cut

KINDS = ("uniform", "greedy", "optimal")
MAX_HALVES = 4  # half steps per schedule the search considers (each costs one model call more than a reuse step)


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
    halves: tuple[int, ...] = ()  # reused steps that reuse one CFG call only (``cfg+<cut>``; see half_cut)
    predicted: float | None = None  # the raw prediction where ``psnr`` was measured or corrected by a measurement
    measured: bool = False  # ``psnr`` was measured by the calibration (calibrate --refine), not predicted

    @property
    def source(self) -> str:
        return "measured" if self.measured else "predicted"

    @property
    def name(self) -> str:
        return schedule_name(self.kind, self.keys, self.threshold, self.halves)

    @property
    def quality(self) -> float:
        """Higher is better: the predicted PSNR, else minus the predicted error."""
        return self.psnr if self.psnr is not None else -self.error


def schedule_name(kind: str, keys, threshold: float | None = None, halves=()) -> str:
    """An honest name: 'DeepCache's schedule' only for key steps every N-th step from step 0."""
    if halves:
        n = len(halves)
        return (f"{schedule_name(kind, keys, threshold)}; {n} reused step{'s' if n > 1 else ''} run{'' if n > 1 else 's'}"
                f" the first CFG call whole and reuse{'' if n > 1 else 's'} the second only")
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
               kinds=KINDS, max_keys: int | None = None, threshold: float | None = None,
               max_halves: int = MAX_HALVES) -> list[Candidate]:
    """Every schedule of ``kinds`` at every cut of ``reuse_at`` (the cost of one reuse call there; ``full``:
    one full call) with at most ``max_keys`` key steps and at least one reused step; duplicates (same cut and keys) kept once, the
    first kind of ``kinds`` naming them. ``threshold`` fixes the greedy schedule's threshold. With ``optimal``,
    CFG reuse over a cut also gets schedules with up to ``max_halves`` *half* steps (one CFG call reused, the
    other run whole; :func:`~.rehash_quality.half_cut`), priced at CFG reuse alone's price."""
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
            seen[k] = rated(model, Candidate(cut, tuple(keys), kind, n * full + (steps - n) * reuse,
                                             model.latent_error(cut, keys), model.psnr(cut, keys), t))
        half = _half_price(model, cut, reuse_at)
        if "optimal" in kinds and half is not None and half > reuse:
            for (n, h), (keys, halves) in optimal_with_halves(model, cut, top, max_halves).items():
                cost = n * full + h * half + (steps - n - h) * reuse
                seen[(cut, tuple(keys), tuple(halves))] = rated(model, Candidate(
                    cut, tuple(keys), "optimal", cost, model.latent_error(cut, keys, halves),
                    model.psnr(cut, keys, halves), None, tuple(halves)))
    return corrected(list(seen.values()))


def corrected(cands: list[Candidate]) -> list[Candidate]:
    """Where the calibration measured some schedules, every other schedule's predicted PSNR moved by the
    measured-minus-predicted of the measured one nearest in cost (``predicted`` keeps the raw prediction):
    the predictor is off by a few dB that drift with the saving, so a raw prediction would outrank a
    measured schedule whenever the predictor runs high there (few key steps) and lose to one where it runs
    low, whatever the schedules' own merit."""
    from dataclasses import replace

    anchors = [(math.log(c.cost), c.psnr - c.predicted) for c in cands
               if c.measured and c.predicted is not None and c.cost > 0 and math.isfinite(c.predicted)]
    if not anchors:
        return cands
    out = []
    for c in cands:
        if c.measured or c.psnr is None or not math.isfinite(c.psnr) or c.cost <= 0:
            out.append(c)
            continue
        here = math.log(c.cost)
        shift = min(anchors, key=lambda a: (abs(a[0] - here), -a[0]))[1]
        out.append(replace(c, psnr=c.psnr + shift, predicted=c.psnr))
    return out


def rated(model: QualityModel, c: Candidate) -> Candidate:
    """``c`` with the PSNR the calibration measured for it, where it ran it (``calibrate --refine``): measured,
    then predicted. The prediction stays in ``predicted``."""
    from dataclasses import replace

    got = model.measured_psnr(c.cut, c.keys, c.halves)
    return c if got is None else replace(c, psnr=got, predicted=c.psnr, measured=True)


def refinement(cands: list[Candidate], top: int) -> list[Candidate]:
    """What ``calibrate --refine top`` runs: at each FLOPs level of the predicted frontier (each frontier
    schedule's cost as the budget), the ``top`` schedules the planner would rank best there; each once,
    cheapest level first."""
    out: dict[tuple, Candidate] = {}
    for level in frontier(cands):
        for c in ranked(cands, level.cost)[:top]:
            out.setdefault((c.cut, c.keys, c.halves), c)
    return list(out.values())


def _half_price(model: QualityModel, cut: str, reuse_at: dict[str, float]) -> float | None:
    """The price of a half step of ``cut`` (CFG reuse alone's, per call), where the schedule may have them:
    CFG reuse over a cut, with CFG reuse alone priced and calibrated."""
    cfg, base = cfg_split(cut)
    half = cfg_cut()
    if not cfg or base is None or half not in reuse_at or half not in {c.cut for c in model.cal.cuts}:
        return None
    return reuse_at[half]


def optimal_with_halves(model: QualityModel, cut: str, top: int, max_halves: int = MAX_HALVES
                        ) -> dict[tuple[int, int], tuple[list[int], list[int]]]:
    """For each (key count 1..``top``, half steps 1..``max_halves``), the key steps (step 0 key) and half
    steps minimising the predicted error (:meth:`QualityModel.latent_error`). Exact: the error adds over arcs
    "key a, next key b", and within an arc with ``h`` half steps the best are the ``h`` reused steps whose
    error drops most (each step's error depends only on the arc's key), so one DP over (keys, halves)."""
    n = model.cal.steps
    full, half = model.errors(cut), model.errors(half_cut(cut))
    w = model.weight
    # arc[a][b][h]: error of the arc a -> b with its h best half steps, and those steps
    arc: list[list[list[tuple[float, tuple[int, ...]]]]] = [[[] for _ in range(n + 1)] for _ in range(n)]
    for a in range(n):
        for b in range(a + 1, n + 1):
            inner = range(a + 1, b)
            base = sum(w[s] * full[a][s] for s in inner)
            gains = sorted(((w[s] * (full[a][s] - half[a][s]), s) for s in inner), reverse=True)
            row, err, taken = [(base, ())], base, ()
            for g, s in gains[:max_halves]:
                err, taken = err - g, (*taken, s)
                row.append((err, taken))
            arc[a][b] = row
    inf = math.inf
    H = max_halves
    # best[j][h][b]: steps < b covered with j keys (the last at b) and h half steps
    best = [[[inf] * n for _ in range(H + 1)] for _ in range(top + 1)]
    back: dict[tuple[int, int, int], tuple[int, int]] = {}
    best[1][0][0] = 0.0
    for j in range(1, top):
        for h0 in range(H + 1):
            for a in range(n):
                here = best[j][h0][a]
                if here == inf:
                    continue
                for b in range(a + 1, n):
                    for dh, (err, _) in enumerate(arc[a][b][:H - h0 + 1]):
                        cost = here + err
                        if cost < best[j + 1][h0 + dh][b]:
                            best[j + 1][h0 + dh][b], back[(j + 1, h0 + dh, b)] = cost, (a, dh)
    out = {}
    for j in range(1, top + 1):
        for h in range(1, H + 1):
            ends = [(best[j][h0][a] + arc[a][n][h - h0][0], a, h0) for a in range(n) for h0 in range(h + 1)
                    if best[j][h0][a] < inf and h - h0 < len(arc[a][n])]
            if not ends:
                continue
            _, a, h0 = min(ends)
            keys, halves = [a], list(arc[a][n][h - h0][1])
            jj, hh = j, h0
            while jj > 1:
                prev, dh = back[(jj, hh, a)]
                halves += arc[prev][a][dh][1]
                a, jj, hh = prev, jj - 1, hh - dh
                keys.append(a)
            if j + h <= n:
                out[(j, h)] = (sorted(keys), sorted(halves))
    return out


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
