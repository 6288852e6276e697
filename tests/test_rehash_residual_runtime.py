"""Residual cuts at run time on a tiny WanPipeline: key steps exact, reuse steps ``start + residual``
through the last blocks (checked against the stock blocks with the span's output replaced by hand)."""

import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
from tiny import tiny_umt5, tiny_wan
from vramplan.planner.rehash import RehashCutError, residual_cut
from vramplan.planner.schema import Plan, RehashPlan
from vramplan.runtime.adapters.base import adapter_for
from vramplan.runtime.apply import sample_shape, uniform_component
from vramplan.runtime.rehash import apply_rehash, rehash_cuts, split_groups_at

CUT = residual_cut("blocks.0.ffn", "blocks.2.ffn")  # block 0 and block 3 run; blocks 1-2 are the span


def _pipe():
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    model = tiny_wan(seed=1, in_channels=16, out_channels=16, num_layers=4)
    return WanPipeline(tokenizer=None, text_encoder=tiny_umt5(), vae=vae, scheduler=scheduler, transformer=model)


def _call(guidance=1.0):
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 512, 16, generator=g), torch.randn(1, 512, 16, generator=g)
    return dict(prompt_embeds=embeds, negative_prompt_embeds=negative, height=32, width=48, num_frames=5,
                num_inference_steps=4, guidance_scale=guidance, output_type="pt",
                generator=torch.Generator().manual_seed(3))


def _plan(pipe, k, cut=CUT):
    comp = uniform_component(pipe.transformer, k, sample_shape(torch.zeros(1, 16, 2, 4, 6), pipe.transformer))
    comp = split_groups_at(comp, [cut])  # both ends of the span exist whole
    assert k == 1 or comp.groups
    rehash = RehashPlan(mode="uniform", cut=cut, steps=4, key_steps=[0, 2], quality="uncalibrated",
                        original_unet_flops=1, unet_flops=1, cache_bytes=1)
    return Plan(pipeline="WanPipeline", model_name="tiny-wan", height=32, width=48, frames=5, components=[comp],
                rehash=rehash)


def _calls(model):
    calls = []
    hook = model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((args, dict(kwargs), out[0].clone())), with_kwargs=True)
    return calls, hook


def test_the_adapter_lists_the_planners_residual_cuts():
    from vramplan.planner.rehash import candidate_cuts

    model = tiny_wan(num_layers=4)
    ops, result = adapter_for(model).ops(model)

    class U:
        def __init__(self, op):
            self.name, self.kind, self.inputs = op.output, op.spec.kind, list(op.inputs)

    assert CUT in rehash_cuts(model) == adapter_for(model).rehash_cuts(model)
    assert [c for c in candidate_cuts([U(op) for op in ops]) if "->" in c] == rehash_cuts(model)


@pytest.mark.parametrize("k,guidance", [(1, 1.0), (3, 1.0), (3, 4.0)])
def test_key_steps_exact_and_reuse_steps_add_the_cached_residual(k, guidance):
    """guidance 4: Wan's CFG calls the DiT twice per step (cond, uncond), each call its own cache."""
    pipe = _pipe()
    model = pipe.transformer
    calls, hook = _calls(model)
    with torch.no_grad():
        handle = apply_rehash(pipe, _plan(pipe, k))
        try:
            pipe(**_call(guidance))
        finally:
            handle.remove()
        hook.remove()
        assert handle.key_steps == [0, 2] and handle.reused_steps == [1, 3]
        per_step = 2 if guidance > 1 else 1
        assert len(calls) == 4 * per_step and handle.caches == {}  # dropped after the last step
        cache, residual = {}, {}

        def keep(name):
            return lambda m, a, out: cache.__setitem__(name, out)

        for i, (args, kwargs, out) in enumerate(calls):
            step, slot = divmod(i, per_step)
            key = step in (0, 2)

            def replace(m, a, out, slot=slot):  # the span's end: start + the residual of the last key step
                return cache["start"] + residual[slot]

            hooks = [model.blocks[0].register_forward_hook(keep("start"))]
            if key:
                hooks.append(model.blocks[2].register_forward_hook(keep("end")))
            else:
                hooks.append(model.blocks[2].register_forward_hook(replace))
            try:
                expected = model(*args, **kwargs)[0]
            finally:
                for h in hooks:
                    h.remove()
            if key:
                residual[slot] = cache["end"] - cache["start"]
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        # a reuse step differs from the stock forward (the approximation is real)
        reused = calls[per_step]
        assert not torch.allclose(reused[2], model(*reused[0], **reused[1])[0], atol=1e-6)


def test_a_span_that_is_not_a_candidate_is_refused():
    pipe = _pipe()
    with pytest.raises(RehashCutError, match="not a rehash cut"):
        apply_rehash(pipe, _plan(pipe, 1, residual_cut("blocks.0.ffn", "blocks.2.attn1")))




def test_with_rehash_counts_the_residual_cuts_flops_and_cache():
    from vramplan.runtime.rehash import with_rehash

    pipe = _pipe()
    plan = _plan(pipe, 1).model_copy(update={"rehash": None})
    r = with_rehash(plan, pipe.transformer, mode="uniform", steps=4, keys=2).rehash
    assert r.cut in rehash_cuts(pipe.transformer) and r.key_steps == [0, 3]
    assert r.unet_flops < r.original_unet_flops
    assert r.cache_bytes == 1 * 12 * 24 * 4  # one block output: 12 tokens x 24 channels, fp32


def test_a_span_of_every_block_runs_no_block_at_reuse_steps():
    """F = 0 (MagCache's shape): the span starts at the patch embedding; a reuse call runs no block, and its
    output is the stock forward's with the last block's output replaced by the tokens + the cached residual."""
    pipe = _pipe()
    model = pipe.transformer
    cut = residual_cut("patch_embedding", "blocks.3.ffn")
    assert cut in rehash_cuts(model)
    calls, hook = _calls(model)
    ran = []
    counters = [b.ffn.register_forward_hook(lambda m, a, o: ran.append(1)) for b in model.blocks]
    with torch.no_grad():
        handle = apply_rehash(pipe, _plan(pipe, 1, cut))
        try:
            pipe(**_call())
        finally:
            handle.remove()
        hook.remove()
        for c in counters:
            c.remove()
        assert len(ran) == 2 * 4  # two key steps of four blocks, none at the reuse steps
        seen = {}
        pre = model.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("tokens", a[0]))
        end = model.blocks[3].register_forward_hook(lambda m, a, o: seen.__setitem__("end", o))
        model(*calls[0][0], **calls[0][1])  # key step 0: its residual
        residual = seen["end"] - seen["tokens"]
        end.remove()
        end = model.blocks[3].register_forward_hook(lambda m, a, o: seen["tokens"] + residual)
        try:
            expected = model(*calls[1][0], **calls[1][1])[0]
        finally:
            pre.remove()
            end.remove()
        torch.testing.assert_close(calls[1][2], expected, rtol=1e-5, atol=1e-5)
