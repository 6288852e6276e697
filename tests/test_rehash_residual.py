"""Residual rehash cuts (a DiT's first-F / last-B blocks run, the middle span's residual is cached):
the reuse program, the candidates, and the planner's pricing. Torch-free."""

from dataclasses import dataclass

import pytest
from vramplan.planner.costs import CostModel
from vramplan.planner.gpus import find_gpu
from vramplan.planner.integrity import problems
from vramplan.planner.rehash import (
    RehashCutError,
    candidate_cuts,
    cut_bytes,
    plan_rehash,
    profile_nodes,
    residual_cut,
    residual_span,
    reuse_flops,
    reuse_names,
    stream_points,
    valid_cuts,
)
from vramplan.planner.schema import PipelineProfile

WAN = "profiles/models/wan2.1-t2v-1.3b-480x832-f81-cfg-bf16-flash.pipeline.json"


@dataclass
class _U:
    name: str
    kind: str
    inputs: list
    output_bytes: int = 8


def _dit(blocks: int) -> tuple[list[_U], str]:
    """A toy DiT program shaped like the Wan adapter's: patch, per block kv/attn/cross/ffn, head."""
    units = [_U("patch", "conv", ["x"])]
    h = "patch"
    for i in range(blocks):
        p = f"b{i}"
        units += [_U(f"{p}.kv", "proj", [h]), _U(f"{p}.kv2", "proj", ["ctx"]),
                  _U(f"{p}.attn1", "attention", [h, f"{p}.kv"]), _U(f"{p}.attn2", "attention", [f"{p}.attn1", f"{p}.kv2"]),
                  _U(f"{p}.ffn", "ffn", [f"{p}.attn2"])]
        h = f"{p}.ffn"
    units += [_U("head", "proj", [h], 4), _U("out", "reshape", ["head"], 4)]
    return units, "out"


def test_residual_reuse_program_skips_exactly_the_span():
    units, result = _dit(5)
    nodes = profile_nodes(units)
    cut = residual_cut("b0.ffn", "b3.ffn")
    assert residual_span(cut) == ("b0.ffn", "b3.ffn") and residual_span("b0.ffn") is None
    names = reuse_names(nodes, result, cut)
    # the first block and the last block run, the span (blocks 1-3) does not, its end is start + residual
    assert names == ["patch", *[f"b0.{s}" for s in ("kv", "kv2", "attn1", "attn2", "ffn")],
                     *[f"b4.{s}" for s in ("kv", "kv2", "attn1", "attn2", "ffn")], "head", "out"]
    assert valid_cuts(nodes, result, [cut]) == [cut]
    # B = 0: the span ends at the last block; the head reads the span's end
    assert reuse_names(nodes, result, residual_cut("b1.ffn", "b4.ffn"))[-2:] == ["head", "out"]


def test_residual_cut_errors():
    units, result = _dit(3)
    nodes = profile_nodes(units)
    with pytest.raises(RehashCutError, match="no value"):
        reuse_names(nodes, result, residual_cut("b0.ffn", "nope"))
    with pytest.raises(RehashCutError, match="does not depend"):
        reuse_names(nodes, result, residual_cut("b2.ffn", "b0.ffn"))
    with pytest.raises(RehashCutError, match="result"):
        reuse_names(nodes, result, residual_cut("b0.ffn", "out"))


def test_candidates_are_block_ends_of_the_stream():
    units, _ = _dit(10)
    points = ["patch", *[n for i in range(10) for n in (f"b{i}.attn2", f"b{i}.ffn")], "head"]
    assert stream_points(profile_nodes(units)) == points  # not attn1: attn2 reads the kv made before it
    cuts = candidate_cuts(units)
    spans = [residual_span(c) for c in cuts]
    assert ("b0.ffn", "b9.ffn") in spans and ("b7.ffn", "b8.ffn") in spans  # F=1,B=0 and F=8,B=1
    assert all(int(s[0][1:-4]) < int(s[1][1:-4]) for s in spans if s[0] != "patch")  # a block in every span
    # F in (1, 2, 4, 8), B in (0, 1, 2, 4, 8), span non-empty: 5 + 4 + 4 + 2; F = 0 (from the patch
    # embedding, MagCache's shape: every block cached) with every B: 5 more, listed last
    assert len(cuts) == len(set(cuts)) == 20
    assert [residual_span(c) for c in cuts[15:]] == [("patch", f"b{9 - b}.ffn") for b in (0, 1, 2, 4, 8)]
    # a skip connection (as in a UNet) from block 2 to the head: no value from there on carries the whole
    # state, so no span reaches past block 1
    units[-2].inputs = ["b9.ffn", "b2.attn1"]
    assert stream_points(profile_nodes(units)) == points[:5] + ["head"]
    assert [c for c in candidate_cuts(units) if residual_span(c)] == ["b0.ffn->b1.ffn", "patch->b1.ffn", "patch->b0.ffn"]


@pytest.fixture(scope="module")
def wan():
    return PipelineProfile.load(WAN)


def test_wan_plan_prices_the_residual_cut(wan):
    stage = next(s for s in wan.stages if s.per_step and s.profile is not None)
    unet = stage.profile
    plan = plan_rehash(wan, find_gpu("h100"), mode="uniform", keys=13, steps=25)
    r = plan.rehash
    start, end = residual_span(r.cut)
    assert r.cut in valid_cuts(profile_nodes(unet.units), unet.result, candidate_cuts(unet.units))
    model = CostModel(unet, find_gpu("h100"))
    full = sum(u.flops for u in unet.units)
    skipped = set(u.name for u in unet.units) - set(reuse_names(profile_nodes(unet.units), unet.result, r.cut))
    assert skipped and start not in skipped and end in skipped
    assert reuse_flops(model, r.cut) == full - sum(u.flops for u in unet.units if u.name in skipped)
    assert r.unet_flops == 13 * full + 12 * reuse_flops(model, r.cut) < r.original_unet_flops
    # one residual per DiT call of a step (Wan's CFG: two), as the runtime keeps them
    assert r.cache_bytes == 2 * cut_bytes(model, r.cut) == 2 * unet.units[model.index[end]].output_bytes
    assert r.reuse_call_s < r.key_call_s
    for g in plan.component(stage.component).groups:  # both ends exist whole
        assert all(v not in g.units or g.units[-1] == v for v in (start, end))
    assert problems(plan, wan) == []
    # a cut that is not one of the model's is caught by the integrity check
    bad = plan.model_copy(update={"rehash": r.model_copy(update={"cut": residual_cut(start, "blocks.3.attn1")})})
    assert any("rehash.cut" in p for p in problems(bad, wan))


def test_wan_fixed_residual_cut_and_latency(wan):
    cut = residual_cut("blocks.1.ffn", "blocks.27.ffn")
    base = plan_rehash(wan, find_gpu("h100"), mode="uniform", keys=25, steps=25, cut=cut)
    plan = plan_rehash(wan, find_gpu("h100"), mode="uniform", keys=9, steps=25, cut=cut)
    assert plan.rehash.cut == cut and len(plan.rehash.key_steps) == 9
    assert plan.prediction.latency_s < base.prediction.latency_s
    with pytest.raises(RehashCutError):
        plan_rehash(wan, find_gpu("h100"), mode="uniform", keys=9, steps=25, cut=residual_cut("blocks.1.ffn", "blocks.3.attn1"))


def test_unets_have_no_residual_candidates():
    from vramplan.planner.plan import shipped_pipeline_profile

    svd = shipped_pipeline_profile("svd", 576, 1024, 14, True, "fp16", "flash")
    unet = next(s.profile for s in svd.stages if s.per_step and s.profile is not None)
    assert candidate_cuts(unet.units) and not any(residual_span(c) for c in candidate_cuts(unet.units))
