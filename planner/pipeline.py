"""Plan a whole pipeline run: slicing per stage and which weights stay on the GPU. No torch.

At each stage the GPU holds the CUDA context, the weights of every *resident* component plus the
stage's own component, the tensors other stages left behind (latents, embeddings), and the
stage's activations. A non-resident component is moved to the GPU before each of its stages and
off after it (cost: twice its bytes over the GPU's PCIe bandwidth). Given the residency, each
sliced stage (the UNet, the VAE decoder) is planned independently within what is left of the
budget (:mod:`.solve`); the residency itself is chosen by trying every assignment (2^components,
a handful). The pipeline's peak is the largest stage peak.

When a sliced stage does not fit with every value on the GPU and its component's weights whole,
:func:`.placement.search` places values in host memory and streams blocks' weights (only then, so
plans that fit without are unchanged). Streamed blocks stay in pinned host memory for the whole
run: the component's other stages hold only its other weights too. Floors are computed with every
value placed and every block streamed, and name what sets them.
"""

from __future__ import annotations

import functools
import gc
import itertools
import math
from dataclasses import dataclass

from .bounds import SLACK, seconds_bound, unbounded
from .costs import CostModel, roofline_seconds
from .errors import InfeasibleError
from .faster_placement import MORE_PLACEMENT_GAIN
from .fmt import human_bytes
from .placement import floor as model_floor
from .placement import host_bytes, search
from .plan import MARGIN_FRACTION, plan_fields
from .schema import (
    ComponentPlan,
    PipelineProfile,
    Plan,
    Prediction,
    SolverInfo,
    StagePrediction,
    Target,
)
from .solve import Solution


@dataclass
class _StageResult:
    stage: object
    weights: int
    base: int  # context + margin + weights + held
    solution: Solution | None
    needed: int
    activation: int
    seconds: float
    peak_unit: str | None


SLOW = object()  # PipelinePlanner.evaluate: this residency cannot meet the latency asked for

_MODELS: dict[tuple, CostModel] = {}
MODELS_KEPT = 8


def cost_model(profile, gpu, allocator: str, pinned: bool) -> CostModel:
    """The cost model of a stage profile on a GPU, kept per (profile, GPU, allocator, pinned) in this
    process: its memoised segment costs, solve tables, floors and searches do not depend on the budget,
    the steps or the latency limit, so a ``--max-latency`` plan after the fastest one, or a fleet's
    plans of one workload shape per GPU, reuse them instead of recomputing."""
    key = (profile.model_dump_json(), gpu.model_dump_json(), allocator, pinned)
    found = _MODELS.get(key)
    if found is None:
        if len(_MODELS) >= MODELS_KEPT:
            _MODELS.pop(next(iter(_MODELS)))
        found = _MODELS[key] = CostModel(profile, gpu, allocator, pinned=pinned)
    return found


class PipelinePlanner:
    def __init__(self, profile: PipelineProfile, gpu, usable: int, steps: int, allocator: str, rehash=None,
                 pinned: bool = True, host_ram_bytes: int | None = None):
        self.profile, self.gpu, self.usable, self.steps, self.allocator = profile, gpu, usable, steps, allocator
        self.pinned = pinned
        # Pinned host memory the plan may use (placed values + streamed weights); None: no limit.
        self.host_ram_bytes = host_ram_bytes
        self.host_bound = False  # set when a residency fitted the GPU but not the host budget
        self.outrun = False  # set when a residency was skipped as slower than a latency asked for
        self.host_ram_source: str | None = None  # for the plan's target: 'given', 'this machine', 'assumed'
        self.margin = int(usable * MARGIN_FRACTION)
        self.weights = {c.component: c.weight_bytes for c in profile.components}
        # pinned=False: host memory could not be pinned; host-link copies at the pageable rate
        self.models = {
            s.stage: cost_model(s.profile, gpu, allocator, pinned) for s in profile.stages if s.profile is not None
        }
        # Step Rehash (planner.rehash.StageRehash): groups kept off the cut, reuse calls priced, cache held.
        self.rehash = rehash
        for s in profile.stages:
            if rehash is not None and s.per_step and s.profile is not None:
                self.models[s.stage] = rehash.constrain(self.models[s.stage], s.stage)  # its part of the schedule

    def calls(self, stage) -> int:
        """Calls of ``stage`` in a run: the pipeline says (Wan: two batch-1 forwards per step under CFG,
        each expert its own steps), else ``steps`` for a per-step stage and one otherwise."""
        from .errors import UnsupportedModelError
        from .pipelines import pipeline_spec

        try:
            spec = pipeline_spec(self.profile.pipeline)
        except UnsupportedModelError:
            return self.steps if stage.per_step else 1
        return spec.stage_calls(stage.stage, stage.per_step, self.steps, self.profile.guidance)

    def evaluate(self, resident: dict[str, bool], cap: int, method: str = "dp",
                 latency_cap: float | None = None) -> list[_StageResult] | None:
        """Every stage within ``cap`` bytes, fastest, for this residency; None if one cannot fit.

        Sliced stages first (placement and streaming chosen within what is left with every other
        component's weights whole), then every stage's weights less the blocks streamed.
        ``latency_cap``: a run slower than this is not wanted: before each stage's search, the seconds
        of the stages searched so far plus a lower bound on the others' (:mod:`.bounds`) are checked
        against it, and :data:`SLOW` is returned instead of searching on (``self.outrun`` set)."""
        solutions: dict[str, Solution] = {}
        limit = min(cap, self.usable)
        budgets = {}
        for stage in self.profile.stages:
            if stage.profile is None:
                continue
            # the component's unsliced stages (SVD's VAE encode) fit only if enough of its weights stream
            need = max((int(other.activation_bytes * self._factor()) + self._base(other, resident, {}) - limit
                        for other in self.profile.stages
                        if other.component == stage.component and other.profile is None), default=0)
            budgets[stage.stage] = (limit - self._base(stage, resident, {}), need)
        bound = self._bounds(budgets, latency_cap) if latency_cap is not None else None
        for stage in self.profile.stages:
            if stage.profile is None:
                continue
            budget, need = budgets[stage.stage]
            if bound is not None:
                total = sum(bound.values())
                if total == math.inf:
                    return None  # some stage has no plan within its budget: its search would say so
                if total * (1 - SLACK) > latency_cap:
                    self.outrun = True
                    return SLOW
            try:
                solutions[stage.stage] = self._search(stage, budget, method, need)
            except InfeasibleError as err:
                err.with_traceback(None)  # the memoised error: its frames would hold this planner (a cycle)
                return None
            if bound is not None:  # its own seconds now (host memory given back later only adds)
                bound[stage.stage] = self._stage_seconds(stage, solutions[stage.stage])
        results = self.results(resident, solutions, cap)
        if results is None:
            return None
        if self.host_ram_bytes is not None and self.host_total(results) > self.host_ram_bytes:
            from .host_budget import within_host

            results = within_host(self, resident, solutions, cap)  # give back pinned memory before the residency
            if results is None:
                self.host_bound = True
                return None
        return results

    def results(self, resident: dict[str, bool], solutions: dict[str, Solution], cap: int) -> list[_StageResult] | None:
        """Every stage's weights, peak and seconds given the sliced stages' ``solutions`` (None: an unsliced
        stage does not fit within ``cap``). A resident component that streams blocks keeps its other
        weights on the GPU for the whole run (the runtime moves them once)."""
        credit: dict[str, int] = {}  # per component: every sliced stage's streamed blocks (disjoint blocks)
        for s in self.profile.stages:
            if s.stage in solutions:
                credit[s.component] = credit.get(s.component, 0) + solutions[s.stage].streamed_weight_bytes
        results = []
        for stage in self.profile.stages:
            base = self._base(stage, resident, credit)
            weights = base - self.gpu.cuda_context_bytes - self.margin - self.held_bytes(stage)
            moved = not resident.get(stage.component, True)
            on = self.weights.get(stage.component, 0) - credit.get(stage.component, 0)
            transfer = 2 * on / (self.gpu.pcie_gbps * 1e9) if moved else 0.0
            if stage.profile is not None:
                sol = solutions[stage.stage]
                worst = max(sol.costs, key=lambda c: c.needed_bytes)
                seconds = self._stage_seconds(stage, sol) + transfer
                activation = max(c.activation_bytes for c in sol.costs)
                unit = self.models[stage.stage].units[worst.peak_unit].name
                results.append(_StageResult(stage, weights, base, sol, worst.needed_bytes, activation, seconds, unit))
            else:
                needed = int(stage.activation_bytes * self._factor())
                if needed > min(cap, self.usable) - base:
                    return None
                seconds = roofline_seconds(stage.flops, stage.bytes_moved, self.gpu, self.profile.dtype)
                seconds = seconds * self.calls(stage) + transfer
                results.append(_StageResult(stage, weights, base, None, needed, stage.activation_bytes, seconds, None))
        return results

    def _stage_seconds(self, stage, sol: Solution) -> float:
        """Seconds of every call of a sliced stage under ``sol`` (moving its component not included)."""
        if self.rehash is not None and stage.per_step:
            return self.rehash.seconds(self.models[stage.stage], sol)
        return sol.latency_s * self.calls(stage)

    def _unbounded_bounds(self) -> dict[str, float]:
        """Per stage, a lower bound on its seconds in the run at any budget: an unsliced stage's own, a sliced
        stage's fastest with memory for everything (:func:`.bounds.unbounded`); 0 for a Step Rehash stage
        (priced otherwise). Moving a non-resident component only adds. Memoised."""
        if "_unbounded_stage_seconds" not in self.__dict__:
            out = {}
            for stage in self.profile.stages:
                if stage.profile is None:
                    seconds = roofline_seconds(stage.flops, stage.bytes_moved, self.gpu, self.profile.dtype)
                    out[stage.stage] = seconds * self.calls(stage)
                elif self.rehash is not None and stage.per_step:
                    out[stage.stage] = 0.0
                else:
                    out[stage.stage] = unbounded(self.models[stage.stage]) * self.calls(stage)
            self.__dict__["_unbounded_stage_seconds"] = out
        return self.__dict__["_unbounded_stage_seconds"]

    def _bounds(self, budgets: dict[str, tuple[int, int]], latency_cap: float) -> dict[str, float]:
        """Per stage, a lower bound on its seconds in the run: :meth:`_unbounded_bounds`, or, where those do
        not exceed ``latency_cap``, a sliced stage's at its budget (:func:`.bounds.seconds_bound`; inf where
        nothing fits)."""
        out = dict(self._unbounded_bounds())
        sliced = [s for s in self.profile.stages
                  if s.profile is not None and not (self.rehash is not None and s.per_step)]
        if sum(out.values()) * (1 - SLACK) <= latency_cap:
            for stage in sliced:
                out[stage.stage] = seconds_bound(self.models[stage.stage], budgets[stage.stage][0]) * self.calls(stage)
        return out

    def stage_host_bytes(self, r: _StageResult) -> tuple[int, int]:
        """(placed, streamed): pinned host memory of a stage's placed values at most at once, and of its
        component's streamed blocks (held for the whole run)."""
        if r.solution is None:
            return 0, 0
        model = self.models[r.stage.stage]
        return host_bytes(model, r.solution.host, r.solution.segments), r.solution.streamed_weight_bytes

    def host_total(self, results) -> int:
        """Pinned host memory of the run: every streamed block, plus the largest stage's placed values."""
        parts = [self.stage_host_bytes(r) for r in results]
        return max((p for p, _ in parts), default=0) + sum(s for _, s in parts)

    def _base(self, stage, resident: dict[str, bool], credit: dict[str, int]) -> int:
        """Context + margin + weights on the GPU (less ``credit``: streamed weights) + held tensors."""
        on_gpu = sum(w - credit.get(c, 0) for c, w in self.weights.items() if resident[c] or c == stage.component)
        return self.gpu.cuda_context_bytes + self.margin + on_gpu + stage.extra_weight_bytes + self.held_bytes(stage)

    def _search(self, stage, budget: int, method: str, streamed_bytes: int = 0) -> Solution:
        """The stage's fastest plan within ``budget`` (its component's weights counted whole) streaming
        at least ``streamed_bytes`` of them, memoised on the stage's cost model (shared by every plan of
        the same profile on the same GPU in this process, see :func:`cost_model`)."""
        cache = self.models[stage.stage].__dict__.setdefault("_searches", {})
        # placing values beyond the budget's need must save a share of the whole run, not of this stage's call
        gain = MORE_PLACEMENT_GAIN * sum(self._unbounded_bounds().values()) / max(1, self.calls(stage))
        key = (budget, method, max(0, streamed_bytes), gain)
        if key not in cache:
            try:
                cache[key] = search(self.models[stage.stage], budget, method=method, min_streamed_bytes=streamed_bytes,
                                    min_placement_gain_s=gain)
            except InfeasibleError as err:
                # kept without its traceback, whose frames hold this model: a cycle that would keep an evicted
                # model (and all it memoised) alive until a full garbage collection
                err.__context__ = None
                cache[key] = err.with_traceback(None)
        found = cache[key]
        if isinstance(found, InfeasibleError):
            raise found
        return found

    def _factor(self) -> float:
        """The allocator factor of the unsliced stages: the denoiser's (else the first sliced stage's)."""
        sliced = [s for s in self.profile.stages if s.profile is not None]
        unet = next((s.profile for s in sliced if s.per_step), sliced[0].profile if sliced else None)
        if self.allocator == "none" or unet is None:
            return 1.0
        return getattr(unet.allocator, f"original_{self.allocator}")

    @staticmethod
    def peak(results) -> int:
        return max(r.base + r.needed for r in results)

    @staticmethod
    def latency(results) -> float:
        return sum(r.seconds for r in results)

    def residencies(self):
        names = list(self.weights)
        for choice in itertools.product([True, False], repeat=len(names)):
            yield dict(zip(names, choice, strict=True))

    def best(self, cap: int, max_latency_s: float | None, beat_s: float | None = None, first: bool = False,
             last: bool = False):
        """The fastest residency within ``cap`` (and ``max_latency_s``): ``((latency, peak), resident)``.

        A bisection over ``cap`` skips what it cannot use: a residency that did not fit a larger cap,
        and one whose fastest plan (at the full memory) is already slower than the limit. A residency
        whose stages' lower bounds miss the limit is not searched further (:meth:`evaluate`). ``beat_s``:
        only a plan at most this slow is wanted (another stage alternative's); a residency that cannot
        be is skipped the same way (``self.outrun`` says one was), and one slower may still be returned.

        ``first``: only whether any residency qualifies is wanted (a bisection probe): the first one found
        is returned (the last probe's first, tried first). The residencies it did not reach are owed this
        cap: whether the exhaustive probes would have skipped them later (missed here) is settled only when
        one of them would be chosen (:meth:`_settle`), so every probe answers, and every plan is, as with
        exhaustive probes.

        ``last``: no probe follows (the skip state is not needed after it): the last probe's residency is
        evaluated first, and each other stops once its bound is slower than the fastest so far (it cannot
        win: the same residency chosen, ties to the first in order as without it)."""
        best = None
        seen = self.__dict__.setdefault("_residency_seen", {})  # residency -> (largest cap it missed, fastest s)
        wanted = [x for x in (max_latency_s, beat_s) if x is not None]
        latency_cap = min(wanted) if wanted else None
        order = list(self.residencies())
        hit = self.__dict__.get("_first_hit")
        if (first or last) and hit is not None:
            order.sort(key=lambda r: tuple(r.values()) != hit)
        rank = {tuple(r.values()): i for i, r in enumerate(self.residencies())}
        for i, resident in enumerate(order):
            rkey = tuple(resident.values())
            missed, fastest = seen.get(rkey, (-1, 0.0))
            if cap <= missed or (max_latency_s is not None and fastest > max_latency_s):
                continue
            cap_s = latency_cap
            if last and best is not None:
                cap_s = best[0][0] if cap_s is None else min(cap_s, best[0][0])
            results = self.evaluate(resident, cap, latency_cap=cap_s)
            if results is SLOW:
                continue
            if results is None:
                seen[rkey] = (max(missed, cap), fastest if cap < self.usable else math.inf)
                continue
            latency = self.latency(results)
            if cap >= self.usable:
                seen[rkey] = (missed, latency)
            if max_latency_s is not None and latency > max_latency_s:
                continue
            if self._settle(rkey, cap, latency_cap):
                continue  # the exhaustive probes would have skipped it: it missed an owed larger cap
            key = (latency, self.peak(results))
            if first:
                owed = self.__dict__.setdefault("_residency_owed", {})
                for rest in order[i + 1:]:
                    owed.setdefault(tuple(rest.values()), []).append((cap, latency_cap))
                self.__dict__["_first_hit"] = rkey
                return key, resident
            if best is None or (*key, rank[rkey]) < (*best[0], best[2]):
                best = (key, resident, rank[rkey])
        return None if best is None else best[:2]

    def _settle(self, rkey, cap: int, latency_cap) -> bool:
        """Replay, in order, the probes owed by residency ``rkey`` (:meth:`best` ``first``) as the exhaustive
        probes ran them: each evaluates it unless a cap it missed is at least the probe's, and records a miss.
        True when it is now skipped at ``cap`` (a cap it missed is at least ``cap``)."""
        owed = self.__dict__.get("_residency_owed", {}).pop(rkey, [])
        if not owed:
            return False
        seen = self.__dict__["_residency_seen"]
        resident = dict(zip(self.weights, rkey, strict=True))
        for q, q_latency_cap in owed:
            missed, fastest = seen.get(rkey, (-1, 0.0))
            if q <= missed:
                continue
            if self.evaluate(resident, q, latency_cap=q_latency_cap) is None:
                seen[rkey] = (max(missed, q), fastest)  # (owed caps are below the usable memory)
        return cap <= seen.get(rkey, (-1, 0.0))[0]

    def held_bytes(self, stage) -> int:
        """Tensors the stage holds from others; Step Rehash's cached cut through every denoising call."""
        held = stage.held_bytes
        if self.rehash is not None and stage.per_step and stage.profile is not None:
            held += self.rehash.cache_bytes(self.models[stage.stage])
        return held

    def floor(self, lower: bool = False) -> tuple[int, str, str]:
        """The smallest reachable pipeline peak, and the stage and unit that set it (every value that
        may leave the GPU in host memory, every block streamed; :attr:`floor_reason` says more).

        ``lower``: a lower bound of it instead, where a sliced stage is credited with the blocks other stages
        of its component stream (its search is not): where ``max_latency_s``'s bisection over the peak
        starts, as it always has (its 1 MiB steps, hence its plans, stay where they were)."""
        floors = {s.stage: model_floor(self.models[s.stage]) for s in self.profile.stages if s.profile is not None}
        streamed = {s.stage: (s.component, self.models[s.stage].streamed_weight_bytes(f.streamed))
                    for s in self.profile.stages if (f := floors.get(s.stage)) is not None}

        def credit_but(name: str | None) -> dict[str, int]:
            """Streamed weights per component, of every sliced stage but ``name``."""
            out: dict[str, int] = {}
            for st, (c, v) in streamed.items():
                if st != name:
                    out[c] = out.get(c, 0) + v
            return out

        credit = credit_but(None)
        best = None
        for resident in self.residencies():
            worst = None
            for stage in self.profile.stages:
                if stage.profile is not None:
                    # every weight counted whole, as :meth:`evaluate` gives its search the budget (a model floor is
                    # relative to all the model's weights): another stage's streamed blocks of the same component
                    # are not credited to it (SVD's VAE encode, whose search counts the VAE whole)
                    base = self._base(stage, resident, credit_but(stage.stage) if lower else {})
                    needed, unit = floors[stage.stage].needed_bytes, floors[stage.stage].unit
                else:
                    base = self._base(stage, resident, credit)
                    needed, unit = int(stage.activation_bytes * self._factor()), stage.component
                if worst is None or base + needed > worst[0]:
                    worst = (base + needed, stage.stage, unit, resident)
            if best is None or worst[0] < best[0]:
                best = worst
        total, stage_name, unit, resident = best
        if stage_name in streamed:  # weights on the GPU at a sliced stage's floor: its own streamed blocks off
            component, own = streamed[stage_name]
            credit = {component: own}
        self.floor_reason = self._reason(stage_name, resident, credit, floors.get(stage_name))
        return total, stage_name, unit

    def _reason(self, stage_name: str, resident, credit, found) -> str:
        """What the floor's stage holds at its peak, the largest part first named."""
        stage = next(s for s in self.profile.stages if s.stage == stage_name)
        on_gpu = {c: w - credit.get(c, 0) for c, w in self.weights.items() if resident[c] or c == stage.component}
        parts = {
            "CUDA context": self.gpu.cuda_context_bytes,
            "weights that cannot be streamed": sum(on_gpu.values()) + stage.extra_weight_bytes,
            "tensors held from other stages": self.held_bytes(stage),
        }
        if found is not None:
            parts.update(found.parts())
            where = f"at {found.describe(self.models[stage_name])}"
        else:
            parts["activations of a stage that is not sliced"] = int(stage.activation_bytes * self._factor())
            where = f"{stage.component} runs that stage unsliced"
        largest = self.floor_part = max(parts, key=parts.get)
        listed = ", ".join(f"{name} {human_bytes(v)}" for name, v in parts.items() if v)
        return f"{where}; the largest part is {largest} ({listed}, margin {human_bytes(self.margin)})"


def _collector_paused(plan):
    """``plan`` with Python's cyclic garbage collector paused while it runs: planning allocates hundreds of
    thousands of small objects (segment costs, solve tables, memoised solutions) that stay in the cost
    models' caches, and every full collection re-scans all of them (about a quarter of the CPU time of the
    55 plans of ``bench/bench_plan_speed.py`` in one process). The planner's garbage is freed by reference
    counting; the few cycles (a cost model and its memoised walk, once evicted) wait for the next
    collection. Resumed only if it was running."""

    @functools.wraps(plan)
    def paused(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return plan(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return paused


@_collector_paused
def plan_pipeline(
    profile: PipelineProfile,
    gpu,
    *,
    usable_bytes: int | None = None,
    steps: int = 25,
    max_latency_s: float | None = None,
    allocator: str = "expandable_segments",
    method: str = "auto",
    rehash=None,
    pinned: bool = True,
    host_ram_bytes: int | None = None,
    host_ram_source: str = "given",
    beat_latency_s: float | None = None,
    peak_at_most: int | None = None,
) -> Plan:
    """The fastest run within the GPU's memory, or (given ``max_latency_s``) the smallest peak within it.
    ``rehash``: a Step Rehash schedule to price in (:class:`.rehash.StageRehash`). ``pinned=False``:
    host memory cannot be pinned here, so placed values and streamed weights move at the pageable rate.
    ``host_ram_bytes``: pinned host memory the plan may use (None: no limit); a plan needing more is
    not chosen. A stage profiled under alternative plans (``profile.alternatives``) runs under whichever
    plans best (:mod:`.alternatives`), which asks each alternative only for a plan that can beat the best
    so far: ``beat_latency_s`` (fastest plans: at most this slow) or ``peak_at_most`` (under
    ``max_latency_s``: a peak of at most these bytes); :class:`CannotWin` when there is none."""
    if profile.alternatives:
        from .alternatives import plan_alternatives

        return plan_alternatives(
            plan_pipeline, profile, gpu, usable_bytes=usable_bytes, steps=steps, max_latency_s=max_latency_s,
            allocator=allocator, method=method, rehash=rehash, pinned=pinned, host_ram_bytes=host_ram_bytes,
            host_ram_source=host_ram_source)
    usable = usable_bytes if usable_bytes is not None else gpu.memory_usable_bytes
    planner = PipelinePlanner(profile, gpu, usable, steps, allocator, rehash, pinned, host_ram_bytes)
    planner.host_ram_source = host_ram_source if host_ram_bytes is not None else None
    if peak_at_most is not None and max_latency_s is not None:  # the fastest plan is not needed: only a peak
        found = None                                             # below another alternative's can win
        if planner.floor(lower=True)[0] > peak_at_most:
            raise CannotWin  # no plan's peak is below this (a plan states its peak with every streamed block off)
    else:
        found = planner.best(usable, None, beat_latency_s)
        if found is None and planner.outrun and beat_latency_s is not None:
            raise CannotWin
        if found is None:
            raise _refusal(profile, gpu, usable, planner)
    cap = usable
    if max_latency_s is not None:
        if found is not None and found[0][0] > max_latency_s:
            raise InfeasibleError(
                f"no plan meets max_latency_s={max_latency_s:g}: the fastest plan within memory takes "
                f"{found[0][0]:.2f} s. Raise the latency limit or give more memory."
            )
        lo, hi = planner.floor(lower=True)[0], usable
        at_floor = planner.best(lo, max_latency_s)
        if at_floor is not None:  # a loose limit: the smallest reachable peak meets it
            hi = lo
            # within the bisection's 1 MiB resolution a faster plan may exist: take it
            near = planner.best(lo + 2**20, max_latency_s)
            if near is not None and near[0][0] < at_floor[0][0]:
                hi = lo + 2**20
        cap = bisect_peak(planner, lo, hi, max_latency_s, peak_at_most)
        found = planner.best(cap, max_latency_s, last=True)
        if found is None:  # (only below another alternative's peak: nothing found there)
            raise CannotWin
    resident = found[1]
    results = planner.evaluate(resident, cap, method=method)
    return _assemble(profile, planner, resident, results, cap, max_latency_s)


def bisect_peak(planner: PipelinePlanner, lo: int, hi: int, max_latency_s: float, peak_at_most: int | None = None,
                first: bool = True) -> int:
    """The smallest cap in ``(lo, hi]`` (1 MiB resolution) at which a residency meets ``max_latency_s``, by
    bisection (``hi`` meets it). Each probe asks only whether one does (``first``, :meth:`PipelinePlanner.best`:
    the same answers as the exhaustive probes, ``first=False``, stopping at the first residency that does)."""
    while hi - lo > 2**20:  # 1 MiB resolution on the peak
        mid = (lo + hi) // 2
        # only a peak below another alternative's can win: above it, take the step a plan found there
        # would take, unsearched (the same steps as searching it, wherever a plan is found above it)
        if (peak_at_most is not None and mid > peak_at_most) or \
                planner.best(mid, max_latency_s, first=first) is not None:
            hi = mid
        else:
            lo = mid
    return hi


def min_usable(floor: int, margin: int) -> int:
    """The smallest usable memory whose plan fits ``floor`` (a peak that holds ``margin``, the margin of the
    budget it was found at): the margin is a fraction of the usable memory, so it grows with it."""
    rest = floor - margin
    need = math.ceil(rest / (1 - MARGIN_FRACTION))
    while need - int(need * MARGIN_FRACTION) < rest:
        need += 1
    while need > 0 and (need - 1) - int((need - 1) * MARGIN_FRACTION) >= rest:
        need -= 1
    return need


def _refusal(profile, gpu, usable: int, planner: PipelinePlanner) -> InfeasibleError:
    """No residency fits: the pinned host memory budget, or the floor (the smallest reachable peak, what
    sets it, and the smallest usable memory that plans)."""
    if planner.host_bound:
        return _host_infeasible(profile, gpu, usable, planner)
    floor, stage, unit = planner.floor()
    need = min_usable(floor, planner.margin)
    err = InfeasibleError(
        f"{profile.model_name} {profile.frames} x {profile.height}x{profile.width} cannot fit {gpu.name} "
        f"({human_bytes(usable)} usable): the smallest reachable peak is {human_bytes(floor)}, set by the "
        f"{stage} stage ({unit}), with every other component's weights off the GPU, every value that may leave "
        f"the GPU in host memory and every block's weights streamed: {planner.floor_reason}. Use a GPU with at "
        f"least {human_bytes(need)} usable (the margin grows with it), a smaller resolution or fewer frames."
    )
    err.min_peak_bytes, err.stage, err.unit, err.reason = floor, stage, unit, planner.floor_reason
    err.min_usable_bytes = need  # the smallest usable memory that plans
    err.part = planner.floor_part  # what sets it: "CUDA context", "weights that cannot be streamed", ...
    return err


class CannotWin(Exception):
    """:func:`plan_pipeline` asked for a plan that beats another (``beat_latency_s``, ``peak_at_most``) has
    none: its lower bounds (the floor, :mod:`.bounds`) or its search below the other's peak say so."""


def _host_infeasible(profile, gpu, usable: int, planner: PipelinePlanner) -> InfeasibleError:
    """The GPU's memory is reachable, but only with more pinned host memory than the budget."""
    free = PipelinePlanner(profile, gpu, usable, planner.steps, planner.allocator, planner.rehash, planner.pinned)
    found = free.best(usable, None)
    need = free.host_total(free.evaluate(found[1], usable)) if found is not None else None
    needs = f"needs {human_bytes(need)} of pinned host memory" if need is not None else "needs more pinned host memory"
    source = planner.host_ram_source or "given"
    source = "" if source == "given" else " (assumed for a named GPU)" if source.startswith("assumed") else f" ({source})"
    err = InfeasibleError(
        f"{profile.model_name} {profile.frames} x {profile.height}x{profile.width} fits {gpu.name} "
        f"({human_bytes(usable)} usable) only by keeping values and weights in host memory: the plan {needs}, "
        f"beyond the host memory budget of {human_bytes(planner.host_ram_bytes)}{source}. Give more host memory "
        f"(host_ram_gb= / --host-ram-gb), a GPU with more memory, a smaller resolution or fewer frames."
    )
    err.part, err.host_bytes, err.host_ram_bytes = "pinned host memory", need, planner.host_ram_bytes
    return err


def _assemble(profile, planner, resident, results, cap, max_latency_s) -> Plan:
    gpu = planner.gpu
    components: dict[str, ComponentPlan] = {
        c.component: ComponentPlan(component=c.component, model=c.model, resident=resident[c.component])
        for c in profile.components
    }
    for stage in profile.stages:  # a stage's own plan (vae_encoder) runs on its attribute, resident with it
        if stage.profile is not None and stage.plan_name not in components:
            components[stage.plan_name] = ComponentPlan(
                component=stage.plan_name, attribute=stage.component, model=stage.profile.model,
                resident=resident[stage.component])
    stages = []
    transfer = 0.0
    placed_peak = streamed_total = 0
    for r in results:
        stage = r.stage
        streamed = placed = 0
        if r.solution is not None:
            model = planner.models[stage.stage]
            comp = components[stage.plan_name]
            components[stage.plan_name] = comp.model_copy(
                update={"model": stage.profile.model, "shape": stage.profile.shape, **plan_fields(model, r.solution)}
            )
            placed, streamed = planner.stage_host_bytes(r)
            if planner.rehash is not None and stage.per_step:  # keys pay a full call's copies, the rest a reuse call's
                transfer += planner.rehash.transfer_s(model, r.solution)
            else:
                transfer += r.solution.transfer_s * planner.calls(stage)
            placed_peak = max(placed_peak, placed)
            streamed_total += streamed
        stages.append(StagePrediction(
            stage=stage.stage, component=stage.plan_name, calls=planner.calls(stage),
            peak_bytes=r.base + r.needed, weight_bytes=r.weights, held_bytes=planner.held_bytes(stage),
            activation_bytes=r.activation, needed_bytes=r.needed,
            original_activation_bytes=stage.activation_bytes, peak_unit=r.peak_unit, seconds=round(r.seconds, 4),
            streamed_bytes=streamed, host_bytes=placed + streamed,
        ))
    worst = max(results, key=lambda r: r.base + r.needed)
    denoise = next((r for r in results if r.stage.per_step and r.solution is not None), None)
    all_weights = sum(planner.weights.values())
    original = gpu.cuda_context_bytes + max(
        all_weights + s.extra_weight_bytes + s.held_bytes + s.activation_bytes for s in profile.stages
    )
    worst_cost = max(worst.solution.costs, key=lambda c: c.needed_bytes) if worst.solution else None
    prediction = Prediction(
        peak_bytes=planner.peak(results),
        context_bytes=gpu.cuda_context_bytes,
        weight_bytes=worst.weights,
        live_bytes=(worst_cost.live_bytes if worst_cost else 0) + planner.held_bytes(worst.stage),
        transient_bytes=worst_cost.transient_bytes if worst_cost else worst.activation,
        allocator_bytes=worst.needed - (worst_cost.activation_bytes if worst_cost else worst.activation),
        margin_bytes=planner.margin,
        activation_peak_bytes=worst.activation,
        peak_unit=worst.peak_unit or worst.stage.component,
        peak_stage=worst.stage.stage,
        original_activation_peak_bytes=max(s.activation_bytes for s in profile.stages),
        original_peak_bytes=original,
        unet_call_s=round(denoise.solution.latency_s, 6) if denoise else 0.0,
        latency_s=round(planner.latency(results), 4),
        streamed_bytes=worst_cost.streamed_bytes if worst_cost else 0,
        host_bytes=placed_peak + streamed_total,
        transfer_s=round(transfer, 4),
        latency_calibrated=gpu.calibrated,
        allocator_model=f"{planner.allocator}: factor from replays of the traced allocation sequences",
    )
    solved = [r.solution for r in results if r.solution is not None]
    return Plan(
        model_name=profile.model_name,
        pipeline=profile.pipeline,
        height=profile.height,
        width=profile.width,
        frames=profile.frames,
        components=list(components.values()),
        target=Target(
            gpu=gpu.name, usable_bytes=planner.usable, max_latency_s=max_latency_s,
            objective="min_peak" if max_latency_s is not None else "min_latency",
            allocator=planner.allocator, attention_kernel=profile.attention_kernel, steps=planner.steps,
            pinned=planner.pinned, host_ram_bytes=planner.host_ram_bytes, host_ram_source=planner.host_ram_source,
        ),
        prediction=prediction,
        stages=stages,
        solver=SolverInfo(
            method=" + ".join(dict.fromkeys(s.method for s in solved)) + "; residency by enumeration",
            status="Optimal" if all(s.status == "Optimal" for s in solved) else "see stages",
            gap=max((s.gap or 0.0) for s in solved) if solved else 0.0,
            solve_seconds=round(sum(s.seconds for s in solved), 4),
            candidates=sum(s.candidates for s in solved),
        ),
    )


def repriced_latency(plan: Plan, profile: PipelineProfile, gpu, *, pinned: bool) -> float:
    """``plan``'s predicted latency with its host-link copies priced at the pinned (``pinned=True``) or
    pageable rate: each sliced stage is priced both ways over the plan's own segments, placement and
    streamed blocks, and the difference is added to the prediction. ValueError when ``profile`` is not
    the one the plan was made from (another model or shape)."""
    stages = {s.stage: s for s in profile.stages if s.profile is not None}
    extra = 0.0
    for pred in plan.stages:
        stage = stages.get(pred.stage)
        if stage is None:
            continue
        comp = plan.component(pred.component)
        if comp.shape != stage.profile.shape or comp.model.config_hash != stage.profile.model.config_hash:
            raise ValueError(f"the {pred.stage} profile found is for another model or shape")
        was, now = (stage_seconds(plan, pred, CostModel(stage.profile, gpu, plan.target.allocator, pinned=flag),
                                  stage.per_step) for flag in (True, pinned))
        extra += now - was
    return round(plan.prediction.latency_s + extra, 4)


def stage_seconds(plan: Plan, pred: StagePrediction, model: CostModel, per_step: bool) -> float:
    """Predicted seconds of every call of a sliced stage under ``plan`` (its host copies at ``model``'s
    rate; moving a non-resident component is not included). A Step Rehash stage (``per_step``, the
    denoiser's): key and reuse calls."""
    from .plan import component_seconds, segments_of
    from .rehash import reuse_seconds

    comp = plan.component(pred.component)
    steps = plan.rehash.steps if plan.rehash is not None else 0
    if steps and per_step and pred.calls % steps == 0:  # per call of a step
        keys = len(plan.rehash.key_steps)
        reuse = reuse_seconds(model, segments_of(model, comp), plan.rehash.cut, comp.host, comp.streamed)
        return pred.calls // steps * (keys * component_seconds(model, comp) + (steps - keys) * reuse)
    return pred.calls * component_seconds(model, comp)

