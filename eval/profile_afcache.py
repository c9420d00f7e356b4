"""What AFCache's no-hit overhead is made of: AFCache at threshold 1 (every block runs, so only its
bookkeeping differs from the uncached model) timed against the uncached model with parts of that bookkeeping
removed, each variant in its own process:

  full            AFCache as it is
  no-stability    the per-block cosine / stability update skipped
  no-taylor       the per-block Newton-difference update and clock skipped
  no-bookkeeping  both skipped: what is left is the per-block tensor `if` and the decision

The variants compute wrong caches on purpose (nothing is reused at threshold 1, so the images are unchanged,
but the state is): this measures cost, never output. Each variant: alternating short runs, uncached and
AFCache, median step of each.

  python -m eval.profile_afcache                  # FLUX-proportioned random model, 256x256, 64 text tokens
  python -m eval.profile_afcache --group-size 4   # one decision per 4 blocks (4 times fewer tensor ifs)
"""
import argparse
import json

import numpy as np

from eval.profile_step import add_model_arguments, check_model_arguments, comma_choices, run_workers
from utils import write_json_atomic

VARIANTS = ("full", "no-stability", "no-taylor", "no-bookkeeping")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--steps", type=int, default=4, help="steps of each timed run (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="alternating uncached / AFCache rounds (default 3)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--group-size", type=int, default=1,
                   help="AFCache's blocks per decision unit (default 1: one tensor if per block)")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: time one variant in this process
    args = p.parse_args(argv)
    args.variants = comma_choices(p, args.variants, VARIANTS, "--variants")
    check_model_arguments(p, args, steps=args.steps, rounds=args.rounds, group_size=args.group_size)
    return args


def _skip_stability(self, *args):
    return None


def _skip_gram(self, *args):
    return self.no_gram


def _skip_update(self, x, scales):
    return x


def _skip_advance(self, *args):
    return None


def time_variant(args):
    """Worker: AFCache with args.worker's parts removed, alternating with the uncached model -> dict."""
    from fbcache_ms import afcache, state
    from fbcache_ms.config import CacheConfig
    from pipelines.flux_pipeline import FluxPipeline

    if args.worker in ("no-stability", "no-bookkeeping"):
        afcache.AFCache._stability_update = _skip_stability
        afcache.AFCache._gram = _skip_gram
    if args.worker in ("no-taylor", "no-bookkeeping"):
        state.TaylorFeature.update = _skip_update
        state.NewtonClock.advance = _skip_advance
    pipe = FluxPipeline.from_pretrained(args.checkpoint, dtype="float32", mode="graph")
    call = dict(prompt="a photo of a cat on a wooden table", height=args.height, width=args.width,
                num_inference_steps=args.steps, max_sequence_length=args.text_tokens, seed=0, progress=False,
                output_type="latent")
    cache = CacheConfig("afcache", threshold=1.0, order=2, group_size=args.group_size)
    pipe(**call)
    pipe(**call, cache=cache)  # compile both first
    uncached, cached = [], []
    for _ in range(args.rounds):
        uncached += pipe(**call).timings["steps"]
        out = pipe(**call, cache=cache)
        cached += out.timings["steps"]
    # whether the stability update ran: every stability starts at 0.5 and moves only through it
    moved = bool(np.any(np.abs(np.asarray(out.cache_stats.stability["cond"][-1]) - 0.5) > 1e-6))
    return dict(variant=args.worker, cache=cache.describe(), uncached_step_s=float(np.median(uncached)),
                afcache_step_s=float(np.median(cached)),
                overhead=float(np.median(cached) / np.median(uncached) - 1), stability_moved=moved)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(time_variant(args)))
        return
    from eval.make_tiny_checkpoint import checkpoint_or_flux_proportioned

    with checkpoint_or_flux_proportioned(args.checkpoint, variant="dev") as checkpoint:
        results = run_workers("eval.profile_afcache", args.variants,
                              ["--checkpoint", checkpoint, "--height", str(args.height), "--width", str(args.width),
                               "--text-tokens", str(args.text_tokens), "--steps", str(args.steps), "--rounds",
                               str(args.rounds), "--group-size", str(args.group_size)])
    print(f"\n{args.checkpoint or 'FLUX-proportioned random model'}, {args.height}x{args.width}, {args.text_tokens} "
          f"text tokens, fp32, AFCache order 2 at threshold 1, units of {args.group_size} blocks, {args.rounds} "
          f"rounds of {args.steps} steps\n")
    print("| variant | uncached step s | AFCache step s | overhead |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['uncached_step_s']:.3f} | {r['afcache_step_s']:.3f} | {r['overhead']:+.1%} |")
    if args.json:
        write_json_atomic(args.json, dict(args={k: v for k, v in vars(args).items() if k != "worker"}, results=results),
                          indent=2)


if __name__ == "__main__":
    main()
