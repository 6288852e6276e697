"""The CLIP vision encoder as a unit program (runtime/adapters/clip_vision.py): one block per transformer
layer, streamable, equal to the stock forward (CLIPVisionModel as Wan 2.1 I2V calls it, with hidden states;
CLIPVisionModelWithProjection as SVD does). CPU: host == device, the same copies happen."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection
from vramplan.planner.errors import UnsupportedArgumentError
from vramplan.planner.schema import SampleShape
from vramplan.runtime import apply_plan, list_units, uniform_plan
from vramplan.runtime.streaming import streamable_blocks

CONFIG = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=30,
              patch_size=7, projection_dim=12)


@pytest.fixture(scope="module", params=["CLIPVisionModel", "CLIPVisionModelWithProjection"])
def model(request):
    torch.manual_seed(0)
    cls = CLIPVisionModel if request.param == "CLIPVisionModel" else CLIPVisionModelWithProjection
    return cls(CLIPVisionConfig(**CONFIG)).eval()


def _shape(batch=2, size=30):
    return SampleShape(batch=batch, frames=1, latent_height=size, latent_width=size, dtype="fp32")


def _fields(out):
    pooled = out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output
    return [pooled, out.last_hidden_state, *(out.hidden_states or ())]


def test_units_are_one_per_layer_and_each_layer_streams(model):
    prefix = "vision_model." if hasattr(model, "vision_model") else ""
    names = [u.name for u in list_units(model)]
    assert names == [f"{prefix}embeddings", *(f"{prefix}encoder.layers.{i}" for i in range(3)), "outputs"]
    assert all(u.axis is None for u in list_units(model))
    blocks = streamable_blocks(model, _shape())
    layer = sum(t.numel() * t.element_size() for t in model.get_submodule(f"{prefix}encoder.layers.0").parameters())
    assert {f"{prefix}encoder.layers.{i}" for i in range(3)} <= set(blocks)
    assert blocks[f"{prefix}encoder.layers.1"] == layer


@pytest.mark.parametrize("hidden", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_planned_and_streamed_forward_equals_the_stock_one(model, hidden, seed):
    x = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(pixel_values=x, output_hidden_states=hidden)
    plan = uniform_plan(model, 1, _shape())
    blocks = list(streamable_blocks(model, _shape()))
    rng = random.Random(seed)
    plan.components[0].streamed = rng.sample(blocks, rng.randint(1, len(blocks)))
    with torch.no_grad(), apply_plan(model, plan):
        got = model(pixel_values=x, output_hidden_states=hidden)
    assert type(got) is type(expected)
    assert (got.hidden_states is None) == (not hidden)
    for a, b in zip(_fields(got), _fields(expected), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_penultimate_hidden_state_in_bf16_as_wan_uses_it():
    torch.manual_seed(1)
    model = CLIPVisionModel(CLIPVisionConfig(**CONFIG)).eval().to(torch.bfloat16)
    x = torch.randn(1, 3, 30, 30).to(torch.bfloat16)
    with torch.no_grad():
        expected = model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    plan = uniform_plan(model, 1, SampleShape(batch=1, frames=1, latent_height=30, latent_width=30, dtype="bf16"))
    plan.components[0].streamed = [f"encoder.layers.{i}" for i in range(3)]
    with torch.no_grad(), apply_plan(model, plan):
        got = model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-2)


def test_attention_maps_are_refused(model):
    plan = uniform_plan(model, 1, _shape())
    with torch.no_grad(), apply_plan(model, plan), pytest.raises(UnsupportedArgumentError, match="attention"):
        model(pixel_values=torch.randn(2, 3, 30, 30), output_attentions=True)
