"""Train the small text-to-video Wan shipped in ``vramplan/profiles/trained_wan`` (CPU, fp32, one thread).

Two phases, deterministic (fixed seeds, fixed step counts; a wall-clock guard only stops early and says so):
1. the ``AutoencoderKLWan`` as an autoencoder on varied procedural clips (any colour, size, track, speed),
   encoding with ``latent_dist.mode()`` as the pipeline's users do; then ``latents_mean``/``latents_std`` are
   set per channel from the training clips' latents, as Wan's config carries them;
2. the ``WanTransformer3DModel`` with flow matching on the frozen VAE's normalised latents, exactly as
   ``WanPipeline`` + ``FlowMatchEulerDiscreteScheduler`` sample: x_t = (1 - sigma) x0 + sigma noise,
   timestep 1000 sigma, target noise - x0 (the velocity the Euler step integrates), sigma drawn with the
   scheduler's shift. The frozen random-init UMT5 encodes the prompt exactly as the pipeline does (padded
   with zeros to 512 tokens); the prompt is dropped to "" (the pipeline's default negative) for CFG.
Then it saves the pipeline (safetensors) and samples every held-out prompt (colour x shape x direction
combinations never trained on) with the stock pipeline call, measuring PSNR to the true clip against a still
copy of the generated clip's own first frame.

    OMP_NUM_THREADS=1 .venv/bin/python bench/train_tiny_wan.py            # full run (~60 min on a shared 2-core box)
    OMP_NUM_THREADS=1 .venv/bin/python bench/train_tiny_wan.py --eval-only
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from training import Log, lr_at  # bench/ is the script's folder
from vramplan.runtime import trained_wan as W
from vramplan.runtime.trained import psnr

ROOT = Path(__file__).resolve().parents[1]


def videos(clips: torch.Tensor) -> torch.Tensor:
    """``[B, F, 3, H, W]`` -> the VAE's ``[B, 3, F, H, W]``."""
    return clips.permute(0, 2, 1, 3, 4)


def train_vae(pipe, args, log, deadline: float) -> None:
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    rng, gen = random.Random(1), torch.Generator().manual_seed(1)
    for step in range(args.vae_steps):
        if time.time() > deadline:
            log(f"vae: wall-clock guard hit, stopped early after {step} steps")
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, warmup=50)
        x = videos(torch.stack([W.random_clip(rng) for _ in range(args.vae_batch)]))
        z = vae.encode(x).latent_dist.mode()
        # A little latent noise keeps the decoder tolerant of the transformer's imperfect latents; the L2
        # term keeps the latent scale in check (the pipeline never samples the posterior).
        y = vae.decode(z + 0.05 * torch.randn(z.shape, generator=gen)).sample
        mse = (y - x).square().mean()
        reg = z.square().mean()
        loss = mse + 1e-4 * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step:5d} mse {mse.item():.5f} latent ms {reg.item():.2f} lr {opt.param_groups[0]['lr']:.2e}")
    vae.eval()
    with torch.no_grad():
        combos = W.train_combinations()[:args.combos]
        z = torch.cat([vae.encode(videos(W.true_clip(*k)[None])).latent_dist.mode() for k in combos])
        mean, std = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4))
        vae.register_to_config(latents_mean=[round(v, 6) for v in mean.tolist()],
                               latents_std=[round(v, 6) for v in std.tolist()])
        recon = [psnr(vae.decode(vae.encode(videos(W.true_clip(*k)[None])).latent_dist.mode()).sample[0]
                      .transpose(0, 1), W.true_clip(*k)).mean().item()
                 for k in W.heldout_combinations()[:args.combos]]
    log(f"vae: latent mean {[f'{v:.2f}' for v in mean.tolist()]} std {[f'{v:.2f}' for v in std.tolist()]}; "
        f"held-out clips' reconstruction PSNR {sum(recon) / len(recon):.2f} dB (the ceiling for generated clips)")


def latents_and_embeds(pipe, count: int | None = None):
    """Normalised latents of the training clips and the prompt embeddings exactly as the pipeline makes them."""
    cfg = pipe.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    combos = W.train_combinations()[:count]
    with torch.no_grad():
        z = torch.cat([pipe.vae.encode(videos(W.true_clip(*k)[None])).latent_dist.mode() for k in combos])
        embeds = pipe._get_t5_prompt_embeds([W.prompt(*k) for k in combos], 1, W.MAX_SEQUENCE_LENGTH, "cpu")
        empty = pipe._get_t5_prompt_embeds([""], 1, W.MAX_SEQUENCE_LENGTH, "cpu")
    return (z - mean) / std, embeds, empty


def sample_sigmas(count: int, gen: torch.Generator) -> torch.Tensor:
    """The scheduler's shifted sigmas (uniform timesteps through the shift), a quarter plain uniform."""
    u = torch.rand(count, generator=gen)
    shifted = W.FLOW_SHIFT * u / (1 + (W.FLOW_SHIFT - 1) * u)
    pick = torch.rand(count, generator=gen) < 0.25
    return torch.where(pick, torch.rand(count, generator=gen), shifted).clamp(1e-3, 1.0)


def save(pipe, folder: Path, params, ema, log) -> None:
    """Save with the EMA weights in place (the training weights are restored afterwards)."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    with torch.no_grad():
        for b, p in zip(backup, params, strict=True):
            p.copy_(b)
    total = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    log(f"saved to {folder} ({total / 2**20:.2f} MiB of safetensors)")


def train_transformer(pipe, args, log, deadline: float) -> None:
    x0_all, embeds_all, empty = latents_and_embeds(pipe, args.combos)
    model = pipe.transformer.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.dit_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(2)
    running = None
    for step in range(args.dit_steps):
        if time.time() > deadline:
            log(f"transformer: wall-clock guard hit, stopped early after {step} steps")
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.dit_steps, args.dit_lr)
        pick = torch.randint(len(x0_all), (args.batch,), generator=gen)
        x0, embeds = x0_all[pick], embeds_all[pick]
        drop = torch.rand(args.batch, generator=gen) < W.CFG_DROPOUT
        embeds = torch.where(drop[:, None, None], empty.expand_as(embeds), embeds)
        sigma = sample_sigmas(args.batch, gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=gen)
        out = model(hidden_states=(1 - s) * x0 + s * noise, timestep=sigma * 1000, encoder_hidden_states=embeds,
                    return_dict=False)[0]
        loss = (out - (noise - x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                e.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == args.dit_steps - 1:
            log(f"transformer step {step:5d} loss {loss.item():.4f} avg {running:.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e}")
        if args.save_every and step and step % args.save_every == 0:
            model.eval()
            save(pipe, args.out, params, ema, log)
            model.train()
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    model.eval()


def evaluate(folder: Path, args, log) -> dict:
    """PSNR to the true clips of the held-out prompts (and of a few training prompts), stock pipeline call,
    seed = prompt index; against a still copy of each generated clip's own first frame."""
    pipe = W.load_trained_wan(folder)
    sets = {"held-out": W.heldout_combinations(), "training (first 12)": W.train_combinations()[:12]}
    results = {}
    for guidance in (W.GUIDANCE_SCALE, 1.0):
        for name, combos in sets.items():
            gen_p, still_p, gen_next, still_next, true_still = [], [], [], [], []
            for i, k in enumerate(combos):
                clip = W.true_clip(*k)
                video = W.sample(pipe, W.prompt(*k), seed=i, num_inference_steps=args.eval_steps,
                                 guidance_scale=guidance)
                p, q = psnr(video, clip), psnr(video[:1].expand_as(video), clip)
                gen_p.append(p.mean().item())
                still_p.append(q.mean().item())
                gen_next.append(p[1:].mean().item())
                still_next.append(q[1:].mean().item())
                true_still.append(psnr(clip[:1].expand_as(clip), clip)[1:].mean().item())
            n = len(combos)

            def avg(values, n=n):
                return sum(values) / n

            g, s = avg(gen_p), avg(still_p)
            results[(guidance, name)] = (g, s)
            log(f"eval [guidance {guidance}, {args.eval_steps} steps] {name} prompts ({n}): all {W.NUM_FRAMES} frames: "
                f"generated {g:.2f} dB, still copy of its own first frame {s:.2f} dB (gain {g - s:+.2f} dB); "
                f"frames 1-{W.NUM_FRAMES - 1}: {avg(gen_next):.2f} vs {avg(still_next):.2f} dB "
                f"(gain {avg(gen_next) - avg(still_next):+.2f}; a still true first frame {avg(true_still):.2f} dB); "
                "per prompt generated " + " ".join(f"{v:.1f}" for v in gen_p)
                + " | still " + " ".join(f"{v:.1f}" for v in still_p))
    return results


def shape_scores(pipe, combo: tuple[str, str, str], seed: int, steps: int) -> dict[str, float]:
    """PSNR of the prompt's generation (guidance 5) to the VAE's reconstruction of its clip drawn with each
    shape: as blurred as a generation can be (against the sharp clips a blur is nearest to the smallest shape)."""
    c, s, d = combo

    def recon(clip):
        with torch.no_grad():
            z = pipe.vae.encode(videos(clip[None])).latent_dist.mode()
            return pipe.vae.decode(z).sample[0].transpose(0, 1).clamp(-1, 1)

    video = W.sample(pipe, W.prompt(c, s, d), seed=seed, num_inference_steps=steps)
    return {shape: psnr(video, recon(W.render(c, shape, d))).mean().item() for shape in W.SHAPES}


def shape_check(folder: Path, args, log) -> int:
    """Does each held-out prompt's generation (seed = prompt index, as :func:`evaluate`) show the shape it
    names, i.e. is it nearest to the named shape's clip? Returns how many of the held-out prompts pass."""
    pipe = W.load_trained_wan(folder)
    passed, lines = 0, []
    for i, combo in enumerate(W.heldout_combinations()):
        scores = shape_scores(pipe, combo, i, args.eval_steps)
        nearest = max(scores, key=scores.get)
        passed += nearest == combo[1]
        lines.append(f"{combo[1]}->{nearest} (" + " ".join(f"{v:.2f}" for v in scores.values()) + ")")
    log(f"shapes [guidance {W.GUIDANCE_SCALE}]: {passed} of {len(lines)} held-out generations are nearest to "
        f"their named shape's clip (PSNR to the VAE's reconstruction of the clip drawn as {' / '.join(W.SHAPES)}): "
        + "; ".join(lines))
    return passed


def save_preview(folder: Path, steps: int, log) -> None:
    """A PNG: rows of (true clip | generated | generated under a uniform Step Rehash schedule, half the steps
    key steps) for held-out prompts, every other frame."""
    pipe = W.load_trained_wan(folder)
    plan = W.rehash_plan(pipe, keys=steps // 2, steps=steps)
    rows = []
    for i, k in enumerate(W.heldout_combinations()[:6]):
        text = W.prompt(*k)
        rows.append([W.true_clip(*k), W.sample(pipe, text, seed=i, num_inference_steps=steps),
                     W.sample_rehash(pipe, plan, text, seed=i)])
    W.strip(rows, folder / "preview.png")
    log(f"preview.png: held-out prompts {[W.prompt(*k) for k in W.heldout_combinations()[:6]]}; columns: true | "
        f"generated | Step Rehash ({plan.rehash.schedule}, cut {plan.rehash.cut})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "profiles" / W.TRAINED_WAN_DIR)
    parser.add_argument("--vae-steps", type=int, default=500)
    parser.add_argument("--dit-steps", type=int, default=3000)
    parser.add_argument("--vae-batch", type=int, default=2, help="clips per VAE step")
    parser.add_argument("--batch", type=int, default=8, help="clips per transformer step")
    parser.add_argument("--vae-lr", type=float, default=1.5e-3)
    parser.add_argument("--dit-lr", type=float, default=5e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--save-every", type=int, default=500, help="transformer steps between checkpoints")
    parser.add_argument("--max-minutes", type=float, default=60.0, help="wall-clock guard for both phases")
    parser.add_argument("--eval-steps", type=int, default=W.NUM_INFERENCE_STEPS)
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--shapes-only", action="store_true", help="only the shape check (appends to the log)")
    parser.add_argument("--combos", type=int, default=None, help="only the first N training prompts (a smoke test)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = Log(args.out / "train_log.txt", append=args.eval_only or args.shapes_only)
    if args.shapes_only:
        shape_check(args.out, args, log)
        return
    if not args.eval_only:
        log(f"train_tiny_wan: {vars(args)}; torch {torch.__version__}, threads {torch.get_num_threads()}")
        start = time.time()
        pipe = W.build_pipeline(seed=0)
        sizes = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in W.COMPONENTS}
        log(f"parameters: {sizes}; {len(W.train_combinations())} training prompts, "
            f"{len(W.heldout_combinations())} held out: {[W.prompt(*k) for k in W.heldout_combinations()]}")
        pipe.text_encoder.requires_grad_(False)
        train_vae(pipe, args, log, start + args.max_minutes * 60 * 0.3)
        pipe.vae.requires_grad_(False)
        train_transformer(pipe, args, log, start + args.max_minutes * 60)
        log(f"training took {(time.time() - start) / 60:.1f} min")
        pipe.save_pretrained(str(args.out), safe_serialization=True)
        total = sum(p.stat().st_size for p in args.out.rglob("*.safetensors"))
        log(f"saved to {args.out} ({total / 2**20:.2f} MiB of safetensors)")
    if not args.no_eval:
        evaluate(args.out, args, log)
        shape_check(args.out, args, log)
        save_preview(args.out, args.eval_steps, log)


if __name__ == "__main__":
    main()
