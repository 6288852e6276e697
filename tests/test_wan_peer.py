"""diffusers' own checks of WanTransformer3DModel (tests/models/transformers/test_models_transformer_wan.py:
its tiny config and dummy inputs, and the ModelTesterMixin / TrainingTesterMixin / AttentionTesterMixin
checks that apply to a forward), run under a plan as they run without one."""

from __future__ import annotations

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from vramplan.planner.errors import UnsupportedArgumentError
from vramplan.runtime import apply_plan, uniform_plan
from vramplan.runtime.apply import sample_shape

INIT = {  # WanTransformer3DTesterConfig.get_init_dict
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4, "out_channels": 4,
    "text_dim": 16, "freq_dim": 256, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32,
}


def _inputs():  # WanTransformer3DTesterConfig.get_dummy_inputs (one generator per tensor, as its property makes)
    return {
        "hidden_states": randn_tensor((1, 4, 2, 16, 16), generator=torch.Generator("cpu").manual_seed(0)),
        "encoder_hidden_states": randn_tensor((1, 12, 16), generator=torch.Generator("cpu").manual_seed(0)),
        "timestep": torch.randint(0, 1000, size=(1,), generator=torch.Generator("cpu").manual_seed(0)),
    }


@pytest.fixture()
def model():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**INIT).eval()


def _planned(model, k=3):
    return apply_plan(model, uniform_plan(model, k, sample_shape(_inputs()["hidden_states"], model)))


def test_output_shape_and_values_equal_the_unplanned(model):
    """ModelTesterMixin.test_output: output shape (4, 2, 16, 16) per sample."""
    with torch.no_grad():
        expected = model(**_inputs()).sample
        with _planned(model):
            got = model(**_inputs()).sample
    assert got.shape[1:] == (4, 2, 16, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_determinism_and_return_dict(model):
    """ModelTesterMixin.test_determinism and test_outputs_equivalence (tuple vs dict output)."""
    with torch.no_grad(), _planned(model):
        first = model(**_inputs()).sample
        second = model(**_inputs()).sample
        tuple_out = model(**_inputs(), return_dict=False)[0]
    assert torch.equal(first, second) and torch.equal(first, tuple_out)


def test_save_and_reload_keeps_the_plan_valid(model, tmp_path):
    """ModelTesterMixin.test_from_save_pretrained: the reloaded model has the same fingerprint, so the
    same plan attaches, and its planned output equals the original's."""
    from diffusers import WanTransformer3DModel

    model.save_pretrained(tmp_path)
    again = WanTransformer3DModel.from_pretrained(tmp_path).eval()
    plan = uniform_plan(model, 3, sample_shape(_inputs()["hidden_states"], model))
    with torch.no_grad():
        expected = model(**_inputs()).sample
        with apply_plan(again, plan):
            got = again(**_inputs()).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(model):
    """TrainingTesterMixin.test_effective_gradient_checkpointing: with checkpointing on, gradients under
    the plan (every unit slice checkpointed) equal those of the unplanned forward."""

    def grads(planned: bool):
        model.zero_grad(set_to_none=True)
        inputs = _inputs()
        inputs["hidden_states"].requires_grad_()
        if planned:
            with _planned(model, 2):
                out = model(**inputs).sample
        else:
            out = model(**inputs).sample
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        return [inputs["hidden_states"].grad] + [p.grad for p in model.parameters() if p.grad is not None]

    model.train()
    expected = grads(False)
    model.enable_gradient_checkpointing()
    got = grads(True)
    assert len(got) == len(expected)
    scale = max(g.abs().max().item() for g in expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * scale)


def test_fused_projections_are_refused_by_name(model):
    """AttentionTesterMixin.test_fuse_unfuse_qkv_projections: fused projections change the module layout the
    plan's units call; the plan refuses them by name, and unfusing restores the planned run."""
    with torch.no_grad():
        expected = model(**_inputs()).sample
    with _planned(model):
        model.fuse_qkv_projections()
        with pytest.raises(UnsupportedArgumentError, match="unfuse_qkv_projections"):
            model(**_inputs())
        model.unfuse_qkv_projections()
        with torch.no_grad():
            torch.testing.assert_close(model(**_inputs()).sample, expected, rtol=1e-5, atol=1e-5)
