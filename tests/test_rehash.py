"""Step Rehash runtime: key steps exact, plumbing exact, schedules run as planned, bad input refused."""

from __future__ import annotations

import pytest
import torch
from tiny import svd_inputs, tiny_svd_unet
from vramplan.planner.errors import PlanConflictError
from vramplan.planner.rehash import (
    RehashCutError,
    RehashStepsError,
    SchedulerOrderError,
    candidate_cuts,
    reuse_names,
)
from vramplan.planner.schema import Group, Plan, RehashPlan, SampleShape
from vramplan.runtime.adapters.base import adapter_for
from vramplan.runtime.apply import apply_plan, uniform_component
from vramplan.runtime.program import Program
from vramplan.runtime.rehash import (
    apply_rehash,
    execute_keeping,
    rehash_cuts,
    reuse_ops,
    reuse_segments,
)


def _rehash(cut: str, keys: list[int], steps: int) -> RehashPlan:
    return RehashPlan(
        mode="uniform", cut=cut, steps=steps, key_steps=keys, quality="uncalibrated", original_unet_flops=1,
        unet_flops=1, key_call_s=0.0, reuse_call_s=0.0, latency_saved_s=0.0, cache_bytes=0,
    )


@pytest.fixture(scope="module")
def unet():
    return tiny_svd_unet()


@pytest.fixture(scope="module")
def motion_unet():
    from diffusers import UNetMotionModel
    from vramplan.runtime.tiny import TINY_MOTION_UNET, randomize_norms

    torch.manual_seed(0)
    return randomize_norms(UNetMotionModel(**TINY_MOTION_UNET)).eval()


def _out(x):
    return x.sample if hasattr(x, "sample") else x[0]


def _inputs(model, batch=2):
    if type(model).__name__ == "UNetMotionModel":
        shape = SampleShape(batch=batch, frames=4, latent_height=8, latent_width=8, dtype="fp32")
        return list(adapter_for(model).example_inputs(model, shape, seed=3))
    return svd_inputs(model, batch=batch)


def test_cuts_listed_by_adapter_match_the_planner_rule(unet, motion_unet):
    for model in (unet, motion_unet):
        ops, result = adapter_for(model).ops(model)
        assert candidate_cuts([_Unit(op) for op in ops]) == adapter_for(model).rehash_cuts(model)
        cuts = rehash_cuts(model)
        assert cuts and set(cuts) <= set(adapter_for(model).rehash_cuts(model))
        # The last up-path temporal layer feeds no skip connection: its reuse would replay a stale output.
        assert adapter_for(model).rehash_cuts(model)[-1] not in cuts


class _Unit:
    def __init__(self, op):
        self.name, self.kind, self.inputs = op.output, op.spec.kind, list(op.inputs)


def test_reuse_program_is_the_dependency_closure(unet):
    ops, result = adapter_for(unet).ops(unet)
    cut = rehash_cuts(unet)[-1]
    names = [op.output for op in reuse_ops(ops, result, cut)]
    assert names[0] == "conv_in" and names[-1] == result
    assert cut not in names and "mid_block.resnets.0.spatial_res_block" not in names
    index = {op.output: i for i, op in enumerate(ops)}
    assert all(index[a] < index[b] for a, b in zip(names, names[1:], strict=False))
    assert len(names) < len(ops) // 2
    with pytest.raises(RehashCutError):
        reuse_names([(op.output, op.inputs) for op in ops], result, "no.such.value")


@pytest.mark.parametrize("which", ["svd", "motion"])
@pytest.mark.parametrize("k", [1, 2])
def test_key_step_exact_and_plumbing(which, k, unet, motion_unet):
    """A key call equals the stock forward; the reuse program fed the same call's cut equals it too."""
    model = unet if which == "svd" else motion_unet
    args = _inputs(model)
    with torch.no_grad():
        expected = _out(model(*args))
        adapter = adapter_for(model)
        ops, result = adapter.ops(model)
        shape = SampleShape(batch=2, frames=args[0].shape[1 if which == "svd" else 2], latent_height=8,
                            latent_width=8, dtype="fp32")
        cut = rehash_cuts(model)[0]
        comp = uniform_component(model, k, shape)
        # The uniform plan groups across the cut; end the group at the cut as a rehash plan would.
        comp = _split_groups_at(comp, ops, cut)
        from vramplan.runtime.apply import build_segments

        segments, _ = build_segments(ops, comp)
        binding = adapter.bind(model, *args)
        full, kept = execute_keeping(
            binding.program(ops, result), segments, {cut}
        )
        torch.testing.assert_close(_out(full), expected, rtol=1e-5, atol=1e-5)
        reuse = reuse_ops(ops, result, cut)
        binding = adapter.bind(model, *args)
        layout = next(op.layout for op in ops if op.output == cut)
        program = Program(reuse, {**binding.env, cut: kept[cut]}, {**binding.layouts, cut: layout}, result,
                          binding.finish, binding.globals)
        from vramplan.runtime.executor import execute

        torch.testing.assert_close(_out(execute(program, reuse_segments(segments, reuse, cut))), expected,
                                   rtol=1e-5, atol=1e-5)


def _split_groups_at(comp, ops, cut):
    names = [op.output for op in ops]
    groups = []
    for g in comp.groups:
        if cut in g.units and g.units[-1] != cut:
            i = g.units.index(cut) + 1
            groups += [Group(units=part, axis=g.axis, k=g.k) for part in (g.units[:i], g.units[i:]) if len(part) > 1]
        else:
            groups.append(g)
    assert all(u in names for g in groups for u in g.units)
    return comp.model_copy(update={"groups": groups})


def _trajectory(model, handle_factory, steps, seed=5):
    """A fake denoising loop: one UNet call per step on drifting inputs."""
    args = svd_inputs(model, batch=2)
    outs = []
    handle = handle_factory()
    try:
        with torch.no_grad():
            x = args[0]
            for s in range(steps):
                y = _out(model(x, torch.tensor(10.0 - s), *args[2:]))
                outs.append(y)
                x = torch.cat([x[:, :, :4] - 0.05 * y, x[:, :, 4:]], dim=2)
    finally:
        if handle is not None:
            handle.remove()
    return outs, handle


def test_all_key_schedule_reproduces_no_rehash(unet):
    cut = rehash_cuts(unet)[0]
    base, _ = _trajectory(unet, lambda: None, 4)
    outs, handle = _trajectory(unet, lambda: apply_rehash(unet, _rehash(cut, [0, 1, 2, 3], 4)), 4)
    for a, b in zip(outs, base, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert handle.key_steps == [0, 1, 2, 3] and "forward" not in unet.__dict__


def test_schedule_reuses_and_keys_stay_exact(unet):
    cut = rehash_cuts(unet)[0]
    base, _ = _trajectory(unet, lambda: None, 4)
    outs, handle = _trajectory(unet, lambda: apply_rehash(unet, _rehash(cut, [0, 2], 4)), 4)
    assert handle.key_steps == [0, 2] and handle.reused_steps == [1, 3]
    torch.testing.assert_close(outs[0], base[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[1], base[1], atol=1e-6)  # step 1 reused step 0's feature
    assert torch.isfinite(outs[3]).all()


def test_cache_not_overwritten_by_buffer_reuse(unet):
    """With slicing, later ops write into dying buffers; the cached cut must survive the call."""
    cut = rehash_cuts(unet)[0]
    shape = SampleShape(batch=2, frames=5, latent_height=8, latent_width=8, dtype="fp32")
    ops, _ = adapter_for(unet).ops(unet)
    comp = _split_groups_at(uniform_component(unet, 2, shape), ops, cut)
    args = svd_inputs(unet, batch=2)
    captured = {}

    def observer(op, value, length):
        if op.output == cut:
            captured[cut] = value.clone()  # the cut as its (unsliced) segment leaves it

    with torch.no_grad():
        adapter = adapter_for(unet)
        ops, result = adapter.ops(unet)
        binding = adapter.bind(unet, *args)
        from vramplan.runtime.executor import execute, unit_by_unit

        execute(binding.program(ops, result),
                unit_by_unit(ops), observer=observer)
        with apply_rehash(unet, _rehash(cut, [0], 3), comp) as handle:
            unet(*args)
            torch.testing.assert_close(handle.cache, captured[cut], rtol=1e-5, atol=1e-5)
            before = handle.cache.clone()
            unet(*args)  # a reuse call reads the cache as an input: never written into
            torch.testing.assert_close(handle.cache, before, rtol=0, atol=0)


def test_group_across_cut_refused(unet):
    shape = SampleShape(batch=2, frames=5, latent_height=8, latent_width=8, dtype="fp32")
    comp = uniform_component(unet, 2, shape)
    crossed = [c for c in rehash_cuts(unet) for g in comp.groups if c in g.units and g.units[-1] != c]
    assert crossed, "the uniform plan should group across a cut"
    cut = crossed[0]
    with pytest.raises(RehashCutError, match="runs across the rehash cut"):
        apply_rehash(unet, _rehash(cut, [0], 2), comp)
    assert "forward" not in unet.__dict__


def test_more_calls_than_steps_refused(unet):
    cut = rehash_cuts(unet)[0]
    args = svd_inputs(unet, batch=2)
    with torch.no_grad(), apply_rehash(unet, _rehash(cut, [0], 2)):
        unet(*args)
        unet(*args)
        with pytest.raises(SchedulerOrderError, match="more than one UNet call per step"):
            unet(*args)


def test_second_plan_on_the_unet_refused(unet):
    shape = SampleShape(batch=2, frames=5, latent_height=8, latent_width=8, dtype="fp32")
    with apply_plan(unet, uniform_component(unet, 1, shape)):
        with pytest.raises(PlanConflictError):
            apply_rehash(unet, _rehash(rehash_cuts(unet)[0], [0], 2))


def test_pipeline_scheduler_checks():
    from diffusers import HeunDiscreteScheduler
    from vramplan.runtime.tiny import tiny_svd_pipeline

    pipe = tiny_svd_pipeline()
    cut = rehash_cuts(pipe.unet)[0]
    with apply_rehash(pipe, _rehash(cut, [0, 2], 4)) as handle:
        with pytest.raises(RehashStepsError, match="num_inference_steps=4"):
            pipe.scheduler.set_timesteps(3)
        pipe.scheduler.set_timesteps(4)
        assert handle.step == 0
    assert "set_timesteps" not in pipe.scheduler.__dict__
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with apply_rehash(pipe, _rehash(cut, [0, 2], 4)):
        with pytest.raises(SchedulerOrderError, match="HeunDiscreteScheduler calls the UNet 2 times"):
            pipe.scheduler.set_timesteps(4)


def test_key_step_gradients_under_gradient_checkpointing():
    """A rehash handle honours the model's gradient checkpointing like a plan: a key step's input
    gradient equals the original's, and checkpointed slices really run again in backward."""
    model = tiny_svd_unet()
    inputs = svd_inputs(model, batch=1)
    x = inputs[0].clone().requires_grad_()
    _out(model(x, *inputs[1:])).square().sum().backward()
    expected = x.grad.clone()
    cut = rehash_cuts(model)[0]
    calls = []
    convs = [m for m in model.down_blocks[0].modules() if isinstance(m, torch.nn.Conv2d)]

    def key_step_grad():
        calls.clear()
        hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in convs]
        handle = apply_rehash(model, _rehash(cut, [0], 1))
        try:
            y = x.detach().clone().requires_grad_()
            _out(model(y, *inputs[1:])).square().sum().backward()
        finally:
            handle.remove()
            for hook in hooks:
                hook.remove()
        return y.grad, len(calls)

    plain, plain_calls = key_step_grad()
    model.enable_gradient_checkpointing()
    checkpointed, checkpointed_calls = key_step_grad()
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(checkpointed, expected, rtol=1e-5, atol=1e-5)
    assert checkpointed_calls > plain_calls > 0


def test_a_key_step_holds_one_cache_not_two(unet):
    """The planner holds one cached cut through denoising: a later key step must drop the old cache
    before it runs (it never reads it), so its peak equals the first key step's."""
    from vramplan.runtime.memory import MemoryTracker

    cut = rehash_cuts(unet)[-1]
    args = svd_inputs(unet, batch=2)
    peaks = []
    with torch.no_grad(), apply_rehash(unet, _rehash(cut, [0, 2], 3)) as handle, MemoryTracker() as tracker:
        for _ in range(3):
            tracker.reset_peak()
            out = unet(*args)
            peaks.append(tracker.peak_bytes)  # live bytes at the call's peak, the cache held between calls included
            del out
        cache = handle.cache
    assert handle.key_steps == [0, 2] and cache is None
    assert tracker.peak_bytes > 0 and peaks[2] <= peaks[0]


def test_measure_cuts_on_the_models_device(unet):
    """with_rehash counts FLOPs on the user's model wherever it lives (inputs on its device, not the CPU);
    meta stands in for CUDA here."""
    import copy

    from vramplan.runtime.rehash import measure_cuts

    shape = SampleShape(batch=2, frames=5, latent_height=8, latent_width=8, dtype="fp32")
    cuts = rehash_cuts(unet)
    full, reuse, sizes = measure_cuts(copy.deepcopy(unet).to("meta"), shape, cuts)
    assert full > max(reuse.values()) > 0 and list(reuse) == cuts
    assert sizes == measure_cuts(unet, shape, cuts)[2]


def test_cpu_flops_count_attention(unet):
    """PyTorch's counter sees no FLOPs in the CPU fused attention kernel; ours counts them, so a CPU
    model's full and reuse FLOPs equal the meta model's (whose attention runs as counted matmuls)."""
    import copy

    from vramplan.runtime.rehash import measure_cuts

    shape = SampleShape(batch=2, frames=5, latent_height=8, latent_width=8, dtype="fp32")
    cuts = rehash_cuts(unet)
    assert measure_cuts(unet, shape, cuts) == measure_cuts(copy.deepcopy(unet).to("meta"), shape, cuts)


def _cut_module(model, cut: str):
    """The diffusers module whose output is the cut value (a whole res block, transformer or motion module)."""
    for suffix in (".temporal_res_block.norm2", ".proj_out"):
        cut = cut.removesuffix(suffix)
    return model.get_submodule(cut)


@pytest.mark.parametrize("which", ["svd", "motion"])
def test_reuse_call_is_the_stock_forward_with_the_cut_replaced(which, unet, motion_unet):
    """Oracle: diffusers' own forward on step 2's inputs with the cut module's output replaced by step 1's
    equals a key call on step 1 then a reuse call on step 2. So everything upstream of the cut is skipped
    and everything else (skip connections read after the cut included) is recomputed from step 2's inputs."""
    model = unet if which == "svd" else motion_unet
    first, second = _inputs(model), _inputs(model)
    second[0] = torch.randn_like(first[0])
    second[1] = first[1] * 0.5
    saved = {}

    def keep(_m, _args, out):
        saved["cut"] = out if isinstance(out, torch.Tensor) else out[0]

    def replace(_m, _args, out):
        return saved["cut"] if isinstance(out, torch.Tensor) else (saved["cut"], *out[1:])

    for cut in (rehash_cuts(model)[0], rehash_cuts(model)[-1]):
        module = _cut_module(model, cut)
        with torch.no_grad():
            hook = module.register_forward_hook(keep)
            model(*first)
            hook.remove()
            hook = module.register_forward_hook(replace)
            expected = _out(model(*second))
            hook.remove()
            assert not torch.allclose(expected, _out(model(*second)), atol=1e-3)  # the cut matters
            with apply_rehash(model, _rehash(cut, [0], 2)) as handle:
                model(*first)
                got = _out(model(*second))
        assert handle.reused_steps == [1]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_value_that_is_no_rehash_cut_is_refused(unet):
    """Only the adapter's candidate cuts that still read the step's input: not an arbitrary value (conv_in),
    and not the last up-path temporal layer, whose reuse would replay a stale output whatever the latents."""
    from vramplan.runtime.rehash import with_rehash

    stale = adapter_for(unet).rehash_cuts(unet)[-1]
    shape = SampleShape(batch=2, frames=5, latent_height=8, latent_width=8, dtype="fp32")
    for cut in (stale, "conv_in"):
        with pytest.raises(RehashCutError, match="not a rehash cut"):
            apply_rehash(unet, _rehash(cut, [0], 2))
        assert "forward" not in unet.__dict__
        with pytest.raises(RehashCutError, match="not a rehash cut"):
            with_rehash(Plan(components=[uniform_component(unet, 1, shape)]), unet, mode="uniform", steps=4, cut=cut)


def test_a_copy_of_a_rehashed_pipeline_has_its_own_scheduler():
    """deepcopy of a pipeline under rehash: the copy's scheduler sets its own timesteps, without the
    original handle's checks or resets (copies of planned models run unplanned)."""
    import copy

    from vramplan.runtime.tiny import tiny_svd_pipeline

    pipe = tiny_svd_pipeline()
    cut = rehash_cuts(pipe.unet)[0]
    with apply_rehash(pipe, _rehash(cut, [0, 2], 4)) as handle:
        pipe.scheduler.set_timesteps(4)
        handle.step = 2
        twin = copy.deepcopy(pipe)
        twin.scheduler.set_timesteps(5)  # not the plan's 4 steps: fine for an unplanned copy
        assert len(twin.scheduler.timesteps) == 5 and len(pipe.scheduler.timesteps) == 4
        assert handle.step == 2  # the original handle was not reset by the copy
        with pytest.raises(RehashStepsError):
            pipe.scheduler.set_timesteps(5)


def test_split_groups_keeps_depth_and_drops_recompute_that_lost_its_producer():
    from vramplan.planner.schema import ComponentPlan, Group, ModelRef
    from vramplan.runtime.rehash import split_groups_at

    a, b, c, d = "x.norm1", "x.norm2", "y.norm1", "y.norm2"
    comp = ComponentPlan(
        model=ModelRef(class_name="UNet", config_hash="0"),
        slices={u: 4 for u in (a, b, c, d)},
        groups=[Group(units=[a, b, c, d], axis="tokens", k=4, depth=2)],
        recompute=[b, d],
    )
    split = split_groups_at(comp, [a])  # cut after x.norm1: x.norm2 now starts its piece
    assert [g.units for g in split.groups] == [[b, c, d]]
    assert split.groups[0].depth == 2
    assert split.recompute == [d]
