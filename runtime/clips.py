"""Procedural video clips (bouncing, rotating shapes) to train and judge the small image-to-video model.

Every clip is a pure function of its seed, so the data needs no files and the held-out split is exact:
held-out clips use seeds ``0 .. HELDOUT_SEEDS-1``, training clips start at ``TRAIN_SEED_OFFSET``.
Shapes move with constant velocity, bounce off the borders and rotate. The motion is a function of what
the first frame shows (colour sets the direction, shape the speed and spin), so the continuation of a
first frame is determined: a model must learn these dynamics, and PSNR to the true clip measures it.
"""

from __future__ import annotations

import math
import random

import torch

HELDOUT_SEEDS = 1000
TRAIN_SEED_OFFSET = 1_000_000

PALETTE = (
    (0.95, 0.15, 0.15), (0.15, 0.8, 0.2), (0.2, 0.35, 0.95), (0.95, 0.85, 0.1),
    (0.9, 0.3, 0.85), (0.1, 0.85, 0.85), (0.98, 0.55, 0.1), (0.97, 0.97, 0.97),
)
BACKGROUNDS = ((0.08, 0.08, 0.1), (0.3, 0.3, 0.35), (0.15, 0.2, 0.35), (0.35, 0.2, 0.15), (0.55, 0.55, 0.5))
SHAPES = ("square", "disc", "triangle")
SPEED = {"square": 1.2, "disc": 2.2, "triangle": 1.7}  # pixels per frame at 32x32
SPIN = {"square": 0.25, "disc": 0.0, "triangle": -0.3}  # radians per frame


def _bounce(start: float, speed: float, low: float, high: float, t: torch.Tensor) -> torch.Tensor:
    """Position at times ``t`` of a point moving at ``speed`` that reflects off ``low`` and ``high``."""
    span = high - low
    if span <= 0:
        return torch.full_like(t, (low + high) / 2)
    u = (start - low + speed * t) % (2 * span)
    return low + torch.where(u <= span, u, 2 * span - u)


def _background(rng: random.Random, size: int, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    a = torch.tensor(rng.choice(BACKGROUNDS))
    if rng.random() < 0.5:
        return a[:, None, None].expand(3, size, size).clone()
    b = torch.tensor(rng.choice(BACKGROUNDS))
    angle = rng.uniform(0, 2 * math.pi)
    ramp = ((xs - size / 2) * math.cos(angle) + (ys - size / 2) * math.sin(angle)) / size + 0.5
    ramp = ramp.clamp(0, 1)
    return a[:, None, None] * (1 - ramp) + b[:, None, None] * ramp


def _distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, radius: float, angle: torch.Tensor):
    """Signed distance (pixels, negative inside) of each pixel to the shape centred at the origin."""
    if shape == "disc":
        return torch.sqrt(dx * dx + dy * dy) - radius
    cos, sin = torch.cos(angle), torch.sin(angle)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) - radius * 0.8
    # equilateral triangle: the farthest of three edge half-planes, inradius radius/2
    edges = [u * math.cos(a) + v * math.sin(a) for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3,
                                                         math.pi / 2 + 4 * math.pi / 3)]
    return torch.stack(edges).amax(0) - radius * 0.6


def make_clip(seed: int, frames: int = 8, size: int = 32) -> torch.Tensor:
    """The clip of ``seed``: float32 ``[frames, 3, size, size]`` in [-1, 1]."""
    rng = random.Random(seed)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    video = _background(rng, size, ys, xs).unsqueeze(0).repeat(frames, 1, 1, 1)
    t = torch.arange(frames, dtype=torch.float32)
    scale = size / 32
    for _ in range(rng.randint(1, 3)):
        shape = rng.choice(SHAPES)
        hue = rng.randrange(len(PALETTE))
        colour = torch.tensor(PALETTE[hue])
        radius = rng.uniform(3.5, 7.0) * scale
        speed, direction = SPEED[shape] * scale, 2 * math.pi * hue / len(PALETTE)
        cx = _bounce(rng.uniform(radius, size - radius), speed * math.cos(direction), radius, size - radius, t)
        cy = _bounce(rng.uniform(radius, size - radius), speed * math.sin(direction), radius, size - radius, t)
        angle = rng.uniform(0, 2 * math.pi) + SPIN[shape] * t
        dist = _distance(shape, xs - cx[:, None, None], ys - cy[:, None, None], radius, angle[:, None, None])
        alpha = (0.5 - dist).clamp(0, 1).unsqueeze(1)  # one pixel of antialiasing
        video = video * (1 - alpha) + colour[None, :, None, None] * alpha
    return video * 2 - 1


def heldout_clip(index: int, frames: int = 8, size: int = 32) -> torch.Tensor:
    """Held-out clip ``index`` (0 <= index < HELDOUT_SEEDS): never seen in training."""
    if not 0 <= index < HELDOUT_SEEDS:
        raise ValueError(f"held-out index must be in [0, {HELDOUT_SEEDS}), got {index}")
    return make_clip(index, frames, size)


def train_clip(index: int, frames: int = 8, size: int = 32) -> torch.Tensor:
    """Training clip ``index`` (any index >= 0); its seed lies outside the held-out range."""
    return make_clip(TRAIN_SEED_OFFSET + index, frames, size)


def train_batch(start: int, count: int, frames: int = 8, size: int = 32) -> torch.Tensor:
    """Training clips ``start .. start+count-1`` as ``[count, frames, 3, size, size]``."""
    return torch.stack([train_clip(start + i, frames, size) for i in range(count)])


def to_pil(frame: torch.Tensor):
    """A ``[3, H, W]`` frame in [-1, 1] as an RGB PIL image (the pipeline's conditioning input)."""
    import PIL.Image

    array = ((frame.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return PIL.Image.fromarray(array)
