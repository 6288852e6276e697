"""Conformance: every registered model adapter passes the same checks.

Parametrised from the adapter registry: every registered adapter, as (model class, component) — a
class with two adapters (a VAE's decode, ``vae``, and encode, ``vae_encoder``) runs twice. A class's
default adapter (the first registered) has its tiny case in ``tests/tiny.py`` (``CASES``), any other in
``tests/encode_cases.py`` (``ENCODE_CASES``), so a new adapter fails here until it has one. The checks: exact
fp32 forward on random plans, fp16/bf16 within the dtype's own noise, backward gradients equal,
the caller's inputs unchanged, hooks on bypassed containers fire (or the plan refuses them by
name), a second plan refused, and the model restored after an exception and after removal in
any order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from encode_cases import ENCODE_CASES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plans import random_plans
from tiny import CASES, Case, assert_gradients_equal, gradients
from vramplan.planner.errors import VramplanError
from vramplan.runtime import apply_plan, fingerprint, list_units, uniform_plan
from vramplan.runtime.adapters import adapter_for, supported_classes
from vramplan.runtime.adapters.base import _ADAPTERS
from vramplan.runtime.memory import current_label

TOL = dict(rtol=1e-5, atol=1e-5)


def registered() -> list[tuple[str, str, bool]]:
    """(model class, component, whether it is the class's default adapter) of every registered adapter."""
    pairs, seen = [], set()
    for adapter in _ADAPTERS:
        for cls in adapter.model_classes:
            pairs.append((cls, adapter.component, cls not in seen))
            seen.add(cls)
    return pairs


@dataclass
class Adapted(Case):
    """A tiny case and the component that picks its adapter (``adapter_for(model, component)``)."""

    component: str = ""


def _factory(cls: str, component: str, default: bool):
    return CASES.get(cls) if default else ENCODE_CASES.get((cls, component))


@pytest.fixture(scope="module", params=registered(), ids=lambda p: p[0] if p[2] else f"{p[0]}-{p[1]}")
def case(request):
    cls, component, default = request.param
    make = _factory(cls, component, default)
    if make is None:
        where = "tests/tiny.py CASES" if default else f"tests/encode_cases.py ENCODE_CASES[({cls!r}, {component!r})]"
        pytest.fail(f"adapter {component!r} of {cls} has no tiny case: add one to {where}")
    base = make()
    assert adapter_for(base.model, component).component == component
    return Adapted(base.model, base.inputs, base.output, base.container, component)


def _out(case, args, kwargs, model=None):
    with torch.no_grad():
        return case.output(model or case.model, args, kwargs)


def _method(case) -> str:
    return getattr(adapter_for(case.model, case.component), "method", "forward")


def _plain(model, name: str) -> bool:
    """Nothing of ours or anybody's left on ``name`` (accelerate leaves the class's own method bound)."""
    attr = model.__dict__.get(name)
    return attr is None or getattr(attr, "__func__", None) is getattr(type(model), name, object())


def _assert_restored(case, args, kwargs, expected):
    """No instance attribute left behind, and the original computation, bit for bit."""
    model = case.model
    assert _method(case) not in model.__dict__ and "forward" not in model.__dict__
    assert torch.equal(_out(case, args, kwargs), expected)
    assert current_label() == ""


def test_every_adapter_has_a_case():
    assert set(supported_classes()) <= set(CASES)
    assert all(_factory(*pair) is not None for pair in registered())
    second = {(cls, comp) for cls, comp, default in registered() if not default}
    assert ("AutoencoderKLWan", "vae_encoder") in second  # a class's second adapter is enumerated too


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), batch=st.sampled_from([1, 2]), frames=st.integers(1, 5), h=st.integers(3, 7),
       w=st.integers(3, 7))
def test_random_plans_are_exact_in_fp32(case, data, batch, frames, h, w):
    args, kwargs, shape = case.inputs(batch, frames, h, w, seed=frames * 100 + h * 10 + w)
    model = case.model
    plan = data.draw(random_plans(list_units(model, case.component), fingerprint(model), shape, max_k=8,
                                  component=case.component))
    expected = _out(case, args, kwargs)
    with apply_plan(model, plan):
        got = _out(case, args, kwargs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_plans_stay_within_the_dtypes_noise(case, dtype):
    """The plan's error against an fp32 run is of the order of the original's own rounding."""
    args, kwargs, shape = case.inputs(1, 3, 5, 4)
    reference = _out(case, args, kwargs)
    low = copy.deepcopy(case.model).to(dtype)
    low_args = tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() and a.dim() else a for a in args)
    original = _out(case, low_args, kwargs, model=low)
    low_shape = shape.model_copy(update={"dtype": {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]})
    with apply_plan(low, uniform_plan(low, 3, low_shape, component=case.component)):
        planned = _out(case, low_args, kwargs, model=low)
    assert planned.dtype == original.dtype == dtype
    own = (original.float() - reference).abs().max().item()
    err = (planned.float() - reference).abs().max().item()
    assert own > 0  # the dtype really rounds
    assert err <= 2 * own + torch.finfo(dtype).eps * reference.abs().max().item(), (err, own)


@pytest.mark.parametrize("k", [2, 3])
def test_backward_gradients_equal_the_original(case, k):
    args, kwargs, shape = case.inputs(2, 3, 5, 4)
    model = case.model
    expected = gradients(case, args, kwargs, lambda a: case.output(model, a, kwargs))
    with apply_plan(model, uniform_plan(model, k, shape, group=k == 3, component=case.component)):
        got = gradients(case, args, kwargs, lambda a: case.output(model, a, kwargs))
    assert_gradients_equal(got, expected)


def test_callers_inputs_are_unchanged(case):
    args, kwargs, shape = case.inputs(2, 3, 5, 4)
    before = [a.clone() if torch.is_tensor(a) else a for a in args]
    model = case.model
    for k in (2, 3):
        with apply_plan(model, uniform_plan(model, k, shape, component=case.component)):
            _out(case, args, kwargs)
            with torch.inference_mode():
                case.output(model, args, kwargs)
            case.output(model, args, kwargs)
    for a, b in zip(args, before, strict=True):
        assert not torch.is_tensor(a) or torch.equal(a, b)


def test_hooks_on_bypassed_containers_fire_or_are_refused(case):
    """A forward hook and a pre-hook on a container the executor does not call: as many calls under the
    plan as without, or apply_plan refuses with the module's name. Never silently skipped."""
    args, kwargs, shape = case.inputs(1, 3, 4, 4)
    model = case.model
    container = model.get_submodule(case.container)
    calls = []
    handles = [
        container.register_forward_pre_hook(lambda *_: calls.append("pre")),
        container.register_forward_hook(lambda *_: calls.append("post")),
    ]
    try:
        _out(case, args, kwargs)
        without = list(calls)
        calls.clear()
        try:
            plan = apply_plan(model, uniform_plan(model, 2, shape, component=case.component))
        except VramplanError as err:
            assert case.container in str(err)
            return
        with plan:
            _out(case, args, kwargs)
        assert without == ["pre", "post"]
        assert calls == without
    finally:
        for handle in handles:
            handle.remove()


def test_a_second_plan_is_refused(case):
    args, kwargs, shape = case.inputs(1, 3, 4, 4)
    model = case.model
    expected = _out(case, args, kwargs)
    first = apply_plan(model, uniform_plan(model, 2, shape, component=case.component))
    try:
        with pytest.raises(VramplanError):
            apply_plan(model, uniform_plan(model, 3, shape, component=case.component))
        torch.testing.assert_close(_out(case, args, kwargs), expected, **TOL)  # the first plan still works
    finally:
        first.remove()
    _assert_restored(case, args, kwargs, expected)


def test_state_is_restored_after_an_exception_inside_the_planned_forward(case):
    args, kwargs, shape = case.inputs(1, 3, 4, 4)
    model = case.model
    expected = _out(case, args, kwargs)
    grad_mode = torch.is_grad_enabled()
    modules = list(model.get_submodule(case.container).modules())
    leaf = next((m for m in modules if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))), None) or next(
        m for m in modules if isinstance(m, torch.nn.Linear))  # a DiT block has no convolution

    def fail(*_):
        raise RuntimeError("boom inside a unit")

    with apply_plan(model, uniform_plan(model, 2, shape, component=case.component)):
        broken = leaf.register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="boom"):
            _out(case, args, kwargs)
        broken.remove()
        assert current_label() == "" and torch.is_grad_enabled() == grad_mode
        wrong, wrong_kwargs, _ = case.inputs(1, 2, 4, 4)  # a shape the plan was not made for
        with pytest.raises(VramplanError):
            _out(case, wrong, wrong_kwargs)
        torch.testing.assert_close(_out(case, args, kwargs), expected, **TOL)  # the plan still runs
    _assert_restored(case, args, kwargs, expected)


@pytest.mark.parametrize("order", ["plan_removed_first", "hook_removed_first"])
def test_removal_in_any_order_restores_the_model(case, order):
    """A plan and an accelerate hook installed after it, removed in either order."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    args, kwargs, shape = case.inputs(1, 3, 4, 4)
    model = case.model
    expected = _out(case, args, kwargs)
    plan = apply_plan(model, uniform_plan(model, 2, shape, component=case.component))
    hook = Count()
    add_hook_to_module(model, hook)
    try:
        torch.testing.assert_close(_out(case, args, kwargs), expected, **TOL)
        assert hook.calls == 1
        if order == "plan_removed_first":
            plan.remove()
            assert torch.equal(_out(case, args, kwargs), expected)
            assert hook.calls == 2  # the user's hook outlives the plan
            remove_hook_from_module(model)
        else:
            remove_hook_from_module(model)
            torch.testing.assert_close(_out(case, args, kwargs), expected, **TOL)
            assert hook.calls == 1
            plan.remove()
        left = [name for name in ("forward", _method(case), "_hf_hook") if not _plain(model, name)]
        same = torch.equal(_out(case, args, kwargs), expected)
    finally:  # leave the shared model clean for the next test, whatever happened
        plan.remove()
        if hasattr(model, "_hf_hook"):
            remove_hook_from_module(model)
        for name in ("forward", _method(case)):
            model.__dict__.pop(name, None)
    assert not left, f"left on the model after removal: {left}"
    assert same


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), frames=st.integers(1, 3), h=st.integers(3, 7), w=st.integers(3, 6))
def test_rows_groups_with_recomputed_statistics_are_exact(case, data, frames, h, w):
    """An adapter with rows units: random plans whose groups also hold units that need statistics over their
    input (GroupNorm over a whole frame: recomputed slice by slice), k up to twice the sample's rows."""
    ops, _ = adapter_for(case.model, case.component).ops(case.model)
    if not any(op.spec.axis == "rows" for op in ops):
        pytest.skip("no rows units")
    args, kwargs, shape = case.inputs(1, frames, h, w, seed=frames * 100 + h * 10 + w)
    first = {op.name: op.inputs[0] for op in ops}
    plan = data.draw(random_plans([op.spec for op in ops], fingerprint(case.model), shape, max_k=2 * h + 2,
                                  recompute=first, component=case.component))
    expected = _out(case, args, kwargs)
    with apply_plan(case.model, plan):
        torch.testing.assert_close(_out(case, args, kwargs), expected, **TOL)
