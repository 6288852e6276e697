"""Plans as hooks: composition with accelerate's, diffusers' and PyTorch's hooks, removal in any
order, one plan per model, hooks on modules the executor bypasses, gradient checkpointing."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny import svd_inputs, tiny_svd_unet
from vramplan.planner.errors import PlanConflictError
from vramplan.runtime import apply as apply_module
from vramplan.runtime import apply_plan, sample_shape, uniform_plan
from vramplan.runtime.hooks import PLAN_HOOK, Hook, get_hook, hooks_on, register_hook, reset_state

K = 2


@pytest.fixture(scope="module")
def unet():
    return tiny_svd_unet()


@pytest.fixture(scope="module")
def inputs(unet):
    return svd_inputs(unet, batch=1, frames=3, height=4, width=4)


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


@pytest.fixture(scope="module")
def expected(unet, inputs):
    return _run(unet, inputs)


def _plan(model, inputs, k=K):
    return uniform_plan(model, k, sample_shape(inputs[0]))


def _clean(model):
    """Nothing of anybody's hooks is left on the model (accelerate's removal leaves the original bound
    ``forward`` as an instance attribute, as it does without a plan)."""
    for attr in ("_old_forward", "_hf_hook", "_vramplan_hooks"):
        assert attr not in model.__dict__, attr
    forward = model.__dict__.get("forward")
    assert forward is None or forward.__func__ is type(model).forward, forward
    assert not getattr(model.__dict__.get("_diffusers_hook"), "hooks", None)


# ---------------------------------------------------------------------------------- one plan per model
def test_a_second_plan_is_refused_and_the_first_removal_restores(unet, inputs, expected):
    h1 = apply_plan(unet, _plan(unet, inputs, 2))
    try:
        with pytest.raises(PlanConflictError, match="already runs under a plan"):
            apply_plan(unet, _plan(unet, inputs, 3))
        assert get_hook(unet, PLAN_HOOK) is h1
    finally:
        h1.remove()
    _clean(unet)
    assert torch.equal(_run(unet, inputs), expected)


def test_a_removed_plan_can_be_applied_again(unet, inputs, expected):
    for k in (2, 3):
        with apply_plan(unet, _plan(unet, inputs, k)):
            torch.testing.assert_close(_run(unet, inputs), expected, rtol=1e-5, atol=1e-5)
    _clean(unet)


# ---------------------------------------------------------------------------------- composition
class _Count:
    def __init__(self):
        self.n = 0


def _accelerate(counter):
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Counting(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            counter.n += 1
            return args, kwargs

    return (lambda m: add_hook_to_module(m, Counting())), (lambda m: remove_hook_from_module(m))


def _diffusers(counter):
    from diffusers.hooks import HookRegistry, ModelHook

    class Counting(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            counter.n += 1
            return args, kwargs

    def attach(m):
        HookRegistry.check_if_exists_or_initialize(m).register_hook(Counting(), "count")

    return attach, (lambda m: m._diffusers_hook.remove_hook("count", recurse=False))


def _ours(counter):
    class Counting(Hook):
        def wrap(self, module, call_next, args, kwargs):
            counter.n += 1
            return call_next(*args, **kwargs)

    handles = {}

    def attach(m):
        handles["h"] = register_hook(m, Counting(), "count")

    return attach, (lambda m: handles.pop("h").remove())


def _torch(counter):
    handles = {}

    def attach(m):
        handles["h"] = m.register_forward_pre_hook(lambda *_: setattr(counter, "n", counter.n + 1))

    return attach, (lambda m: handles.pop("h").remove())


FOREIGN = {"accelerate": _accelerate, "diffusers": _diffusers, "ours": _ours, "torch": _torch}
WRAPPERS = ("accelerate", "diffusers", "ours")  # the ones that wrap ``forward`` (torch hooks live in __call__)

ATTACH_ORDERS = [
    ("plan", "accelerate", "diffusers", "ours", "torch"),
    ("accelerate", "diffusers", "plan", "ours", "torch"),
    ("diffusers", "ours", "torch", "accelerate", "plan"),
]


def _removal_orders(attach: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Orders in which the hooks can be removed. accelerate's and diffusers' removal put back the
    ``forward`` they wrapped, dropping whatever wrapped them since (their own limitation), so each is
    removed only while it is the outermost wrapper; the plan and our hooks go in any order."""
    valid = []
    for order in itertools.permutations(attach):
        alive = list(attach)
        ok = True
        for name in order:
            if name in ("accelerate", "diffusers"):
                outer = [a for a in alive[alive.index(name) + 1 :] if a in WRAPPERS]
                ok = ok and not outer
            alive.remove(name)
        if ok:
            valid.append(order)
    # a handful, deterministic: first, last and every eighth
    return sorted(set(valid[::8] + valid[-1:]))


CASES = [(a, r) for a in ATTACH_ORDERS for r in _removal_orders(a)]


@pytest.mark.parametrize(("attach", "removal"), CASES, ids=[f"{'-'.join(a)}|{'-'.join(r)}" for a, r in CASES])
def test_plan_composes_with_other_hooks_and_removes_in_any_order(unet, inputs, expected, attach, removal):
    counters = {name: _Count() for name in FOREIGN}
    hooks = {name: FOREIGN[name](counters[name]) for name in FOREIGN}
    plan_handle = None
    for name in attach:
        if name == "plan":
            plan_handle = apply_plan(unet, _plan(unet, inputs))
        else:
            hooks[name][0](unet)
    alive = set(attach)
    try:
        for step in [None, *removal]:
            if step == "plan":
                plan_handle.remove()
            elif step is not None:
                hooks[step][1](unet)
            if step is not None:
                alive.remove(step)
            before = {n: c.n for n, c in counters.items()}
            out = _run(unet, inputs)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            fired = {n for n, c in counters.items() if c.n != before[n]}
            assert fired == alive - {"plan"}, (step, fired)
            assert (get_hook(unet, PLAN_HOOK) is not None) == ("plan" in alive)
    finally:
        for name in list(alive):
            (plan_handle.remove if name == "plan" else lambda n=name: hooks[n][1](unet))()
    _clean(unet)
    assert torch.equal(_run(unet, inputs), expected)


def test_the_plan_really_runs_under_other_wrappers(unet, inputs, monkeypatch):
    """Under an accelerate hook installed before the plan, the planned executor (not the stock
    forward) computes the output."""
    calls = []
    real = apply_module.execute
    monkeypatch.setattr(apply_module, "execute", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    attach, detach = _accelerate(_Count())
    attach(unet)
    try:
        with apply_plan(unet, _plan(unet, inputs)):
            _run(unet, inputs)
    finally:
        detach(unet)
    assert calls == [1]
    _clean(unet)


def test_accelerate_cpu_offload_installed_before_the_plan_is_called(unet, inputs, expected, monkeypatch):
    """What ``enable_model_cpu_offload`` installs (``cpu_offload_with_hook``) still moves the model
    to its execution device and back under a plan."""
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import CpuOffload

    events = []
    pre, off = CpuOffload.pre_forward, CpuOffload.offload if hasattr(CpuOffload, "offload") else None
    monkeypatch.setattr(CpuOffload, "pre_forward", lambda self, m, *a, **kw: events.append("on") or pre(self, m, *a, **kw))
    _, hook = cpu_offload_with_hook(unet, execution_device="cpu")
    try:
        with apply_plan(unet, _plan(unet, inputs)):
            torch.testing.assert_close(_run(unet, inputs), expected, rtol=1e-5, atol=1e-5)
            assert events == ["on"]
            assert unet.forward.func.__qualname__.startswith("add_hook_to_module")  # accelerate still outermost
        assert events == ["on"]
    finally:
        hook.remove()
    _clean(unet)
    del off


def test_signature_of_a_planned_forward_is_the_models(unet, inputs):
    import inspect

    before = inspect.signature(unet.forward)
    with apply_plan(unet, _plan(unet, inputs)):
        assert inspect.signature(unet.forward) == before


# ---------------------------------------------------------------------------------- bypassed modules
@pytest.mark.parametrize("container", ["down_blocks.0", "mid_block", "down_blocks.0.attentions.0"])
def test_a_pytorch_hook_on_a_bypassed_container_is_refused_by_name(unet, inputs, container):
    module = unet.get_submodule(container)
    h = module.register_forward_pre_hook(lambda *_: None)
    try:
        with pytest.raises(PlanConflictError, match=rf"{container} carries a PyTorch forward pre-hook"):
            apply_plan(unet, _plan(unet, inputs))
        assert get_hook(unet, PLAN_HOOK) is None
    finally:
        h.remove()
    _clean(unet)


def test_a_hook_added_after_the_plan_on_a_bypassed_container_is_refused_at_the_call(unet, inputs, expected):
    with apply_plan(unet, _plan(unet, inputs)):
        h = unet.mid_block.register_forward_hook(lambda *_: None)
        try:
            with pytest.raises(PlanConflictError, match="mid_block carries a PyTorch forward hook"):
                _run(unet, inputs)
        finally:
            h.remove()
        torch.testing.assert_close(_run(unet, inputs), expected, rtol=1e-5, atol=1e-5)  # usable again


def test_a_hook_on_a_module_the_plan_calls_fires(unet, inputs):
    seen = []
    h = unet.conv_in.register_forward_hook(lambda m, a, out: seen.append(out.shape[0]))
    try:
        with apply_plan(unet, _plan(unet, inputs)):
            _run(unet, inputs)
    finally:
        h.remove()
    assert sum(seen) == inputs[0].shape[0] * inputs[0].shape[1]  # every frame, in K slices
    assert len(seen) == K


def test_vae_decoder_container_hook_is_refused_and_encoder_hook_ignored():
    from diffusers import AutoencoderKLTemporalDecoder
    from vramplan.runtime.tiny import TINY_VAE

    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(**TINY_VAE).eval()
    z = torch.randn(3, 4, 4, 4)
    from vramplan.planner.schema import SampleShape

    plan = uniform_plan(vae, 2, SampleShape(batch=1, frames=3, latent_height=4, latent_width=4, dtype="fp32"))
    h = vae.decoder.mid_block.register_forward_pre_hook(lambda *_: None)
    with pytest.raises(PlanConflictError, match="decoder.mid_block carries"):
        apply_plan(vae, plan)
    h.remove()
    # The encoder does not run in decode, with or without a plan: its hooks are none of the plan's business.
    h = vae.encoder.register_forward_pre_hook(lambda *_: None)
    try:
        with torch.no_grad():
            expected = vae.decode(z, num_frames=3).sample
            with apply_plan(vae, plan):
                torch.testing.assert_close(vae.decode(z, num_frames=3).sample, expected, rtol=1e-5, atol=1e-5)
    finally:
        h.remove()
    _clean(vae)
    assert "decode" not in vae.__dict__


# ---------------------------------------------------------------------------------- diffusers' hooks
def _group_events(monkeypatch):
    from diffusers.hooks.group_offloading import ModuleGroup

    events = []
    on, off = ModuleGroup.onload_, ModuleGroup.offload_
    monkeypatch.setattr(ModuleGroup, "onload_", lambda self: events.append(("on", id(self))) or on(self))
    monkeypatch.setattr(ModuleGroup, "offload_", lambda self: events.append(("off", id(self))) or off(self))
    return events


def _fresh_unet():
    return tiny_svd_unet(seed=0)


def _block_groups(model) -> dict[str, int]:
    """Block name -> id of its offloading group (block-level offloading: one per block)."""
    found = {}
    for name, m in model.named_modules():
        registry = m.__dict__.get("_diffusers_hook")
        if name and registry is not None and "group_offloading" in registry.hooks:
            found[name] = id(registry.hooks["group_offloading"].group)
    return found


@pytest.mark.parametrize("before", [True, False], ids=["offload-then-plan", "plan-then-offload"])
def test_block_level_group_offloading_onloads_each_block_while_its_units_run(inputs, monkeypatch, before):
    """Every block is onloaded once per call, before its first unit runs, and offloaded after its last
    (a plan group spanning two blocks holds both), as the unplanned forward does."""
    from diffusers.hooks import apply_group_offloading

    model = _fresh_unet()
    expected = _run(model, inputs)
    plan = _plan(model, inputs)
    handle = None if before else apply_plan(model, plan)
    apply_group_offloading(model, onload_device="cpu", offload_device="cpu", offload_type="block_level",
                           num_blocks_per_group=1)
    groups = _block_groups(model)
    assert sorted(groups) == ["down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1"]
    events = _group_events(monkeypatch)
    violations = []

    def check(block):
        def pre(module, args):  # the block's group is onloaded (more onloads than offloads so far)
            if events.count(("on", groups[block])) <= events.count(("off", groups[block])):
                violations.append(block)

        return pre

    leaves = [model.get_submodule(n).register_forward_pre_hook(check(n.split(".resnets")[0]))
              for n in ("down_blocks.0.resnets.0.spatial_res_block.conv1", "down_blocks.1.resnets.0.spatial_res_block.conv2",
                        "up_blocks.0.resnets.1.spatial_res_block.conv1", "up_blocks.1.resnets.0.temporal_res_block.conv2")]
    try:
        unplanned = _run(model, inputs)
        counts = {g: events.count(("on", g)) for g in groups.values()}
        events.clear()
        handle = handle or apply_plan(model, plan)
        try:
            torch.testing.assert_close(_run(model, inputs), expected, rtol=1e-5, atol=1e-5)
        finally:
            handle.remove()
    finally:
        for h in leaves:
            h.remove()
    torch.testing.assert_close(unplanned, expected, rtol=1e-5, atol=1e-5)
    assert not violations
    assert {g: events.count(("on", g)) for g in groups.values()} == counts == dict.fromkeys(groups.values(), 1)
    assert {g: events.count(("off", g)) for g in groups.values()} == counts


def test_leaf_level_group_offloading_onloads_every_leaf(inputs, monkeypatch):
    from diffusers.hooks import apply_group_offloading

    model = _fresh_unet()
    expected = _run(model, inputs)
    apply_group_offloading(model, onload_device="cpu", offload_device="cpu", offload_type="leaf_level")
    events = _group_events(monkeypatch)
    torch.testing.assert_close(_run(model, inputs), expected, rtol=1e-5, atol=1e-5)
    unplanned_groups = {g for _, g in events}
    events.clear()
    with apply_plan(model, _plan(model, inputs)):
        torch.testing.assert_close(_run(model, inputs), expected, rtol=1e-5, atol=1e-5)
    assert {g for _, g in events} == unplanned_groups  # every group, also of norms the plan computes itself
    on = [g for e, g in events if e == "on"]
    off = [g for e, g in events if e == "off"]
    assert sorted(on) == sorted(off)


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.bfloat16])
def test_layerwise_casting_gives_what_it_gives_without_a_plan(inputs, storage):
    from diffusers.hooks import apply_layerwise_casting

    model = _fresh_unet()
    apply_layerwise_casting(model, storage_dtype=storage, compute_dtype=torch.float32)
    expected = _run(model, inputs)
    assert model.conv_in.weight.dtype == storage
    with apply_plan(model, _plan(model, inputs)):
        out = _run(model, inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert model.conv_in.weight.dtype == storage  # cast back after each use


def test_sequential_cpu_offload_weights_are_loaded_for_norms_the_plan_computes_itself(inputs):
    """accelerate's ``cpu_offload`` keeps every weight on meta and loads it in its module's hook; the
    plan computes temporal GroupNorms without calling the norm module, so their hooks are bridged."""
    from accelerate import cpu_offload

    model = _fresh_unet()
    expected = _run(model, inputs)
    cpu_offload(model, execution_device="cpu")
    assert model.conv_in.weight.device.type == "meta"
    with apply_plan(model, _plan(model, inputs)):
        torch.testing.assert_close(_run(model, inputs), expected, rtol=1e-5, atol=1e-5)
    assert model.down_blocks[0].resnets[0].temporal_res_block.norm1.weight.device.type == "meta"


# ---------------------------------------------------------------------------------- state and checkpointing
class _Stateful(Hook):
    def __init__(self):
        self.seen: list[int] = []
        self.resets = 0

    def wrap(self, module, call_next, args, kwargs):
        self.seen.append(len(self.seen))
        return call_next(*args, **kwargs)

    def reset_state(self):
        self.seen.clear()
        self.resets += 1


def test_reset_state_reaches_hooks_in_the_whole_tree(unet, inputs):
    hook, inner = _Stateful(), _Stateful()
    with register_hook(unet, hook, "state"), register_hook(unet.conv_in, inner, "state"), apply_plan(
        unet, _plan(unet, inputs)
    ):
        _run(unet, inputs)
        _run(unet, inputs)
        assert hook.seen == [0, 1] and len(inner.seen) == 2 * K
        reset_state(unet)
        assert hook.seen == [] and inner.seen == [] and hook.resets == 1
        assert hooks_on(unet) == ["state", PLAN_HOOK]
    _clean(unet)


def test_state_is_restored_when_the_planned_call_raises(unet, inputs, expected):
    """A failure inside a segment exits every bridge it entered (block offloading: nothing stays onloaded)."""
    from diffusers.hooks import apply_group_offloading
    from diffusers.hooks.group_offloading import ModuleGroup

    model = _fresh_unet()
    apply_group_offloading(model, onload_device="cpu", offload_device="cpu", offload_type="block_level",
                           num_blocks_per_group=1)
    onloaded = set()
    on, off = ModuleGroup.onload_, ModuleGroup.offload_
    orig_on, orig_off = on, off
    try:
        ModuleGroup.onload_ = lambda self: onloaded.add(id(self)) or orig_on(self)
        ModuleGroup.offload_ = lambda self: onloaded.discard(id(self)) or orig_off(self)
        boom = model.down_blocks[1].resnets[0].spatial_res_block.register_forward_hook(_raise)
        with apply_plan(model, _plan(model, inputs)):
            with pytest.raises(RuntimeError, match="boom"):
                _run(model, inputs)
            assert onloaded <= {id(model._diffusers_hook.hooks["group_offloading"].group)}  # only the root's:
            # diffusers' own root hook has no finally; ours released every block we onloaded
        boom.remove()
    finally:
        ModuleGroup.onload_, ModuleGroup.offload_ = orig_on, orig_off


def _raise(*_):
    raise RuntimeError("boom")


def test_gradient_checkpointing_is_passed_to_the_executor_when_grad_is_on(inputs, monkeypatch):
    seen = []
    real = apply_module.execute
    monkeypatch.setattr(apply_module, "execute", lambda *a, **kw: seen.append(kw.get("checkpoint")) or real(*a, **kw))
    model = _fresh_unet()
    model.enable_gradient_checkpointing()
    sample = inputs[0].clone().requires_grad_()
    expected = model(sample, *inputs[1:]).sample
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), sample)
    with apply_plan(model, _plan(model, inputs)):
        out = model(sample, *inputs[1:]).sample
        (grad,) = torch.autograd.grad(out.square().sum(), sample)
        with torch.no_grad():
            model(*inputs)
    assert seen == [True, False]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-5, atol=1e-5)
    model.disable_gradient_checkpointing()
    seen.clear()
    with apply_plan(model, _plan(model, inputs)):
        model(sample, *inputs[1:])
    assert seen == [False]


def test_a_stateful_diffusers_hook_on_a_sliced_unit_is_refused(unet, inputs, expected):
    """A cache hook (diffusers' ``_is_stateful``) expects one call per forward, not one per slice."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Cache(ModelHook):
        _is_stateful = True

        def reset_state(self, module):
            return module

    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    registry = HookRegistry.check_if_exists_or_initialize(unet.get_submodule(block))
    registry.register_hook(Cache(), "cache")
    try:
        with pytest.raises(PlanConflictError, match=rf"{block} carries diffusers' Cache .* once per slice \(2 slices\)"):
            apply_plan(unet, _plan(unet, inputs))
        with apply_plan(unet, _plan(unet, inputs, 1)):  # unsliced: one call per forward, as the hook expects
            torch.testing.assert_close(_run(unet, inputs), expected, rtol=1e-5, atol=1e-5)
    finally:
        registry.remove_hook("cache", recurse=False)


def test_a_hook_added_after_the_plan_to_a_bridged_block_is_refused_at_the_call(inputs):
    from diffusers.hooks import apply_group_offloading

    model = _fresh_unet()
    expected = _run(model, inputs)
    apply_group_offloading(model, onload_device="cpu", offload_device="cpu", offload_type="block_level",
                           num_blocks_per_group=1)
    with apply_plan(model, _plan(model, inputs)):
        torch.testing.assert_close(_run(model, inputs), expected, rtol=1e-5, atol=1e-5)
        h = model.up_blocks[1].register_forward_pre_hook(lambda *_: None)
        with pytest.raises(PlanConflictError, match="up_blocks.1 carries a PyTorch forward pre-hook"):
            _run(model, inputs)
        h.remove()
        torch.testing.assert_close(_run(model, inputs), expected, rtol=1e-5, atol=1e-5)


def test_group_offloading_of_nested_blocks_in_a_vae_decoder(monkeypatch):
    """AutoencoderKL offloads ``decoder`` and, inside it, each up block: every group is onloaded and
    offloaded as often under the plan as its modules' units need, and the decode is unchanged."""
    from diffusers import AutoencoderKL
    from diffusers.hooks import apply_group_offloading
    from vramplan.planner.schema import SampleShape
    from vramplan.runtime.tiny import TINY_SD_VAE

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_SD_VAE).eval()
    z = torch.randn(3, 4, 4, 4)
    with torch.no_grad():
        expected = vae.decode(z).sample
    apply_group_offloading(vae, onload_device="cpu", offload_device="cpu", offload_type="block_level",
                           num_blocks_per_group=1)
    groups = _block_groups(vae)
    assert {"decoder", "decoder.up_blocks.0", "decoder.up_blocks.1"} <= set(groups)
    events = _group_events(monkeypatch)
    plan = uniform_plan(vae, 2, SampleShape(batch=1, frames=3, latent_height=4, latent_width=4, dtype="fp32"))
    with apply_plan(vae, plan), torch.no_grad():
        torch.testing.assert_close(vae.decode(z).sample, expected, rtol=1e-5, atol=1e-5)
    for name in ("decoder", "decoder.up_blocks.0", "decoder.up_blocks.1"):
        assert events.count(("on", groups[name])) == events.count(("off", groups[name])) == 1, name
    # the decoder (the outer group) is entered first and left last
    assert events[0] == ("on", groups["decoder"]) and events[-1] == ("off", groups["decoder"])


# ---------------------------------------------------------------------------------- every adapter
def _offload(mode: str):
    def apply(model):
        if mode == "sequential":
            from accelerate import cpu_offload

            cpu_offload(model, execution_device="cpu")
        elif mode == "casting":
            model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
        else:
            from diffusers.hooks import apply_group_offloading

            apply_group_offloading(model, onload_device="cpu", offload_device="cpu", offload_type=mode,
                                   num_blocks_per_group=1 if mode == "block_level" else None)

    return apply


@pytest.mark.parametrize("mode", ["sequential", "leaf_level", "block_level", "casting"])
@pytest.mark.parametrize("adapter", ["UNetSpatioTemporalConditionModel", "AutoencoderKLTemporalDecoder",
                                     "UNetMotionModel", "AutoencoderKL"])
def test_offloading_and_casting_give_what_they_give_without_a_plan_for_every_adapter(adapter, mode):
    from tiny import CASES

    case = CASES[adapter]()
    args, kwargs, shape = case.inputs(1, 3, 4, 4)
    _offload(mode)(case.model)
    with torch.no_grad():
        expected = case.output(case.model, args, kwargs)
        with apply_plan(case.model, uniform_plan(case.model, 2, shape)):
            got = case.output(case.model, args, kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_without_a_trace_containers_are_still_refused(unet, inputs, monkeypatch, caplog):
    """A model that cannot be copied to meta: module paths decide (containers of units are bypassed)."""

    def fail(*_):
        raise TypeError("cannot deepcopy this model")

    monkeypatch.setattr(apply_module, "_meta_twin", fail)
    h = unet.down_blocks[1].register_forward_pre_hook(lambda *_: None)
    try:
        with pytest.raises(PlanConflictError, match="down_blocks.1 carries"):
            apply_plan(unet, _plan(unet, inputs))
    finally:
        h.remove()
    assert "deciding by module paths" in caplog.text
    h = unet.conv_in.register_forward_pre_hook(lambda *_: None)  # a unit itself: called, allowed
    try:
        with apply_plan(unet, _plan(unet, inputs)):
            pass
    finally:
        h.remove()


def test_a_rehash_handle_without_a_plan_shape_traces_hooked_modules(unet, inputs, caplog):
    """apply_rehash without slicing has no plan shape: the trace takes its shape from the model's
    config instead of falling back to module paths with a warning."""
    from vramplan.planner.schema import RehashPlan
    from vramplan.runtime.adapters.base import adapter_for
    from vramplan.runtime.rehash import apply_rehash

    cut = adapter_for(unet).rehash_cuts(unet)[0]
    rehash = RehashPlan(
        mode="uniform", cut=cut, steps=2, key_steps=[0], quality="uncalibrated", original_unet_flops=1,
        unet_flops=1, key_call_s=0.0, reuse_call_s=0.0, latency_saved_s=0.0, cache_bytes=0,
    )
    h = unet.down_blocks[1].register_forward_pre_hook(lambda *_: None)
    try:
        with pytest.raises(PlanConflictError, match="down_blocks.1 carries"):
            apply_rehash(unet, rehash)
    finally:
        h.remove()
    h = unet.conv_in.register_forward_pre_hook(lambda *_: None)
    try:
        with apply_rehash(unet, rehash), torch.no_grad():
            unet(*inputs)
    finally:
        h.remove()
    assert "could not trace" not in caplog.text
    _clean(unet)


def test_a_copy_of_a_planned_model_computes_with_its_own_weights(unet, inputs, expected):
    """copy.deepcopy of a planned model (EMA, teacher models): the plan's ops hold the original's
    modules, so the copy does not inherit vramplan hooks (apply a plan to it); other hooks stay."""
    import copy

    counter = _Count()
    attach, detach = _accelerate(counter)
    attach(unet)
    try:
        with apply_plan(unet, _plan(unet, inputs)), register_hook(unet.conv_in, Hook(), "mine"):
            twin = copy.deepcopy(unet)
        assert hooks_on(twin) == [] and hooks_on(twin.conv_in) == []
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(0.5)
        got = _run(twin, inputs)
        assert counter.n == 1  # the copied accelerate hook still runs
        detach(twin)
        torch.testing.assert_close(got, _run(twin, inputs), rtol=0, atol=0)
        assert not torch.allclose(got, expected)
        with apply_plan(twin, _plan(twin, inputs)):
            torch.testing.assert_close(_run(twin, inputs), got, rtol=1e-5, atol=1e-5)
    finally:
        detach(unet)
    _clean(unet)


def test_a_planned_model_can_be_saved_whole_and_loads_unplanned(unet, inputs, expected):
    """torch.save(model) (pickle) of a planned model: the plan's ops are closures that cannot be
    pickled; the saved model loads without vramplan hooks, like a copy."""
    import io

    buffer = io.BytesIO()
    with apply_plan(unet, _plan(unet, inputs)):
        torch.save(unet, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert hooks_on(loaded) == []
    torch.testing.assert_close(_run(loaded, inputs), expected, rtol=0, atol=0)
    _clean(unet)
