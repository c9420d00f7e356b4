"""Calibrate TeaCache, MagCache, AFCache and FastCache for one checkpoint: run it uncached on N prompts and record,
per step:
- TeaCache: the relative L1 change of block 0's modulated input (x) and of the model output (y); a degree-4
  least-squares polynomial y ~ poly(x) is what TeaCache's accumulator adds per step (the authors' procedure);
- MagCache: gamma_t, the mean over tokens of |r_t| / |r_t-1| for the block stack's image residual r;
- AFCache: every block's residual at every step; its threshold rule (default schedule, order 2) is replayed per
  block at each threshold of a grid, open loop (the block forecasts from the steps it ran, its stability
  updates when it runs), and the threshold is the lowest at and above which the forecasts miss --target-cosine
  in at most --tolerance of cases; the same again for units of --group-sizes blocks (AFCache's group_size: a
  unit's residual is the sum of its blocks'), each with its own threshold;
- FastCache: the map that predicts a static token's residual (a token a reduced step does not run) from the
  residual of the last step it ran (its anchor), its input change since then and the steps' progress, fitted in
  closed form (ridge) on pairs of steps 1-4 apart, the static tokens of a pair being those outside the top
  --motion-ratio by change over it; written beside the JSON as <name>.fastcache.safetensors, with how well it
  predicts on half the prompts when fitted on the other half, per distance.
  Its normal equations are kept per gap and half, in float64, on the host: 8 x ((3D + 3)^2 + (3D + 3) D) numbers,
  13 MB for the embedded model (D = 128), 7.3 GB for FLUX.1 (D = 3072).
One uncached pass per batch feeds AFCache and FastCache: it holds every block's residual of the call (steps x
blocks x batch x tokens x D float32): 22 MB a prompt for the embedded model, but 90 GB for FLUX.1 at 1024x1024
and 28 steps, which this command does not stream to disk. TeaCache and MagCache read a second pass.
Writes one JSON file (load it with --calibration FILE or CacheConfig(calibration=FILE)) and a plot of the fits
beside it.

The prompts are drawn from the training distribution, never from the held-out evaluation set, so nothing is
tuned on the prompts the benchmarks score.

  python -m eval.calibrate_cache --out fbcache_ms/calibrations/trained-tiny-flux-shapes.json --group-sizes 2 4 8 16
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
    p.add_argument("--target-cosine", type=float, default=0.98,
                   help="AFCache: cosine similarity a block's forecast must reach against its fresh residual "
                        "(default 0.98)")
    p.add_argument("--tolerance", type=float, default=0.1,
                   help="AFCache: fraction of allowed forecasts that may miss --target-cosine (default 0.1)")
    p.add_argument("--group-sizes", type=int, nargs="*", default=[2, 4], metavar="N",
                   help="AFCache: also fit the threshold for units of N blocks (group_size N), each N >= 2 "
                        "(default 2 4; per block is always fitted; none: per block only)")
    p.add_argument("--motion-ratio", type=float, default=0.5,
                   help="FastCache: the motion ratio whose static tokens the map is fitted on (default 0.5, "
                        "FastCache's)")
    p.add_argument("--batch-size", type=int, default=25,
                   help="AFCache: prompts per call; its cosine pools the call, as in generation (default 25, "
                        "benchmark_quality's)")
    args = p.parse_args(argv)
    if not 0.0 < args.target_cosine < 1.0:
        p.error(f"--target-cosine must be in (0, 1), got {args.target_cosine}")
    if not 0.0 <= args.tolerance < 1.0:
        p.error(f"--tolerance must be in [0, 1), got {args.tolerance}")
    if any(g < 2 for g in args.group_sizes):
        p.error(f"--group-sizes must be at least 2 each (per block is always fitted), got {args.group_sizes}")
    args.group_sizes = sorted(set(args.group_sizes))
    if not 0.0 < args.motion_ratio < 1.0:
        p.error(f"--motion-ratio must be in (0, 1) (1 runs every token: nothing static to map), "
                f"got {args.motion_ratio}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 1 <= args.prompts <= 1024:
        p.error(f"--prompts must be in 1..1024, got {args.prompts}")
    if args.steps < 5:
        p.error(f"--steps must be at least 5 (AFCache's default schedule runs the first 4 fully), got {args.steps}")
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


AFCACHE_THRESHOLDS = np.round(np.arange(0.30, 1.0001, 0.02), 2)


def block_trajectories(pipe, prompts, steps, batch_size, **size):
    """Uncached runs of `prompts`, `batch_size` at a time -> per batch (index of its first prompt, the stack's
    image input [steps, B, N, D], every block's residual [steps, blocks, B, text + N, D])."""
    from eval.cache_signals import uncached_trajectory
    from eval.probes import probe_cell, read_block_residuals

    probe = probe_cell(pipe.transformer, read_block_residuals)
    for start in range(0, len(prompts), batch_size):
        trajectory = [tensors for _, _, tensors in uncached_trajectory(pipe, prompts[start:start + batch_size], steps,
                                                                       probe, **size)]
        yield start, np.stack([h for h, _ in trajectory]), np.stack([r for _, r in trajectory])


class AFCacheReplays:
    """AFCache's threshold rule simulated per block, and per unit of each of `group_sizes` blocks
    (fbcache_ms.calibration.simulate_afcache), at each threshold, on every block's residual of uncached runs, a
    batch at a time (add). replays: {group size: (decisions [thresholds], forecast cosines [thresholds][])}."""

    def __init__(self, steps, cache, num_layers, num_single_layers, thresholds=AFCACHE_THRESHOLDS, group_sizes=(1,)):
        from fbcache_ms.afcache import stack_units
        self.full = [cache.is_full_step(i) for i in range(steps)]
        self.order, self.thresholds = cache.order, thresholds
        self.bounds = {g: stack_units(num_layers, num_single_layers, g) for g in group_sizes}
        self.replays = {g: (np.zeros(len(thresholds), int), [[] for _ in thresholds]) for g in group_sizes}

    def add(self, residuals):
        """residuals: [steps, blocks, ...] of one batch."""
        from fbcache_ms.afcache import EMA_KEEP, START
        from fbcache_ms.calibration import simulate_afcache, unit_residuals
        for g, (decisions, cosines) in self.replays.items():
            unit = residuals if g == 1 else unit_residuals(residuals, self.bounds[g])
            for b in range(unit.shape[1]):
                for k, threshold in enumerate(self.thresholds):
                    d, c, _ = simulate_afcache(unit[:, b], self.full, threshold, self.order, EMA_KEEP, START)
                    decisions[k] += d
                    cosines[k] += c


class StaticMapHalves:
    """FastCache's static-token map (fbcache_ms.calibration.StaticMapFit) fitted on uncached runs a batch at a time
    (add), on each half of the prompts (prompt k goes to half k % 2), to fit it on all and score it on the half
    it was not fitted on (solve)."""

    def __init__(self, motion_ratio):
        from fbcache_ms.calibration import StaticMapFit
        self.halves = [StaticMapFit(motion_ratio), StaticMapFit(motion_ratio)]

    def add(self, start, inputs, residuals):
        """start: index of the batch's first prompt; the stack's image input and residual, [steps, B, N, D]."""
        for half, fit in enumerate(self.halves):
            first = (half - start) % 2
            if inputs.shape[1] > first:
                fit.add(inputs[:, first::2], residuals[:, first::2])

    def solve(self):
        """-> (map [3D + 3, D], {steps between the pair, and "all": {"stale", "mapped" dB on the other half}})."""
        from fbcache_ms.calibration import to_db
        a, b = self.halves
        held_out = {}
        if b.rows:
            for fitted, scored in ((a, b), (b, a)):
                for gap, errors in scored.squared_errors(fitted.solve()).items():
                    held_out[gap] = [x + y for x, y in zip(held_out.get(gap, (0.0, 0.0, 0.0)), errors)]
        scores = {str(g): {"stale": to_db(s, r), "mapped": to_db(m, r)} for g, (s, m, r) in sorted(held_out.items())}
        if held_out:
            s, m, r = (sum(e[k] for e in held_out.values()) for k in range(3))
            scores["all"] = {"stale": to_db(s, r), "mapped": to_db(m, r)}
        return a.merged(b).solve(), scores


def calibrate(pipe, prompts, steps, target_cosine=0.98, tolerance=0.1, batch_size=25, group_sizes=(),
              motion_ratio=0.5):
    """-> (calibration dict, signals, FastCache's static map) from uncached runs of `prompts`."""
    from eval.cache_signals import record_signals
    from fbcache_ms import calibration as calib
    from fbcache_ms.config import CacheConfig

    cache = CacheConfig("afcache", order=2)  # its default schedule: the one `--calibration` alone runs
    cfg = pipe.transformer.config
    afcache = AFCacheReplays(steps, cache, cfg.num_layers, cfg.num_single_layers, group_sizes=(1, *group_sizes))
    fastcache = StaticMapHalves(motion_ratio)
    for start, inputs, residuals in block_trajectories(pipe, prompts, steps, batch_size):  # one pass feeds both
        afcache.add(residuals)
        # the stack's image residual is the sum of its blocks' (the image tokens are the last N of every block's)
        fastcache.add(start, inputs, residuals[:, :, :, -inputs.shape[2]:].sum(axis=1))
    replays = afcache.replays
    fits = {g: calib.fit_afcache_threshold(AFCACHE_THRESHOLDS, d, c, target_cosine, tolerance)
            for g, (d, c) in replays.items()}
    decisions, cosines = replays[1]
    threshold, fraction, missed = fits[1]
    sig = record_signals(pipe, prompts, steps)
    sig["afcache_miss"] = {g: calib.miss_rates(c, target_cosine) for g, (_, c) in replays.items()}
    sig["afcache_forecast"] = {g: [len(c) / max(d, 1) for c, d in zip(cs, ds)] for g, (ds, cs) in replays.items()}
    coefficients, r2 = calib.fit_teacache(sig["teacache"], sig["output"])
    data = {"steps": steps, "prompts": len(prompts),
            "teacache": {"coefficients": coefficients, "r2": r2, "points": int(sig["teacache"].size),
                         "input_change_range": [float(sig["teacache"].min()), float(sig["teacache"].max())]},
            "magcache": {"ratios": calib.mean_magnitude_ratios(sig["magcache_ratio"]),
                         "ratio_std_over_prompts": [0.0] + [float(v) for v in sig["magcache_ratio"].std(0)]},
            "afcache": {"threshold": threshold, "target_cosine": target_cosine, "tolerance": tolerance,
                        "forecast_fraction": fraction, "miss_rate": missed, "order": cache.order,
                        "warmup": cache.warmup, "interval": cache.interval, "batch_size": batch_size,
                        "decisions": int(decisions[0]),
                        "by_group_size": {str(g): {"threshold": t, "forecast_fraction": f, "miss_rate": m,
                                                   "decisions": int(replays[g][0][0])}
                                          for g, (t, f, m) in fits.items() if g > 1}}}
    static_map, held_out = fastcache.solve()
    data["fastcache"] = {"motion_ratio": motion_ratio, "ridge": calib.STATIC_MAP_RIDGE, "held_out_db": held_out}
    return data, sig, static_map


def plot(data, sig, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fbcache_ms.calibration import FLUX_DEV, load_calibration

    flux = load_calibration(FLUX_DEV)
    x, y = sig["teacache"].ravel(), sig["output"].ravel()
    fit = np.asarray(data["teacache"]["coefficients"])
    grid = np.linspace(0, x.max() * 1.05, 200)
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
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
    ax = axes[3]
    af = data["afcache"]
    fits = {1: af, **{int(g): e for g, e in af["by_group_size"].items()}}
    for colour, (g, fit) in enumerate(sorted(fits.items())):
        ax.plot(AFCACHE_THRESHOLDS, sig["afcache_forecast"][g], "-", color=f"C{colour}",
                label=f"{'per block' if g == 1 else f'units of {g}'}: threshold {fit['threshold']:.2f}, forecasts "
                      f"{fit['forecast_fraction']:.0%}, {fit['miss_rate']:.0%} miss")
        ax.plot(AFCACHE_THRESHOLDS, sig["afcache_miss"][g], "--", color=f"C{colour}")
        ax.axvline(fit["threshold"], color=f"C{colour}", lw=0.8)
    ax.plot([], [], "k-", label="solid: decisions forecast")
    ax.plot([], [], "k--", label=f"dashed: forecasts below cosine {af['target_cosine']:g}")
    ax.axhline(af["tolerance"], color="k", ls=":", label=f"tolerance {af['tolerance']:g}")
    ax.set_xlabel("stability threshold (the rule replayed per block / unit)")
    ax.set_ylabel("fraction")
    ax.set_title(f"AFCache threshold (order {af['order']}, warm-up {af['warmup']}, interval {af['interval']})")
    ax.legend(fontsize=6, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    from fbcache_ms.calibration import save_calibration, save_static_map
    from pipelines.flux_pipeline import FluxPipeline

    pipe = FluxPipeline.from_pretrained(args.checkpoint)
    data, sig, static_map = calibrate(pipe, args.prompt_list, args.steps, args.target_cosine, args.tolerance,
                                      args.batch_size, args.group_sizes, args.motion_ratio)
    data = {"model": os.path.basename(os.path.normpath(args.checkpoint)),
            "source": f"python -m eval.calibrate_cache: {len(args.prompt_list)} prompts, {args.steps} steps", **data}
    data["fastcache"].update(save_static_map(args.out, static_map))  # the weights first: the JSON names them
    save_calibration(args.out, data)
    png = args.out[:-len(".json")] + ".png"
    plot(data, sig, png)
    print(f"wrote {args.out} and {png}: TeaCache fit R^2 {data['teacache']['r2']:.3f} over "
          f"{data['teacache']['points']} points; MagCache ratios "
          f"{min(data['magcache']['ratios']):.3f}..{max(data['magcache']['ratios']):.3f}; AFCache threshold "
          f"{data['afcache']['threshold']:.3f} (forecasts {data['afcache']['forecast_fraction']:.0%} of block "
          f"decisions, {data['afcache']['miss_rate']:.0%} below cosine {data['afcache']['target_cosine']:g})"
          + "".join(f"; in units of {g}: {e['threshold']:.3f} (forecasts {e['forecast_fraction']:.0%})"
                    for g, e in data["afcache"]["by_group_size"].items())
          + "; FastCache static map, on held-out prompts: "
          + (", ".join(f"{g} steps apart {e['stale']:.1f} -> {e['mapped']:.1f} dB"
                       for g, e in data["fastcache"]["held_out_db"].items()) or "not scored (one prompt)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
