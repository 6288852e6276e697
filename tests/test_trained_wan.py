"""The trained tiny Wan that ships with vramplan: the stock WanPipeline runs it, its files are complete and
small, its prompts name the clips, and the training script runs end to end on a tiny subset."""

from __future__ import annotations

import pytest
import torch
from vramplan.planner.errors import InputFileError, VramplanError
from vramplan.runtime import trained_wan as W


@pytest.fixture(scope="module")
def wan():
    try:
        W.check_files(W.trained_wan_dir())
    except InputFileError as err:
        pytest.skip(f"the trained tiny Wan is not installed: {err}")
    return W.load_trained_wan()


def test_the_stock_pipeline_runs_it_at_its_native_shape(wan):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    assert type(wan) is WanPipeline and type(wan.scheduler) is FlowMatchEulerDiscreteScheduler
    assert wan.scheduler.order == 1  # first order: Step Rehash's reuse is valid for it
    assert all(p.dtype == torch.float32 for p in wan.transformer.parameters())
    with torch.no_grad():
        frames = wan(prompt="a red square moving left", num_frames=W.NUM_FRAMES, height=W.HEIGHT, width=W.WIDTH,
                     num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert frames.shape == (1, W.NUM_FRAMES, W.HEIGHT, W.WIDTH, 3)
    assert frames.min() >= 0 and frames.max() <= 1 and frames.std() > 0.01


def test_the_shipped_weights_are_within_the_size_limit(wan):
    """Issue 16: <= 40 MB for the shipped trained models together (this Wan and the image-to-video one)."""
    profiles = W.trained_wan_dir().parent
    sizes = {d: sum(p.stat().st_size for p in (profiles / d).rglob("*.safetensors")) for d in ("trained_wan", "trained")}
    assert sizes["trained_wan"] > 1e6  # real weights, not pointers
    assert sum(sizes.values()) <= 40e6, sizes


def test_the_config_is_what_the_module_says(wan):
    cfg = wan.vae.config
    assert (cfg.scale_factor_spatial, cfg.scale_factor_temporal) == (4, 2) == (wan.vae_scale_factor_spatial,
                                                                          wan.vae_scale_factor_temporal)
    assert len(cfg.latents_mean) == len(cfg.latents_std) == cfg.z_dim == wan.transformer.config.in_channels
    assert all(s > 0 for s in cfg.latents_std) and cfg.latents_std != [1.0] * cfg.z_dim  # set from the data
    assert wan.transformer.config.text_dim == wan.text_encoder.config.d_model


def test_absent_weights_are_a_clear_error(tmp_path):
    with pytest.raises(InputFileError, match="train_tiny_wan.py") as err:
        W.load_trained_wan(tmp_path)
    assert isinstance(err.value, VramplanError) and "model_index.json" in str(err.value)


def test_the_tokenizer_keeps_every_word_of_a_prompt():
    tok = W.build_tokenizer()
    ids = tok("A Red square moving LEFT").input_ids
    assert ids == [W.VOCAB.index(w) for w in ("a", "red", "square", "moving", "left", "</s>")]
    assert tok("a purple square").input_ids[1] == W.VOCAB.index("<unk>")
    assert tok("").input_ids == [W.VOCAB.index("</s>")]  # WanPipeline's default negative prompt


def test_prompts_are_distinguishable_through_the_text_encoder():
    pipe = W.build_pipeline()
    texts = [W.prompt(*k) for k in W.combinations()]
    with torch.no_grad():
        embeds = pipe._get_t5_prompt_embeds(texts, 1, 16, "cpu").flatten(1)
    gaps = torch.cdist(embeds, embeds) + torch.eye(len(texts)) * 1e9
    assert gaps.min() > 1.0  # no two prompts map to (nearly) the same conditioning


def test_held_out_prompts_combine_words_seen_in_training():
    held, train = W.heldout_combinations(), W.train_combinations()
    assert len(held) == 12 and len(train) == 60 and not set(held) & set(train)
    for c, s, d in held:  # every pair of its words is in some training prompt
        assert any(k[0] == c and k[1] == s for k in train)
        assert any(k[0] == c and k[2] == d for k in train)
        assert any(k[1] == s and k[2] == d for k in train)


@pytest.mark.parametrize("direction", list(W.DIRECTIONS))
def test_a_clip_moves_the_way_its_prompt_says(direction):
    clip = W.true_clip("red", "circle", direction)
    assert clip.shape == (W.NUM_FRAMES, 3, W.HEIGHT, W.WIDTH)
    mask = clip[:, 0] > 0.5  # the red channel of the shape; the background is dark
    ys, xs = torch.meshgrid(torch.arange(float(W.HEIGHT)), torch.arange(float(W.WIDTH)), indexing="ij")
    cx = (xs * mask).sum((1, 2)) / mask.sum((1, 2))
    cy = (ys * mask).sum((1, 2)) / mask.sum((1, 2))
    dx, dy = W.DIRECTIONS[direction]
    moved = torch.stack([cx[-1] - cx[0], cy[-1] - cy[0]])
    assert torch.dot(moved, torch.tensor([dx, dy], dtype=torch.float32)) > 15  # crosses most of the frame
    assert (moved - torch.tensor([dx, dy]) * moved.norm()).abs().max() < 1


def test_the_training_script_runs_on_a_tiny_subset(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import train_tiny_wan

    train_tiny_wan.main(["--out", str(tmp_path), "--vae-steps", "1", "--dit-steps", "2", "--vae-batch", "1",
                         "--batch", "2", "--combos", "2", "--save-every", "0", "--no-eval"])
    log = (tmp_path / "train_log.txt").read_text()
    assert "vae step     0" in log and "transformer step     1" in log and "saved to" in log
    pipe = W.load_trained_wan(tmp_path)
    assert pipe.vae.config.latents_std != [1.0] * pipe.vae.config.z_dim


def test_step_rehash_runs_on_it_and_stays_close_to_the_full_run(wan):
    from vramplan.runtime.trained import psnr

    plan = W.rehash_plan(wan, keys=2, steps=4)
    r = plan.rehash
    assert len(r.key_steps) == 2 and r.key_steps[0] == 0 and r.unet_flops < r.original_unet_flops and "->" in r.cut
    text = W.prompt(*W.heldout_combinations()[0])
    full = W.sample(wan, text, seed=0, num_inference_steps=4)
    rehashed = W.sample_rehash(wan, plan, text, seed=0)
    assert rehashed.shape == full.shape and not torch.equal(rehashed, full)
    assert psnr(rehashed, full).mean() > 15  # an approximation of the same clip, not another clip
    assert torch.equal(W.sample(wan, text, seed=0, num_inference_steps=4), full)  # the hooks are gone


def test_side_by_side_gif_and_strip(tmp_path):
    from PIL import Image

    clips = [W.true_clip("red", "square", "left"), W.true_clip("blue", "circle", "up")]
    gif = W.side_by_side(clips, tmp_path / "a.gif", scale=2)
    with Image.open(gif) as im:
        assert im.n_frames == W.NUM_FRAMES and im.size == (2 * (2 * W.WIDTH + 2), 2 * W.HEIGHT)
    png = W.strip([clips, clips], tmp_path / "a.png", every=4, scale=1)
    with Image.open(png) as im:
        assert im.size == (2 * 5 * W.WIDTH + 3, 2 * W.HEIGHT + 2)


def test_each_shape_word_draws_its_own_shape():
    clips = {s: W.true_clip("red", s, "left")[0, 0] > 0.5 for s in W.SHAPES}
    area = {s: m.sum().item() for s, m in clips.items()}
    assert area["triangle"] < area["square"] < area["circle"]  # radius 7: 81, 100 and 144 pixels
    assert not torch.equal(clips["circle"], clips["triangle"])


def test_a_held_out_circle_prompt_generates_a_disc(wan):
    """The shipped weights were retrained after render() drew 'circle' as a triangle: a circle prompt never
    trained on gives the clip nearest to the disc's (not the triangle's; the old weights gave a triangle)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import train_tiny_wan

    index, combo = next((i, k) for i, k in enumerate(W.heldout_combinations()) if k[1] == "circle")
    scores = train_tiny_wan.shape_scores(wan, combo, seed=index, steps=W.NUM_INFERENCE_STEPS)
    assert max(scores, key=scores.get) == "circle", scores
