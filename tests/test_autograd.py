"""Backward through planned models: gradient checkpointing, the GroupNorm statistics path, and
buffer reuse only where autograd cannot see it. (Plain backward per adapter: test_conformance.py.)"""

from __future__ import annotations

import pytest
import torch
from tiny import CASES, assert_gradients_equal, gradients
from vramplan.runtime import uniform_plan
from vramplan.runtime.adapters.base import adapter_for
from vramplan.runtime.apply import build_segments, component_for
from vramplan.runtime.executor import Segment, execute
from vramplan.runtime.norm import merged_moments, normalize_groups
from vramplan.runtime.program import Op, Program, UnitSpec


def planned_call(model, plan, args, kwargs, **options):
    """What a plan's forward does (PlanHandle), with executor options such as ``checkpoint``."""
    adapter = adapter_for(model)
    ops, result = adapter.ops(model)
    segments, _ = build_segments(ops, component_for(model, plan))
    binding = adapter.bind(model, *args, **kwargs)
    program = binding.program(ops, result)
    return execute(program, segments, **options)


@pytest.mark.parametrize("model_class", sorted(CASES))
def test_checkpointed_plan_gradients_equal_the_original(model_class):
    case = CASES[model_class]()
    args, kwargs, shape = case.inputs(1, 3, 5, 4)
    plan = uniform_plan(case.model, 2, shape)
    expected = gradients(case, args, kwargs, lambda a: case.output(case.model, a, kwargs))
    calls = []
    # Convs inside a block: checkpointing reruns those whose saved tensors backward needs.
    kinds = (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)  # a DiT or text encoder block has no conv
    convs = [m for m in case.model.get_submodule(case.container).modules() if isinstance(m, kinds)]
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in convs]
    try:
        plain = gradients(case, args, kwargs, lambda a: _sample(planned_call(case.model, plan, a, kwargs)))
        forward_calls = len(calls)
        calls.clear()
        got = gradients(
            case, args, kwargs, lambda a: _sample(planned_call(case.model, plan, a, kwargs, checkpoint=True))
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert_gradients_equal(plain, expected)
    assert_gradients_equal(got, expected)
    assert forward_calls > 0 and len(calls) > forward_calls  # slices ran again in backward


def _sample(out):
    """The tensor ``case.output`` reads: a VAE's sample, an encoder's last hidden state (CLIP with a
    projection returns its image embeddings first)."""
    for name in ("sample", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    return out[0]


def test_merged_moments_group_norm_is_differentiable_and_exact():
    """Statistics merged over uneven token slices give GroupNorm's value and gradients (float64)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 3, 7, dtype=torch.float64, generator=gen).requires_grad_()
    weight = (torch.randn(8, dtype=torch.float64, generator=gen) + 1).requires_grad_()
    bias = torch.randn(8, dtype=torch.float64, generator=gen).requires_grad_()

    def sliced(x, weight, bias):
        b, c, t, n = x.shape
        grouped = x.reshape(b, 4, c // 4, t, n)
        pieces = [grouped[..., s:e] for s, e in ((0, 3), (3, 5), (5, 7))]
        mean, var = merged_moments(pieces, reduce_dims=(2, 3, 4))
        return normalize_groups(x, mean.to(x.dtype), var.to(x.dtype), 4, 1e-6, weight, bias)

    def reference(x, weight, bias):
        return torch.nn.functional.group_norm(x, 4, weight, bias, 1e-6)

    torch.testing.assert_close(sliced(x, weight, bias), reference(x, weight, bias))
    probe = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad((sliced(x, weight, bias) * probe).sum(), (x, weight, bias))
    expected = torch.autograd.grad((reference(x, weight, bias) * probe).sum(), (x, weight, bias))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def _chain(x: torch.Tensor, scale: torch.Tensor) -> tuple[Program, list[Segment], dict]:
    """``a = x * scale`` (whole), then ``b = a + 1`` in two slices: ``b`` may take over ``a``'s buffer."""
    seen = {}
    a = Op(UnitSpec("a", None), ("x",), "a", lambda ctx, x: x * scale)
    b = Op(UnitSpec("b", "frames"), ("a",), "b", lambda ctx, a: a + 1)
    program = Program([a, b], {"x": x}, {"x": "nchw"}, "b", lambda out: out)
    return program, [Segment([a], None, 1), Segment([b], "frames", 2)], seen


def _reused(x, scale, **context) -> bool:
    program, segments, _ = _chain(x, scale)
    pointers = {}

    def observe(op, value, length):
        pointers[op.output] = value.untyped_storage().data_ptr()

    out = execute(program, segments, observer=observe)
    torch.testing.assert_close(out.detach(), x.detach() * scale.detach() + 1)
    return pointers["a"] == pointers["b"]


def test_buffers_are_reused_only_where_autograd_cannot_see():
    x = torch.randn(4, 3, 2, 2)
    scale = torch.tensor(2.0)
    with torch.no_grad():
        assert _reused(x, scale)
    with torch.inference_mode():
        assert _reused(x.clone(), scale.clone())
    assert _reused(x, scale)  # grad enabled, but nothing requires grad
    assert not _reused(x.clone().requires_grad_(), scale)
    assert not _reused(x, scale.clone().requires_grad_())  # a weight requires grad


def test_backward_through_a_chain_that_would_reuse():
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)
    program, segments, _ = _chain(x, scale)
    execute(program, segments).square().sum().backward()
    torch.testing.assert_close(x.grad, 2 * (x.detach() * 2 + 1) * 2)
    torch.testing.assert_close(scale.grad, (2 * (x.detach() * 2 + 1) * x.detach()).sum())
