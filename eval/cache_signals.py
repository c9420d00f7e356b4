"""What the caches read, step by step, on a trained model: do FLUX.1-dev's thresholds transfer?

For held-out prompts, an uncached run records per step and per image
- FBCache's signal: relative L1 change of block 0's image residual (h0 - h) since the previous step;
- TeaCache's signal: relative L1 change of block 0's modulated input LN(h)(1 + scale) + shift, and that value
  rescaled by TeaCache's FLUX.1 polynomial (what its accumulator adds per step);
- the step-to-step relative L1 change of the model output (the velocity);
- MagCache's signal: the ratio of the block stack's residual norm to the previous step's (mean over tokens).
Then FBCache runs at several thresholds on the same prompts (one image per call, as FLUX's published figures)
and its ideal speedup (1 / fraction of blocks run) is set beside FLUX.1-dev's published 0.08 -> 1.55x and
0.12 -> 1.91x (28 steps, wall clock on an L20).

  python -m eval.cache_signals --out outputs/signals
"""
import argparse
import json
import os
import sys

import numpy as np

from utils import EMBEDDED_MODEL

FLUX_DEV_FBCACHE = {0.08: 1.55, 0.12: 1.91}  # published wall-clock speedups, FLUX.1-dev 1024^2, 28 steps
THRESHOLDS = (0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.16, 0.20, 0.25, 0.30)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.cache_signals", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=EMBEDDED_MODEL, help="trained model folder (default: the embedded one)")
    p.add_argument("--out", required=True, help="folder for signals.json and signals.png")
    p.add_argument("--prompts", type=int, default=16, help="held-out one-object prompts (default 16, at most 500)")
    p.add_argument("--steps", type=int, default=28, help="denoising steps (default 28)")
    args = p.parse_args(argv)
    if not 1 <= args.prompts <= 500:
        p.error(f"--prompts must be in 1..500, got {args.prompts}")
    if args.steps < 2:
        p.error(f"--steps must be at least 2, got {args.steps}")
    if not os.path.isdir(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint!r} is not a folder")
    return args


def _rel_l1(a, b):
    """Per image: mean |a - b| / mean |b| over all but the first axis."""
    axes = tuple(range(1, a.ndim))
    return np.abs(a - b).mean(axes) / (np.abs(b).mean(axes) + 1e-8)


def uncached_trajectory(pipe, prompts, steps, probe, size=None, max_sequence_length=None):
    """Run `prompts` uncached (image k: seed k; the model's default size and text length unless given) with
    `probe`, a cell of the transformer's inputs returning (velocity, *tensors); yields (step index, velocity,
    [tensors as numpy]) after each step."""
    import mindspore as ms
    from pipelines.flux_pipeline import latent_image_ids
    from pipelines.scheduling import euler_step, flux_timesteps

    step_fn = ms.jit(probe.construct)
    batch, size = len(prompts), size or pipe.default_size
    seq = max_sequence_length or pipe.default_sequence_length
    embeds, pooled = pipe.encode_prompt(prompts, 1, seq)
    grid = 2 * (size // (2 * pipe.vae_scale_factor))  # latent rows and columns of the image size
    gens = [np.random.default_rng(k) for k in range(batch)]  # image k: seed k, as fbcache_sweep
    x = ms.Tensor(pipe._initial_latents(batch, grid, grid, None, gens, None))
    img_ids, txt_ids = ms.Tensor(latent_image_ids(grid, grid)), ms.Tensor(np.zeros((seq, 3), np.float32))
    guidance = ms.Tensor(np.full(batch, 3.5, np.float32))  # read only by guidance-distilled models
    timesteps, sigmas = flux_timesteps(pipe.scheduler, steps, x.shape[1])
    for i, t in enumerate(timesteps):
        timestep = ms.Tensor(np.full(batch, t / 1000, np.float32))
        v, *tensors = step_fn(x, embeds, pooled, timestep, img_ids, txt_ids, guidance)
        yield i, v, [a.asnumpy() for a in tensors]
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])


def record_signals(pipe, prompts, steps):
    from eval.probes import probe_cell, read_signals
    from fbcache_ms.calibration import FLUX_DEV, teacache_coefficients

    prev, sig = None, {k: [] for k in ("fbcache", "teacache", "teacache_rescaled", "output", "magcache_ratio")}
    poly = np.poly1d(teacache_coefficients(FLUX_DEV))
    probe = probe_cell(pipe.transformer, read_signals)
    for i, v, (modulated, r1, residual) in uncached_trajectory(pipe, prompts, steps, probe):
        v = v.asnumpy()
        if prev is not None:
            pv, pm, pr1, pres = prev
            sig["fbcache"].append(_rel_l1(r1, pr1))
            sig["teacache"].append(_rel_l1(modulated, pm))
            sig["teacache_rescaled"].append(poly(sig["teacache"][-1]))
            sig["output"].append(_rel_l1(v, pv))
            sig["magcache_ratio"].append((np.linalg.norm(residual, axis=-1) / np.linalg.norm(pres, axis=-1)).mean(1))
        prev = (v, modulated, r1, residual)
    return {k: np.stack(v, 1) for k, v in sig.items()}  # [images, steps - 1]


def fbcache_sweep(pipe, prompts, steps):
    """Ideal speedup of FBCache per threshold: mean over prompts of 1 / blocks-run fraction, one image per call."""
    from fbcache_ms.config import CacheConfig
    from tqdm.auto import tqdm

    result = {}
    for th in tqdm(THRESHOLDS, desc="FBCache thresholds"):
        fractions, hits = [], []
        for k, prompt in enumerate(prompts):
            out = pipe(prompt, height=64, width=64, num_inference_steps=steps, max_sequence_length=32,
                       generator=[np.random.default_rng(k)], output_type="latent", progress=False,
                       cache=CacheConfig("fbcache", threshold=th))
            fractions.append(out.cache_stats.block_fraction())
            hits.append(out.cache_stats.hits())
        result[th] = {"ideal_speedup": float(np.mean([1 / f for f in fractions])), "reused_steps": float(np.mean(hits))}
    return result


def plot(sig, sweep, steps, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(1, steps)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))

    def band(ax, values, label, colour):
        ax.plot(x, np.median(values, 0), color=colour, label=f"{label} (median)")
        ax.fill_between(x, np.percentile(values, 10, 0), np.percentile(values, 90, 0), color=colour, alpha=0.2,
                        label=f"{label} (10-90%)")

    ax = axes[0, 0]
    band(ax, sig["fbcache"], "block-0 residual change", "C0")
    for th, style in ((0.08, "--"), (0.12, ":")):
        ax.axhline(th, color="k", ls=style, lw=1, label=f"FLUX threshold {th}")
    ax.set_title("FBCache signal: block 0's residual, relative L1 change per step")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    band(ax, sig["teacache"], "modulated input change", "C1")
    band(ax, sig["teacache_rescaled"], "rescaled by FLUX's polynomial", "C3")
    ax.set_title("TeaCache signal: block 0's modulated input")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    band(ax, sig["output"], "model output change", "C2")
    band(ax, np.abs(1 - sig["magcache_ratio"]), "MagCache |1 - residual norm ratio|", "C4")
    ax.set_title("Output change and MagCache's residual magnitude ratio")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    th = sorted(sweep)
    ax.plot(th, [sweep[t]["ideal_speedup"] for t in th], "o-", color="C0", label="this model: FBCache ideal speedup")
    ax.plot(list(FLUX_DEV_FBCACHE), list(FLUX_DEV_FBCACHE.values()), "s", color="k", ms=8,
            label="FLUX.1-dev published (wall clock)")
    ax.set_xlabel("FBCache threshold")
    ax.set_ylabel(f"speedup at {steps} steps")
    ax.set_title("Do FLUX's thresholds transfer?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    from eval.shapes_data import heldout_prompts
    from pipelines.flux_pipeline import FluxPipeline

    prompts = [s.caption for s in heldout_prompts(args.prompts, 0)]
    pipe = FluxPipeline.from_pretrained(args.checkpoint, mode="graph")
    sig = record_signals(pipe, prompts, args.steps)
    sweep = fbcache_sweep(pipe, prompts, args.steps)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "signals.json"), "w", encoding="utf-8") as f:
        json.dump({"prompts": prompts, "steps": args.steps, "signals": {k: v.tolist() for k, v in sig.items()},
                   "fbcache_sweep": {str(k): v for k, v in sweep.items()},
                   "flux_dev_published": {str(k): v for k, v in FLUX_DEV_FBCACHE.items()}}, f)
    plot(sig, sweep, args.steps, os.path.join(args.out, "signals.png"))
    med = {k: np.median(v, 0) for k, v in sig.items()}
    print(f"per-step medians over {len(prompts)} prompts (steps 1..{args.steps - 1}):")
    for k, v in med.items():
        print(f"  {k:<18} min {v.min():.4f}  median {np.median(v):.4f}  max {v.max():.4f}")
    print("FBCache threshold -> ideal speedup (reused steps of", args.steps, "):")
    for th, r in sweep.items():
        flux = f"   FLUX.1-dev: {FLUX_DEV_FBCACHE[th]:.2f}x" if th in FLUX_DEV_FBCACHE else ""
        print(f"  {th:<5} {r['ideal_speedup']:.2f}x ({r['reused_steps']:.1f}){flux}")
    print(f"wrote {args.out}/signals.json and signals.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
