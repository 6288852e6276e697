"""The shipped small trained image-to-video model: it loads, it is small, and it learned (beats random init)."""

import pytest
import torch
from vramplan.planner.errors import InputFileError, VramplanError
from vramplan.runtime import trained as T
from vramplan.runtime.clips import HELDOUT_SEEDS, TRAIN_SEED_OFFSET, heldout_clip, make_clip, train_clip

CLIPS = (0, 1)  # the first two held-out clips, not chosen by result
STEPS = 10
MARGIN_DB = 3.0  # measured on these two clips at 10 steps: see the report in docs/benchmarks.md


def test_clips_are_deterministic_videos_in_range():
    a, b = make_clip(123), make_clip(123)
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.equal(make_clip(123), make_clip(124))
    assert (a[1:] - a[:-1]).abs().amax() > 0.5  # shapes move
    assert make_clip(5, frames=4, size=64).shape == (4, 3, 64, 64)


def test_heldout_split_is_disjoint_from_training_seeds():
    assert torch.equal(heldout_clip(7), make_clip(7))
    assert TRAIN_SEED_OFFSET >= HELDOUT_SEEDS
    assert torch.equal(train_clip(3), make_clip(TRAIN_SEED_OFFSET + 3))
    with pytest.raises(ValueError):
        heldout_clip(HELDOUT_SEEDS)


def test_weights_are_shipped_and_small():
    folder = T.trained_dir()
    files = list(folder.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == set(T.COMPONENTS)
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20
    assert (folder / "train_log.txt").is_file()


def test_missing_weights_raise_a_clear_error(tmp_path):
    with pytest.raises(InputFileError, match="train_tiny_svd"):
        T.trained_svd_pipeline(tmp_path)
    assert issubclass(InputFileError, VramplanError)


@pytest.fixture(scope="module")
def pipelines():
    return T.trained_svd_pipeline(), T.untrained_svd_pipeline()


def test_trained_pipeline_matches_the_training_configuration(pipelines):
    trained, untrained = pipelines
    assert trained.unet.config.num_frames == T.NUM_FRAMES
    assert trained.vae.config.scaling_factor == untrained.vae.config.scaling_factor != 0.18215
    assert trained.scheduler.config.prediction_type == "v_prediction"
    assert trained.scheduler.config.timestep_type == "continuous"
    changed = [n for n, p in trained.unet.named_parameters()
               if not torch.equal(p, dict(untrained.unet.named_parameters())[n])]
    assert len(changed) > 0.9 * len(list(trained.unet.parameters()))


def test_trained_model_continues_held_out_first_frames(pipelines):
    trained, untrained = pipelines
    scores = {"trained": [], "untrained": []}
    for i in CLIPS:
        clip, image = T.heldout_example(i)
        for name, pipe in zip(scores, pipelines, strict=True):
            video = T.sample(pipe, image, seed=i, num_inference_steps=STEPS)
            assert video.shape == clip.shape
            scores[name].append(T.psnr(video, clip).mean().item())
    trained_psnr = sum(scores["trained"]) / len(CLIPS)
    untrained_psnr = sum(scores["untrained"]) / len(CLIPS)
    assert trained_psnr > untrained_psnr + MARGIN_DB, scores


def test_metrics():
    clip = heldout_clip(0)
    assert (T.psnr(clip, clip) > 100).all()
    assert torch.allclose(T.ssim(clip, clip), torch.ones(len(clip)))
    noisy = (clip + 0.1 * torch.randn(clip.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert (T.psnr(noisy, clip) < 30).all() and (T.ssim(noisy, clip) < 1).all()
