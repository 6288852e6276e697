"""The straight run of an unsliced program (runtime/straight.py) gives the executor's result bit for bit, and
Step Rehash's handle takes it only where it may (one slice per segment, nothing to bridge or place)."""

import pytest
import torch
from tiny import svd_inputs, tiny_svd_unet, tiny_wan, wan_inputs
from vramplan.runtime.adapters.base import adapter_for
from vramplan.runtime.executor import Segment, execute, unit_by_unit
from vramplan.runtime.program import Program
from vramplan.runtime.rehash import cache_name, cache_of, reuse_ops, reuse_segments
from vramplan.runtime.straight import Straight, straight_ok


def _program(model, args, ops, result, extra=None):
    binding = adapter_for(model).bind(model, *args)
    env, layouts = dict(binding.env), dict(binding.layouts)
    for name, (value, layout) in (extra or {}).items():
        env[name], layouts[name] = value, layout
    return Program(ops, env, layouts, result, binding.finish, binding.globals)


def _same(a, b):
    a, b = (x.sample if hasattr(x, "sample") else x[0] if isinstance(x, tuple) else x for x in (a, b))
    assert torch.equal(a, b)


@pytest.mark.parametrize("which", ["wan", "svd"])
def test_straight_equals_the_executor_on_full_and_reuse_programs(which):
    if which == "wan":
        model = tiny_wan(num_layers=3)
        args = wan_inputs(model, 1, 3, 3, 5)[0]
        cut = "blocks.0.ffn->blocks.1.ffn"
    else:
        model = tiny_svd_unet()
        args = svd_inputs(model, frames=3, height=8, width=12)
        cut = None
    adapter = adapter_for(model)
    ops, result = adapter.ops(model)
    if cut is None:  # the UNet's shallowest feature cut
        from vramplan.runtime.rehash import rehash_cuts

        cut = rehash_cuts(model)[0]
    from vramplan.planner.rehash import cut_values

    segments = unit_by_unit(ops)
    keep = frozenset(cut_values(cut))
    with torch.no_grad():
        p1, p2 = _program(model, args, ops, result), _program(model, args, ops, result)
        _same(execute(p1, segments, keep=keep), Straight(segments, result, keep).run(p2))
        assert p1.kept.keys() == p2.kept.keys() == keep
        assert all(torch.equal(p1.kept[k], p2.kept[k]) for k in keep)
        reuse = reuse_ops(ops, result, cut)
        segs = reuse_segments(segments, reuse, cut)
        layout = next(op.layout for op in ops if op.output == cut_values(cut)[-1])
        extra = {cache_name(cut): (cache_of(cut, p1.kept) * 0.5, layout)}
        r1, r2 = (_program(model, args, reuse, result, extra) for _ in range(2))
        _same(execute(r1, segs), Straight(segs, result).run(r2))


def test_straight_only_where_it_gives_the_executors_result():
    model = tiny_wan(num_layers=2)
    ops, _ = adapter_for(model).ops(model)
    one = unit_by_unit(ops)
    cpu = torch.device("cpu")
    assert straight_ok(one, cpu)
    assert not straight_ok([Segment(one[1].ops, "tokens", 2), *one[2:]], cpu)  # sliced
    assert not straight_ok(one, cpu, checkpoint=True)
    assert not straight_ok(one, cpu, host=frozenset({ops[1].output}))
    from vramplan.runtime.memory import MemoryTracker

    with MemoryTracker():  # it attributes memory unit by unit through the executor
        assert not straight_ok(one, cpu)
    # an op that computes its own statistics: straight on the CPU only (the executor runs its pass elsewhere)
    unet = tiny_svd_unet()
    segs = unit_by_unit(adapter_for(unet).ops(unet)[0])
    assert any(op.prepare is not None for s in segs for op in s.ops)
    assert straight_ok(segs, cpu) and not straight_ok(segs, torch.device("meta"))


def test_the_rehash_handle_runs_straight_unsliced_and_through_the_executor_sliced(monkeypatch):
    from vramplan.planner.schema import RehashPlan
    from vramplan.runtime import executor, rehash
    from vramplan.runtime.apply import uniform_component

    model = tiny_wan(num_layers=3)
    args, kwargs, shape = wan_inputs(model, 1, 3, 3, 5)
    cut = "blocks.0.ffn->blocks.1.ffn"
    plan = RehashPlan(mode="uniform", cut=cut, steps=2, key_steps=[0], quality="uncalibrated",
                      original_unet_flops=1, unet_flops=1, cache_bytes=1)
    executed = []
    real = executor.execute
    monkeypatch.setattr(rehash, "execute", lambda *a, **k: executed.append(1) or real(*a, **k))
    outs = {}
    for k in (1, 2):
        comp = rehash.split_groups_at(uniform_component(model, k, shape), [cut]) if k > 1 else None
        handle = rehash.apply_rehash(model, plan, comp)
        try:
            with torch.no_grad():
                outs[k] = [model(*args, **kwargs).sample for _ in range(2)]  # key, then reuse
        finally:
            handle.remove()
        assert handle.key_steps == [0] and handle.reused_steps == [1]
        assert len(executed) == (0 if k == 1 else 2)
    for a, b in zip(outs[1], outs[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_others_hooks_are_checked_once_per_pipeline_call(monkeypatch):
    """The plan hook checks others' hooks at a pipeline call's first model call, not at its later ones (a
    rehash run calls the model twice per step); the next pipeline call checks again."""
    from test_rehash_residual_runtime import _call, _pipe, _plan
    from vramplan.runtime import apply
    from vramplan.runtime.rehash import apply_rehash

    pipe = _pipe()
    scans = []
    real = apply.hooked_modules
    monkeypatch.setattr(apply, "hooked_modules", lambda *a: scans.append(1) or real(*a))
    handle = apply_rehash(pipe, _plan(pipe, 1))
    try:
        with torch.no_grad():
            for expected in (2, 3):  # apply_rehash's own check, then one per pipeline call of 8 model calls
                pipe(**_call(4.0))
                assert len(handle.records) == 8 and len(scans) == expected
    finally:
        handle.remove()


def test_unsliced_key_steps_run_the_stock_forward_and_cache_its_residual(monkeypatch):
    """An unsliced plan's key calls are the stock forward (its blocks' own forwards run), the span's ends read
    off it (the adapter's stock_values); reuse calls run the reuse program (no block forward); sliced: the plan."""
    from test_rehash_residual_runtime import _call, _pipe, _plan
    from vramplan.runtime.rehash import apply_rehash

    pipe = _pipe()
    model = pipe.transformer
    block_class = type(model.blocks[0])
    real_forward = block_class.forward
    ran = []  # (block, output) of every block forward, in order

    def forward(self, hidden_states, *a, **k):
        out = real_forward(self, hidden_states, *a, **k)
        ran.append((self, hidden_states, out))
        return out

    monkeypatch.setattr(block_class, "forward", forward)  # the class's: not a hook on a module of the plan
    for k, key_calls in ((1, 2 * 2), (3, 0)):  # two key steps x two CFG calls, or none under slicing
        ran.clear()
        handle = apply_rehash(pipe, _plan(pipe, k))
        cached = []
        if k == 1:
            real = handle._stock_call

            def spy(*a, real=real, handle=handle, cached=cached):
                out = real(*a)
                cached.append(handle.program_kept["blocks.2.ffn"] - handle.program_kept["blocks.0.ffn"])
                return out

            handle._stock_call = spy
        try:
            with torch.no_grad():
                pipe(**_call(4.0))
        finally:
            handle.remove()
        assert len(ran) == key_calls * 4 and handle.key_steps == [0, 2]
        # each call's cache: the stock forward's block 2 output minus its block 0 output (a cache per CFG call)
        calls = [ran[i:i + 4] for i in range(0, len(ran), 4)]
        assert len(cached) == len(calls) == (4 if k == 1 else 0)
        for got, blocks in zip(cached, calls, strict=True):
            assert torch.equal(got, blocks[2][2] - blocks[0][2])
