"""Host placement of values: exact results, staged slices, placement-matched reuse, memory accounting.

With ``host_device=None`` (CPU, meta) the host copies live on the compute device and are marked so
that the tracker never counts them; staged slices are counted during their op's call.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_recompute import (
    NORM1,
    NORM2,
    TOL,
    index_of,
    original,
    program_of,
    random_spans,
    run,
    segments_of,
    vae_inputs,
)
from tiny import assert_gradients_equal, gradients
from vramplan.planner.rules import ProgramRules
from vramplan.runtime.executor import Segment, _Run, execute
from vramplan.runtime.memory import MemoryTracker, host_allocation, mark_host
from vramplan.runtime.program import Op, Program, UnitSpec


def _outputs(ops, result):
    return [op.output for op in ops if op.output != result]


# ---------------------------------------------------------------------- exactness
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), frames=st.integers(1, 4), h=st.integers(2, 6), w=st.integers(2, 6))
def test_random_host_placement_is_exact(vae_case, data, frames, h, w):
    args, kwargs = vae_inputs(vae_case, frames, h, w, seed=frames * 100 + h * 10 + w)
    program = program_of(vae_case.model, args, kwargs)
    spans = data.draw(random_spans(program.ops))
    names = _outputs(program.ops, program.result)
    host = data.draw(st.sets(st.sampled_from(names), max_size=len(names)))
    expected = original(vae_case, args, kwargs)
    with torch.no_grad():
        got = run(vae_case, args, kwargs, spans, host=host)
        device_only = run(vae_case, args, kwargs, spans)
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(got, device_only, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 3])
def test_everything_on_host_is_exact(vae_case, k):
    args, kwargs = vae_inputs(vae_case, 3, 5, 4)
    program = program_of(vae_case.model, args, kwargs)
    spans = [(i, i, k) for i, op in enumerate(program.ops) if op.spec.axis is not None]
    expected = original(vae_case, args, kwargs)
    with torch.no_grad():
        got = run(vae_case, args, kwargs, spans, host=_outputs(program.ops, program.result))
    torch.testing.assert_close(got, expected, **TOL)


def test_prepare_over_a_host_input_and_recompute_over_host_inputs(vae_case):
    """norm1's statistics from a host-placed input (staged slice by slice), and a recompute group whose
    cone reads a host value."""
    args, kwargs = vae_inputs(vae_case, 4, 5, 6)
    ops = program_of(vae_case.model, args, kwargs).ops
    n1, n2 = index_of(ops, NORM1), index_of(ops, NORM2)
    spatial = ops[n1 - 1].output
    expected = original(vae_case, args, kwargs)
    with torch.no_grad():
        split = run(vae_case, args, kwargs, [(n1, n1, 3), (n2, n2, 3)], host={spatial, ops[n1].output})
        grouped = run(vae_case, args, kwargs, [(n1, n2, 3)], host={spatial})
    torch.testing.assert_close(split, expected, **TOL)
    torch.testing.assert_close(grouped, expected, **TOL)


def test_unet_skip_connections_on_host(unet_case):
    args, kwargs, _ = unet_case.inputs(1, 3, 5, 4)
    program = program_of(unet_case.model, args, kwargs)
    skips = [op.output for op in program.ops if "down_blocks" in op.name or op.name.startswith("conv_in")]
    spans = [(i, i, 2) for i, op in enumerate(program.ops) if op.spec.axis is not None]
    expected = original(unet_case, args, kwargs)
    with torch.no_grad():
        got = run(unet_case, args, kwargs, spans, host=skips)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpoint"])
def test_gradients_with_host_values_equal_the_original(vae_case, checkpoint):
    args, kwargs = vae_inputs(vae_case, 3, 5, 4)
    program = program_of(vae_case.model, args, kwargs)
    ops = program.ops
    spans = [(i, i, 3) for i, op in enumerate(ops) if op.spec.axis is not None]
    host = _outputs(ops, program.result)[::2]
    expected = gradients(vae_case, args, kwargs, lambda a: vae_case.output(vae_case.model, a, kwargs))
    got = gradients(vae_case, args, kwargs, lambda a: run(vae_case, a, kwargs, spans, host=host, checkpoint=checkpoint))
    assert_gradients_equal(got, expected)


# ---------------------------------------------------------------------- reuse and placement
def test_host_output_reuses_a_dying_host_input_only(vae_case):
    """norm2 is the last reader of norm1's output and of the block input, both of its output's shape.
    A device output takes the first device input's buffer (norm1's); a host output only a host one."""
    args, kwargs = vae_inputs(vae_case, 3, 5, 4)
    ops = program_of(vae_case.model, args, kwargs).ops
    n2 = index_of(ops, NORM2)
    spatial, h1, out = ops[n2 - 2].output, ops[n2 - 1].output, ops[n2].output
    spans = [(n2 - 2, n2 - 2, 3), (n2 - 1, n2 - 1, 3), (n2, n2, 3)]
    for host, reused in [({spatial, out}, spatial), ({h1, out}, h1), ({out}, None), ({spatial}, h1), (set(), h1),
                         ({h1}, spatial)]:
        seen = {}
        program = program_of(vae_case.model, args, kwargs)
        with torch.no_grad():
            execute(program, segments_of(program.ops, spans), host=host,
                    observer=lambda op, value, _n, seen=seen: seen.setdefault(op.output, value.data_ptr()))
        got = next((n for n in (spatial, h1) if seen[n] == seen[out]), None)
        assert got == reused, host


def test_rules_placement():
    rules = ProgramRules(inputs=((), ("a",), ("b",), ("a", "c")), outputs=("a", "b", "c", "d"), result="d")
    placed = rules.with_host({"a", "c"})
    assert rules.on_device_before(3) == ["a", "c"] and placed.on_device_before(3) == []
    seg = placed.segment(3, 3)
    assert seg.staged(3) == ["a", "c"] and placed.segment(1, 3).staged(3) == ["a"]
    assert seg.candidates(3) == [] and rules.segment(3, 3).candidates(3) == ["a", "c"]
    with_d = rules.with_host({"a", "c", "b"})
    assert with_d.segment(2, 2).on_host(2) and with_d.segment(2, 2).buffers(lambda j, n: True) == ["b"]
    assert rules.with_host({"c"}).segment(2, 2).buffers(lambda j, n: False) == ["host"]
    assert rules.host_errors({"d", "x", "a"}) == ["d is the result", "x is not a value made by a unit"]


def test_bad_host_names_are_refused(vae_case):
    args, kwargs = vae_inputs(vae_case, 2, 3, 3)
    for host, keep, words in [({"z"}, (), "initial value"), ({"nope"}, (), "not a value"), ({"RESULT"}, (), "result"),
                              ({"decoder.conv_in"}, ("decoder.conv_in",), "kept")]:
        program = program_of(vae_case.model, args, kwargs)
        host = {program.result if n == "RESULT" else n for n in host}
        with pytest.raises(ValueError, match=words):
            execute(program, segments_of(program.ops, []), host=host, keep=keep)


# ---------------------------------------------------------------------- memory accounting
MiB = 2**20


def _toy(device="meta"):
    """x -> a -> b -> c, each elementwise on [8, 16, 32, 64] fp32 (1 MiB per value)."""

    def double(ctx, t):
        return t * 2

    ops = [Op(UnitSpec(n, "frames"), (i,), n, double) for i, n in [("x", "a"), ("a", "b"), ("b", "c")]]
    x = torch.empty(8, 16, 32, 64, device=device)
    return Program(ops, {"x": x}, {"x": "nchw"}, "c", lambda t: t)


def test_host_values_are_not_counted_and_staged_slices_are():
    full, piece = MiB, MiB // 4  # k=4
    peaks = {}
    for host in [(), ("a",), ("a", "b")]:
        program = _toy()
        segments = [Segment([op], "frames", 4) for op in program.ops]
        with torch.no_grad(), MemoryTracker() as tracker:
            execute(program, segments, host=host)
        peaks[host] = (tracker.peak_bytes, tracker.units["b"].peak_bytes)
    # device only: b writes into a's buffer (a dies at b): a + b's piece
    assert peaks[()] == (full + piece, full + piece)
    # a on host: b (on the device) cannot take a host buffer: its buffer + a staged slice of a (alive
    # during its call) + its piece
    assert peaks[("a",)] == (full + 2 * piece, full + 2 * piece)
    # a and b on host: b takes a's host buffer, so only slices are on the device (staged input + piece)
    assert peaks[("a", "b")][1] == 2 * piece
    assert peaks[("a", "b")][0] == full + 2 * piece  # c: its buffer + a staged slice of b + its piece


def test_unsliced_host_value_is_staged_whole():
    full = MiB
    program = _toy()
    segments = [Segment([op], "frames", 1) for op in program.ops]
    with torch.no_grad(), MemoryTracker() as tracker:
        execute(program, segments, host=("a",))
    # b: a staged whole + b's result; a's host copy never counted (a's device result dropped first)
    assert tracker.units["b"].peak_bytes == 2 * full
    assert tracker.units["a"].peak_bytes == full


def test_mark_host_and_device_filter():
    with MemoryTracker() as tracker:
        t = torch.empty(1024, device="meta")
        assert tracker.current_bytes == 4096
        mark_host(t)
        assert tracker.current_bytes == 0
        with host_allocation():
            u = torch.empty(2048, device="meta")
        v = u + 1  # a new storage, counted
        assert tracker.current_bytes == 8192
    assert tracker.peak_bytes == 8192
    del t, u, v
    with MemoryTracker(device="cuda") as only_cuda, MemoryTracker(device="meta") as only_meta:
        w = torch.empty(1024, device="meta")
        c = torch.empty(1024)
    assert only_cuda.peak_bytes == 0 and only_meta.peak_bytes == 4096
    del w, c


def test_pinning_failure_falls_back_to_pageable_with_one_warning(monkeypatch):
    program = _toy("cpu")
    runner = _Run(program, ProgramRules.of(program.ops, "c"), False, False, "cpu")
    runner.pin = True  # as under a CUDA computation
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("cannot pin: container limit")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = runner.host_empty((4, 4), torch.float32)
        second = runner.host_empty((4, 4), torch.float32)
    assert len(caught) == 1 and "pageable" in str(caught[0].message)
    assert first.device.type == second.device.type == "cpu" and not runner.pin
