"""Speed side by side with diffusers on the same weights: our graph mode, our PyNative, diffusers' PyTorch eager.

One process loads one checkpoint folder into both stacks and times them in alternating rounds (a slow spell of a
shared machine spreads over every column), with the same prompt and the same initial noise:
- uncached: our compiled step, our PyNative step, diffusers' FluxPipeline (transformer + Euler update);
- each cache method next to diffusers' own hook where one exists, at matched settings: FBCache with
  `FirstBlockCacheConfig` (same threshold, same relative-L1 signal), TaylorSeer with `TaylorSeerCacheConfig`
  (same interval, warm-up and order, fp32 factors); MagCache has no diffusers hook in 0.36 (ours only).

Per setting and stack: median step, per-image denoise total (median over rounds, the first call excluded and
reported apart as "first call", which holds the graph compilation), wall speedup over the same stack uncached,
ideal speedup (the block-stack work an uncached step does over what the cached run did: ours from the blocks run,
diffusers' from the FLOPs of the linear layers its blocks really ran, counted in a separate untimed run) and
their ratio, the efficiency. Our cache state in bytes. The final latents of both stacks are compared (relative
error), so a fast column that computes something else shows.

  python -m eval.benchmark_vs_diffusers                    # the FLUX-proportioned random model, 256x256
  python -m eval.benchmark_vs_diffusers --checkpoint trained-tiny-flux-shapes --steps 28 --json out.json
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from eval.profile_step import comma_choices
from utils import write_text_atomic

STACKS = ("graph", "pynative", "diffusers")
METHODS = ("none", "fbcache", "taylorseer", "magcache")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="diffusers-format FLUX.1 folder; default: build the FLUX-proportioned random "
                                        "model (19 + 38 blocks, 4 heads x 128) in a temporary folder")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--text-tokens", type=int, default=64, help="T5 sequence length (default 64)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per image (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="timed alternating rounds after the first calls (default 3)")
    p.add_argument("--stacks", default="graph,pynative,diffusers", help="comma-separated: " + ", ".join(STACKS))
    p.add_argument("--methods", default="none,fbcache,taylorseer,magcache",
                   help="comma-separated: " + ", ".join(METHODS) + " (PyNative runs 'none' only)")
    p.add_argument("--fbcache-threshold", type=float,
                   help="FBCache threshold for both stacks (default: the 40th percentile of this model's own "
                        "block-0 changes, so that a random model reuses steps too; FLUX.1-dev's is 0.08)")
    p.add_argument("--interval", type=int, default=5, help="TaylorSeer: one full step every N (default 5)")
    p.add_argument("--warmup", type=int, default=3, help="TaylorSeer: first steps always computed (default 3)")
    p.add_argument("--order", type=int, default=1, help="TaylorSeer order (default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    p.add_argument("--json", help="write every figure to this JSON file")
    p.add_argument("--markdown", help="write the table to this markdown file")
    args = p.parse_args(argv)
    args.stacks = comma_choices(p, args.stacks, STACKS, "--stacks")
    args.methods = comma_choices(p, args.methods, METHODS, "--methods")
    for name in ("steps", "rounds", "interval", "threads", "height", "width", "text_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.order < 0:
        p.error("--warmup and --order must be at least 0")
    if args.fbcache_threshold is not None and not 0 <= args.fbcache_threshold <= 1:
        p.error(f"--fbcache-threshold must be in [0, 1], got {args.fbcache_threshold}")
    if args.checkpoint and not os.path.isdir(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint!r} is not a folder")
    if "none" not in args.methods:
        args.methods.insert(0, "none")  # every speedup is relative to it
    return args


class Ours:
    """This project's pipeline in one MindSpore mode; our CacheConfig for each method."""

    def __init__(self, checkpoint, mode, args):
        from pipelines.flux_pipeline import FluxPipeline
        self.name, self.args = mode, args
        self.pipe = FluxPipeline.from_pretrained(checkpoint, mode=mode)

    def config(self, method, threshold):
        from fbcache_ms.config import CacheConfig
        a = self.args
        return {"none": CacheConfig("none"), "fbcache": CacheConfig("fbcache", threshold=threshold),
                "taylorseer": CacheConfig("taylorseer", order=a.order, interval=a.interval, warmup=a.warmup),
                "magcache": CacheConfig("magcache")}[method]

    def run(self, method, threshold, noise):
        a = self.args
        out = self.pipe(prompt=PROMPT, height=a.height, width=a.width, num_inference_steps=a.steps,
                        max_sequence_length=a.text_tokens, latents=noise, output_type="latent", progress=False,
                        cache=self.config(method, threshold))
        stats = out.cache_stats
        return dict(steps=out.timings["steps"], latents=np.asarray(out.images, np.float32),
                    pattern=stats.pattern() if stats else "C" * a.steps,
                    ideal=float(1 / stats.block_fraction()) if stats else 1.0,
                    state_bytes=int(stats.state_bytes) if stats else 0)


class Diffusers:
    """diffusers' FluxPipeline in PyTorch eager, its cache hooks enabled on the transformer."""
    name = "diffusers"

    def __init__(self, checkpoint, args):
        import torch
        from diffusers import FluxPipeline
        torch.set_num_threads(args.threads)
        self.torch, self.args = torch, args
        self.pipe = FluxPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32)
        for module in (self.pipe.transformer, self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.vae):
            module.eval()  # built from a config, they start in training mode
        with torch.no_grad():
            self.embeds, self.pooled, _ = self.pipe.encode_prompt(PROMPT, None, max_sequence_length=args.text_tokens)

    def config(self, method, threshold):
        from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig
        a = self.args
        if method == "fbcache":
            return FirstBlockCacheConfig(threshold=threshold)
        if method == "taylorseer":
            return TaylorSeerCacheConfig(cache_interval=a.interval, disable_cache_before_step=a.warmup,
                                         max_order=a.order, taylor_factors_dtype=self.torch.float32)
        return None  # uncached; magcache has no hook

    def _call(self, noise):
        marks, starts = [], []
        # step 0 starts at the first transformer call, as ours does after the prompt is encoded
        handle = self.pipe.transformer.register_forward_pre_hook(
            lambda m, inp: starts.append(time.perf_counter()) if not starts else None)
        try:
            out = self._pipe(noise, lambda: marks.append(time.perf_counter()))
        finally:
            handle.remove()
        return np.diff(np.concatenate([starts[:1], marks])).tolist(), out.images.float().numpy()

    def _pipe(self, noise, after_step):
        """One latent-output call of diffusers' pipeline on our noise; after_step() runs after every step."""
        a = self.args
        with self.torch.no_grad():
            return self.pipe(prompt_embeds=self.embeds, pooled_prompt_embeds=self.pooled, height=a.height,
                             width=a.width, num_inference_steps=a.steps, max_sequence_length=a.text_tokens,
                             latents=self.torch.from_numpy(noise), output_type="latent",
                             callback_on_step_end=lambda pipe, i, t, kw: after_step() or {})

    def run(self, method, threshold, noise):
        transformer = self.pipe.transformer
        config = self.config(method, threshold)
        if config is not None:
            transformer.enable_cache(config)
        try:
            steps, latents = self._call(noise)
        finally:
            if config is not None:
                transformer.disable_cache()
        return dict(steps=steps, latents=latents, state_bytes=None)

    def count(self, method, threshold, noise):
        """Untimed run with every block's linear layers counted: -> linear FLOPs per step (blocks only)."""
        transformer = self.pipe.transformer
        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        flops = [0.0]
        handles = [m.register_forward_hook(lambda m, inp, out: flops.__setitem__(
            0, flops[0] + inp[0].numel() // m.in_features * m.in_features * m.out_features))
            for block in blocks for m in block.modules() if isinstance(m, self.torch.nn.Linear)]
        config = self.config(method, threshold)
        if config is not None:
            transformer.enable_cache(config)
        marks = []
        try:
            self._pipe(noise, lambda: marks.append(flops[0]))
        finally:
            for h in handles:
                h.remove()
            if config is not None:
                transformer.disable_cache()
        return np.diff(np.concatenate([[0.0], marks]))


PROMPT = "a small red circle in the top left corner"


def work_pattern(per_step, full_step):
    """'C' a step that ran (nearly) all of its blocks' linear work, '.' one that ran under 5%, '~' in between
    (diffusers' TaylorSeer forecasts attention only: the MLPs still run)."""
    return "".join("C" if f >= 0.99 * full_step else "." if f < 0.05 * full_step else "~" for f in per_step)


def fbcache_threshold_from_model(pipe, args, noise):
    """40th percentile of the model's block-0 relative changes in an uncached (threshold 0) run of our pipeline."""
    from fbcache_ms.config import CacheConfig
    out = pipe(prompt=PROMPT, height=args.height, width=args.width, num_inference_steps=args.steps,
                    max_sequence_length=args.text_tokens, latents=noise, output_type="latent", progress=False,
                    cache=CacheConfig("fbcache", threshold=0.0))
    changes = [c for c in out.cache_stats.changes["cond"] if c is not None]
    return round(float(np.percentile(changes, 40)), 4)


def initial_noise(pipe, args):
    from pipelines.flux_pipeline import pack_latents
    channels = pipe.transformer.config.in_channels // 4
    grid = (args.height // pipe.vae_scale_factor, args.width // pipe.vae_scale_factor)
    return pack_latents(np.random.default_rng(0).standard_normal((1, channels, *grid), np.float32))


def benchmark(args, checkpoint):
    from tqdm.auto import tqdm
    stacks = {}
    for name in args.stacks:
        stacks[name] = Diffusers(checkpoint, args) if name == "diffusers" else Ours(checkpoint, name, args)
    ours = next((s for s in stacks.values() if isinstance(s, Ours)), None) or Ours(checkpoint, "pynative", args)
    noise = initial_noise(ours.pipe, args)
    threshold = args.fbcache_threshold
    if threshold is None and "fbcache" in args.methods:
        threshold = fbcache_threshold_from_model(ours.pipe, args, noise)
    runs = [(s, m) for s in args.stacks for m in args.methods
            if (s != "pynative" or m == "none") and (s != "diffusers" or m != "magcache")]

    results = {}
    for stack, method in tqdm(runs, desc="first calls (compilation)"):
        start = time.perf_counter()
        out = stacks[stack].run(method, threshold, noise)
        results[stack, method] = dict(first_call_s=time.perf_counter() - start, step_times=[], denoise=[], **{
            k: v for k, v in out.items() if k not in ("steps",)})
    if "diffusers" in stacks:
        full = stacks["diffusers"].count("none", threshold, noise)
        for method in args.methods:
            if ("diffusers", method) in results:
                per_step = stacks["diffusers"].count(method, threshold, noise)
                results["diffusers", method].update(ideal=float(full.sum() / per_step.sum()),
                                                    pattern=work_pattern(per_step, full.max()))
    for _ in tqdm(range(args.rounds), desc="timed rounds"):
        for stack, method in runs:
            out = stacks[stack].run(method, threshold, noise)
            results[stack, method]["step_times"] += out["steps"]
            results[stack, method]["denoise"].append(float(np.sum(out["steps"])))

    rows = []
    for stack, method in runs:
        r = results[stack, method]
        base = results[stack, "none"]
        denoise, base_denoise = float(np.median(r["denoise"])), float(np.median(base["denoise"]))
        speedup = base_denoise / denoise
        ref = results.get(("graph", method)) or results.get(("pynative", method))
        rows.append(dict(
            stack=stack, method=method, step_median_s=float(np.median(r["step_times"])), denoise_s=denoise,
            first_call_s=r["first_call_s"], speedup=speedup, ideal=r["ideal"], efficiency=speedup / r["ideal"],
            pattern=r["pattern"], state_bytes=r["state_bytes"],
            vs_ours=None if ref is None or ref is r else rel_err(r["latents"], ref["latents"])))
    return dict(threshold=threshold, rows=rows)


def rel_err(a, b):
    """max |a - b| / max |b| (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def setting_name(method, args, threshold):
    return {"none": "uncached", "fbcache": f"FBCache {threshold:g}",
            "taylorseer": f"TaylorSeer N={args.interval} O={args.order} warm-up {args.warmup}",
            "magcache": "MagCache 0.06 (FLUX ratios)"}[method]


def markdown(result, args):
    rows, threshold = result["rows"], result["threshold"]
    by = {(r["stack"], r["method"]): r for r in rows}
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = ["| setting | stack | step s (median) | s / image (denoise) | first call s | speedup | ideal | "
             "measured / ideal | cache state MiB | ours / diffusers (s per image) | pattern |", "|" + "---|" * 11]
    for method in args.methods:
        for stack in args.stacks:
            r = by.get((stack, method))
            if r is None:
                continue
            ratio = None
            if stack != "diffusers" and ("diffusers", method) in by:
                ratio = r["denoise_s"] / by["diffusers", method]["denoise_s"]
            state = None if r["state_bytes"] is None else r["state_bytes"] / 2 ** 20
            lines.append(f"| {setting_name(method, args, threshold or 0)} | {stack} | {r['step_median_s']:.3f} | "
                         f"{r['denoise_s']:.2f} | {r['first_call_s']:.1f} | {r['speedup']:.2f}x | {r['ideal']:.2f}x | "
                         f"{r['efficiency']:.2f} | {fmt(state, '.2f')} | {fmt(ratio, '.2f')}x | `{r['pattern']}` |")
    return "\n".join(lines).replace("| -x |", "| - |")


def main(argv=None):
    args = parse_args(argv)
    import mindspore as ms
    from eval.make_tiny_checkpoint import checkpoint_or_flux_proportioned
    from pipelines.flux_pipeline import inspect_checkpoint
    from models.checkpoint import CheckpointError
    if args.checkpoint:
        try:
            inspect_checkpoint(args.checkpoint)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}")
    with checkpoint_or_flux_proportioned(args.checkpoint, variant="dev") as checkpoint:
        result = benchmark(args, checkpoint)
    import torch
    header = (f"{args.checkpoint or 'FLUX-proportioned random model'}, {args.height}x{args.width}, "
              f"{args.text_tokens} text tokens, {args.steps} steps, fp32, batch 1; {platform.machine()}, "
              f"{os.cpu_count()} cores, MindSpore {ms.__version__}, torch {torch.__version__} "
              f"({args.threads} threads); medians of {args.rounds} alternating rounds")
    table = markdown(result, args)
    print(f"\n{header}\n\n{table}")
    for r in result["rows"]:
        if r["vs_ours"] is not None:
            print(f"final latents, {r['stack']} vs ours ({r['method']}): relative error {r['vs_ours']:.1e}")
    if args.markdown:
        write_text_atomic(args.markdown, f"{header}\n\n{table}\n")
    if args.json:
        write_text_atomic(args.json, json.dumps(dict(args=vars(args), header=header, **result), indent=2))


if __name__ == "__main__":
    sys.exit(main())
