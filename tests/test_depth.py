"""Depth: a group keeps ``depth`` slices in flight (waves). On CUDA each slice of a wave runs on its own
stream; elsewhere the waves run one slice after another. Either way the result equals the stock
forward (fp32 1e-5) and, bit for bit, the same plan at depth 1."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_placement import MiB, _toy
from test_recompute import (
    TOL,
    original,
    program_of,
    random_spans,
    run,
    vae_inputs,
)
from tiny import CASES, assert_gradients_equal, gradients
from vramplan.runtime.executor import Segment, execute
from vramplan.runtime.memory import MemoryTracker
from vramplan.runtime.program import Op, Program, UnitSpec


def _depth_one(spans):
    return [(a, b, k) for a, b, k, *_ in spans]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), frames=st.integers(1, 5), h=st.integers(2, 7), w=st.integers(2, 7))
def test_random_plans_with_depth_are_exact(vae_case, data, frames, h, w):
    args, kwargs = vae_inputs(vae_case, frames, h, w, seed=frames * 100 + h * 10 + w)
    program = program_of(vae_case.model, args, kwargs)
    spans = data.draw(random_spans(program.ops, depth=True))
    names = [op.output for op in program.ops if op.output != program.result]
    host = data.draw(st.sets(st.sampled_from(names), max_size=4))
    expected = original(vae_case, args, kwargs)
    with torch.no_grad():
        got = run(vae_case, args, kwargs, spans, host=host)
        flat = run(vae_case, args, kwargs, _depth_one(spans), host=host)
    torch.testing.assert_close(got, expected, **TOL)
    assert torch.equal(got, flat)


@pytest.mark.parametrize("k,depth", [(5, 2), (7, 3), (4, 4), (3, 8)])
def test_unet_uneven_waves(unet_case, k, depth):
    args, kwargs, _ = unet_case.inputs(2, 3, 5, 4)
    ops = program_of(unet_case.model, args, kwargs).ops
    spans, i = [], 0
    while i < len(ops):  # maximal same-axis runs, stats units inside (recompute)
        j = i
        while j + 1 < len(ops) and ops[j + 1].spec.axis == ops[i].spec.axis is not None:
            j += 1
        if ops[i].spec.axis is not None:
            spans.append((i, j, k, depth))
        i = j + 1
    expected = original(unet_case, args, kwargs)
    with torch.no_grad():
        got = run(unet_case, args, kwargs, spans)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpoint"])
def test_gradients_with_depth_equal_the_original(vae_case, checkpoint):
    args, kwargs = vae_inputs(vae_case, 3, 5, 4)
    ops = program_of(vae_case.model, args, kwargs).ops
    spans = [(i, i + 1, 5, 2) for i, op in enumerate(ops) if op.name.endswith("temporal_res_block.norm1")]
    expected = gradients(vae_case, args, kwargs, lambda a: vae_case.output(vae_case.model, a, kwargs))
    got = gradients(vae_case, args, kwargs, lambda a: run(vae_case, a, kwargs, spans, checkpoint=checkpoint))
    assert_gradients_equal(got, expected)


def test_wave_memory_on_meta():
    """x -> a -> b -> c in one group of 4 slices: held slices x depth, plus the pieces of earlier slices
    of the wave of the current op, plus one scratch (here the op's output piece)."""
    full, piece = MiB, MiB // 4
    peaks = {}
    for depth in (1, 2, 4):
        program = _toy()
        with torch.no_grad(), MemoryTracker() as tracker:
            execute(program, [Segment(program.ops, "frames", 4, depth)])
        peaks[depth] = tracker.peak_bytes
        assert tracker.units["c"].calls == 4
    # depth 1: c's buffer + b's slice + c's piece
    assert peaks[1] == full + 2 * piece
    # depth d: c's buffer + d slices of b + c's piece (c's earlier pieces are written and dropped)
    assert peaks[2] == full + 3 * piece
    assert peaks[4] == full + 5 * piece


def test_depth_one_slice_per_wave_is_the_plain_loop():
    program = _toy("cpu")
    x = program.env["x"].normal_()
    with torch.no_grad():
        got = execute(program, [Segment(program.ops, "frames", 3, 2)])
    assert torch.equal(got, x * 8)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_adapter_with_recompute_host_and_depth(name):
    """Maximal same-axis groups (stats units inside: recompute), every other value on host, depth 2."""
    case = CASES[name]()
    args, kwargs, _ = case.inputs(2, 3, 5, 4)
    program = program_of(case.model, args, kwargs)
    ops = program.ops
    spans, i = [], 0
    while i < len(ops):
        j = i
        while j + 1 < len(ops) and ops[i].spec.axis is not None and ops[j + 1].spec.axis == ops[i].spec.axis:
            j += 1
        if ops[i].spec.axis is not None:
            spans.append((i, j, 3, 2))
        i = j + 1
    host = [op.output for op in ops if op.output != program.result][::2]
    expected = original(case, args, kwargs)
    with torch.no_grad():
        got = run(case, args, kwargs, spans, host=host)
    torch.testing.assert_close(got, expected, **TOL)


def test_stream_schedule_of_a_wave(monkeypatch):
    """The CUDA path's schedule, with streams simulated on the CPU: every slice of a wave on its own
    side stream (the same streams at every call), side streams wait for the compute stream at the
    wave's start, the compute stream waits for them at its end, buffers are allocated on the compute
    stream. The result is the plain loop's."""
    import contextlib

    import vramplan.runtime.executor as executor

    log, current = [], ["main"]

    class Stream:
        def __init__(self, device=None):
            self.name = f"side{sum(1 for e in log if e[0] == 'new')}"
            log.append(("new", self.name))

        def wait_stream(self, other):
            log.append(("wait", self.name, other.name))

    main = Stream.__new__(Stream)
    main.name = "main"

    @contextlib.contextmanager
    def stream(s):
        current.append(s.name)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(executor, "compute_device", lambda program: torch.device("cuda", 0))
    monkeypatch.setattr(executor, "_side_streams", __import__("threading").local())

    def traced(ctx, t):
        log.append(("op", current[-1], ctx.start))
        return t * 2

    x = torch.randn(5, 3, 2, 2)
    ops = [Op(UnitSpec(n, "frames"), (i,), n, traced) for i, n in [("x", "a"), ("a", "b")]]
    real_new_empty = torch.Tensor.new_empty

    def new_empty(self, *args, **kwargs):
        log.append(("alloc", current[-1]))
        return real_new_empty(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    for _call in range(2):
        log.clear()
        program = Program(ops, {"x": x}, {"x": "nchw"}, "b", lambda t: t)
        with torch.no_grad():
            out = execute(program, [Segment(program.ops, "frames", 5, 2)])
        assert torch.equal(out, x * 4)
    # the second call made no new streams
    assert not any(e[0] == "new" for e in log)
    expected = []  # k=5 over 5 frames: waves of slices starting at (0, 1), (2, 3), (4,)
    for starts in [(0, 1), (2, 3)]:
        expected += [("wait", "side0", "main"), ("wait", "side1", "main")]
        for op in ("a", "b"):
            for n, start in enumerate(starts):
                expected.append(("op", f"side{n}", start))
                if op == "b" and start == 0:
                    expected.append(("alloc", "main"))
        expected += [("wait", "main", "side0"), ("wait", "main", "side1")]
    expected += [("op", "main", 4), ("op", "main", 4)]  # a last wave of one slice runs on the compute stream
    assert log == expected
