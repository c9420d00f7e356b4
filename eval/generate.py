"""Generate images with FLUX.1 in MindSpore and print timings.

Examples:
  python -m eval.generate --prompt "a small red star in the top left corner" --out outputs/star   # embedded model
  python -m eval.generate --checkpoint /data/FLUX.1-dev --prompt "a photo of a cat" --out outputs/cat
  python -m eval.generate --checkpoint /data/FLUX.1-schnell --prompt-file prompts.txt --out outputs/run1
  python -m eval.generate --checkpoint /data/FLUX.1-dev --prompt-file prompts.txt --out outputs/fb08 \
      --cache fbcache --threshold 0.08
  python -m eval.generate ... --cache taylorseer --order 1 --interval 5

Images are written as they are made, one PNG per image plus one line per image in metadata.jsonl;
a rerun with the same --out skips the images that already exist, so an interrupted run loses nothing.
Image k of the run uses seed (--seed + k), whatever the batch size, so a resumed run makes the same images.
"""
import argparse
import json
import os
import sys
import time

import mindspore as ms
import numpy as np

from eval.cache_args import add_cache_arguments, cache_config_from_args
from utils import EMBEDDED_MODEL


def read_prompts(args):
    prompts = list(args.prompt or [])
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            sys.exit(f"error: prompt file {args.prompt_file!r} does not exist")
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        sys.exit("error: no prompts: give --prompt TEXT (repeatable) or --prompt-file FILE (one prompt per line)")
    return prompts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=EMBEDDED_MODEL,
                   help="diffusers-format FLUX.1 folder (transformer/, vae/, ...); default: the embedded trained "
                        "shapes model, trained-tiny-flux-shapes/ (64x64, 28 steps)")
    p.add_argument("--prompt", action="append", help="a prompt; repeat the flag for several")
    p.add_argument("--prompt-file", help="text file with one prompt per line")
    p.add_argument("--out", required=True, help="output folder for PNGs and metadata.jsonl")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k (default 0)")
    p.add_argument("--height", type=int, default=None,
                   help="image height, a multiple of 2 x the VAE's scale factor (default: the VAE's sample_size, "
                        "1024 for FLUX.1)")
    p.add_argument("--width", type=int, default=None, help="image width (default: as --height)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default 28 on dev's shifted schedule, 4 for schnell)")
    p.add_argument("--guidance", type=float, default=3.5, help="distilled guidance scale, dev only (default 3.5)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt; used when --true-cfg-scale > 1")
    p.add_argument("--true-cfg-scale", type=float, default=1.0, help="true CFG scale (default 1: off)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens (default 512 for dev, 256 for schnell, at most the T5 tokenizer's "
                        "model_max_length: 32 for the embedded model)")
    p.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call (default 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="model dtype (default float32; bfloat16 needs Ascend)")
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"],
                   help="graph: compiled denoising step (default); pynative: eager, for comparison")
    p.add_argument("--device", default=None, help="MindSpore device (CPU, Ascend); default: MindSpore's choice")
    add_cache_arguments(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    prompts = read_prompts(args)
    try:
        cache = cache_config_from_args(args)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.batch_size < 1 or args.images_per_prompt < 1:
        sys.exit("error: --batch-size and --images-per-prompt must be at least 1")
    if args.device:
        ms.set_device(args.device)
    from pipelines.flux_pipeline import FluxPipeline  # after set_device: cells read the device when built

    start = time.perf_counter()
    try:
        pipe = FluxPipeline.from_pretrained(args.checkpoint, dtype=args.dtype, mode=args.mode)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        sys.exit(f"error: {e}")
    print(f"loaded {args.checkpoint} ({args.dtype}, {args.mode} mode) in {time.perf_counter() - start:.1f} s; "
          f"cache: {cache.describe()}")

    os.makedirs(args.out, exist_ok=True)
    n = args.images_per_prompt
    jobs = [(i, p) for i, p in enumerate(prompts)]
    names = {i: [f"{i:05d}_{k}.png" for k in range(n)] for i, _ in jobs}
    todo = [(i, p) for i, p in jobs if not all(os.path.exists(os.path.join(args.out, f)) for f in names[i])]
    if len(todo) < len(jobs):
        print(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} prompts already done in {args.out}")

    step_times, calls = [], 0
    with open(os.path.join(args.out, "metadata.jsonl"), "a", encoding="utf-8") as meta:
        for b in range(0, len(todo), args.batch_size):
            batch = todo[b:b + args.batch_size]
            seeds = [args.seed + i * n + k for i, _ in batch for k in range(n)]
            out = pipe([p for _, p in batch], height=args.height, width=args.width,
                       num_inference_steps=args.steps, guidance_scale=args.guidance,
                       generator=[np.random.default_rng(s) for s in seeds], num_images_per_prompt=n,
                       negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg_scale,
                       max_sequence_length=args.max_sequence_length, cache=cache)
            t = out.timings
            for j, image in enumerate(out.images):
                i, prompt = batch[j // n]
                name = names[i][j % n]
                image.save(os.path.join(args.out, name))
                meta.write(json.dumps({"file": name, "prompt": prompt, "seed": seeds[j], "height": image.height,
                                       "width": image.width, "steps": len(t["steps"]), "mode": args.mode,
                                       "cache": cache.to_dict()}) + "\n")
                meta.flush()
            calls += 1
            # the first call of a shape includes graph compilation: reported apart from the steady state
            note = " (includes compilation)" if calls == 1 and args.mode == "graph" else ""
            print(f"batch {calls}: {len(out.images)} image(s), encode {t['encode']:.2f} s, denoise {t['denoise']:.2f} s"
                  f" ({np.mean(t['steps']):.3f} s/step{note}), decode {t['decode']:.2f} s")
            if out.cache_stats is not None:
                print(f"  cache: {out.cache_stats.summary()}")
            step_times += t["steps"][1:] if calls == 1 else t["steps"]
    if step_times:
        print(f"steady-state step time: mean {np.mean(step_times):.3f} s, min {np.min(step_times):.3f} s "
              f"over {len(step_times)} steps")
    print(f"images in {args.out}")


if __name__ == "__main__":
    main()
