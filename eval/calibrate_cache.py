"""Calibrate TeaCache and MagCache for one checkpoint: run it uncached on N prompts and record per step
- TeaCache: the relative L1 change of block 0's modulated input (x) and of the model output (y); a degree-4
  least-squares polynomial y ~ poly(x) is what TeaCache's accumulator adds per step (the authors' procedure);
- MagCache: gamma_t, the mean over tokens of |r_t| / |r_t-1| for the block stack's image residual r.
Writes one JSON file (load it with --calibration FILE or CacheConfig(calibration=FILE)) and a plot of the fit
and its residuals beside it.

The prompts are drawn from the training distribution, never from the held-out evaluation set, so nothing is
tuned on the prompts the benchmarks score.

  python -m eval.calibrate_cache --out fbcache_ms/calibrations/trained-tiny-flux-shapes.json
"""
import argparse
import os
import sys

import numpy as np

from utils import EMBEDDED_MODEL


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.calibrate_cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=EMBEDDED_MODEL, help="model folder (default: the embedded model)")
    p.add_argument("--out", required=True, help="calibration JSON to write (the plot goes beside it, .png)")
    p.add_argument("--prompts", type=int, default=32,
                   help="prompts to run (default 32): training captions for the embedded model")
    p.add_argument("--prompt-file", help="one prompt a line instead (UTF-8), for other models")
    p.add_argument("--steps", type=int, default=28, help="denoising steps (default 28)")
    args = p.parse_args(argv)
    if not 1 <= args.prompts <= 1024:
        p.error(f"--prompts must be in 1..1024, got {args.prompts}")
    if args.steps < 3:
        p.error(f"--steps must be at least 3, got {args.steps}")
    if not os.path.isdir(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint!r} is not a folder")
    if not args.out.endswith(".json"):
        p.error(f"--out must name a .json file, got {args.out!r}")
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                args.prompt_list = [line.strip() for line in f if line.strip()][:args.prompts]
        except (OSError, UnicodeDecodeError) as e:
            p.error(f"--prompt-file {args.prompt_file!r} cannot be read: {e}")
        if not args.prompt_list:
            p.error(f"--prompt-file {args.prompt_file!r} has no prompts")
    else:
        from eval.shapes_data import training_sample
        first = 987_654_321  # far from the training stream's start
        args.prompt_list = [training_sample(first + k).caption for k in range(args.prompts)]
    return args


def calibrate(pipe, prompts, steps):
    """-> (calibration dict, signals) from an uncached run of `prompts`."""
    from eval.cache_signals import record_signals
    from fbcache_ms import calibration as calib

    sig = record_signals(pipe, prompts, steps)
    coefficients, r2 = calib.fit_teacache(sig["teacache"], sig["output"])
    data = {"steps": steps, "prompts": len(prompts),
            "teacache": {"coefficients": coefficients, "r2": r2, "points": int(sig["teacache"].size),
                         "input_change_range": [float(sig["teacache"].min()), float(sig["teacache"].max())]},
            "magcache": {"ratios": calib.mean_magnitude_ratios(sig["magcache_ratio"]),
                         "ratio_std_over_prompts": [0.0] + [float(v) for v in sig["magcache_ratio"].std(0)]}}
    return data, sig


def plot(data, sig, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fbcache_ms.calibration import FLUX_DEV, load_calibration

    flux = load_calibration(FLUX_DEV)
    x, y = sig["teacache"].ravel(), sig["output"].ravel()
    fit = np.asarray(data["teacache"]["coefficients"])
    grid = np.linspace(0, x.max() * 1.05, 200)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.scatter(x, y, s=4, alpha=0.4, label="per image and step")
    ax.plot(grid, np.polyval(fit, grid), "C1", label=f"degree-4 fit (R^2 {data['teacache']['r2']:.3f})")
    ax.plot(grid, np.polyval(flux["teacache"]["coefficients"], grid), "C2--", label="FLUX.1-dev's published")
    ax.set_xlabel("relative change of block 0's modulated input")
    ax.set_ylabel("relative change of the model output")
    ax.set_title("TeaCache rescaling")
    ax.set_ylim(0, max(y.max() * 1.2, 1e-3))
    ax.legend()
    ax = axes[1]
    ax.scatter(x, y - np.polyval(fit, x), s=4, alpha=0.4)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("relative change of block 0's modulated input")
    ax.set_title("fit residuals")
    ax = axes[2]
    ratios = data["magcache"]["ratios"]
    ax.errorbar(np.arange(len(ratios)), ratios, yerr=data["magcache"]["ratio_std_over_prompts"], fmt="o-", ms=3,
                label="this model (mean, std over prompts)")
    published = flux["magcache"]["ratios"]
    ax.plot(np.linspace(0, len(ratios) - 1, len(published)), published, "C2--", label="FLUX.1-dev's published")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xlabel("step")
    ax.set_title("MagCache magnitude ratio |r_t| / |r_t-1|")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    from fbcache_ms.calibration import save_calibration
    from pipelines.flux_pipeline import FluxPipeline

    pipe = FluxPipeline.from_pretrained(args.checkpoint)
    data, sig = calibrate(pipe, args.prompt_list, args.steps)
    data = {"model": os.path.basename(os.path.normpath(args.checkpoint)),
            "source": f"python -m eval.calibrate_cache: {len(args.prompt_list)} prompts, {args.steps} steps", **data}
    save_calibration(args.out, data)
    png = args.out[:-len(".json")] + ".png"
    plot(data, sig, png)
    print(f"wrote {args.out} and {png}: TeaCache fit R^2 {data['teacache']['r2']:.3f} over "
          f"{data['teacache']['points']} points; MagCache ratios "
          f"{min(data['magcache']['ratios']):.3f}..{max(data['magcache']['ratios']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
