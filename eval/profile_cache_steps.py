"""Measured / ideal speedup of cache methods, step by step against the uncached model on the same inputs.

The side-by-side benchmark times whole images in alternating rounds; on a shared 2-core host its measured /
ideal column moves by about 0.1 between runs of the same code. Here one process records one cached run of each
method (the latents entering every step), then replays it `--rounds` times: each step of the method (its state
reset before every replay, so it takes the same decisions on the same inputs) is timed next to the compiled
uncached transformer on the same inputs, in alternating order. Both see the same moment of the machine, so
their ratio is steadier. Per method: measured = sum over steps of the uncached step's median / the method's,
ideal = blocks an uncached run runs / blocks the method ran, efficiency = measured / ideal; the table also gives
the range of each single replay's efficiency (on the 2-core test machine about +-0.03: differences smaller than
that are not the code's). Step times hold the transformer (or the method's policy step) only, not the Euler
update.

  python -m eval.profile_cache_steps                      # FLUX-proportioned random model, 256x256, 8 steps
  python -m eval.profile_cache_steps --checkpoint DIR --methods fbcache,taylorseer --rounds 6 --json out.json
"""
import argparse
import os
import time

import numpy as np

from eval.benchmark_vs_diffusers import PROMPT, fbcache_threshold_from_model, initial_noise
from eval.profile_step import add_model_arguments, check_model_arguments, comma_choices
from fbcache_ms.config import METHODS
from utils import write_json_atomic, write_text_atomic

CACHED = [m for m in METHODS if m != "none"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--steps", type=int, default=8, help="denoising steps (default 8)")
    p.add_argument("--rounds", type=int, default=4, help="timed replays after one untimed one (default 4)")
    p.add_argument("--methods", default="fbcache,taylorseer,magcache",
                   help="comma-separated subset of: " + ", ".join(CACHED) + " (default fbcache,taylorseer,magcache;"
                        " each with its defaults, FBCache and FBCache+TaylorSeer with --fbcache-threshold)")
    p.add_argument("--fbcache-threshold", type=float, default=None,
                   help="FBCache and FBCache+TaylorSeer threshold (default: the 40th percentile of this model's own "
                        "block-0 changes, so that a random model reuses steps too)")
    p.add_argument("--json", help="write every figure to this JSON file")
    p.add_argument("--markdown", help="write the table to this markdown file")
    args = p.parse_args(argv)
    args.methods = comma_choices(p, args.methods, CACHED, "--methods")
    if args.fbcache_threshold is not None and not 0 <= args.fbcache_threshold <= 1:
        p.error("--fbcache-threshold must be in [0, 1]")
    check_model_arguments(p, args, steps=args.steps, rounds=args.rounds)
    return args


class Replay:
    """One prompt's fixed inputs, the method's policy step and the uncached transformer, as the pipeline runs them."""

    def __init__(self, pipe, args):
        import mindspore as ms
        from pipelines.flux_pipeline import latent_image_ids
        from pipelines.scheduling import flux_timesteps
        self.pipe, self.args = pipe, args
        self.embeds, self.pooled = pipe.encode_prompt([PROMPT], 1, args.text_tokens)
        multiple = 2 * pipe.vae_scale_factor
        grid_h, grid_w = 2 * (args.height // multiple), 2 * (args.width // multiple)
        self.grid = (grid_h // 2, grid_w // 2)
        self.noise = initial_noise(pipe, args)  # the side-by-side benchmark's
        self.tokens = self.noise.shape[1]
        self.img_ids = ms.Tensor(latent_image_ids(grid_h, grid_w))
        self.txt_ids = ms.Tensor(np.zeros((args.text_tokens, 3), np.float32))
        self.guidance = ms.Tensor(np.full(1, 3.5, np.float32))
        self.timesteps, self.sigmas = flux_timesteps(pipe.scheduler, args.steps, self.tokens)

    def _timestep(self, i):
        import mindspore as ms
        return ms.Tensor(np.full(1, self.timesteps[i], np.float32), self.pipe.dtype) / 1000

    def policy(self, cache):
        """The pipeline's own policy cell and compiled step for `cache`, its state reset (and loaded, as the
        pipeline does)."""
        policy, step = self.pipe.cache_policy(cache, "cond", 1, self.tokens, self.args.text_tokens, self.grid)
        policy.reset()
        policy.load(cache)
        return policy, step

    def record(self, cache):
        """Run the method once as the pipeline does -> (latents entering each step, final latents, CacheStats,
        computed flags)."""
        import mindspore as ms
        from fbcache_ms.stats import CacheStats
        from pipelines.scheduling import euler_step
        policy, step = self.policy(cache)
        stats = CacheStats(cache.method, self.pipe.transformer.num_blocks, state_bytes=policy.state_bytes())
        x, inputs, flags = ms.Tensor(self.noise, self.pipe.dtype), [], []
        for i in range(len(self.timesteps)):
            inputs.append(x)
            v, computed, signal = step(x, self.embeds, self.pooled, self._timestep(i), self.img_ids, self.txt_ids,
                                       self.guidance, *policy.step_inputs(cache, i, len(self.timesteps)))
            policy.record(stats, "cond", i, computed, signal)
            flags.append(bool(computed.asnumpy()))
            x = euler_step(x, v, self.sigmas[i], self.sigmas[i + 1])
        return inputs, x.asnumpy(), stats, flags

    def time_steps(self, cache, inputs, method_first):
        """One replay -> per step (method seconds, uncached seconds, computed)."""
        policy, step = self.policy(cache)
        rows = []
        for i, x in enumerate(inputs):
            t = self._timestep(i)
            model_inputs = (x, self.embeds, self.pooled, t, self.img_ids, self.txt_ids, self.guidance)
            timed = {}
            for which in (("method", "uncached") if method_first else ("uncached", "method")):
                start = time.perf_counter()
                if which == "method":
                    v, computed, _ = step(*model_inputs, *policy.step_inputs(cache, i, len(inputs)))
                else:
                    v = self.pipe._transformer(*model_inputs)
                v.asnumpy()
                timed[which] = time.perf_counter() - start
            rows.append((timed["method"], timed["uncached"], bool(computed.asnumpy())))
        return rows


def profile_method(replay, cache, rounds):
    inputs, final, stats, flags = replay.record(cache)
    replay.time_steps(cache, inputs, True)  # untimed: compiles whatever the recording did not
    per_round = [replay.time_steps(cache, inputs, r % 2 == 0) for r in range(rounds)]
    if any([c for _, _, c in rows] != flags for rows in per_round):
        raise RuntimeError(f"{cache.method}: a replay took other decisions than the recorded run")  # state leaked
    method_s = np.median([[m for m, _, _ in rows] for rows in per_round], axis=0)
    uncached_s = np.median([[u for _, u, _ in rows] for rows in per_round], axis=0)
    measured = float(uncached_s.sum() / method_s.sum())
    ideal = 1 / stats.block_fraction()
    # each replay's own measured / ideal: how far one replay's figure moves on this machine
    per_replay = [sum(u for _, u, _ in rows) / sum(m for m, _, _ in rows) / ideal for rows in per_round]
    return dict(method=cache.method, setting=cache.describe(), threshold=cache.threshold, pattern=stats.pattern(),
                method_step_s=method_s.tolist(), uncached_step_s=uncached_s.tolist(),
                blocks_run=stats.blocks_run["cond"], state_bytes=stats.state_bytes, measured=measured, ideal=ideal,
                efficiency=measured / ideal, efficiency_per_replay=per_replay, final_latents=final)


def run(args, checkpoint):
    from tqdm.auto import tqdm
    from fbcache_ms.config import CacheConfig
    from pipelines.flux_pipeline import FluxPipeline
    replay = Replay(FluxPipeline.from_pretrained(checkpoint), args)
    results, threshold = [], args.fbcache_threshold
    for method in tqdm(args.methods, desc="methods"):
        kwargs = {}
        if method in ("fbcache", "fbcache_taylorseer"):
            if threshold is None:
                threshold = fbcache_threshold_from_model(replay.pipe, args, replay.noise)
            kwargs["threshold"] = threshold
        results.append(profile_method(replay, CacheConfig(method, **kwargs), args.rounds))
    return results


def report(results):
    lines = ["| setting | pattern | method s / image | uncached s / image | full step / uncached | "
             "reused step / uncached | measured | ideal | measured / ideal | one replay's | state MiB |", "|---" * 11 + "|"]
    for r in results:
        ratio = np.array(r["method_step_s"]) / np.array(r["uncached_step_s"])
        full = [q for q, c in zip(ratio, r["pattern"]) if c == "C"]
        reused = [q for q, c in zip(ratio, r["pattern"]) if c == "."]
        span = lambda v, digits=3: f"{min(v):.{digits}f}-{max(v):.{digits}f}" if v else "-"  # noqa: E731
        lines.append(f"| {r['setting']} | `{r['pattern']}` | {sum(r['method_step_s']):.2f} | "
                     f"{sum(r['uncached_step_s']):.2f} | {span(full)} | {span(reused)} | {r['measured']:.2f}x | "
                     f"{r['ideal']:.2f}x | {r['efficiency']:.2f} | {span(r['efficiency_per_replay'], 2)} | "
                     f"{r['state_bytes'] / 2 ** 20:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    from eval.make_tiny_checkpoint import checkpoint_or_flux_proportioned
    with checkpoint_or_flux_proportioned(args.checkpoint, variant="dev") as checkpoint:
        results = run(args, checkpoint)
    text = (f"{args.checkpoint or 'FLUX-proportioned random model'}, {args.height}x{args.width}, {args.text_tokens} "
            f"text tokens, {args.steps} steps, fp32, batch 1, {os.cpu_count()} cores; per-step medians of "
            f"{args.rounds} replays\n\n" + report(results))
    print("\n" + text)
    if args.json:
        write_json_atomic(args.json, dict(args=vars(args), results=[{k: v for k, v in r.items() if k != "final_latents"}
                                                                    for r in results]), indent=2)
    if args.markdown:
        write_text_atomic(args.markdown, text + "\n")
    return results


if __name__ == "__main__":
    main()
