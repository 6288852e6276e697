"""The small trained text-to-video Wan shipped in ``vramplan/profiles/trained_wan``.

A real diffusers ``WanPipeline``: a tiny ``WanTransformer3DModel``, a tiny ``AutoencoderKLWan`` (4x spatial,
2x temporal), a tiny frozen random-init ``UMT5EncoderModel`` with a word-level tokenizer built here (nothing can
be downloaded), and the first-order ``FlowMatchEulerDiscreteScheduler`` (valid for Step Rehash's reuse).
``bench/train_tiny_wan.py`` trains it on procedural clips whose prompt names everything in them: "a red square
moving left" is one shape crossing most of the frame. Some colour x shape x direction combinations are held
out of training, so PSNR to their true clip measures whether the model learned motion from text.
"""

from __future__ import annotations

import math
import random
from importlib import resources
from pathlib import Path

import torch

from .clips import _distance
from .trained import require_files

HEIGHT = WIDTH = 32
NUM_FRAMES = 17  # 4n+1 as Wan needs: the first frame alone, then 8 latent frames of 2 frames each
NUM_INFERENCE_STEPS = 20
GUIDANCE_SCALE = 5.0  # WanPipeline's default; training drops the prompt (to "") for classifier-free guidance
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default: prompts are padded with zeros to this many tokens
FLOW_SHIFT = 3.0
CFG_DROPOUT = 0.1
TRAINED_WAN_DIR = "trained_wan"
COMPONENTS = ("transformer", "vae", "text_encoder")

COLORS = {
    "red": (0.95, 0.15, 0.15), "green": (0.15, 0.8, 0.2), "blue": (0.25, 0.4, 1.0),
    "yellow": (0.95, 0.85, 0.1), "magenta": (0.9, 0.3, 0.85), "cyan": (0.1, 0.85, 0.85),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = (0.08, 0.08, 0.1)
RADIUS = 7.0  # pixels at 32x32: large, so that a still frame is clearly wrong
TRAVEL = 20.0  # pixels crossed over the clip: from 6 to 26 along the motion's axis

VOCAB = ["<pad>", "</s>", "<unk>", "a", "moving", *COLORS, *SHAPES, *DIRECTIONS]

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=8, out_channels=8,
    text_dim=32, freq_dim=64, ffn_dim=256, num_layers=8, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)
VAE_CONFIG = dict(
    # 4x spatial, 2x temporal (Wan's is 8x, 4x): a 4x temporal code left this small VAE at ~17 dB on the clips
    base_dim=24, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
    latents_mean=[0.0] * 8, latents_std=[1.0] * 8,  # set from the data after the VAE is trained
    scale_factor_spatial=4, scale_factor_temporal=2,
)
UMT5_CONFIG = dict(
    vocab_size=len(VOCAB), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
    decoder_start_token_id=0,
)


def prompt(color: str, shape: str, direction: str) -> str:
    return f"a {color} {shape} moving {direction}"


def combinations() -> list[tuple[str, str, str]]:
    return [(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]


def is_heldout(color: str, shape: str, direction: str) -> bool:
    """12 of the 72 combinations; every (colour, shape), (colour, direction) and (shape, direction) pair
    they contain is still seen in training with another third word."""
    c, s, d = list(COLORS).index(color), SHAPES.index(shape), list(DIRECTIONS).index(direction)
    return (c + s + d) % len(COLORS) == 0


def train_combinations() -> list[tuple[str, str, str]]:
    return [k for k in combinations() if not is_heldout(*k)]


def heldout_combinations() -> list[tuple[str, str, str]]:
    return [k for k in combinations() if is_heldout(*k)]


def render(color, shape: str, direction, frames: int = NUM_FRAMES, size: int = HEIGHT, radius: float = RADIUS,
           travel: float = TRAVEL, offset: float = 0.0, background=BACKGROUND) -> torch.Tensor:
    """One shape crossing the frame: float32 ``[frames, 3, size, size]`` in [-1, 1].

    ``color`` and ``direction`` are names or an RGB triple and a unit (dx, dy); ``offset`` moves the track
    off the frame's centre line (pixels). The defaults are the clip a prompt names."""
    rgb = torch.tensor(COLORS[color] if isinstance(color, str) else color, dtype=torch.float32)
    dx, dy = DIRECTIONS[direction] if isinstance(direction, str) else direction
    scale = size / 32
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    t = torch.linspace(-0.5, 0.5, frames)
    cx = size / 2 + dx * travel * scale * t + (offset * scale if dx == 0 else 0.0)
    cy = size / 2 + dy * travel * scale * t + (offset * scale if dy == 0 else 0.0)
    angle = torch.zeros(frames)[:, None, None]
    kind = "disc" if shape == "circle" else shape  # clips.py's name for a circle
    dist = _distance(kind, xs - cx[:, None, None], ys - cy[:, None, None], radius * scale, angle)
    alpha = (0.5 - dist).clamp(0, 1).unsqueeze(1)  # one pixel of antialiasing
    video = torch.tensor(background, dtype=torch.float32)[None, :, None, None].expand(frames, 3, size, size)
    video = video * (1 - alpha) + rgb[None, :, None, None] * alpha
    return video * 2 - 1


def true_clip(color: str, shape: str, direction: str) -> torch.Tensor:
    """The clip ``prompt(color, shape, direction)`` names: ``[NUM_FRAMES, 3, H, W]`` in [-1, 1]."""
    return render(color, shape, direction)


def random_clip(rng: random.Random, frames: int = NUM_FRAMES, size: int = HEIGHT) -> torch.Tensor:
    """A varied clip for the VAE: mostly near the prompts' clips (their colours, sizes, axis-aligned tracks),
    sometimes any colour, size, track or background, so that it codes more than the 72 clips."""
    near = rng.random() < 0.7
    angle = rng.choice([0, 1, 2, 3]) * math.pi / 2 if near or rng.random() < 0.5 else rng.uniform(0, 2 * math.pi)
    bg = BACKGROUND if near or rng.random() < 0.5 else tuple(rng.uniform(0, 0.4) for _ in range(3))
    color = rng.choice(list(COLORS)) if near or rng.random() < 0.5 else tuple(rng.uniform(0, 1) for _ in range(3))
    radius = rng.uniform(6.0, 8.0) if near else rng.uniform(3.5, 8.0)
    travel = rng.uniform(16.0, 22.0) if near else rng.uniform(6.0, 24.0)
    offset = rng.uniform(-3, 3) if near else rng.uniform(-8, 8)
    return render(color, rng.choice(SHAPES), (math.cos(angle), math.sin(angle)), frames, size, radius=radius,
                  travel=travel, offset=offset, background=bg)


def build_tokenizer():
    """A word-level tokenizer over ``VOCAB`` (lower-cased, whitespace split, ``</s>`` appended like T5's)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=MAX_SEQUENCE_LENGTH)


def build_pipeline(seed: int = 0):
    """A randomly initialised pipeline; with the same seed, exactly the training's start point."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG)
    vae = AutoencoderKLWan(**VAE_CONFIG)
    text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_CONFIG))
    pipe = WanPipeline(tokenizer=build_tokenizer(), text_encoder=text_encoder.eval(), vae=vae.eval(),
                       transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trained_wan_dir() -> Path:
    return Path(str(resources.files("vramplan.profiles").joinpath(TRAINED_WAN_DIR)))


def check_files(folder: Path) -> None:
    needed = [folder / "model_index.json", folder / "tokenizer" / "tokenizer.json",
              folder / "scheduler" / "scheduler_config.json"]
    needed += [folder / c / "config.json" for c in COMPONENTS]
    needed += [folder / c / "diffusion_pytorch_model.safetensors" for c in ("transformer", "vae")]
    needed += [folder / "text_encoder" / "model.safetensors"]
    require_files(folder, needed, "the trained tiny Wan",
                  "`python bench/train_tiny_wan.py` (about an hour on one CPU core)")


def load_trained_wan(path: str | Path | None = None):
    """The shipped trained ``WanPipeline`` (fp32, CPU, eval mode, progress bar off)."""
    folder = Path(path) if path is not None else trained_wan_dir()
    check_files(folder)
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(folder), dtype=torch.float32)
    for name in COMPONENTS:
        getattr(pipe, name).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, text: str, seed: int = 0, num_inference_steps: int = NUM_INFERENCE_STEPS, **kwargs) -> torch.Tensor:
    """One clip for a prompt with the stock pipeline call: ``[NUM_FRAMES, 3, H, W]`` in [-1, 1]."""
    kwargs = {"guidance_scale": GUIDANCE_SCALE, **kwargs}
    frames = pipe(prompt=text, height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES,
                  num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed),
                  output_type="np", **kwargs).frames[0]
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() * 2 - 1


def rehash_plan(pipe, keys: int = NUM_INFERENCE_STEPS // 2, steps: int = NUM_INFERENCE_STEPS, mode: str = "uniform",
                cut: str | None = None, calibration=None):
    """A Step Rehash plan for the transformer at the native shape: the middle blocks' residual cached at
    ``keys`` of ``steps`` steps (each CFG branch its own call, batch 1), FLOPs counted on the model."""
    from ..planner.schema import Plan
    from .apply import sample_shape, uniform_component
    from .rehash import with_rehash

    cfg = pipe.vae.config
    latent = torch.zeros(1, cfg.z_dim, (NUM_FRAMES - 1) // cfg.scale_factor_temporal + 1,
                         HEIGHT // cfg.scale_factor_spatial, WIDTH // cfg.scale_factor_spatial)
    comp = uniform_component(pipe.transformer, 1, sample_shape(latent, pipe.transformer))
    base = Plan(pipeline="WanPipeline", model_name="trained-tiny-wan", height=HEIGHT, width=WIDTH, frames=NUM_FRAMES,
                components=[comp])
    return with_rehash(base, pipe.transformer, mode=mode, steps=steps, keys=keys, cut=cut, calibration=calibration)


def sample_rehash(pipe, plan, text: str, seed: int = 0, **kwargs) -> torch.Tensor:
    """:func:`sample` under the Step Rehash schedule of ``plan`` (the stock pipeline, its DiT hooked)."""
    from .rehash import apply_rehash

    handle = apply_rehash(pipe, plan)
    try:
        with torch.no_grad():
            return sample(pipe, text, seed=seed, num_inference_steps=plan.rehash.steps, **kwargs)
    finally:
        handle.remove()


def _tile(videos: list[torch.Tensor], gap: int = 2) -> torch.Tensor:
    """Clips ``[F, 3, H, W]`` in [-1, 1] side by side, a white column apart."""
    white = torch.ones(videos[0].shape[0], 3, videos[0].shape[2], gap)
    parts = [p for v in videos for p in (v, white)][:-1]
    return torch.cat(parts, dim=3)


def side_by_side(videos: list[torch.Tensor], path: str | Path, scale: int = 4, fps: int = 8) -> Path:
    """A GIF of clips (e.g. true | generated | generated under Step Rehash), enlarged ``scale`` times."""
    from .runner import save_video

    video = (_tile(videos) + 1) / 2
    video = torch.nn.functional.interpolate(video, scale_factor=scale, mode="nearest")
    return save_video(video, path, fps=fps)


def strip(rows: list[list[torch.Tensor]], path: str | Path, every: int = 2, scale: int = 3) -> Path:
    """A PNG: one row per prompt, each clip's frames ``0, every, 2 every, ...`` left to right, clips apart."""
    from .clips import to_pil

    lines = []
    for videos in rows:
        frames = [torch.cat(list(v[::every]), dim=2) for v in videos]
        lines.append(_tile([f[None] for f in frames], gap=3)[0])
        lines.append(torch.ones(3, 2, lines[-1].shape[2]))
    picture = to_pil(torch.cat(lines[:-1], dim=1))
    picture = picture.resize((picture.width * scale, picture.height * scale), 0)
    picture.save(path)
    return Path(path)


def demo(out: Path, index: int = 0, seed: int = 0, keys: int = NUM_INFERENCE_STEPS // 2) -> Path:
    """The demo's clip: a held-out prompt's true clip | the trained Wan's generation | the same generation
    under a uniform Step Rehash schedule, as a GIF in ``out``; prints the plan and PSNRs to the true clip."""
    from ..planner.rehash import rehash_summary
    from .trained import psnr

    pipe = load_trained_wan()
    plan = rehash_plan(pipe, keys=keys)
    print(rehash_summary(plan))
    combo = heldout_combinations()[index]
    text, clip = prompt(*combo), true_clip(*combo)
    full = sample(pipe, text, seed=seed)
    rehashed = sample_rehash(pipe, plan, text, seed=seed)
    still = full[:1].expand_as(full)
    r = plan.rehash
    print(f'prompt "{text}" (held out: never trained on), seed {seed}, {r.steps} steps, CFG {GUIDANCE_SCALE}: '
          f"PSNR to the true clip: generated {psnr(full, clip).mean():.2f} dB, still copy of its first frame "
          f"{psnr(still, clip).mean():.2f} dB, Step Rehash {psnr(rehashed, clip).mean():.2f} dB; Step Rehash vs "
          f"the full generation {psnr(rehashed, full).mean():.2f} dB at {r.original_unet_flops / r.unet_flops:.2f}x "
          "fewer transformer FLOPs")
    return side_by_side([clip, full, rehashed], Path(out) / "trained-wan-true-vs-generated-vs-rehash.gif")
