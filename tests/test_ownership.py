"""The executor writes into a buffer only when it owns the storage: never the caller's tensors (or
views of them), never a kept value (or views of it), never a storage another live value holds."""

from __future__ import annotations

import contextlib

import pytest
import torch
from vramplan.runtime.executor import Segment, execute
from vramplan.runtime.program import Op, Program, UnitSpec


def _op(name, inputs, fn, axis="frames") -> Op:
    return Op(UnitSpec(name, axis), tuple(inputs), name, fn)


def _pointers():
    seen = {}

    def observe(op, value, length):
        seen[op.output] = value.untyped_storage().data_ptr()

    return seen, observe


def test_a_view_of_the_callers_tensor_is_never_written():
    """``a`` is a view of the caller's ``x``; ``b`` reads ``a`` for the last time with the same shape:
    by name ``a`` is the program's, by storage it is the caller's."""
    x = torch.randn(4, 3, 2, 2)
    before = x.clone()
    a = _op("a", ("x",), lambda ctx, x: x.view_as(x), axis=None)
    b = _op("b", ("a",), lambda ctx, a: a * 2)
    program = Program([a, b], {"x": x}, {"x": "nchw"}, "b", lambda out: out)
    with torch.no_grad():
        out = execute(program, [Segment([a], None, 1), Segment([b], "frames", 2)])
    assert torch.equal(x, before)
    torch.testing.assert_close(out, before * 2)


def test_initial_values_sharing_storage_are_never_written():
    x = torch.randn(4, 3, 2, 2)
    before = x.clone()
    a = _op("a", ("y",), lambda ctx, y: y[:, :], axis=None)  # a view of y, itself a view of x
    b = _op("b", ("a", "x"), lambda ctx, a, x: a + x)
    program = Program([a, b], {"x": x, "y": x.view(4, 3, 2, 2)}, {"x": "nchw", "y": "nchw"}, "b", lambda o: o)
    with torch.no_grad():
        out = execute(program, [Segment([a], None, 1), Segment([b], "frames", 3)])
    assert torch.equal(x, before)
    torch.testing.assert_close(out, before * 2)


def _kept_chain():
    """``a = 2x``; ``v`` a view of ``a``; ``b = v + 1`` in slices (``v`` dies there); ``c = a + b``."""
    a = _op("a", ("x",), lambda ctx, x: x * 2, axis=None)
    v = _op("v", ("a",), lambda ctx, a: a.view_as(a), axis=None)
    b = _op("b", ("v",), lambda ctx, v: v + 1)
    return a, v, b


def test_kept_values_survive_untouched_and_are_returned():
    x = torch.randn(6, 3, 2, 2)
    a, _, _ = _kept_chain()
    b = _op("b", ("a",), lambda ctx, a: a + 1)
    segments = [Segment([a], None, 1), Segment([b], "frames", 3)]
    seen, observe = _pointers()
    with torch.no_grad():
        execute(Program([a, b], {"x": x}, {"x": "nchw"}, "b", lambda o: o), segments, observer=observe)
        assert seen["a"] == seen["b"]  # without keep, b takes over a's buffer...
        program = Program([a, b], {"x": x}, {"x": "nchw"}, "b", lambda o: o)
        out = execute(program, segments, keep={"a", "x"})
    torch.testing.assert_close(program.kept["a"], x * 2)  # ...with keep, a is left alone
    assert program.kept["x"] is x
    torch.testing.assert_close(out, x * 2 + 1)


def test_a_view_of_a_kept_value_is_not_written():
    x = torch.randn(6, 3, 2, 2)
    a, v, b = _kept_chain()
    program = Program([a, v, b], {"x": x}, {"x": "nchw"}, "b", lambda o: o)
    segments = [Segment([a], None, 1), Segment([v], None, 1), Segment([b], "frames", 2)]
    with torch.no_grad():
        out = execute(program, segments, keep={"a"})
    torch.testing.assert_close(program.kept["a"], x * 2)
    torch.testing.assert_close(out, x * 2 + 1)


def test_a_storage_another_live_value_holds_is_not_written():
    """``v`` (a view of ``a``) dies at ``b``, but ``a`` is read later by ``c``."""
    x = torch.randn(6, 3, 2, 2)
    a, v, b = _kept_chain()
    c = _op("c", ("a", "b"), lambda ctx, a, b: a + b, axis=None)
    program = Program([a, v, b, c], {"x": x}, {"x": "nchw"}, "c", lambda o: o)
    segments = [Segment([a], None, 1), Segment([v], None, 1), Segment([b], "frames", 2), Segment([c], None, 1)]
    with torch.no_grad():
        out = execute(program, segments)
    torch.testing.assert_close(out, x * 4 + 1)


def test_keep_names_must_exist():
    x = torch.randn(2, 1, 1, 1)
    a = _op("a", ("x",), lambda ctx, x: x + 1, axis=None)
    with pytest.raises(ValueError, match="nope"):
        execute(Program([a], {"x": x}, {"x": "nchw"}, "a", lambda o: o), [Segment([a], None, 1)], keep={"nope"})


def test_around_segment_wraps_every_segment():
    x = torch.randn(4, 1, 2, 2)
    a = _op("a", ("x",), lambda ctx, x: x + 1)
    b = _op("b", ("a",), lambda ctx, a: a * 3)
    c = _op("c", ("b",), lambda ctx, b: b - 1, axis=None)
    events = []

    @contextlib.contextmanager
    def around(segment):
        events.append(("enter", [op.name for op in segment.ops]))
        yield
        events.append(("exit", [op.name for op in segment.ops]))

    def maybe(segment):
        return around(segment) if segment.axis is not None else None  # None: nothing to enter

    program = Program([a, b, c], {"x": x}, {"x": "nchw"}, "c", lambda o: o)
    out = execute(program, [Segment([a, b], "frames", 2), Segment([c], None, 1)], around_segment=maybe)
    torch.testing.assert_close(out, (x + 1) * 3 - 1)
    assert events == [("enter", ["a", "b"]), ("exit", ["a", "b"])]


def test_a_kept_value_made_inside_a_group_is_materialised():
    """``a`` lives only slice by slice inside the group ``[a, b]``; kept, it is written in full."""
    x = torch.randn(5, 2, 3, 3)
    a = _op("a", ("x",), lambda ctx, x: x * 2)
    b = _op("b", ("a",), lambda ctx, a: a + 1)
    program = Program([a, b], {"x": x}, {"x": "nchw"}, "b", lambda o: o)
    with torch.no_grad():
        out = execute(program, [Segment([a, b], "frames", 3)], keep={"a"})
    torch.testing.assert_close(program.kept["a"], x * 2)
    torch.testing.assert_close(out, x * 2 + 1)
