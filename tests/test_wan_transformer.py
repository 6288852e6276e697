"""WanTransformer3DModel under plans: the variants the conformance case does not cover (I2V image
keys/values, TI2V per-token timesteps), whole inputs (self-attention by query chunks with full keys
and values) in the executor, the rulebook and plan checks, and the profile's prediction on meta.
(The T2V model runs the whole conformance suite: tests/tiny.py CASES.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from plans import random_plans
from tiny import tiny_wan, wan_inputs
from vramplan.planner.errors import InvalidPlanError
from vramplan.planner.schema import ComponentPlan, Group
from vramplan.runtime import apply_plan, fingerprint, list_units, uniform_plan
from vramplan.runtime.apply import sample_shape

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def i2v():
    return tiny_wan(seed=3, image_dim=8, added_kv_proj_dim=24)


def _out(model, args):
    with torch.no_grad():
        return model(*args).sample


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), frames=st.integers(1, 3), h=st.integers(2, 5), w=st.integers(2, 4))
def test_image_conditioned_random_plans_are_exact(i2v, data, frames, h, w):
    args, _, shape = wan_inputs(i2v, 1, frames, h, w, seed=frames + h + w)
    plan = data.draw(random_plans(list_units(i2v), fingerprint(i2v), shape, max_k=9))
    expected = _out(i2v, args)
    with apply_plan(i2v, plan):
        got = _out(i2v, args)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("k", [2, 5])
def test_per_token_timesteps_ti2v_are_exact(k):
    """Wan 2.2 TI2V passes one timestep per token: the modulation is sliced with the tokens."""
    model = tiny_wan(seed=4)
    args, _, shape = wan_inputs(model, 1, 3, 3, 2, seed=5, per_token=True)
    assert args[1].shape == (1, 18)
    expected = _out(model, args)
    with apply_plan(model, uniform_plan(model, k, shape)):
        got = _out(model, args)
    torch.testing.assert_close(got, expected, **TOL)


def test_sample_shape_reads_the_models_layout():
    model = tiny_wan()
    x = torch.zeros(1, 4, 5, 6, 8)  # [B, C, T, H, W]
    s = sample_shape(x, model)
    assert (s.batch, s.frames, s.latent_height, s.latent_width) == (1, 5, 6, 8)


def test_attention_reads_keys_and_values_whole():
    model = tiny_wan()
    units = {u.name: u for u in list_units(model)}
    assert units["blocks.0.attn1"].whole_inputs == ("blocks.0.attn1.kv",)
    assert units["blocks.1.attn2"].whole_inputs == ("blocks.1.attn2.kv",)
    assert units["blocks.0.attn2.kv"].axis is None and units["blocks.0.attn1"].axis == "tokens"
    # uniform plans never group a whole input's maker with its reader
    plan = uniform_plan(model, 3, wan_inputs(model, 1, 2, 3, 3)[2]).components[0]
    for group in plan.groups:
        made = set()
        for name in group.units:
            assert not set(units[name].whole_inputs) & made
            made.add(name)
    assert any(g.units[:3] == ["blocks.0.attn1", "blocks.0.attn2", "blocks.0.ffn"] for g in plan.groups)


def _chain():
    """x -> kv (tokens) -> attn (tokens, reads kv whole): the maker and reader of a whole input adjacent."""
    from vramplan.runtime.program import Op, UnitSpec

    return [
        Op(UnitSpec("kv", "tokens"), ("x",), "kv", lambda ctx, x: 2 * x, "nlc"),
        Op(UnitSpec("attn", "tokens", whole_inputs=("kv",)), ("x", "kv"), "attn",
           lambda ctx, x, kv: x + kv.sum(dim=1, keepdim=True), "nlc"),
    ]


def test_a_group_making_a_whole_input_is_refused():
    from vramplan.planner.schema import ModelRef, SampleShape
    from vramplan.runtime.apply import build_segments

    ops = _chain()
    shape = SampleShape(batch=1, frames=1, latent_height=2, latent_width=2, dtype="fp32")
    plan = ComponentPlan(model=ModelRef(class_name="X", config_hash="0"), shape=shape, slices={"kv": 2, "attn": 2},
                         groups=[Group(units=["kv", "attn"], axis="tokens", k=2)])
    with pytest.raises(InvalidPlanError, match="reads kv whole"):
        build_segments(ops, plan)


def test_the_executor_runs_whole_inputs_exactly_and_refuses_them_inside_a_segment():
    from vramplan.runtime.executor import Segment, execute
    from vramplan.runtime.program import Program

    ops = _chain()
    x = torch.randn(1, 7, 3)

    def program():
        return Program(ops, {"x": x}, {"x": "nlc"}, "attn", lambda t: t)

    expected = x + (2 * x).sum(dim=1, keepdim=True)
    got = execute(program(), [Segment(ops[:1], "tokens", 3), Segment(ops[1:], "tokens", 3)])
    torch.testing.assert_close(got, expected, **TOL)
    with pytest.raises(ValueError, match="whole"):
        execute(program(), [Segment(ops, "tokens", 3)])


def test_a_whole_input_is_never_the_first_one():
    from vramplan.runtime.program import Op, UnitSpec

    with pytest.raises(ValueError, match="whole"):
        Op(UnitSpec("u", "tokens", whole_inputs=("a",)), ("a", "b"), "u", lambda ctx, a, b: a, "nlc")


def test_rulebook_never_reuses_a_whole_input_and_splits_groups_before_its_reader():
    from vramplan.planner.rules import ProgramRules

    class U:
        def __init__(self, name, inputs, whole=()):
            self.name, self.inputs, self.whole_inputs = name, inputs, whole

    units = [U("x", ("in",)), U("kv", ("x",)), U("attn", ("x", "kv"), ("kv",)), U("out", ("attn",))]
    rules = ProgramRules.of(units, "out")
    assert rules.whole_made_inside(1, 2) == [2] and rules.whole_made_inside(2, 3) == []
    # attn's output may take over x's buffer (sliced, dying) but never kv's (read whole)
    assert rules.segment(2, 3).candidates(2) == ["x"]
    placed = rules.with_host({"kv"})
    assert placed.segment(2, 3).staged_whole(2) == ["kv"]


# ---------------------------------------------------------------------- profile and prediction on meta
@pytest.fixture(scope="module")
def meta_wan():
    from diffusers import WanTransformer3DModel
    from tiny import TINY_WAN
    from vramplan.runtime import empty_model

    return empty_model(WanTransformer3DModel, TINY_WAN, torch.float32)


@pytest.fixture(scope="module")
def wan_profile(meta_wan):
    from vramplan.planner.schema import SampleShape
    from vramplan.runtime.profiler import profile

    shape = SampleShape(batch=1, frames=5, latent_height=18, latent_width=14, dtype="fp32")
    return profile(meta_wan, shape, "efficient", name="tiny-wan", max_k=16)


def test_profile_streams_each_block_and_counts_quadratic_attention(wan_profile):
    units = {u.name: u for u in wan_profile.units}
    assert {"blocks.0", "blocks.1"} <= set(wan_profile.block_weights)
    assert units["blocks.0.attn1"].whole_inputs == ["blocks.0.attn1.kv"]
    length = units["blocks.0.attn1"].axis_length
    assert length == 5 * 9 * 7
    # q.k^T and p.v over all keys for every query: 2 x 2 x L^2 x inner (24) FLOPs, plus the projections
    assert units["blocks.0.attn1"].flops >= 4 * length * length * 24


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_memory_model_predicts_the_measured_peak(meta_wan, wan_profile, data):
    from vramplan.planner.costs import CostModel, Segment
    from vramplan.planner.gpus import find_gpu
    from vramplan.runtime.verify import verify

    units = list_units(meta_wan)
    k_ok = {u.name: set(u.scratch) for u in wan_profile.units}
    drawn = data.draw(random_plans(units, fingerprint(meta_wan), wan_profile.shape, max_k=16)).components[0]

    def profiled(k):  # the largest profiled slice count not above k (powers of two here)
        return 1 << (k.bit_length() - 1)

    plan = drawn.model_copy(update={
        "slices": {n: profiled(k) for n, k in drawn.slices.items()},
        "groups": [g.model_copy(update={"k": profiled(g.k)}) for g in drawn.groups],
    })
    assert all(plan.k(u.name) in k_ok[u.name] for u in units)
    assume(all(g.k > 1 for g in plan.groups))  # the planner groups only with k > 1 (costs.segments)
    model = CostModel(wan_profile, find_gpu("RTX 4090"), allocator="none")
    group_at = {g.units[0]: g for g in plan.groups}
    segments, i = [], 0
    while i < model.n:
        name = model.units[i].name
        size = len(group_at[name].units) if name in group_at else 1
        segments.append(Segment(i, i + size - 1, plan.k(name)))
        i += size
    predicted = max(model.cost(seg).activation_bytes for seg in segments)
    measured = verify(plan, model=meta_wan).measured_activation_bytes
    assert predicted == pytest.approx(measured, rel=0.02)
