"""Why the shipped tiny SVD misses the motion bar (issue 16: >= 3 dB PSNR over a still copy of its own first
frame): how much headroom the data and the VAE leave, and whether the samples move too little or the wrong way.

Per held-out clip (frames 1..F-1, the stock pipeline call, seed = clip index):
- PSNR of the sample, of a still copy of its own first frame, of a still copy of the true first frame;
- the VAE's reconstruction (the ceiling any sample can reach) and a still copy of its first frame: the
  gain a perfect latent model would have over a still copy;
- motion energy mean |frame_t - frame_0| of the true clip, the sample and the reconstruction, and the cosine
  between the sample's frame differences and the true ones (1: moves the way the clip does; 0: unrelated).

    OMP_NUM_THREADS=1 .venv/bin/python bench/diagnose_tiny_svd.py            # the shipped weights (~1 min)
    OMP_NUM_THREADS=1 .venv/bin/python bench/diagnose_tiny_svd.py --folder /tmp/run --clips 16
"""

from __future__ import annotations

import argparse

import torch
from vramplan.runtime import trained as T


def clip_stats(pipe, index: int, steps: int) -> dict[str, float]:
    clip, image = T.heldout_example(index)
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(clip).latent_dist.mode(), num_frames=T.NUM_FRAMES).sample.clamp(-1, 1)
    video = T.sample(pipe, image, seed=index, num_inference_steps=steps)

    def later(v, ref=clip):  # PSNR over frames 1.. (frame 0 is the conditioning image)
        return T.psnr(v, ref)[1:].mean().item()

    def still(v):
        return v[:1].expand_as(v)

    moved = {name: v[1:] - v[:1] for name, v in (("true", clip), ("sample", video), ("recon", recon))}
    cosine = torch.nn.functional.cosine_similarity
    return {
        "sample": later(video), "sample still": later(still(video)), "true still": later(still(clip)),
        "ceiling": later(recon), "ceiling still": later(still(recon)),
        "motion true": moved["true"].abs().mean().item(), "motion sample": moved["sample"].abs().mean().item(),
        "motion recon": moved["recon"].abs().mean().item(),
        "cos sample": cosine(moved["sample"].flatten(), moved["true"].flatten(), dim=0).item(),
        "cos recon": cosine(moved["recon"].flatten(), moved["true"].flatten(), dim=0).item(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="a trained SVD folder (default: the shipped one)")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--steps", type=int, default=T.NUM_INFERENCE_STEPS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = T.trained_svd_pipeline(args.folder)
    rows = [clip_stats(pipe, i, args.steps) for i in range(args.clips)]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    last = T.NUM_FRAMES - 1
    print(f"held-out clips 0..{args.clips - 1}, {args.steps} steps, frames 1-{last}, PSNR to the true clip:")
    print(f"  sample {mean['sample']:.2f} dB; still copy of its own first frame {mean['sample still']:.2f} dB "
          f"(gain {mean['sample'] - mean['sample still']:+.2f}; the bar is +3); still true first frame "
          f"{mean['true still']:.2f} dB")
    print(f"  VAE reconstruction (ceiling) {mean['ceiling']:.2f} dB; still copy of its first frame "
          f"{mean['ceiling still']:.2f} dB: a perfect latent model gains {mean['ceiling'] - mean['ceiling still']:+.2f}")
    print(f"  motion energy mean|f_t - f_0|: true {mean['motion true']:.3f}, sample {mean['motion sample']:.3f}, "
          f"reconstruction {mean['motion recon']:.3f}; cosine to the true frame differences: sample "
          f"{mean['cos sample']:.2f}, reconstruction {mean['cos recon']:.2f}")
    print("  per clip: gain over its own still " + " ".join(f"{r['sample'] - r['sample still']:+.1f}" for r in rows))
    print("  per clip: ceiling's gain over its still " + " ".join(f"{r['ceiling'] - r['ceiling still']:+.1f}"
                                                              for r in rows))
    print("  per clip: cosine " + " ".join(f"{r['cos sample']:.2f}" for r in rows))


if __name__ == "__main__":
    main()
