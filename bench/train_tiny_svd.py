"""Train the small image-to-video model shipped in ``vramplan/profiles/trained`` (CPU, fp32, one thread).

Two phases, deterministic (fixed seeds, fixed step counts; a wall-clock guard only stops early and says so):
1. the temporal-decoder VAE as an autoencoder on procedural clips; its scaling factor is then set so
   that scaled latents have unit standard deviation (as Stable Diffusion's);
2. the UNet, with exactly what ``StableVideoDiffusionPipeline`` does at inference: the first frame (as the
   uint8 PIL image the pipeline receives) noised by ``noise_aug_strength`` and encoded with
   ``latent_dist.mode()`` unscaled, concatenated with the noisy latents on channels; the CLIP image
   embedding; added time ids (fps-1, motion bucket, noise aug); the Euler scheduler's EDM
   preconditioning: input / sqrt(sigma^2+1), timestep 0.25 log sigma, v-prediction target
   (noise - sigma x0) / sqrt(sigma^2+1), so that c_skip x + c_out F is the denoised latent. The image
   latents and embedding are dropped together (zeros, like the pipeline's negative branch) for CFG.
Then it saves the pipeline (safetensors) and measures PSNR/SSIM of sampled held-out videos against the
true clips, trained vs untrained (the same configs and seed before training) vs repeating the first frame.

    OMP_NUM_THREADS=1 .venv/bin/python bench/train_tiny_svd.py            # full run (~30 min)
    OMP_NUM_THREADS=1 .venv/bin/python bench/train_tiny_svd.py --eval-only
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from training import Log, lr_at  # bench/ is the script's folder
from vramplan.runtime import trained as T
from vramplan.runtime.clips import heldout_clip, to_pil, train_batch

ROOT = Path(__file__).resolve().parents[1]


def quantize(frames: torch.Tensor) -> torch.Tensor:
    """What the pipeline sees of a frame passed as a uint8 PIL image."""
    return ((frames.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def train_vae(pipe, args, log, deadline: float) -> None:
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    F, B = T.NUM_FRAMES, args.vae_batch
    for step in range(args.vae_steps):
        if time.time() > deadline:
            log(f"vae: wall-clock guard hit, stopped early after {step} steps")
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, warmup=50, floor=0.2)
        x = train_batch(step * B, B, F, T.HEIGHT).flatten(0, 1)
        # Deterministic: the pipeline only ever encodes with .mode(); sampling the posterior (std 1 at
        # init) would bury the signal and slow training several-fold. A little noise keeps the decoder
        # tolerant of imperfect latents from the UNet; the L2 term keeps the latent scale in check.
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z + 0.05 * torch.randn(z.shape, generator=gen), num_frames=F).sample
        mse = (y - x).square().mean()
        kl = z.square().mean()
        loss = mse + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step:5d} mse {mse.item():.5f} latent ms {kl.item():.2f} lr {opt.param_groups[0]['lr']:.2e}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(train_batch(10**6 + 8 * i, 8, F, T.HEIGHT).flatten(0, 1)).latent_dist.mode()
                             for i in range(4)])
        scale = 1.0 / latents.std().item()
        vae.register_to_config(scaling_factor=scale)
        psnrs = []
        for i in range(8):
            clip = heldout_clip(i, F, T.HEIGHT)
            recon = vae.decode(vae.encode(clip).latent_dist.mode(), num_frames=F).sample
            psnrs.append(T.psnr(recon.clamp(-1, 1), clip).mean().item())
    log(f"vae: latent std {1 / scale:.4f} -> scaling_factor {scale:.4f}; held-out reconstruction PSNR "
        f"{sum(psnrs) / len(psnrs):.2f} dB (8 clips; the ceiling for sampled videos)")


def condition(pipe, first: torch.Tensor, gen: torch.Generator):
    """The pipeline's conditioning for first frames ``[B, 3, H, W]``: CLIP embeddings, image latents."""
    with torch.no_grad():
        embeds = pipe._encode_image([to_pil(f) for f in first], "cpu", 1, False)
        noisy = quantize(first) + T.NOISE_AUG_STRENGTH * torch.randn(first.shape, generator=gen)
        latents = pipe.vae.encode(noisy).latent_dist.mode()
    return embeds, latents


def sample_sigmas(count: int, gen: torch.Generator) -> torch.Tensor:
    """Log-normal around the sigmas that shape the result, plus a log-uniform share over SVD's whole range."""
    lognormal = torch.exp(0.3 + 1.4 * torch.randn(count, generator=gen))
    lo, hi = math.log(0.002), math.log(700.0)
    uniform = torch.exp(lo + (hi - lo) * torch.rand(count, generator=gen))
    pick = torch.rand(count, generator=gen) < 0.25
    return torch.where(pick, uniform, lognormal).clamp(0.002, 700.0)


def unet_loss(pipe, clips: torch.Tensor, gen: torch.Generator, dropout: float) -> torch.Tensor:
    B, F = clips.shape[:2]
    embeds, cond = condition(pipe, clips[:, 0], gen)
    keep = (torch.rand(B, generator=gen) >= dropout).float()
    embeds = embeds * keep[:, None, None]
    cond = cond * keep[:, None, None, None]
    with torch.no_grad():
        x0 = pipe.vae.encode(clips.flatten(0, 1)).latent_dist.mode() * pipe.vae.config.scaling_factor
    x0 = x0.unflatten(0, (B, F))
    sigma = sample_sigmas(B, gen)
    s = sigma[:, None, None, None, None]
    noise = torch.randn(x0.shape, generator=gen)
    noisy = x0 + s * noise
    model_in = torch.cat([noisy / (s**2 + 1).sqrt(), cond.unsqueeze(1).expand(-1, F, -1, -1, -1)], dim=2)
    ids = torch.tensor([[T.FPS - 1, T.MOTION_BUCKET_ID, T.NOISE_AUG_STRENGTH]]).repeat(B, 1)
    out = pipe.unet(model_in, 0.25 * sigma.log(), encoder_hidden_states=embeds, added_time_ids=ids).sample
    target = (noise - s * x0) / (s**2 + 1).sqrt()
    return (out - target).square().mean()


def train_unet(pipe, args, log, deadline: float) -> None:
    unet = pipe.unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(2)
    running = None
    for step in range(args.unet_steps):
        if time.time() > deadline:
            log(f"unet: wall-clock guard hit, stopped early after {step} steps")
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.unet_lr, floor=0.2)
        clips = train_batch(10**7 + args.clip_offset + step * args.batch, args.batch, T.NUM_FRAMES, T.HEIGHT)
        loss = unet_loss(pipe, clips, gen, T.CFG_DROPOUT)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                e.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == args.unet_steps - 1:
            log(f"unet step {step:5d} loss {loss.item():.4f} avg {running:.4f} lr {opt.param_groups[0]['lr']:.2e}")
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    unet.eval()


def evaluate(folder: Path, args, log) -> None:
    """PSNR/SSIM to the true held-out clips, same seeds for every model; no clip is skipped."""
    torch.manual_seed(0)
    models = {"trained": T.trained_svd_pipeline(folder), "untrained": T.untrained_svd_pipeline(folder)}
    settings = {"cfg 1->3 (pipeline default)": {}, "no cfg": {"max_guidance_scale": 1.0}}
    clips = range(args.eval_clips)
    log(f"eval: held-out clips 0..{args.eval_clips - 1}, {args.eval_steps} steps, seed = clip index, "
        f"{T.NUM_FRAMES}x{T.HEIGHT}x{T.WIDTH}")
    copy_p, copy_s = [], []
    for i in clips:
        clip, _ = T.heldout_example(i)
        still = clip[:1].expand_as(clip)
        copy_p.append(T.psnr(still[1:], clip[1:]).mean().item())
        copy_s.append(T.ssim(still[1:], clip[1:]).mean().item())
    log(f"eval: repeat-first-frame baseline frames 1-{T.NUM_FRAMES - 1}: PSNR {sum(copy_p) / len(copy_p):.2f} dB "
        f"SSIM {sum(copy_s) / len(copy_s):.3f}")
    for setting, kwargs in settings.items():
        for name, pipe in models.items():
            p_all, p_next, s_all, s_next = [], [], [], []
            for i in clips:
                clip, image = T.heldout_example(i)
                video = T.sample(pipe, image, seed=i, num_inference_steps=args.eval_steps, **kwargs)
                p, s = T.psnr(video, clip), T.ssim(video, clip)
                p_all.append(p.mean().item())
                p_next.append(p[1:].mean().item())
                s_all.append(s.mean().item())
                s_next.append(s[1:].mean().item())
            n = len(p_all)
            log(f"eval [{setting}] {name:9s}: PSNR {sum(p_all) / n:.2f} dB (frames 1-{T.NUM_FRAMES - 1}: "
                f"{sum(p_next) / n:.2f}), SSIM {sum(s_all) / n:.3f} (frames 1-{T.NUM_FRAMES - 1}: "
                f"{sum(s_next) / n:.3f}); per clip PSNR " + " ".join(f"{v:.1f}" for v in p_all))


def save_preview(folder: Path, count: int = 6) -> None:
    """A PNG: rows of (true clip | trained sample) for held-out clips, to look at."""
    pipe = T.trained_svd_pipeline(folder)
    rows = []
    for i in range(count):
        clip, image = T.heldout_example(i)
        video = T.sample(pipe, image, seed=i)
        rows.append(torch.cat([torch.cat(list(clip), dim=2), torch.cat(list(video), dim=2)], dim=1))
    picture = to_pil(torch.cat(rows, dim=1))
    picture.resize((picture.width * 3, picture.height * 3), 0).save(folder / "preview.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "profiles" / T.TRAINED_DIR)
    parser.add_argument("--vae-steps", type=int, default=500)
    parser.add_argument("--unet-steps", type=int, default=1500)
    parser.add_argument("--vae-batch", type=int, default=2, help="clips per VAE step")
    parser.add_argument("--batch", type=int, default=2, help="clips per UNet step")
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--unet-lr", type=float, default=7e-4)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--max-minutes", type=float, default=30.0, help="wall-clock guard for both phases")
    parser.add_argument("--eval-clips", type=int, default=16)
    parser.add_argument("--eval-steps", type=int, default=T.NUM_INFERENCE_STEPS)
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from a trained folder: its VAE kept as is, the UNet trained further")
    parser.add_argument("--clip-offset", type=int, default=0, help="first training clip index (past those seen)")
    parser.add_argument("--no-eval", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    log = Log(args.out / "train_log.txt", append=args.eval_only)
    if not args.eval_only:
        log(f"train_tiny_svd: {vars(args)}; torch {torch.__version__}, threads {torch.get_num_threads()}")
        start = time.time()
        pipe = T.build_pipeline(seed=0) if args.init is None else T.trained_svd_pipeline(args.init)
        sizes = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in T.COMPONENTS}
        log(f"parameters: {sizes}")
        pipe.image_encoder.requires_grad_(False)
        if args.init is None:
            train_vae(pipe, args, log, start + args.max_minutes * 60 * 0.25)
        pipe.vae.requires_grad_(False)
        train_unet(pipe, args, log, start + args.max_minutes * 60)
        log(f"training took {(time.time() - start) / 60:.1f} min")
        pipe.save_pretrained(str(args.out), safe_serialization=True)
        total = sum(p.stat().st_size for p in args.out.rglob("*.safetensors"))
        log(f"saved to {args.out} ({total / 2**20:.2f} MiB of safetensors)")
    if not args.no_eval:
        evaluate(args.out, args, log)
        save_preview(args.out)


if __name__ == "__main__":
    main()
