"""Plan a whole pipeline run: slicing per stage and which weights stay on the GPU. No torch.

At each stage the GPU holds the CUDA context, the weights of every *resident* component plus the
stage's own component, the tensors other stages left behind (latents, embeddings), and the
stage's activations. A non-resident component is moved to the GPU before each of its stages and
off after it (cost: twice its bytes over the GPU's PCIe bandwidth). Given the residency, each
sliced stage (the UNet, the VAE decoder) is planned independently within what is left of the
budget (:mod:`.solve`); the residency itself is chosen by trying every assignment (2^components,
a handful). The pipeline's peak is the largest stage peak.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .costs import CostModel, roofline_seconds
from .errors import InfeasibleError
from .fmt import human_bytes
from .plan import MARGIN_FRACTION, to_component
from .schema import (
    ComponentPlan,
    PipelineProfile,
    Plan,
    Prediction,
    SolverInfo,
    StagePrediction,
    Target,
)
from .solve import Solution, min_needed, solve


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


class PipelinePlanner:
    def __init__(self, profile: PipelineProfile, gpu, usable: int, steps: int, allocator: str, rehash=None):
        self.profile, self.gpu, self.usable, self.steps, self.allocator = profile, gpu, usable, steps, allocator
        self.margin = int(usable * MARGIN_FRACTION)
        self.weights = {c.component: c.weight_bytes for c in profile.components}
        self.models = {
            s.stage: CostModel(s.profile, gpu, allocator) for s in profile.stages if s.profile is not None
        }
        # Step Rehash (planner.rehash.StageRehash): groups kept off the cut, reuse calls priced, cache held.
        self.rehash = rehash
        for s in profile.stages:
            if rehash is not None and s.per_step and s.profile is not None:
                self.models[s.stage] = rehash.constrain(self.models[s.stage])

    def calls(self, stage) -> int:
        return self.steps if stage.per_step else 1

    def evaluate(self, resident: dict[str, bool], cap: int, method: str = "dp") -> list[_StageResult] | None:
        """Every stage within ``cap`` bytes, fastest, for this residency; None if one cannot fit."""
        results = []
        for stage in self.profile.stages:
            on_gpu = sum(w for c, w in self.weights.items() if resident[c] or c == stage.component)
            weights = on_gpu + stage.extra_weight_bytes
            base = self.gpu.cuda_context_bytes + self.margin + weights + self.held_bytes(stage)
            budget = min(cap, self.usable) - base
            moved = not resident.get(stage.component, True)
            transfer = 2 * self.weights[stage.component] / (self.gpu.pcie_gbps * 1e9) if moved else 0.0
            if stage.profile is not None:
                try:
                    if budget <= 0:
                        return None
                    sol = solve(self.models[stage.stage], budget, method=method)
                except InfeasibleError:
                    return None
                worst = max(sol.costs, key=lambda c: c.needed_bytes)
                seconds = sol.latency_s * self.calls(stage) + transfer
                if self.rehash is not None and stage.per_step:
                    seconds = self.rehash.seconds(self.models[stage.stage], sol) + transfer
                activation = max(c.activation_bytes for c in sol.costs)
                unit = self.models[stage.stage].units[worst.peak_unit].name
                results.append(_StageResult(stage, weights, base, sol, worst.needed_bytes, activation, seconds, unit))
            else:
                needed = int(stage.activation_bytes * self._factor())
                if needed > budget:
                    return None
                seconds = roofline_seconds(stage.flops, stage.bytes_moved, self.gpu, self.profile.dtype)
                seconds = seconds * self.calls(stage) + transfer
                results.append(_StageResult(stage, weights, base, None, needed, stage.activation_bytes, seconds, None))
        return results

    def _factor(self) -> float:
        unet = next((s.profile for s in self.profile.stages if s.profile is not None), None)
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

    def best(self, cap: int, max_latency_s: float | None):
        best = None
        for resident in self.residencies():
            results = self.evaluate(resident, cap)
            if results is None:
                continue
            latency = self.latency(results)
            if max_latency_s is not None and latency > max_latency_s:
                continue
            key = (latency, self.peak(results))
            if best is None or key < best[0]:
                best = (key, resident)
        return best

    def held_bytes(self, stage) -> int:
        """Tensors the stage holds from others; Step Rehash's cached cut through every denoising call."""
        held = stage.held_bytes
        if self.rehash is not None and stage.per_step and stage.profile is not None:
            held += self.rehash.cache_bytes(self.models[stage.stage])
        return held

    def floor(self) -> tuple[int, str, str]:
        """The smallest reachable pipeline peak, and the stage and unit that set it."""
        best = None
        for resident in self.residencies():
            worst = None
            for stage in self.profile.stages:
                on_gpu = sum(w for c, w in self.weights.items() if resident[c] or c == stage.component)
                base = (self.gpu.cuda_context_bytes + self.margin + on_gpu + stage.extra_weight_bytes
                        + self.held_bytes(stage))
                if stage.profile is not None:
                    needed, unit = min_needed(self.models[stage.stage])
                else:
                    needed, unit = int(stage.activation_bytes * self._factor()), stage.component
                if worst is None or base + needed > worst[0]:
                    worst = (base + needed, stage.stage, unit)
            if best is None or worst[0] < best[0]:
                best = worst
        return best


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
) -> Plan:
    """The fastest run within the GPU's memory, or (given ``max_latency_s``) the smallest peak within it.
    ``rehash``: a Step Rehash schedule to price in (:class:`.rehash.StageRehash`)."""
    usable = usable_bytes if usable_bytes is not None else gpu.memory_usable_bytes
    planner = PipelinePlanner(profile, gpu, usable, steps, allocator, rehash)
    found = planner.best(usable, None)
    if found is None:
        floor, stage, unit = planner.floor()
        err = InfeasibleError(
            f"{profile.model_name} {profile.frames} x {profile.height}x{profile.width} cannot fit {gpu.name} "
            f"({human_bytes(usable)} usable): the smallest reachable peak is {human_bytes(floor)}, set by the "
            f"{stage} stage ({unit}) with every other component's weights off the GPU. Use a GPU with at least "
            f"{human_bytes(floor)}, a smaller resolution or fewer frames."
        )
        err.min_peak_bytes, err.stage, err.unit = floor, stage, unit
        raise err
    cap = usable
    if max_latency_s is not None:
        if found[0][0] > max_latency_s:
            raise InfeasibleError(
                f"no plan meets max_latency_s={max_latency_s:g}: the fastest plan within memory takes "
                f"{found[0][0]:.2f} s. Raise the latency limit or give more memory."
            )
        lo, hi = planner.floor()[0], usable
        while hi - lo > 2**20:  # 1 MiB resolution on the peak
            mid = (lo + hi) // 2
            if planner.best(mid, max_latency_s) is not None:
                hi = mid
            else:
                lo = mid
        cap = hi
        found = planner.best(cap, max_latency_s)
    resident = found[1]
    results = planner.evaluate(resident, cap, method=method)
    return _assemble(profile, planner, resident, results, cap, max_latency_s)


def _assemble(profile, planner, resident, results, cap, max_latency_s) -> Plan:
    gpu = planner.gpu
    components: dict[str, ComponentPlan] = {
        c.component: ComponentPlan(component=c.component, model=c.model, resident=resident[c.component])
        for c in profile.components
    }
    stages = []
    for r in results:
        stage = r.stage
        if r.solution is not None:
            model = planner.models[stage.stage]
            slices, groups = to_component(model, r.solution.segments)
            comp = components[stage.component]
            components[stage.component] = comp.model_copy(
                update={"model": stage.profile.model, "shape": stage.profile.shape, "slices": slices, "groups": groups}
            )
        stages.append(StagePrediction(
            stage=stage.stage, component=stage.component, calls=planner.calls(stage),
            peak_bytes=r.base + r.needed, weight_bytes=r.weights, held_bytes=planner.held_bytes(stage),
            activation_bytes=r.activation, needed_bytes=r.needed,
            original_activation_bytes=stage.activation_bytes, peak_unit=r.peak_unit, seconds=round(r.seconds, 4),
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
