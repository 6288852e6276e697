"""Exact low-memory VAE decode and encode: tiling's error vs vramplan's, and the full-size peaks.

1. Quality (tiny configs, random weights, fp32, CPU): diffusers' ``enable_tiling()`` (tiles blended)
   and a vramplan rows plan against the stock decode/encode on the same latents: PSNR (peak 2: the
   [-1, 1] range) and the largest difference.
2. Memory and time (``--meta``; full-size configs on meta tensors, no weights): the stock activation
   peak (traced), and plans within a budget, each run on meta tensors and measured (``verify``), with
   the predicted time of the plan next to the unsliced decode on the same GPU profile (RTX 4090).

    python bench/bench_vae.py            # quality only (seconds)
    python bench/bench_vae.py --meta     # + Wan 2.1/2.2 and SVD encode on meta (minutes)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from report import machine, table, write_section  # noqa: E402
from vramplan.runtime import apply_plan, sample_shape, uniform_plan  # noqa: E402


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def _row(name, tiled, planned, ref, plan):
    if isinstance(tiled, torch.Tensor) and tiled.shape != ref.shape:
        tiled = RuntimeError(f"returns shape {tuple(tiled.shape)}, not {tuple(ref.shape)}")
    if isinstance(tiled, Exception):
        return [name, f"fails: {str(tiled)[:70]}", "", f"{psnr(planned, ref):.1f} dB", f"{(planned - ref).abs().max():.1e}",
                plan]
    return [name, f"{psnr(tiled, ref):.1f} dB", f"{(tiled - ref).abs().max():.3g}",
            "inf" if psnr(planned, ref) == math.inf else f"{psnr(planned, ref):.1f} dB",
            f"{(planned - ref).abs().max():.1e}", plan]


def quality() -> list[list[object]]:
    from diffusers import AutoencoderKL
    from tiny import tiny_wan_vae
    from vramplan.planner.schema import SampleShape
    from vramplan.runtime.tiny import randomize_norms

    rows = []
    torch.manual_seed(0)
    cfg = dict(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, norm_num_groups=8,
               sample_size=32)
    sd = randomize_norms(AutoencoderKL(**cfg), 1).eval()
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    with torch.no_grad():
        ref_d, ref_e = sd.decode(z).sample, sd.encode(x).latent_dist.mean
        sd.enable_tiling()
        tiled_d, tiled_e = sd.decode(z).sample, sd.encode(x).latent_dist.mean
        sd.disable_tiling()
        with apply_plan(sd, uniform_plan(sd, 6, SampleShape(batch=1, frames=1, latent_height=96, latent_width=96,
                                                              dtype="fp32"), component="vae_encoder")):
            planned_e = sd.encode(x).latent_dist.mean
    # the SD decoder slices along frames: one image is decoded whole (exact trivially); see the encode row
    rows.append(_row("SD AutoencoderKL encode 96x96 (tiles 32 px)", tiled_e, planned_e, ref_e, "rows k=6"))
    del ref_d, tiled_d

    for label, wan22 in (("Wan 2.1 decode", False), ("Wan 2.2 decode", True)):
        vae = tiny_wan_vae(0, wan22=wan22)
        z = torch.randn(1, vae.config.z_dim, 3, 12, 12, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            ref = vae.decode(z).sample
            side = ref.shape[-1] // (4 if wan22 else 2)  # a tile of half the (2.2: unpatchified) latent side
            vae.enable_tiling(tile_sample_min_height=side, tile_sample_min_width=side,
                              tile_sample_stride_height=side * 2 // 3, tile_sample_stride_width=side * 2 // 3)
            try:
                tiled = vae.decode(z).sample
            except RuntimeError as err:  # diffusers' tiled decode of a patched (2.2) VAE at this size
                tiled = err
            vae.disable_tiling()
            with apply_plan(vae, uniform_plan(vae, 8, sample_shape(z, vae))):
                planned = vae.decode(z).sample
        rows.append(_row(f"{label} {tuple(ref.shape[2:])} (tiles {side} px)", tiled, planned, ref, "rows k=8"))
    return rows


def _wan_config(version: str) -> tuple[dict, tuple[int, int, int]]:
    if version == "2.1":  # Wan-AI/Wan2.1-T2V-14B-Diffusers vae: the class defaults; 720x1280x81
        return {}, (21, 90, 160)
    return dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48), (31, 44, 80)


VERIFY_MAX_K = 64
UNITS = ("decoder.mid_block", "decoder.up_blocks.0", "decoder.up_blocks.1", "decoder.up_blocks.2", "decoder.up_blocks.3")


def _floor(prof, gpu) -> float:
    """The smallest activation budget (GiB, to 0.01) the planner finds a plan within (bisection)."""
    from vramplan.planner.errors import InfeasibleError
    from vramplan.planner.plan import make_plan

    lo, hi = 0.0, prof.original_peak_bytes / 2**30 + 0.1
    while hi - lo > 0.01:
        mid = (lo + hi) / 2
        try:
            make_plan(prof, gpu, usable_bytes=int((prof.weight_bytes + mid * 2**30) / 0.98), steps=1)
            hi = mid
        except InfeasibleError:
            lo = mid
    return hi


def _describe(comp, prof) -> tuple[str, str]:
    """The plan's slice counts per up block (``1`` unsliced; ``[..]`` a rows group sharing one) and the
    values it places in host memory (GiB)."""
    grouped = {n: g for g in comp.groups for n in g.units}
    ks = []
    for name in UNITS[1:]:
        k = comp.slices.get(name, 1)
        g = grouped.get(name)
        ks.append(f"[{k}" if g and g.units[0] == name else f"{k}]" if g and g.units[-1] == name else str(k))
    host = sum(u.output_bytes for u in prof.units if u.name in comp.host)
    stream = f", {len(comp.streamed)} weight blocks streamed" if comp.streamed else ""
    return "k=" + "/".join(ks) + stream, f"{host / 2**30:.1f}" if host else "0"


def where_time_goes(model, comp, segments) -> dict[str, float]:
    """Seconds of a plan by kind, from each segment's priced recipe (the cost model's own terms):
    ``compute`` each unit's roofline time once, ``halo`` the rows computed again by overlapping slabs,
    ``launches`` kernel launches, ``memory`` writes into output buffers and statistics passes, ``host``
    the host-link copies of placed values."""
    out = dict.fromkeys(("compute", "halo", "launches", "memory", "host"), 0.0)
    host = frozenset(comp.host)
    for seg in segments:
        cost = model.cost(seg, host)
        rel = host & model.relevant(seg)
        rows = model.units[seg.start].axis == "rows" and seg.k > 1 and model.units[seg.stop].axis_length > 1
        found = model.shared.memory.get(("rows", seg, rel) if rows else (seg, rel))
        terms = found[1] if rows else found[6]
        for t in terms:
            if len(t) == 1:
                out["memory"] += t[0] / model.bytes_per_s
            elif rows:  # (unit, work over its rows, launches)
                out["compute"] += model.unit_seconds[t[0]]
                out["halo"] += model.unit_seconds[t[0]] * (t[1] - 1)
                out["launches"] += t[2] * model.launch_seconds
            else:  # (unit, launches, depth)
                out["compute"] += model.unit_seconds[t[0]]
                out["launches"] += t[1] * model.launch_seconds / t[2]
        out["host"] += cost.transfer_s
    return out


def meta(budgets: dict, verify_max_k: int = VERIFY_MAX_K) -> list[list[object]]:
    """Wan VAEs on meta tensors: stock peak, the plan within each budget (measured), times and where
    the plan's time goes (:func:`where_time_goes`). Budgets are (activation GiB, host GiB or None:
    unlimited, run on meta or predicted only); the VAE's weights stay resident (not streamed), so the
    activation budget is the plan's bound."""
    from diffusers import AutoencoderKLWan
    from vramplan.planner.costs import CostModel
    from vramplan.planner.errors import InfeasibleError
    from vramplan.planner.gpus import find_gpu
    from vramplan.planner.plan import make_plan, segments_of
    from vramplan.planner.schema import SampleShape
    from vramplan.runtime.profiler import cached_profile
    from vramplan.runtime.verify import verify

    gpu = find_gpu("RTX 4090").model_copy(update={"cuda_context_bytes": 0})  # budgets are activations only
    rows = []
    for (version, dtype), budget in budgets.items():
        cfg, (t, h, w) = _wan_config(version)
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        with torch.device("meta"):
            vae = AutoencoderKLWan(**cfg).to(torch_dtype)
        shape = SampleShape(batch=1, frames=t, latent_height=h, latent_width=w, dtype=dtype)
        prof = cached_profile(vae, shape, "flash", name=f"wan{version}-vae", max_k=128)
        resident = prof.model_copy(update={"block_weights": {}, "block_gathered": {}})  # weights not streamed
        model = CostModel(prof, gpu)
        out = prof.units[-1].output_shape
        label = f"Wan {version} {dtype} {out[-2]}x{out[-1]}x{out[2]}"
        for gib, host_gib, check in budget:
            host_bytes = None if host_gib is None else int(host_gib * 2**30)
            try:
                plan = make_plan(resident, gpu, usable_bytes=int((prof.weight_bytes + gib * 2**30) / 0.98),
                                 steps=1, host_ram_bytes=host_bytes)
            except InfeasibleError:
                why = f"floor {_floor(resident, gpu):.2f}" if host_gib is None else "host memory"
                rows.append([label, f"{prof.original_peak_bytes / 2**30:.2f}", f"{gib:g}",
                             "any" if host_gib is None else f"{host_gib:g}", f"refused ({why})", "", "", "", "", "", ""])
                print(rows[-1], flush=True)
                continue
            comp = plan.components[0]
            k = max(comp.slices.values(), default=1)
            # on CPU a meta run takes minutes per 16 slices: the tightest plans are predicted only
            measured = verify(plan, vae).measured_activation_bytes if check and k <= verify_max_k else None
            whole = comp.model_copy(update={"slices": {}, "groups": [], "host": []})
            seconds = sum(model.cost(s, frozenset(comp.host)).seconds for s in segments_of(model, comp))
            base = sum(model.cost(s).seconds for s in segments_of(model, whole))
            plan_text, host_used = _describe(comp, prof)
            parts = where_time_goes(model, comp, segments_of(model, comp))
            over = " + ".join(f"{name} {parts[name]:.2f}" for name in ("halo", "launches", "host", "memory")
                              if parts[name] >= 0.005)
            rows.append([label, f"{prof.original_peak_bytes / 2**30:.2f}",
                         f"{gib:g}", "any" if host_gib is None else f"{host_gib:g}",
                         f"{plan.prediction.activation_peak_bytes / 2**30:.3f}",
                         f"{measured / 2**30:.3f}" if measured else "not run",
                         f"{(plan.prediction.activation_peak_bytes / measured - 1) * 100:+.2f} %" if measured else "",
                         plan_text, host_used, f"{seconds:.2f} / {base:.2f} ({seconds / base:.2f}x)",
                         f"compute {parts['compute']:.2f} + {over}"])
            print(rows[-1], flush=True)
    return rows


def meta_encode(version: str, dtype: str, video: tuple[int, int, int], gibs: list[float]) -> list[list[object]]:
    """A Wan VAE *encode* on meta tensors: the stock peak, plans within each budget (run and measured)."""
    from diffusers import AutoencoderKLWan
    from vramplan.planner.costs import CostModel
    from vramplan.planner.errors import InfeasibleError
    from vramplan.planner.gpus import find_gpu
    from vramplan.planner.plan import make_plan, segments_of
    from vramplan.planner.schema import SampleShape
    from vramplan.runtime.profiler import cached_profile
    from vramplan.runtime.verify import verify

    gpu = find_gpu("RTX 4090").model_copy(update={"cuda_context_bytes": 0})
    cfg, _ = _wan_config(version)
    with torch.device("meta"):
        vae = AutoencoderKLWan(**cfg).to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    t, h, w = video
    shape = SampleShape(batch=1, frames=t, latent_height=h, latent_width=w, dtype=dtype)
    prof = cached_profile(vae, shape, "flash", name=f"wan{version}-vae", component="vae_encoder", max_k=32)
    model = CostModel(prof, gpu)
    rows = []
    for gib in gibs:
        label = f"Wan {version} encode {dtype} {h}x{w}x{t}"
        try:
            plan = make_plan(prof, gpu, usable_bytes=int((prof.weight_bytes + gib * 2**30) / 0.98), steps=1)
        except InfeasibleError:
            rows.append([label, f"{prof.original_peak_bytes / 2**30:.2f}", f"{gib:g}",
                         f"refused (floor {_floor(prof, gpu):.2f})", "", "", "", ""])
            print(rows[-1], flush=True)
            continue
        comp = plan.components[0]
        measured = verify(plan, vae).measured_activation_bytes
        whole = comp.model_copy(update={"slices": {}, "groups": [], "host": []})
        seconds = sum(model.cost(s, frozenset(comp.host)).seconds for s in segments_of(model, comp))
        base = sum(model.cost(s).seconds for s in segments_of(model, whole))
        rows.append([label, f"{prof.original_peak_bytes / 2**30:.2f}", f"{gib:g}",
                     f"{plan.prediction.activation_peak_bytes / 2**30:.3f}", f"{measured / 2**30:.3f}",
                     f"{(plan.prediction.activation_peak_bytes / measured - 1) * 100:+.2f} %",
                     f"k={comp.slices.get('encoder.down_blocks', 1)}" + (", down on host" if comp.host else ""),
                     f"{seconds:.2f} / {base:.2f} ({seconds / base:.2f}x)"])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meta", action="store_true", help="also the full-size Wan VAEs on meta tensors (minutes)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--only", choices=["2.1", "2.2", "encode"],
                        help="one part of --meta only (printed, not written): a Wan VAE's decode, or the 2.1 encode")
    args = parser.parse_args()
    torch.set_num_threads(1)
    q = quality()
    body = ["## Exact low-memory VAEs (`bench/bench_vae.py`)", "", f"Machine: {machine()}.", "",
            "Tiled decoding (diffusers `enable_tiling()`: tiles blended) vs a vramplan rows plan, each against the "
            "stock call on the same inputs (tiny configs, random weights, fp32). PSNR with peak 2 (the [-1, 1] range).",
            "", table(["call", "tiled PSNR", "tiled max diff", "vramplan PSNR", "vramplan max diff", "plan"], q)]
    print(body[-1])
    # (activation GiB, host GiB: None unlimited, run on meta): the targets run; a meta run of all
    # frames takes 5-10 minutes per plan on this CPU for the others
    budgets = {("2.1", "fp32"): [(3.0, None, False), (1.5, None, True), (1.5, 16.0, False)],
               ("2.1", "bf16"): [(1.0, None, True)],
               ("2.2", "fp32"): [(3.0, None, False), (2.0, None, False), (2.0, 32.0, False)]}
    encode = ("2.1", "fp32", (81, 720, 1280), [4.0, 2.0, 1.5])
    if args.only == "encode":
        meta_encode(*encode)
        return
    if args.only:
        meta({key: b for key, b in budgets.items() if key[0] == args.only})
        return
    if args.meta:
        m = meta(budgets)
        body += ["", "Full-size configs on meta tensors: the stock decode's activation peak (traced) and the fastest "
                 "plan within each activation budget (the VAE's weights resident; host memory for placed values "
                 "unlimited or bounded), run on meta tensors and measured; predicted time of the plan and of the "
                 "unsliced decode on the RTX 4090 profile (the video itself is part of every peak: 720x1280x81 "
                 "fp32 is 0.83 GiB). Plan: slice counts of up blocks 0/1/2/3 ([..]: a rows group sharing one).",
                 "", table(["decode", "stock GiB", "budget GiB", "host budget GiB", "predicted GiB", "measured GiB",
                            "error", "plan", "host GiB used", "predicted s (plan / unsliced)",
                            "plan's s by kind"], m)]
        print(body[-1])
    if not args.no_write:
        print("wrote", write_section("vae", "\n".join(body)))


if __name__ == "__main__":
    main()
