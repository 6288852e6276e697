"""A Wan plan's header frames are checked with the VAE's own temporal factor: the trained tiny Wan's VAE
compresses 2x in time (17 frames -> 9 latent frames), so its plans load; Wan's 4x still holds for the
catalogue models (the check stays strict there)."""

from __future__ import annotations

import json

import pytest
import torch
from vramplan.planner.errors import PlanIntegrityError
from vramplan.planner.integrity import problems, shipped_configs
from vramplan.planner.schema import Plan
from vramplan.runtime import trained_wan as W
from vramplan.runtime.apply import sample_shape, uniform_component


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**W.TRANSFORMER_CONFIG).eval()


def _plan(transformer, latent_frames: int) -> Plan:
    """A plan of the trained tiny Wan at its native 17 frames x 32x32 (4x spatial: 8x8 latents)."""
    latent = torch.zeros(1, 8, latent_frames, W.HEIGHT // 4, W.WIDTH // 4)
    comp = uniform_component(transformer, 1, sample_shape(latent, transformer))
    return Plan(pipeline="WanPipeline", model_name="trained-tiny-wan", height=W.HEIGHT, width=W.WIDTH,
                frames=W.NUM_FRAMES, components=[comp])


def test_the_shipped_configs_give_the_trained_wan_vae_2x_temporal():
    configs = shipped_configs("trained-tiny-wan")
    assert configs["vae"]["scale_factor_temporal"] == W.VAE_CONFIG["scale_factor_temporal"] == 2
    assert shipped_configs("my-wan") is None


def test_a_trained_tiny_wan_plan_saves_and_loads(transformer, tmp_path):
    assert W.NUM_FRAMES == 17
    plan = _plan(transformer, 9)  # (17 - 1) / 2 + 1 latent frames
    path = plan.save(tmp_path / "plan.json")
    loaded = Plan.load(path)
    assert loaded.component("transformer").shape.frames == 9
    assert problems(loaded) == []


def test_a_trained_tiny_wan_plan_at_wan_4x_frames_is_refused(transformer, tmp_path):
    path = _plan(transformer, 5).save(tmp_path / "plan.json")  # what a 4x VAE would give: not this model's
    with pytest.raises(PlanIntegrityError, match="shape.frames' is 5, but the plan's header .* needs 9"):
        Plan.load(path)


def test_catalogue_wan_stays_at_4x(tmp_path):
    """The catalogue Wan 2.1's VAE config says 4x: a plan whose latent frames follow 2x is refused."""
    from vramplan import plan_for

    plan = plan_for(gpu="RTX 4090", model="wan2.1-t2v-1.3b", height=480, width=832, frames=17, dtype="bf16")
    assert plan.component("transformer").shape.frames == 5
    data = json.loads(plan.to_json())
    data["components"] = [c for c in data["components"] if c["component"] == "transformer"]
    data["components"][0]["shape"]["frames"] = 9
    found = problems(Plan.model_validate(data), find_profile=False)
    assert any("frames' is 9, but the plan's header" in f and "needs 5" in f for f in found), found
