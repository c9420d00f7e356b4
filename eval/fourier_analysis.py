"""How the residual FBCache reuses spreads over the image-token grid's spectrum, and what each kept Fourier ratio
costs: for a model and prompt set, run uncached (FBCache at threshold 0 stores the residual of the blocks it
would skip at every step), then per step and kept ratio report the fraction of the residual's energy inside
the kept block and the reconstruction PSNR of the restored residual (peak = the residual's largest magnitude),
next to the bytes the compressed copy holds.

  python -m eval.fourier_analysis --out outputs/fourier            # embedded model, 16 held-out prompts
  python -m eval.fourier_analysis --checkpoint /data/FLUX.1-dev --prompt-file prompts.txt --height 1024 --out ...

Writes fourier_analysis.json and fourier_analysis.png (radial energy spectrum; PSNR per step and ratio).
"""
import argparse
import json
import os
import sys

import numpy as np

from utils import EMBEDDED_MODEL


def build_parser():
    p = argparse.ArgumentParser(prog="python -m eval.fourier_analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=EMBEDDED_MODEL, help="FLUX.1 folder (default: the embedded model)")
    p.add_argument("--prompt-file", default="shapes-heldout", help="prompts (default: shapes-heldout)")
    p.add_argument("--prompts", type=int, default=16, help="how many prompts (default 16)")
    p.add_argument("--ratios", default="0.25,0.5,0.75", help="kept ratios to evaluate (default 0.25,0.5,0.75)")
    p.add_argument("--height", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--out", required=True, help="output folder")
    return p


def residual_energy(residuals, grid):
    """Mean energy of the residuals' 2-D spectrum on rfft2's half plane [h, w//2+1] (residuals [N, h*w, D]), each
    column that stands for itself and its mirror image (not column 0, nor w/2 when w is even) counted twice, so
    that the plane's energies sum to the full spectrum's (Parseval)."""
    h, w = grid
    spectrum = np.fft.rfft2(residuals.reshape(len(residuals), h, w, -1), axes=(1, 2))
    mirrored = np.full(w // 2 + 1, 2.0)
    mirrored[0] = 1.0
    if w % 2 == 0:
        mirrored[-1] = 1.0
    return (np.abs(spectrum) ** 2).mean(axis=(0, 3)) * mirrored


def restoration(residuals, projector):
    """(fraction of energy kept, PSNR dB of the restored residuals); projector = decoder @ encoder of one ratio."""
    x = residuals.astype(np.float64)
    restored = np.einsum("nm,bmd->bnd", projector, x)
    err = np.mean((x - restored) ** 2)
    peak = np.abs(x).max()
    return float((restored ** 2).sum() / (x ** 2).sum()), float(10 * np.log10(peak ** 2 / err)) if err > 0 else float("inf")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
        if not all(0 < r <= 1 for r in ratios):
            raise ValueError
    except ValueError:
        print(f"error: --ratios must be numbers in (0, 1], got {args.ratios!r}", file=sys.stderr)
        return 2
    if args.prompts < 1:
        print(f"error: --prompts must be at least 1, got {args.prompts}", file=sys.stderr)
        return 2
    from eval.prompt_sources import PromptSourceError, load_prompts
    from models.checkpoint import CheckpointError
    from pipelines.flux_pipeline import FluxPipeline, inspect_checkpoint
    try:
        info = inspect_checkpoint(args.checkpoint)
        prompts = [item.prompt for item in load_prompts(args.prompt_file)[:args.prompts]]
    except (PromptSourceError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from tqdm.auto import tqdm
    from fbcache_ms.config import CacheConfig
    from fbcache_ms.fourier import fourier_matrices

    pipe = FluxPipeline.from_pretrained(args.checkpoint, mode="graph")
    size = args.height or info.default_size
    grid = (size // info.size_multiple, size // info.size_multiple)
    steps = args.steps or info.default_steps
    cache = CacheConfig("fbcache", threshold=0.0)  # never reuses: stores the skippable residual every step
    per_step = []  # [step] -> list of residual arrays
    for k, prompt in enumerate(tqdm(prompts, desc="prompts")):
        policy = pipe.cache_policy(cache, "cond", 1, grid[0] * grid[1], info.default_sequence_length, grid)[0]
        captured = []  # a copy per step: asnumpy() may alias the Parameter, which the next step overwrites
        pipe(prompt, height=size, width=size, num_inference_steps=steps, seed=k, progress=False, cache=cache,
             output_type="latent", step_callback=lambda i, x: captured.append(policy.res_h.value.asnumpy()[0].copy()))
        for i, r in enumerate(captured):
            if len(per_step) <= i:
                per_step.append([])
            per_step[i].append(r)
    per_step = [np.stack(rs) for rs in per_step]
    tokens, dim = per_step[0].shape[1:]
    rows = []
    for ratio in ratios:
        encoder, decoder = fourier_matrices(grid[0], grid[1], ratio)  # built once per ratio, not per step
        projector = decoder @ encoder
        quality = [restoration(r, projector) for r in per_step]
        rows.append(dict(ratio=ratio, bytes_fraction=encoder.shape[0] / tokens, energy_kept=[q[0] for q in quality],
                         psnr_db=[q[1] for q in quality]))
    energy = residual_energy(np.concatenate(per_step), grid)
    result = dict(checkpoint=os.path.abspath(args.checkpoint), prompts=len(prompts), steps=steps, grid=grid,
                  dim=int(dim), spectrum=energy.tolist(), rows=rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fourier_analysis.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, "fourier_analysis.png"))
    print(f"{len(prompts)} prompts, {steps} steps, {grid[0]}x{grid[1]} token grid")
    print("| kept ratio | bytes vs uncompressed | energy kept (mean over steps) | PSNR dB mean | PSNR dB min |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ratio']:g} | {r['bytes_fraction']:.3f} | {np.mean(r['energy_kept']):.3f} | "
              f"{np.mean(r['psnr_db']):.1f} | {np.min(r['psnr_db']):.1f} |")
    return 0


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = result["grid"]
    energy = np.asarray(result["spectrum"])
    u = np.minimum(np.arange(h), h - np.arange(h))[:, None]
    v = np.arange(w // 2 + 1)[None, :]
    radius = np.maximum(u / (h / 2), v / (w / 2))  # the kept block is radius <= ratio
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    order = np.argsort(radius.ravel())
    axes[0].plot(radius.ravel()[order], np.cumsum(energy.ravel()[order]) / energy.sum(), marker=".")
    axes[0].set_xlabel("kept ratio (max(|u| / (h/2), v / (w/2)))")
    axes[0].set_ylabel("fraction of the residual's energy kept")
    axes[0].set_title("residual energy over the token-grid spectrum")
    axes[0].grid(alpha=0.3)
    for r in result["rows"]:
        axes[1].plot(r["psnr_db"], marker=".", label=f"ratio {r['ratio']:g} ({r['bytes_fraction']:.2f} of the bytes)")
    axes[1].set_xlabel("denoising step")
    axes[1].set_ylabel("PSNR of the restored residual (dB)")
    axes[1].set_title("what compression costs, per step")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
