"""Weight streaming (runtime/streaming.py) and the plan fields apply checks: streamed blocks, host
placement, recompute. CPU only: host == device, the same copies happen."""

from __future__ import annotations

import logging
import random
import warnings

import pytest
import torch
from tiny import CASES
from vramplan.planner.errors import InvalidPlanError
from vramplan.planner.schema import Group
from vramplan.runtime import apply as apply_mod
from vramplan.runtime import apply_plan, list_units, streaming, uniform_plan
from vramplan.runtime.memory import MemoryTracker
from vramplan.runtime.streaming import WeightStreamer, streamable_blocks

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    return CASES[request.param]()


def _out(case, args, kwargs):
    with torch.no_grad():
        return case.output(case.model, args, kwargs)


def _weights(model):
    return {n: (t, t.data_ptr(), t.device, t.detach().clone()) for n, t in
            [*model.named_parameters(), *model.named_buffers()]}


def _assert_weights_restored(model, before):
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert set(after) == set(before)
    for name, (tensor, ptr, device, value) in before.items():
        t = after[name]
        assert t is tensor, name  # the same Parameter / buffer object
        assert t.device == device and t.data_ptr() == ptr, name  # CPU: the original storage itself
        assert torch.equal(t, value), name


def _streamable(case, shape):
    method = getattr(apply_mod.adapter_for(case.model), "method", "forward")
    return list(streamable_blocks(case.model, shape, method))


@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_blocks_give_the_same_output(case, seed):
    """Random streamed blocks on a grouped (ungrouped) plan: bit for bit the plan without streaming, and the
    unplanned output within fp32 rounding; every weight back in place afterwards."""
    args, kwargs, shape = case.inputs(1, 3, 5, 4, seed=seed + 3)
    model = case.model
    blocks = _streamable(case, shape)
    assert blocks
    rng = random.Random(seed)
    streamed = rng.sample(blocks, rng.randint(1, len(blocks)))
    plan = uniform_plan(model, 2 + seed, shape, group=seed == 0)
    before = _weights(model)
    expected = _out(case, args, kwargs)
    with apply_plan(model, plan):
        planned = _out(case, args, kwargs)
    plan.components[0].streamed = streamed
    for group in plan.components[0].groups:
        group.depth = 2  # waves of two slices: the same values
    with apply_plan(model, plan) as handle:
        assert set(handle.streamer.blocks) == set(streamed)
        got = _out(case, args, kwargs)
        again = _out(case, args, kwargs)
    assert torch.equal(got, planned) and torch.equal(again, planned)
    torch.testing.assert_close(got, expected, **TOL)
    _assert_weights_restored(model, before)


def test_segments_hold_their_blocks_and_the_next_one(case):
    """While a segment runs: the streamed blocks it touches plus the next streamed block used after it;
    nothing loaded after the call."""
    args, kwargs, shape = case.inputs(1, 3, 5, 4)
    model = case.model
    blocks = _streamable(case, shape)
    plan = uniform_plan(model, 2, shape)
    plan.components[0].streamed = blocks
    seen = []
    with apply_plan(model, plan) as handle:
        streamer = handle.streamer
        block = streaming.adapter_block(apply_mod.adapter_for(model))  # finer where the adapter declares
        order = {b: i for i, b in enumerate(dict.fromkeys(block(op.name) for op in handle.ops))}

        def check(op_name):
            loaded = {b for b, blk in streamer.blocks.items() if blk.loaded}
            seg = next(s for s in handle.segments if any(op.name == op_name for op in s.ops))
            copied = set(blocks) - streamer.gathered  # a gathered table stays on host (its unit copies rows)
            touched = {block(op.name) for op in seg.ops} & copied
            last = max(order[block(op.name)] for op in seg.ops)
            later = [b for b in copied if order[b] > last]
            nxt = {min(later, key=order.__getitem__)} if later else set()
            seen.append(op_name)
            assert loaded == touched | nxt, (op_name, loaded, touched, nxt)

        originals = {}
        for op in handle.ops:
            originals[op.name] = op.fn

            def fn(ctx, *a, _name=op.name, _fn=op.fn):
                check(_name)
                return _fn(ctx, *a)

            op.fn = fn
        try:
            _out(case, args, kwargs)
        finally:
            for op in handle.ops:
                op.fn = originals[op.name]
        assert not any(b.loaded for b in streamer.blocks.values())
    assert len(seen) >= len(handle.ops)


def test_streamed_copies_are_counted_by_the_tracker(case):
    """Host == device: the weights' host copies are never counted, the per-segment device copies are."""
    args, kwargs, shape = case.inputs(1, 3, 5, 4)
    model = case.model
    plan = uniform_plan(model, 2, shape)
    with apply_plan(model, plan), MemoryTracker() as plain:
        _out(case, args, kwargs)
    plan.components[0].streamed = _streamable(case, shape)
    with apply_plan(model, plan) as handle, MemoryTracker() as tracked:
        _out(case, args, kwargs)
        assert tracked.current_bytes < plain.peak_bytes  # nothing held after the call
        smallest = min(b.nbytes for b in handle.streamer.blocks.values())
    assert tracked.peak_bytes >= plain.peak_bytes + smallest


def test_weights_restored_after_an_exception_and_remove(case):
    args, kwargs, shape = case.inputs(1, 3, 5, 4)
    model = case.model
    before = _weights(model)
    expected = _out(case, args, kwargs)
    plan = uniform_plan(model, 2, shape)
    plan.components[0].streamed = _streamable(case, shape)
    handle = apply_plan(model, plan)
    op = handle.ops[len(handle.ops) // 2]
    original = op.fn

    def boom(ctx, *a):
        raise RuntimeError("boom")

    op.fn = boom
    try:
        with pytest.raises(RuntimeError, match="boom"):
            _out(case, args, kwargs)
    finally:
        op.fn = original
    assert not any(b.loaded for b in handle.streamer.blocks.values())  # released by the call's finally
    torch.testing.assert_close(_out(case, args, kwargs), expected, **TOL)  # still runs
    handle.remove()
    _assert_weights_restored(model, before)
    assert torch.equal(_out(case, args, kwargs), expected)


def test_streaming_under_autograd_is_refused(case):
    args, kwargs, shape = case.inputs(1, 2, 4, 4)
    model = case.model
    before = _weights(model)
    plan = uniform_plan(model, 2, shape)
    plan.components[0].streamed = _streamable(case, shape)[:1]
    with apply_plan(model, plan), pytest.raises(InvalidPlanError, match="torch.no_grad"):
        case.output(model, args, kwargs)
    _assert_weights_restored(model, before)


def test_pinned_memory_failure_falls_back_to_pageable_with_one_warning(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    values = [p.detach().clone() for p in model.parameters()]

    def no_pinning(like):
        raise RuntimeError("cannot lock memory (container limit)")

    monkeypatch.setattr(streaming, "_allocate_pinned", no_pinning)
    streamer = WeightStreamer(model, ["0", "1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        streamer.offload(compute=torch.device("cuda"))  # as on a CUDA machine: host copies are pinned
    messages = [str(w.message) for w in caught if "pageable" in str(w.message)]
    assert len(messages) == 1 and "container limit" in messages[0]
    assert streamer.pinned is False and "RuntimeError" in streamer.fallback_error
    for p, v in zip(model.parameters(), values, strict=True):
        assert p.device.type == "cpu" and not p.is_pinned() and torch.equal(p, v)
    streamer.restore()
    for p, v in zip(model.parameters(), values, strict=True):
        assert torch.equal(p, v)


def test_pinned_host_copy_when_pinning_works(monkeypatch):
    made = []

    def fake_pinned(like):  # no CUDA here: stands in for a pinned allocation
        made.append(like.shape)
        return torch.empty(like.shape, dtype=like.dtype)

    monkeypatch.setattr(streaming, "_allocate_pinned", fake_pinned)
    model = torch.nn.Linear(3, 2)
    weight = model.weight.detach().clone()
    copy, pinned = streaming.host_copy(model.weight.data, True)
    assert pinned and made == [model.weight.shape] and torch.equal(copy, weight)


# ---------------------------------------------------------------------------- plan fields apply checks
@pytest.fixture()
def svd():
    return CASES["UNetSpatioTemporalConditionModel"]()


def _svd_plan(case, **fields):
    args, kwargs, shape = case.inputs(1, 3, 5, 4)
    plan = uniform_plan(case.model, 2, shape)
    for key, value in fields.items():
        setattr(plan.components[0], key, value)
    return plan


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(streamed=["down_blocks.7"]), "streams blocks this model does not have: down_blocks.7"),
        (dict(streamed=["mid_block", "mid_block"]), "streams mid_block more than once"),
        (dict(host=["no.such.value"]), "values no unit of this model makes: no.such.value"),
        (dict(host=["sample"]), "never the call's inputs"),
        (dict(host=["conv_norm_out"]), "result conv_norm_out on host"),
        (dict(recompute=["no.such.unit"]), "recompute names units this model does not have: no.such.unit"),
        (dict(recompute=["conv_in"]), "recompute lists conv_in, but no group makes its statistics input"),
    ],
)
def test_bad_plan_fields_are_refused_by_name(svd, fields, message):
    model = svd.model
    before = _weights(model)
    with pytest.raises(InvalidPlanError, match=message):
        apply_plan(model, _svd_plan(svd, **fields))
    assert "forward" not in model.__dict__
    _assert_weights_restored(model, before)


def test_a_host_value_read_only_inside_its_group_is_refused(svd):
    model = svd.model
    plan = _svd_plan(svd)
    ops, _ = apply_mod.adapter_for(model).ops(model)
    group_of = {u: i for i, g in enumerate(plan.components[0].groups) for u in g.units}
    inside = next(op.output for op in ops if op.name in group_of and all(
        group_of.get(r.name) == group_of[op.name] for r in ops if op.output in r.inputs) and any(
        op.output in r.inputs for r in ops))
    plan.components[0].host = [inside]
    with pytest.raises(InvalidPlanError, match=f"on host {inside}, but no later segment reads it"):
        apply_plan(model, plan)


def test_a_statistics_unit_inside_a_group_needs_recompute_listed(svd):
    model = svd.model
    units = list_units(model)
    i = next(i for i, u in enumerate(units) if u.needs_input_stats and i > 0 and units[i - 1].axis == u.axis)
    pair = [units[i - 1].name, units[i].name]
    plan = _svd_plan(svd, groups=[Group(units=pair, axis=units[i].axis, k=2)])
    plan.components[0].slices = dict.fromkeys(pair, 2)
    with pytest.raises(InvalidPlanError, match="must start its group, or be listed in the plan's recompute"):
        apply_plan(model, plan)


def test_a_block_read_outside_itself_cannot_stream(svd, monkeypatch):
    monkeypatch.setattr(apply_mod, "streamable_blocks", lambda *a, **k: {"down_blocks.0": 1})
    before = _weights(svd.model)
    with pytest.raises(InvalidPlanError, match=r"streams mid_block, but its weights are also read outside"):
        apply_plan(svd.model, _svd_plan(svd, streamed=["mid_block"]))
    _assert_weights_restored(svd.model, before)


def test_streaming_without_cuda_says_host_is_device(svd, caplog):
    args, kwargs, shape = svd.inputs(1, 3, 5, 4)
    plan = _svd_plan(svd, streamed=["mid_block"])
    with caplog.at_level(logging.WARNING, logger="vramplan.runtime.apply"), apply_plan(svd.model, plan):
        _out(svd, args, kwargs)
        _out(svd, args, kwargs)
    said = [r.getMessage() for r in caplog.records if "no CUDA device: host == device" in r.getMessage()]
    assert len(said) == 1 and "weight streaming" in said[0]


def test_host_placement_without_cuda_says_so_once_and_is_exact(svd, caplog):
    args, kwargs, shape = svd.inputs(1, 3, 5, 4)
    model = svd.model
    plan = uniform_plan(model, 2, shape, group=False)
    with apply_plan(model, plan):
        expected = _out(svd, args, kwargs)
    units = [u.name for u in list_units(model)]
    plan.components[0].host = [units[1], units[3]]  # skip-connection-like values read by later units
    with caplog.at_level(logging.WARNING, logger="vramplan.runtime.apply"), apply_plan(model, plan):
        got = _out(svd, args, kwargs)
        _out(svd, args, kwargs)
    assert torch.equal(got, expected)
    said = [r.getMessage() for r in caplog.records if apply_mod.HOST_EQUALS_DEVICE in r.getMessage()]
    assert len(said) == 1


def test_verify_on_meta_counts_the_streamed_copies():
    """On meta tensors (``verify``): the weights' host copies are not counted, the device copies made for
    each segment are: every segment holds at least the blocks it touches."""
    from diffusers import UNetSpatioTemporalConditionModel
    from tiny import SVD_TINY
    from vramplan.planner.schema import SampleShape
    from vramplan.runtime import empty_model, verify

    meta = empty_model(UNetSpatioTemporalConditionModel, SVD_TINY, torch.float32)
    shape = SampleShape(batch=2, frames=5, latent_height=9, latent_width=7, dtype="fp32")
    plan = uniform_plan(meta, 2, shape)
    plain = verify(plan, meta).measured_activation_bytes
    blocks = streamable_blocks(meta, shape)
    plan.components[0].streamed = list(blocks)
    streamed = verify(plan, meta).measured_activation_bytes
    assert plain + min(blocks.values()) <= streamed <= plain + sum(blocks.values())
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_step_rehash_streams_the_blocks_of_key_and_reuse_calls():
    """A rehash handle (key calls: the whole program; reuse calls: its tail) streams through the same
    bridges: outputs equal the rehash run without streaming, weights restored after remove."""
    from tiny import svd_inputs, tiny_svd_unet
    from vramplan.planner.schema import RehashPlan, SampleShape
    from vramplan.runtime.apply import uniform_component
    from vramplan.runtime.rehash import apply_rehash, rehash_cuts

    unet = tiny_svd_unet()
    args = svd_inputs(unet, batch=2)
    shape = SampleShape(batch=2, frames=5, latent_height=8, latent_width=8, dtype="fp32")
    cut = rehash_cuts(unet)[-1]
    rehash = RehashPlan(mode="uniform", cut=cut, steps=3, key_steps=[0], quality="uncalibrated",
                        original_unet_flops=1, unet_flops=1, key_call_s=0.0, reuse_call_s=0.0,
                        latency_saved_s=0.0, cache_bytes=0)
    comp = uniform_component(unet, 2, shape, group=False)

    def trajectory():
        with torch.no_grad(), apply_rehash(unet, rehash, comp):
            return [unet(*args).sample for _ in range(3)]

    expected = trajectory()
    before = _weights(unet)
    comp.streamed = list(streamable_blocks(unet, shape))
    got = trajectory()
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    _assert_weights_restored(unet, before)


def test_cuda_prefetch_schedule_simulated_on_the_cpu(monkeypatch):
    """The CUDA branch with streams and events simulated: the next block is copied on the copy stream
    during the segment before its use, the compute stream waits on its event at first use and marks its
    tensors used there (record_stream); blocks touched now are copied on the compute stream."""
    import contextlib
    from types import SimpleNamespace

    log = []

    class FakeStream:
        def __init__(self, name="copy"):
            self.name = name

        def wait_event(self, event):
            log.append(("wait", self.name, event.block))

        def synchronize(self):
            log.append(("sync", self.name))

    compute = FakeStream("compute")
    active = [compute]

    class FakeEvent:
        block = None

        def record(self, stream):
            self.block = current_block[0]
            log.append(("record", stream.name, self.block))

    @contextlib.contextmanager
    def on(stream):
        active.append(stream)
        yield
        active.pop()

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: log.append(("mark", s.name)))
    current_block = [None]

    def copy_in(block, device):
        current_block[0] = block.name
        log.append(("copy", active[-1].name, block.name))
        for w in block.weights:
            w.tensor.data = w.host.clone()

    monkeypatch.setattr(WeightStreamer, "_copy_in", staticmethod(copy_in))
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2), "c": torch.nn.Linear(2, 2)})
    streamer = WeightStreamer(model, ["a", "b", "c"])
    streamer.offload()
    segments = [SimpleNamespace(ops=[SimpleNamespace(name=n)]) for n in ("a", "b", "c")]
    with torch.no_grad(), streamer.call(segments, torch.device("cuda")) as around:
        for seg in segments:
            with around(seg):
                log.append(("run", seg.ops[0].name))
    assert log == [
        ("copy", "compute", "a"), ("copy", "copy", "b"), ("record", "copy", "b"), ("run", "a"),
        ("wait", "compute", "b"), ("mark", "compute"), ("mark", "compute"),  # b's weight and bias
        ("copy", "copy", "c"), ("record", "copy", "c"), ("run", "b"),
        ("wait", "compute", "c"), ("mark", "compute"), ("mark", "compute"), ("run", "c"),
    ]
    assert not any(b.loaded for b in streamer.blocks.values())
