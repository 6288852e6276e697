"""Adapter for the Wan VAE decode (``AutoencoderKLWan``: Wan 2.1 z16 and Wan 2.2 z48), exact.

The stock decode runs one latent frame at a time through the whole decoder with a causal feature
cache (the last two input frames of every causal conv) and grows its output by ``torch.cat``:
at 720p that cache and the output are most of its memory. Everything in the decoder is local in
space (3x3 causal convs, per-position RMS norms, nearest upsampling, pixel shuffles) except the mid
block's attention over a frame's tokens, so the decode is split into:

- ``decoder.mid_block`` (unsliced, latent resolution, small): ``post_quant_conv``, ``conv_in`` and
  the mid block, frame by frame with their own cache, written into one ``[B, C, T, h, w]`` value (a
  value between segments: the plan may place it in host memory);
- ``decoder.up_blocks.<i>``, one rows unit per up block (the last one with ``norm_out``,
  ``conv_out``, Wan 2.2's unpatchify and the clamp): **rows outer, frames inner** — each slice runs
  its input's frames in order through the stock modules with a feature cache of its own rows (alive
  during that slice only), cropping to the rows the next stage needs after each convolution, and
  returns its rows of every output frame. Each level has its own slice count (a low-resolution block
  needs few slices: one partition for every level recomputed and cached the low-resolution halo in
  every slice), or levels share one in a rows group; a value between segments (all frames of a
  level) may live in host memory, copied in one frame at a time (``Op.stage_inside``).

Each stock module sees exactly what it sees in the stock decode, restricted to a slab whose halo
covers its convolutions (:mod:`vramplan.planner.rows`): the result equals ``vae.decode``.

Plan shape: latents ``[B, C, T, h, w]`` (``sample_layout = "bcthw"``): ``frames`` are latent frames.
"""

from __future__ import annotations

import math

import torch

from ...planner.errors import UnsupportedArgumentError, UnsupportedModelError
from ...planner.rows import CONV3, UP2, RowMap
from ..program import Op, SliceCtx, UnitSpec
from .base import CallBinding, example_maker, register

MID = "decoder.mid_block"


def _upsampler(block):
    up = getattr(block, "upsampler", None)
    if up is None and getattr(block, "upsamplers", None) is not None:
        up = block.upsamplers[0]
    if up is not None and up.mode not in ("upsample2d", "upsample3d"):
        raise UnsupportedModelError(f"Wan decoder upsampler mode {up.mode!r} has no rows lowering")
    return up


def conv_step(conv, scale: int, frames: int):
    """A 3x3 conv's row step: work per output row (weights x width x frames, relative) and bytes held
    per row (its input and output channels x width x frames, relative: the memory model of a cropping unit)."""
    cin, cout = conv.weight.shape[1], conv.weight.shape[0]
    return CONV3.with_cost(conv.weight.numel() * scale * frames, (cin + cout) * scale * frames)


def _parts(vae) -> list[tuple[int, str, list[RowMap]]]:
    """The up part in order, as ``(block, kind, row maps of its crop points)``: each up block's residual
    blocks (``"res"``: conv1, conv2 each), its upsampler (``"up"``: nearest(-exact) x2 then a 3x3 conv;
    Wan 2.2's ``DupUp3D`` shortcut maps rows the same way), then the head (``"head"``: conv_out, and
    unpatchify)."""
    parts = []
    scale = frames = 1  # width and frames per latent frame at this level, relative to the first up block's
    for i, block in enumerate(vae.decoder.up_blocks):
        parts.append((i, "res", [RowMap.of(conv_step(conv, scale, frames))
                                 for res in block.resnets for conv in (res.conv1, res.conv2)]))
        up = _upsampler(block)
        if up is not None:
            frames *= 2 if up.mode == "upsample3d" else 1
            scale *= 2
            parts.append((i, "up", [RowMap.of(UP2.with_cost(1), conv_step(up.resample[1], scale, frames))]))
    head = [conv_step(vae.decoder.conv_out, scale, frames)]
    patch = vae.config.patch_size
    if patch:
        if patch & (patch - 1):
            raise UnsupportedModelError(f"patch_size={patch}: only powers of two have a row map")
        head += [UP2.with_cost(1)] * (patch.bit_length() - 1)
    parts.append((len(vae.decoder.up_blocks) - 1, "head", [RowMap(tuple(head))]))
    return parts


def _units(vae) -> list[list[tuple[int, str, list[RowMap]]]]:
    """The parts of each up unit. A unit starts at each up block's residual blocks, or just before the
    previous block's upsampler when that block has no shortcut around it (Wan 2.1): the value between
    units is then the residual blocks' output, before the upsampler makes it 4 (2-D) or 8 (3-D) times
    larger. Wan 2.2's blocks add a ``DupUp3D`` of the block's input to the upsampler's output, so the
    upsampler stays with its block."""
    blocks = vae.decoder.up_blocks

    def cut_before_up(i: int) -> bool:
        return i + 1 < len(blocks) and getattr(blocks[i], "avg_shortcut", None) is None

    units: list[list] = []
    for part in _parts(vae):
        i, kind, _ = part
        if not units or (kind == "up" and cut_before_up(i)) or (kind == "res" and i and not (
                _upsampler(blocks[i - 1]) is not None and cut_before_up(i - 1))):
            units.append([])
        units[-1].append(part)
    return units


class WanVAEDecoderAdapter:
    name = "wan-vae-decoder"
    model_classes = ("AutoencoderKLWan",)
    method = "decode"
    component = "vae"
    sample_layout = "bcthw"

    def ops(self, vae) -> tuple[list[Op], str]:
        dec = vae.decoder

        def mid(ctx: SliceCtx, z):
            b, _, t, h, w = z.shape
            cache: list = [None] * (1 + 2 * len(dec.mid_block.resnets))
            out = None
            z = vae.post_quant_conv(z)  # as the stock decode: once, on every frame (a 1x1x1 conv)
            for i in range(t):
                idx = [1]
                x = z[:, :, i : i + 1]
                c = x[:, :, -2:].clone()
                if c.shape[2] < 2 and cache[0] is not None:
                    c = torch.cat([cache[0][:, :, -1:].to(c.device), c], dim=2)
                x = dec.conv_in(x, cache[0])
                cache[0] = c
                x = dec.mid_block(x, feat_cache=cache, feat_idx=idx)
                if out is None:
                    out = x.new_empty(b, x.shape[1], t, h, w)
                out[:, :, i : i + 1] = x
                del x
            return out

        mid_spec = UnitSpec(MID, None, kind="attention")
        ops = [Op(mid_spec, ("z",), mid_spec.name, mid)]
        prev = mid_spec.name
        for parts in _units(vae):
            block = next(i for i, kind, _ in parts if kind == "res")
            spec = UnitSpec(f"decoder.up_blocks.{block}", "rows", kind="conv")
            whole = RowMap(tuple(step for _, _, maps in parts for m in maps for step in m.steps))

            def up(ctx: SliceCtx, x, parts=parts):
                return _parts_slab(vae, parts, ctx, x)

            ops.append(Op(spec, (prev,), spec.name, up, rows=whole, rows_cropped=True, stage_inside=True))
            prev = spec.name
        return ops, prev

    def bind(self, vae, z: torch.Tensor, return_dict: bool = True) -> CallBinding:
        from diffusers.models.autoencoders.vae import DecoderOutput

        if z.dim() != 5:
            raise UnsupportedArgumentError(
                f"AutoencoderKLWan.decode takes latents [B, C, T, h, w]; got shape {tuple(z.shape)}.")
        if z.shape[1] != vae.config.z_dim:
            raise UnsupportedArgumentError(
                f"this AutoencoderKLWan decodes {vae.config.z_dim}-channel latents (z_dim); got {z.shape[1]} channels "
                f"(shape {tuple(z.shape)}: [B, C, T, h, w]).")
        if getattr(vae, "use_tiling", False):
            raise UnsupportedArgumentError(
                "vae.use_tiling is set: tiled decoding blends tiles and changes the video, which a plan cannot "
                "reproduce exactly. Call vae.disable_tiling() and let the plan save the memory.")

        def finish(out: torch.Tensor):
            return DecoderOutput(sample=out) if return_dict else (out,)

        return CallBinding(
            env={"z": z}, layouts={"z": "nchw"}, globals={"device": z.device}, finish=finish,
            shape={"batch": z.shape[0], "frames": z.shape[2], "latent_height": z.shape[-2],
                   "latent_width": z.shape[-1], "dtype": z.dtype},
        )

    def example_inputs(self, vae, shape, device="cpu", seed: int = 0) -> tuple:
        size = (shape.batch, vae.config.z_dim, shape.frames, shape.latent_height, shape.latent_width)
        return (example_maker(vae, device, seed)(*size),)


def _cached_conv(conv, x: torch.Tensor, cache: list, idx: list) -> torch.Tensor:
    """A causal conv with the stock decode's feature cache: the last two input frames (one new frame
    after a single-frame chunk: the previous cache's last frame and it). The conv runs as
    :func:`causal_conv` (no copies of the cached and new frames), and the new cache is taken after it."""
    i = idx[0]
    prev = cache[i]
    out = causal_conv(conv, x, prev)
    keep = x[:, :, -CACHE_T:].clone()
    if keep.shape[2] < 2 and prev is not None:
        keep = torch.cat([prev[:, :, -1:].to(keep.device), keep], dim=2)
    cache[i] = keep
    idx[0] += 1
    return out


def causal_conv(conv, x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """``WanCausalConv3d.forward(x, prev)``: the stock call concatenates the cached frames and the new
    ones, pads them in time and space (two copies of every frame), then convolves; here each output
    frame is the sum over the kernel's temporal taps of a 2-D convolution of one input frame (the
    same sum, zero frames skipped), written into the output — equal up to float summation order
    (fp32; half types take the stock call)."""
    import torch.nn.functional as F

    kt, kh, kw = conv.kernel_size
    pw, ph, pt = conv._padding[0], conv._padding[2], conv._padding[4]
    if (conv.stride != (1, 1, 1) or conv.dilation != (1, 1, 1) or conv.groups != 1 or kt != pt + 1
            or x.dtype != torch.float32):
        # not a stride-1 causal conv, or a half type (the sum of rounded per-tap results would round
        # more often than one convolution): the stock call
        return conv(x, prev)
    frames = [None] * pt
    if prev is not None:
        prev = prev.to(x.device)
        n = min(prev.shape[2], pt)
        frames[pt - n :] = [prev[:, :, j] for j in range(prev.shape[2] - n, prev.shape[2])]
    frames += [x[:, :, j] for j in range(x.shape[2])]
    out = None  # one frame: the sum itself; more: a preallocated output, a frame at a time
    for t in range(x.shape[2]):
        acc = None
        for tap in range(kt):
            f = frames[t + tap]
            if f is None:
                continue
            if acc is None:  # the first tap carries the bias
                acc = F.conv2d(f, conv.weight[:, :, tap], conv.bias, padding=(ph, pw))
            else:
                acc.add_(F.conv2d(f, conv.weight[:, :, tap], None, padding=(ph, pw)))
        if acc is None:  # only zero frames (cannot happen: the newest frame is always there)
            raise RuntimeError("causal conv over zero frames only")
        if x.shape[2] == 1:
            return acc.unsqueeze(2)
        if out is None:
            out = acc.new_empty(acc.shape[0], acc.shape[1], x.shape[2], acc.shape[-2], acc.shape[-1])
        out[:, :, t] = acc
        del acc
    return out


CACHE_T = 2


class _Rows:
    """The rows walk of one slice: ``need[i]``: rows needed at the input of crop point ``i``."""

    def __init__(self, stages: list[RowMap], n_in: int, start: int, stop: int):
        full = [n_in]
        for m in stages:
            full.append(m.out_len(full[-1]))
        need = [(start, stop)]
        for j in range(len(stages) - 1, -1, -1):
            need.insert(0, stages[j].needs(*need[0], full[j]))
        self.stages, self.need = stages, need

    def crop(self, t: torch.Tensor, i: int, have: int) -> tuple[torch.Tensor, int]:
        """The output of crop point ``i`` (computed from a slab whose first row was ``have``), cropped to
        what point ``i + 1`` needs: the tensor and its first row."""
        lo, hi = self.need[i + 1]
        start = self.stages[i].start(have)
        return t.narrow(-2, lo - start, hi - lo), lo


RESAMPLE_ROWS = 64  # upsampled rows per piece of a resample (nearest x2 then a 3x3 conv): few pieces unsliced


def _upsample(up, x: torch.Tensor, cache: list, idx: list, start: int, stop: int) -> torch.Tensor:
    """``WanResample.forward`` (upsample2d/3d) for upsampled rows ``[start, stop)`` of the slab ``x``:
    its own code for the temporal conv and the cache, then its spatial ``resample`` (nearest x2, 3x3
    conv) one frame and :data:`RESAMPLE_ROWS` rows at a time (the stock call upsamples every row of
    every frame of the chunk at once: 4x the chunk's bytes)."""
    b, c, t, h, w = x.shape
    if up.mode == "upsample3d":
        i = idx[0]
        if cache[i] is None:
            cache[i] = "Rep"
            idx[0] += 1
        else:
            cache_x = x[:, :, -CACHE_T:, :, :].clone()
            rep = isinstance(cache[i], str)
            if cache_x.shape[2] < 2 and not rep:
                cache_x = torch.cat([cache[i][:, :, -1, :, :].unsqueeze(2).to(cache_x.device), cache_x], dim=2)
            if cache_x.shape[2] < 2 and rep:
                cache_x = torch.cat([torch.zeros_like(cache_x).to(cache_x.device), cache_x], dim=2)
            x = up.time_conv(x) if rep else up.time_conv(x, cache[i])
            cache[i] = cache_x
            idx[0] += 1
            x = x.reshape(b, 2, c, t, h, w)
            x = torch.stack((x[:, 0, :, :, :, :], x[:, 1, :, :, :, :]), 3)
            x = x.reshape(b, c, t * 2, h, w)
    if not 0 <= start < stop <= 2 * h:
        raise RuntimeError(f"Wan upsampler: rows [{start}, {stop}) of a slab of {2 * h} upsampled rows")
    out = None
    for v in range(x.shape[2]):
        for r0 in range(start, stop, RESAMPLE_ROWS):
            r1 = min(stop, r0 + RESAMPLE_ROWS)
            a, e = max(0, (r0 - 1) // 2), min(h, (r1 + 2) // 2)  # input rows under upsampled rows r0-1 .. r1
            y = up.resample(x[:, :, v, a:e])
            y = y.narrow(-2, r0 - 2 * a, r1 - r0)
            if out is None:
                out = y.new_empty(b, y.shape[1], x.shape[2], stop - start, y.shape[-1])
            out[:, :, v, r0 - start : r1 - start] = y
            del y
    return out


def cropped_residual(res, walk: _Rows, h: torch.Tensor, have: int, point: int, cache: list, idx: list):
    """A Wan residual block on a slab (the stock forward, cropped after each conv, the shortcut on the
    kept rows): the output, its first row and the next crop point."""
    res_in, res_have = h, have
    h = _cached_conv(res.conv1, res.nonlinearity(res.norm1(h)), cache, idx)
    h, have = walk.crop(h, point, have)
    h = res.dropout(res.nonlinearity(res.norm2(h)))
    h = _cached_conv(res.conv2, h, cache, idx)
    h, have = walk.crop(h, point + 1, have)
    shortcut = res.conv_shortcut(res_in)
    return h + shortcut.narrow(-2, have - res_have, h.shape[-2]), have, point + 2


def _upsample_part(block, walk: _Rows, h: torch.Tensor, have: int, point: int, cache: list, first: bool,
                   block_in: tuple[torch.Tensor, int] | None):
    """A block's upsampler on a slab, only the upsampled rows the rest needs (its output's first row is
    ``2 * have``), and Wan 2.2's ``DupUp3D`` shortcut of the block's input ``block_in`` (a slab and its
    first row): the output and its first row."""
    lo, hi = walk.need[point + 1]
    h = _upsample(_upsampler(block), h, cache, [0], lo - 2 * have, hi - 2 * have)
    have = lo
    if getattr(block, "avg_shortcut", None) is not None:  # Wan 2.2: DupUp3D of the block's input
        # only the input rows under the output rows kept: DupUp3D copies its input 8-fold (twice)
        # and one input frame at a time, added into the upsampler's (fresh) output
        block_in, block_have = block_in
        f = block.avg_shortcut.factor_s
        lo, hi = have // f, -(-(have + h.shape[-2]) // f)
        src = block_in.narrow(-2, lo - block_have, hi - lo)
        done = 0
        for v in range(src.shape[2]):
            shortcut = block.avg_shortcut(src[:, :, v : v + 1], first_chunk=first)
            n = shortcut.shape[2]
            h[:, :, done : done + n].add_(shortcut.narrow(-2, have - f * lo, h.shape[-2]))
            done += n
            del shortcut
        if done != h.shape[2]:
            raise RuntimeError(f"Wan up block shortcut: {done} frames for {h.shape[2]}")
    return h, have


def _parts_slab(vae, parts: list[tuple[int, str, list[RowMap]]], ctx: SliceCtx, x: torch.Tensor) -> torch.Tensor:
    """Output rows ``[ctx.start, ctx.stop)`` of every frame of a unit's parts (:func:`_units`) from a slab
    of their input: the input's frames in order, one at a time, through the stock modules (and their
    forwards' own code between them) with this slab's own feature cache, cropped after every
    convolution to the rows the rest needs; the frames a temporal upsampler makes go on one at a time.
    One frame at a time equals the stock chunks (one latent frame's frames at once): a causal conv with
    its cache gives the same frames from one frame as from a chunk, and a temporal upsampler's first
    call (one frame: latent frame 0) is the stock first one."""
    blocks = list(vae.decoder.up_blocks)
    stages = [m for _, _, maps in parts for m in maps]
    n_in = ctx.length // math.prod(step.up for m in stages for step in m.steps)  # 3x3 convs keep the rows
    walk = _Rows(stages, n_in, ctx.start, ctx.stop)
    a0, b0 = walk.need[0]
    name = f"Wan up parts {[(i, kind) for i, kind, _ in parts]}"
    if x.shape[-2] != b0 - a0:
        raise RuntimeError(f"{name}: a slab of {x.shape[-2]} rows, expected rows {walk.need[0]}")
    t = x.shape[2]
    device = ctx.globals["device"]
    cuda = device.type == "cuda" and x.is_pinned()
    walker = _PartsWalk(vae, parts, walk, 1 + later_frames(blocks, parts) * (t - 1))
    for f in range(t):
        # the input may be in host memory: one frame of the slab on the device at a time
        walker.run(0, x[:, :, f : f + 1].to(device, copy=True, non_blocking=cuda), a0, f == 0)
    out, frame = walker.out, walker.frame
    del walker
    if frame != out.shape[2]:
        raise RuntimeError(f"{name} made {frame} frames, expected {out.shape[2]}")
    return out


def later_frames(blocks, parts) -> int:
    """Frames per input frame after the first that a unit's temporal upsamplers make."""
    return 2 ** sum(kind == "up" and _upsampler(blocks[i]).mode == "upsample3d" for i, kind, _ in parts)


class _PartsWalk:
    """One slice's walk of a unit's parts, frame by frame, writing its frames into ``out`` (a method,
    not a recursive closure: a closure that calls itself is a reference cycle, and would keep the
    slice's causal cache and output alive until the garbage collector runs)."""

    def __init__(self, vae, parts, walk: _Rows, frames: int):
        self.vae, self.parts, self.walk, self.frames = vae, parts, walk, frames
        self.blocks = list(vae.decoder.up_blocks)
        self.points, p = [], 0  # each part's first crop point
        for _, _, maps in parts:
            self.points.append(p)
            p += len(maps)
        self.caches = [[None] * max(1, len(maps)) for _, _, maps in parts]  # each part's causal cache
        self.out = None
        self.frame = 0

    def run(self, j: int, h: torch.Tensor, have: int, first: bool, block_in=None) -> None:
        """Frame ``h`` (rows from ``have``) through parts ``j ..``, into ``out``."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        walk, dec = self.walk, self.vae.decoder
        if j < len(self.parts):
            i, kind, _ = self.parts[j]
            block = self.blocks[i]
            if kind == "res":
                # Wan 2.2: the block's input, for the shortcut around it (else not held)
                start = (h, have) if getattr(block, "avg_shortcut", None) is not None else None
                point, idx = self.points[j], [0]
                for res in block.resnets:
                    h, have, point = cropped_residual(res, walk, h, have, point, self.caches[j], idx)
                self.run(j + 1, h, have, first, start)
                return
            if kind == "up":
                h, have = _upsample_part(block, walk, h, have, self.points[j], self.caches[j], first, block_in)
                del block_in
                for v in range(h.shape[2]):  # a temporal upsampler's frames, one at a time
                    self.run(j + 1, h[:, :, v : v + 1], have, first)
                return
            h = _cached_conv(dec.conv_out, dec.nonlinearity(dec.norm_out(h)), self.caches[j], [0])
            if self.vae.config.patch_size is not None:
                h = unpatchify(h, patch_size=self.vae.config.patch_size)
            h, have = walk.crop(h, self.points[j], have)
            h = torch.clamp(h, min=-1.0, max=1.0)
        if self.out is None:
            self.out = h.new_empty(h.shape[0], h.shape[1], self.frames, h.shape[-2], h.shape[-1])
        self.out[:, :, self.frame : self.frame + 1] = h
        self.frame += 1


register(WanVAEDecoderAdapter())
