"""Step Rehash's quality predictor (torch-free): the video's error of any (cut, key steps) from one calibration.

A reused step ``s`` (its cut feature from the last key step ``a``) makes a noise prediction off by
the calibrated relative error ``e(a, s)`` of ``||g_s||``. The scheduler turns that into an error of
the next latent (``step_gain[s]``, its coefficient, measured on the scheduler), and the rest of the
sampling carries it to the final latent. We carry it as the probability-flow ODE of Gaussian data
does: an error made at noise level ``sigma`` reaches the end scaled by
``sqrt(sigma_end^2 + sd^2) / sqrt(sigma^2 + sd^2)`` (``sd``: the data's RMS, here the final latent's),
so errors made while the video is still mostly noise shrink, late ones stay. The errors add up as
if they pointed the same way (a stale feature pulls each reused step back towards its key step's
prediction; on the trained model this ranks schedules better than adding arcs in quadrature).
The VAE's gain (``decode_gain``) turns the final latent's error into the frames' MSE, hence PSNR.

Errors of reuse gaps beyond the calibrated ``max_gap`` are extrapolated, never infinite: from the
cut's measured relation between reuse error and feature dissimilarity ``1 - cos`` (a power law fit
over the measured gaps; the similarity is measured for every pair of steps), and never below the
error measured at the largest gap from the same key (a staler feature does not help).

The predictor is validated against measured PSNR in ``bench/bench_rehash.py`` (Spearman rank
correlation over schedules of every kind; ``docs/benchmarks.md``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .rehash import Calibration, CutCalibration

PEAK_TO_PEAK = 2.0  # decoded frames in [-1, 1]
_FLOOR = 1e-9


class QualityModel:
    """Predicted error and PSNR (vs the full run) of schedules at the calibration's cuts.

    Without the calibration's scheduler and decoder measurements (calibrations made before them) the
    prediction is the plain sum of relative errors (``psnr`` is then None): still finite everywhere."""

    def __init__(self, cal: Calibration):
        self.cal = cal
        n = cal.steps
        self.measured = cal.noise_norm is not None and cal.step_gain is not None
        weight = ([g * m for g, m in zip(cal.step_gain, cal.noise_norm, strict=True)] if self.measured
                  else [1.0] * n)
        self.weight = [w * c for w, c in zip(weight, self.carry(cal), strict=True)]
        self._fits: dict[str, tuple[float, float]] = {}
        self._errors: dict[str, list[list[float]]] = {}
        self._ran = {m.key: m.psnr for m in getattr(cal, "measured", ())}

    def measured_psnr(self, cut: str, keys: Sequence[int], halves: Collection[int] = ()) -> float | None:
        """The PSNR the calibration *measured* for this schedule on its own call (``calibrate --refine``), or
        None where it did not run it: measured, then predicted."""
        return self._ran.get((cut, tuple(sorted(keys)), tuple(sorted(halves))))

    @staticmethod
    def carry(cal: Calibration) -> list[float]:
        """Per step, the factor by which an error of the latent after step ``s`` reaches the end. A
        flow-matching latent ``(1 - sigma) x0 + sigma noise`` is the other's ``x0 + sigma' noise`` scaled by
        ``1 - sigma`` (``sigma' = sigma / (1 - sigma)``): its scale is ``sqrt(sigma^2 + sd^2 (1 - sigma)^2)``."""
        if cal.sigmas is None or cal.latent_rms is None:
            return [1.0] * cal.steps
        sd2 = cal.latent_rms**2

        def scale(sigma: float) -> float:
            return math.sqrt(sigma**2 + sd2 * ((1 - sigma) ** 2 if cal.flow_matching else 1.0))

        after = [*cal.sigmas[1:], 0.0]  # the noise level the step moves to (the last step's: 0)
        return [scale(after[-1]) / scale(s) for s in after]

    # -- per reused step ----------------------------------------------------------------------------
    def errors(self, cut: str) -> list[list[float]]:
        """[a][s] (a < s): the relative reuse error, measured or extrapolated (finite, > 0)."""
        if cut not in self._errors:
            entry = self.cal.cut(cut)
            alpha, beta = self._fit(entry)
            n = self.cal.steps
            table = [[0.0] * n for _ in range(n)]
            for a in range(n):
                last = None  # the error at the largest measured gap from a
                for s in range(a + 1, n):
                    e = entry.error[a][s]
                    if e is not None:
                        last = e
                        table[a][s] = max(e, _FLOOR)
                        continue
                    d = max(1.0 - entry.similarity[a][s], _FLOOR)
                    guess = math.exp(alpha + beta * math.log(d))
                    table[a][s] = max(guess, last or 0.0, _FLOOR)
            self._errors[cut] = table
        return self._errors[cut]

    def _fit(self, entry: CutCalibration) -> tuple[float, float]:
        """log e = alpha + beta log(1 - cos) over the measured pairs (least squares)."""
        xs, ys = [], []
        n = self.cal.steps
        for a in range(n):
            for s in range(a + 1, n):
                e = entry.error[a][s]
                if e is not None and e > 0:
                    xs.append(math.log(max(1.0 - entry.similarity[a][s], _FLOOR)))
                    ys.append(math.log(e))
        if not xs:
            return math.log(1.0), 0.0
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        beta = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx > 0 else 0.0
        beta = max(0.0, beta)  # errors do not shrink as features drift apart
        return my - beta * mx, beta

    # -- schedules ----------------------------------------------------------------------------------
    def arc(self, cut: str, a: int, b: int, halves: Collection[int] = ()) -> float:
        """The final latent's error from reusing key ``a``'s feature on steps ``a+1 .. b-1``; on ``halves``
        (under CFG reuse ``cfg+<cut>``: the first call whole, the second from key ``a``'s offset) the error of
        CFG reuse alone from the same key (:func:`half_cut`)."""
        e = self.errors(cut)[a]
        h = self.errors(half_cut(cut))[a] if halves else e
        return sum(self.weight[s] * (h[s] if s in halves else e[s]) for s in range(a + 1, b))

    def arc_cost(self, cut: str, a: int, b: int) -> float:
        """What the optimal schedule sums over its arcs (additive: an exact DP over arcs)."""
        return self.arc(cut, a, b)

    def latent_error(self, cut: str, keys: Sequence[int], halves: Collection[int] = ()) -> float:
        """Predicted L2 error of the final latent (relative-error units without scheduler measurements);
        ``halves``: reused steps that reuse one CFG call only (see :meth:`arc`)."""
        bounds = [*sorted(keys), self.cal.steps]
        halves = frozenset(halves)
        if halves:
            return sum(self.arc(cut, a, b, halves) for a, b in zip(bounds, bounds[1:], strict=False))
        return sum(self.arc_cost(cut, a, b) for a, b in zip(bounds, bounds[1:], strict=False))

    def psnr(self, cut: str, keys: Sequence[int], halves: Collection[int] = ()) -> float | None:
        """Predicted PSNR (dB, frames in [-1, 1], against the full run); inf for every step key; None
        without the calibration's scheduler and decoder measurements."""
        if not self.measured or self.cal.decode_gain is None or not self.cal.frame_values:
            return None
        err = self.latent_error(cut, keys, halves) * self.cal.decode_gain
        if err <= 0:
            return math.inf
        mse = err**2 / self.cal.frame_values
        return 10 * math.log10(PEAK_TO_PEAK**2 / mse)


def half_cut(cut: str) -> str:
    """What a *half* step of ``cut`` runs: a schedule of CFG reuse over a cut (``cfg+<cut>``) may, at some
    reused steps, run the step's first call whole and reuse only the second (``cfg`` alone, from the same
    key step's offset): one model call of the step saved instead of nearly two, at CFG reuse's error."""
    from .rehash import cfg_cut, cfg_split

    cfg, base = cfg_split(cut)
    if not cfg or base is None:
        raise ValueError(f"half steps need per-step CFG reuse over a cut ('cfg+<cut>'), not {cut!r}")
    return cfg_cut()


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    vy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (vx * vy) if vx > 0 and vy > 0 else 0.0


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks
