"""Recompute: a unit that needs statistics over its whole input sits inside a group that makes that input.

Its statistics come from a pass that recomputes its producers slice by slice (the segment's
bounds), so the result equals the stock forward (fp32 1e-5) and, bit for bit, the split plan
that materialises the input. Gradients equal the original's, also under checkpointing.

The executor is driven directly (``execute`` with hand-built segments); the helpers here are
shared by ``test_placement.py`` and ``test_depth.py``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import assert_gradients_equal, gradients
from vramplan.planner.rules import ProgramRules
from vramplan.runtime.adapters import adapter_for
from vramplan.runtime.executor import Segment, execute
from vramplan.runtime.memory import MemoryTracker
from vramplan.runtime.program import Program

TOL = dict(rtol=1e-5, atol=1e-5)
NORM1 = "decoder.up_blocks.1.resnets.0.temporal_res_block.norm1"
NORM2 = "decoder.up_blocks.1.resnets.0.temporal_res_block.norm2"


# ---------------------------------------------------------------------- helpers (shared)
def program_of(model, args, kwargs) -> Program:
    adapter = adapter_for(model)
    ops, result = adapter.ops(model)
    b = adapter.bind(model, *args, **kwargs)
    return Program(ops, b.env, b.layouts, result, b.finish, b.globals)


def segments_of(ops, spans) -> list[Segment]:
    """``spans``: (first index, last index, k[, depth]) of the grouped runs; every other op alone, unsliced."""
    by_start = {s[0]: s for s in spans}
    out, i = [], 0
    while i < len(ops):
        if i in by_start:
            a, b, k, *rest = by_start[i]
            out.append(Segment(ops[a : b + 1], ops[a].spec.axis, k, *rest))
            i = b + 1
        else:
            out.append(Segment([ops[i]], ops[i].spec.axis, 1))
            i += 1
    return out


def run(case, args, kwargs, spans, **options):
    """The planned method's output tensor under ``spans`` (see :func:`segments_of`)."""
    program = program_of(case.model, args, kwargs)
    out = execute(program, segments_of(program.ops, spans), **options)
    return out.sample if hasattr(out, "sample") else getattr(out, "last_hidden_state", out)  # a text encoder


def original(case, args, kwargs):
    with torch.no_grad():
        return case.output(case.model, args, kwargs)


def index_of(ops, name: str) -> int:
    return next(i for i, op in enumerate(ops) if op.name == name)


@st.composite
def random_spans(draw, ops, max_k: int = 7, depth: bool = False, stats_inside: bool = True):
    """Random groups over runs of one axis; stats units anywhere in a group (with ``stats_inside``)."""
    spans, i = [], 0
    while i < len(ops):
        axis = ops[i].spec.axis
        if axis is None:
            i += 1
            continue
        j = i + 1
        while j < len(ops) and ops[j].spec.axis == axis and (stats_inside or not ops[j].spec.needs_input_stats):
            j += 1
        size = draw(st.integers(1, j - i))
        k = draw(st.integers(1, max_k))
        extra = (draw(st.integers(1, 3)),) if depth else ()
        spans.append((i, i + size - 1, k, *extra))
        i += size
    return spans


def split_at_stats(ops, spans):
    """The same plan with every group cut before a stats unit (the split plan: no recompute)."""
    out = []
    for a, b, k, *rest in spans:
        start = a
        for i in range(a + 1, b + 1):
            if ops[i].spec.needs_input_stats:
                out.append((start, i - 1, k, *rest))
                start = i
        out.append((start, b, k, *rest))
    return out


def recomputes(ops, spans) -> bool:
    return any(ops[i].spec.needs_input_stats for a, b, *_ in spans for i in range(a + 1, b + 1))


def vae_inputs(case, frames=5, h=7, w=5, seed=1):
    args, kwargs, _ = case.inputs(1, frames, h, w, seed=seed)
    return args, kwargs


# ---------------------------------------------------------------------- rules
def test_cone_lists_the_producers_inside_the_segment(vae_case):
    ops, result = adapter_for(vae_case.model).ops(vae_case.model)
    rules = ProgramRules.of(ops, result)
    n1, n2 = index_of(ops, NORM1), index_of(ops, NORM2)
    spatial = n1 - 1
    assert rules.segment(n1, n2).cone(n2) == [n1]
    assert rules.segment(n1, n2).cone(n1) == []  # its input comes from before the segment
    assert rules.segment(spatial, n2).cone(n2) == [spatial, n1]
    assert rules.segment(spatial, n2).cone(n1) == [spatial]
    assert rules.segment(n2, n2).cone(n2) == []


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("k", [2, 3, 4, 6, 64])
def test_norm1_norm2_group_equals_forward_and_split_plan_bitwise(vae_case, k):
    args, kwargs = vae_inputs(vae_case)  # 7x5 latent -> 14x10 at up_blocks.1: 140 tokens, k never divides evenly
    ops = program_of(vae_case.model, args, kwargs).ops
    n1, n2 = index_of(ops, NORM1), index_of(ops, NORM2)
    expected = original(vae_case, args, kwargs)
    with torch.no_grad(), MemoryTracker() as tracker:
        got = run(vae_case, args, kwargs, [(n1, n2, k)])
    split = run(vae_case, args, kwargs, [(n1, n1, k), (n2, n2, k)])
    torch.testing.assert_close(got, expected, **TOL)
    assert torch.equal(got, split)
    assert tracker.units[NORM1].calls == k + 1 and tracker.units[NORM2].calls == k + 1


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), frames=st.integers(1, 5), h=st.integers(2, 7), w=st.integers(2, 7))
def test_random_plans_with_recompute_are_exact(vae_case, data, frames, h, w):
    args, kwargs = vae_inputs(vae_case, frames, h, w, seed=frames * 100 + h * 10 + w)
    ops = program_of(vae_case.model, args, kwargs).ops
    spans = data.draw(random_spans(ops))
    expected = original(vae_case, args, kwargs)
    with torch.no_grad():
        got = run(vae_case, args, kwargs, spans)
        split = run(vae_case, args, kwargs, split_at_stats(ops, spans))
    torch.testing.assert_close(got, expected, **TOL)
    assert torch.equal(got, split)


def test_unet_group_over_a_whole_res_block(unet_case):
    args, kwargs, _ = unet_case.inputs(1, 3, 5, 4)
    ops = program_of(unet_case.model, args, kwargs).ops
    spans = [(i, i + 1, 3) for i, op in enumerate(ops) if op.name.endswith("temporal_res_block.norm1")]
    expected = original(unet_case, args, kwargs)
    with torch.no_grad():
        got = run(unet_case, args, kwargs, spans)
    torch.testing.assert_close(got, expected, **TOL)


# ---------------------------------------------------------------------- autograd
@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpoint"])
def test_gradients_equal_the_original(vae_case, checkpoint):
    args, kwargs = vae_inputs(vae_case, frames=3, h=5, w=4)
    ops = program_of(vae_case.model, args, kwargs).ops
    spans = [(i, i + 1, 3) for i, op in enumerate(ops) if op.name.endswith("temporal_res_block.norm1")]
    expected = gradients(vae_case, args, kwargs, lambda a: vae_case.output(vae_case.model, a, kwargs))
    got = gradients(vae_case, args, kwargs, lambda a: run(vae_case, a, kwargs, spans, checkpoint=checkpoint))
    assert_gradients_equal(got, expected)


# ---------------------------------------------------------------------- memory
def test_recompute_pass_holds_one_slice_of_the_input(vae_case):
    """On meta tensors: the recompute plan never holds norm1's output at full size (4 slices: it holds
    a quarter of it where the split plan holds all of it)."""
    model = vae_case.model
    meta = _meta_copy(model)
    z = torch.empty(8, 4, 32, 32, device="meta")
    ops = program_of(meta, (z,), {"num_frames": 8}).ops
    n1, n2 = index_of(ops, NORM1), index_of(ops, NORM2)
    peaks = {}
    for label, spans in {"split": [(n1, n1, 4), (n2, n2, 4)], "recompute": [(n1, n2, 4)]}.items():
        program = program_of(meta, (z,), {"num_frames": 8})
        with torch.no_grad(), MemoryTracker() as tracker:
            execute(program, segments_of(program.ops, spans))
        peaks[label] = tracker.units[NORM2].peak_bytes
    full = 8 * 32 * 64 * 64 * 4  # norm1's output: [T, C, H, W] fp32 at up_blocks.1 (64x64)
    assert peaks["split"] - peaks["recompute"] >= full * 7 // 10


def _meta_copy(model):
    import copy

    twin = copy.deepcopy(model)
    return twin.to("meta")
