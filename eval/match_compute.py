"""Equal-compute settings: for each target fraction of blocks run (of an uncached call), the setting of every
method that comes closest, found on calibration prompts (training captions, never the held-out set):
- TaylorSeer (per_module and residual, order 1) and FORA (TaylorSeer residual at order 0: the stack's residual
  reused as stored): the (warmup, interval) schedule whose full steps come closest (exact arithmetic, no run
  needed). FORA is AFCache's reuse spent on whole steps instead of on blocks;
- AFCache: budget = the target, on its own schedule (--afcache-warmup, --afcache-interval) with predictors up to
  --afcache-order (default 0, reuse only: on the embedded model its Taylor forecasts cost quality wherever they
  are chosen; README); and, where the calibration has one, AFCache at its calibrated threshold and order (not
  matched: its fraction is what it is);
- FBCache, TeaCache (the model's own calibration) and FastCache (motion ratio 1 and 0.5): the blocks each
  ran over a threshold sweep on the calibration batch, interpolated (in log threshold) to each target. A
  target outside a method's sweep is left out for that method, and said so.
The fractions of threshold methods are the calibration batch's: on the held-out prompts they land near the
target, not on it (benchmark_quality reports the fraction each setting really ran).
Writes the settings file for `python -m eval.benchmark_quality --settings-file` and, beside it, a plot of the
sweeps (fraction of blocks run against threshold) and a JSON of the sweep points.

  python -m eval.match_compute --out results/shapes-model/equal_compute_settings.json
"""
import argparse
import gc
import os
import sys

import numpy as np

from utils import EMBEDDED_MODEL, write_json_atomic

SWEEPS = {  # name -> (CacheConfig arguments without threshold, thresholds)
    "fbcache": (dict(method="fbcache"), np.geomspace(0.02, 0.6, 9)),
    "teacache-own": (dict(method="teacache"), np.geomspace(0.05, 3.0, 9)),
    "fastcache-m1": (dict(method="fastcache", motion_ratio=1.0), np.geomspace(0.01, 0.3, 9)),
    "fastcache-m0.5": (dict(method="fastcache", motion_ratio=0.5), np.geomspace(0.01, 0.3, 9)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.match_compute", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="settings JSON to write (sweep plot and points go beside it)")
    p.add_argument("--checkpoint", default=EMBEDDED_MODEL, help="model folder (default: the embedded model)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.6, 0.4, 0.25],
                   help="target fractions of an uncached call's blocks (default 0.6 0.4 0.25)")
    p.add_argument("--calibration", default=None,
                   help="the model's TeaCache calibration JSON (default: the embedded model's own)")
    p.add_argument("--prompts", type=int, default=25, help="calibration prompts (training captions; default 25)")
    p.add_argument("--batch-size", type=int, default=25,
                   help="prompts per call, as benchmark_quality's: the caches decide per call (default 25)")
    p.add_argument("--steps", type=int, default=28, help="denoising steps (default 28)")
    p.add_argument("--afcache-warmup", type=int, default=3, help="AFCache full steps at the start (default 3)")
    p.add_argument("--afcache-interval", type=int, default=10,
                   help="AFCache: a full step every N steps after the warm-up (default 10)")
    p.add_argument("--afcache-order", type=int, default=0, choices=(0, 1, 2),
                   help="AFCache's highest predictor: 0 reuse only, 1 and 2 add Taylor forecasts (default 0)")
    args = p.parse_args(argv)
    if not args.out.endswith(".json"):
        p.error(f"--out must name a .json file, got {args.out!r}")
    if not all(0.0 < f < 1.0 for f in args.fractions):
        p.error(f"--fractions must be in (0, 1), got {args.fractions}")
    for name, value, low in (("--prompts", args.prompts, 1), ("--batch-size", args.batch_size, 1),
                             ("--steps", args.steps, 3), ("--afcache-warmup", args.afcache_warmup, 1),
                             ("--afcache-interval", args.afcache_interval, 1)):
        if value < low:
            p.error(f"{name} must be at least {low}, got {value}")
    if not os.path.isdir(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint!r} is not a folder")
    if args.calibration is None:
        from fbcache_ms.calibration import CALIBRATIONS
        args.calibration = os.path.join(CALIBRATIONS, os.path.basename(os.path.normpath(args.checkpoint)) + ".json")
    if not os.path.isfile(args.calibration):
        p.error(f"--calibration {args.calibration!r} does not exist (python -m eval.calibrate_cache writes one)")
    from fbcache_ms.config import CacheConfig
    af_full = sum(CacheConfig("afcache", warmup=args.afcache_warmup, interval=args.afcache_interval).is_full_step(i)
                  for i in range(args.steps))
    if min(args.fractions) < af_full / args.steps:
        p.error(f"--fractions {min(args.fractions):g} is below AFCache's full steps alone ({af_full} of {args.steps}): "
                "raise --afcache-interval or lower --afcache-warmup")
    return args


def taylorseer_schedule(fraction, steps):
    """(warmup, interval) whose full steps come closest to `fraction` of `steps` (ties: warm-up nearest 3)."""
    from fbcache_ms.config import CacheConfig
    best = None
    for warmup in range(1, 7):
        for interval in range(1, steps):
            full = sum(CacheConfig("taylorseer", warmup=warmup, interval=interval).is_full_step(i) for i in range(steps))
            key = (abs(full / steps - fraction), abs(warmup - 3), interval)
            if best is None or key < best[0]:
                best = (key, warmup, interval, full / steps)
    return best[1:]


def sweep(pipe, prompts, steps, batch_size, base, thresholds):
    """Fraction of blocks run at each threshold, over the calibration prompts."""
    from fbcache_ms.config import CacheConfig
    fractions = []
    for th in thresholds:
        cache = CacheConfig(**base, threshold=float(th))
        run = total = 0.0
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            out = pipe(batch, num_inference_steps=steps, height=64, width=64, max_sequence_length=32,
                       generator=[np.random.default_rng(start + k) for k in range(len(batch))],
                       output_type="latent", progress=False, cache=cache)
            run += out.cache_stats.block_fraction() * len(batch)
            total += len(batch)
        fractions.append(run / total)
    pipe._policies.clear()  # this method's compiled graphs: free them before the next method compiles its own
    gc.collect()
    return fractions


def threshold_for(fraction, thresholds, fractions):
    """Interpolated threshold giving `fraction` (fractions fall as thresholds rise), or None outside the sweep."""
    f = np.minimum.accumulate(np.asarray(fractions, np.float64))  # monotone: noise must not fold the curve
    if not f[-1] <= fraction <= f[0]:
        return None
    return float(np.exp(np.interp(fraction, f[::-1], np.log(np.asarray(thresholds))[::-1])))


def plot(points, targets, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, pts in points.items():
        ax.plot(pts["thresholds"], pts["fractions"], "o-", ms=4, label=name)
    for f in targets:
        ax.axhline(f, color="k", lw=0.7, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("threshold (each method's own units)")
    ax.set_ylabel("fraction of blocks run (calibration batch)")
    ax.set_title("equal-compute matching: dashed lines are the targets")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    from tqdm.auto import tqdm
    from eval.shapes_data import training_sample
    from pipelines.flux_pipeline import FluxPipeline

    first = 987_654_321  # the calibration prompts of eval.calibrate_cache: far from the training stream's start
    prompts = [training_sample(first + k).caption for k in range(args.prompts)]
    pipe = FluxPipeline.from_pretrained(args.checkpoint, mode="graph")
    points = {}
    for name, (base, thresholds) in tqdm(SWEEPS.items(), desc="threshold sweeps", unit="method"):
        if base["method"] == "teacache":
            base = dict(base, calibration=os.path.relpath(args.calibration))  # commands run from the project root
        points[name] = dict(base=base, thresholds=[float(t) for t in thresholds],
                            fractions=sweep(pipe, prompts, args.steps, args.batch_size, base, thresholds))
        print(name, " ".join(f"{t:.3g}:{f:.2f}" for t, f in zip(thresholds, points[name]["fractions"])), flush=True)

    settings, missing = {}, []
    for target in args.fractions:
        tag = f"{target:g}"
        settings[f"afcache-b{tag}"] = dict(method="afcache", budget=target, order=args.afcache_order,
                                           warmup=args.afcache_warmup, interval=args.afcache_interval)
        warmup, interval, got = taylorseer_schedule(target, args.steps)
        for variant in ("per_module", "residual"):
            settings[f"taylorseer-{variant}-b{tag}"] = dict(method="taylorseer", order=1, warmup=warmup,
                                                            interval=interval, variant=variant)
        settings[f"fora-b{tag}"] = dict(method="taylorseer", order=0, warmup=warmup, interval=interval,
                                        variant="residual")
        for name, pts in points.items():
            th = threshold_for(target, pts["thresholds"], pts["fractions"])
            if th is None:
                missing.append(f"{name} at {tag}")
            else:
                settings[f"{name}-b{tag}"] = dict(pts["base"], threshold=round(th, 4))
    from fbcache_ms.calibration import load_calibration
    af = load_calibration(args.calibration).get("afcache")
    if af:  # not equal compute: its calibrated threshold on the schedule it was calibrated for, beside
        settings["afcache-calibrated"] = dict(method="afcache", order=af.get("order", 2), warmup=af.get("warmup", 3),
                                              interval=af.get("interval", 5),
                                              calibration=os.path.relpath(args.calibration))
    stem = args.out[:-len(".json")]
    for path, data in ((args.out, settings), (stem + "_sweeps.json", points)):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_json_atomic(path, data)
    plot(points, args.fractions, stem + "_sweeps.png")
    print(f"wrote {args.out} ({len(settings)} settings), {stem}_sweeps.json and {stem}_sweeps.png")
    if missing:
        print("outside the sweeps (left out): " + ", ".join(missing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
