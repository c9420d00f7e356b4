"""Generate images with FLUX.1 in MindSpore graph mode: one prompt, a prompt file, COCO-2017 captions or the
embedded model's held-out set, batched, sharded and crash-safe.

Examples:
  python -m eval.generate --prompt "a small red star in the top left corner" --out outputs/star   # embedded model
  python -m eval.generate --prompt-file shapes-heldout --batch-size 25 --out outputs/heldout --cache fbcache
  python -m eval.generate --checkpoint /data/FLUX.1-dev --prompt-file prompts.tsv --out outputs/parti
  python -m eval.generate --checkpoint /data/FLUX.1-dev --prompt-file coco/annotations/captions_val2017.json \\
      --out outputs/coco-fb08 --batch-size 4 --cache fbcache --threshold 0.08 --num-shards 8 --shard-index 3
  msrun --worker_num 8 --local_worker_num 8 python -m eval.generate ... --out outputs/coco-fb08
  (under msrun each worker takes its shard from mindspore.communication; its scheduler process generates nothing)
  python -m eval.verify_run outputs/coco-fb08     # every image exactly once, all shards agree

Prompt files: .txt (one a line), .tsv (PartiPrompts: a Prompt column), .jsonl (prompt, optional seed and
negative_prompt), .json (COCO captions: one caption per image, the one with the smallest id), or the name
shapes-heldout. Image k of the run uses seed --seed + k unless its prompt line gives a seed.

Nothing is lost when a run is killed: images are written under a temporary name and renamed, then recorded
in the manifest (manifest.jsonl, one per shard: every setting that decides an image, then one line per image
with its prompt, seed, per-step cache decisions and timings). Rerunning the same command resumes; a rerun with
other settings or prompts into the same folder is refused. Resumed and re-sharded runs make bit-identical
images; a different --batch-size does not (a cache decides per batch, and kernels round by batch size).

mindone FBCache_ms flags are accepted: --ckpt, -p/--prompt, --image_size H W, --save_path,
--residual_diff_threshold, --taylorseer_derivative N (TaylorSeer order N on top of FBCache; 0 = plain FBCache),
--use_graph_mode (graph mode is the default here), --guidance_scale, --negative_prompt.
"""
import argparse
import math
import os
import sys
import time

from eval.cache_args import (add_cache_arguments, add_compile_cache_argument, cache_config_from_args,
                             compile_cache_problem)
from eval.prompt_sources import MAX_SEED, PromptItem, PromptSourceError, check_source, load_prompts
from utils import EMBEDDED_MODEL, writable_parent


class UsageError(ValueError):
    pass


def build_parser():
    p = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", "--ckpt", default=EMBEDDED_MODEL,
                   help="diffusers-format FLUX.1 folder (transformer/, vae/, ...); default: the embedded trained "
                        "shapes model, trained-tiny-flux-shapes/ (64x64, 28 steps)")
    p.add_argument("-p", "--prompt", action="extend", nargs="+", help="prompt(s); the flag may be repeated")
    p.add_argument("--prompt-file", help="a .txt, .tsv, .jsonl or COCO captions .json file, or shapes-heldout")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts of --prompt-file")
    p.add_argument("--out", "--save_path", dest="out", required=True,
                   help="output folder for the PNGs and the manifest")
    p.add_argument("--seed", type=int, default=0, help="seed of image 0; image k uses seed + k (default 0)")
    p.add_argument("--height", type=int, default=None,
                   help="image height, a multiple of 2 x the VAE's scale factor (default: the VAE's sample_size, "
                        "1024 for FLUX.1, 64 for the embedded model)")
    p.add_argument("--width", type=int, default=None, help="image width (default: as --height)")
    p.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="height and width (mindone's flag)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default 28 on dev's shifted schedule, 4 for schnell)")
    p.add_argument("--guidance", "--guidance_scale", dest="guidance", type=float, default=3.5,
                   help="distilled guidance scale, dev only (default 3.5)")
    p.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", default=None,
                   help="negative prompt of every image (a .jsonl line may give its own); used when "
                        "--true-cfg-scale > 1, else an empty one")
    p.add_argument("--true-cfg-scale", type=float, default=1.0, help="true CFG scale (default 1: off)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens (default 512 for dev, 256 for schnell, at most the T5 tokenizer's "
                        "model_max_length: 32 for the embedded model)")
    p.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per pipeline call (default 1); part of the run's settings")
    p.add_argument("--num-shards", type=int, default=None,
                   help="split the run into this many shards (default 1, or msrun's worker count)")
    p.add_argument("--shard-index", type=int, default=None, help="the shard this process makes (0-based)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="model dtype (default float32; bfloat16 needs Ascend)")
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"],
                   help="graph: compiled denoising step (default); pynative: eager, for comparison")
    p.add_argument("--use_graph_mode", dest="mode", action="store_const", const="graph",
                   help="mindone's flag: graph mode (the default here)")
    p.add_argument("--device", default=None, choices=["CPU", "Ascend"],
                   help="MindSpore device; default: MindSpore's choice")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_compile_cache_argument(p)
    g = add_cache_arguments(p)
    g.add_argument("--residual_diff_threshold", type=float, default=None,
                   help="mindone's flag: FBCache with this threshold (same as --cache fbcache --threshold X)")
    g.add_argument("--taylorseer_derivative", type=int, default=None,
                   help="mindone's flag: TaylorSeer order on top of FBCache (0 = off)")
    return p


def _mindone_cache(args):
    """mindone's --residual_diff_threshold / --taylorseer_derivative mapped onto --cache / --threshold / --order."""
    if args.residual_diff_threshold is None and args.taylorseer_derivative is None:
        return
    if args.cache != "none":
        raise UsageError("give either --cache or mindone's --residual_diff_threshold / --taylorseer_derivative")
    order = args.taylorseer_derivative or 0
    if order < 0:
        raise UsageError(f"--taylorseer_derivative must be >= 0, got {order}")
    args.cache = "fbcache_taylorseer" if order > 0 else "fbcache"
    if order > 0:
        args.order = order
    args.threshold = args.residual_diff_threshold


def check_args(args):
    """Everything that can be checked without loading the model; returns (prompt items, cache, checkpoint info).
    Raises UsageError / PromptSourceError / CheckpointError / ValueError with a one-line reason."""
    from pipelines.flux_pipeline import inspect_checkpoint

    if not args.prompt and not args.prompt_file:
        raise UsageError("no prompts: give --prompt TEXT or --prompt-file FILE")
    if args.prompt is not None and not all(p.strip() for p in args.prompt):
        raise UsageError("--prompt: an empty prompt")
    if args.prompt_file:
        check_source(args.prompt_file)
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.image_size is not None:
        if args.height is not None or args.width is not None:
            raise UsageError("give either --image_size or --height / --width")
        args.height, args.width = args.image_size
    for flag, value, least in (("--steps", args.steps, 1), ("--max-sequence-length", args.max_sequence_length, 1),
                               ("--height", args.height, 1), ("--width", args.width, 1),
                               ("--images-per-prompt", args.images_per_prompt, 1),
                               ("--batch-size", args.batch_size, 1), ("--num-shards", args.num_shards, 1)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    if args.steps is not None and args.steps > 1000:
        raise UsageError(f"--steps must be at most 1000 (the scheduler's training steps), got {args.steps}")
    for flag, value in (("--guidance", args.guidance), ("--true-cfg-scale", args.true_cfg_scale)):
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"{flag} must be a finite number >= 0, got {value}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    if args.shard_index is not None:
        if args.num_shards is None:
            raise UsageError("--shard-index needs --num-shards")
        if not 0 <= args.shard_index < args.num_shards:
            raise UsageError(f"--shard-index must be in 0..{args.num_shards - 1}, got {args.shard_index}")
    elif args.num_shards not in (None, 1):
        raise UsageError("--num-shards needs --shard-index (or run under msrun)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} exists and is not a folder")
    if not os.path.exists(args.out) and writable_parent(args.out) is None:
        raise UsageError(f"--out {args.out!r}: cannot create it (its parent is not a writable folder)")
    if args.dtype == "bfloat16" and args.device != "Ascend":
        raise UsageError("--dtype bfloat16 needs --device Ascend (MindSpore has no CPU bfloat16 matmul)")
    _mindone_cache(args)
    cache = cache_config_from_args(args)
    problem = compile_cache_problem(args.compile_cache)
    if problem:
        raise UsageError(problem)
    info = inspect_checkpoint(args.checkpoint)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value % info.size_multiple:
            raise UsageError(f"{flag} must be a multiple of {info.size_multiple} for this checkpoint, got {value}")
    if args.max_sequence_length is not None and args.max_sequence_length > info.tokenizer_max_length:
        raise UsageError(f"--max-sequence-length must be at most {info.tokenizer_max_length} for this "
                         f"checkpoint's T5 tokenizer, got {args.max_sequence_length}")
    problem = cache.model_problem(info.num_blocks, info.hidden_size)
    if problem:
        raise UsageError(problem)
    items = [PromptItem(p.strip()) for p in args.prompt or []]
    if args.prompt_file:
        items += load_prompts(args.prompt_file)[:args.limit]
    last_seed = args.seed + len(items) * args.images_per_prompt - 1
    if last_seed > MAX_SEED:
        raise UsageError(f"--seed {args.seed}: the last image's seed would exceed {MAX_SEED}")
    return items, cache, info


def run_settings(args, cache, info):
    """Everything besides the prompt and seed that decides an image: the manifest's header."""
    from fbcache_ms.calibration import load_calibration

    weights = {}
    from models.checkpoint import StateDict
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        for f in StateDict.weight_files(os.path.join(info.path, sub)):
            weights[os.path.relpath(f, info.path)] = os.path.getsize(f)
    size = args.height or info.default_size
    return dict(
        checkpoint=info.path, checkpoint_weight_bytes=weights, dtype=args.dtype, mode=args.mode,
        prompt_source=args.prompt_file, base_seed=args.seed, images_per_prompt=args.images_per_prompt,
        # the calibration's content decides the images, not its path
        calibration_content=load_calibration(cache.calibration) if cache.calibration else None,
        call=dict(height=size, width=args.width or size, num_inference_steps=args.steps or info.default_steps,
                  guidance_scale=args.guidance, true_cfg_scale=args.true_cfg_scale,
                  max_sequence_length=args.max_sequence_length or info.default_sequence_length,
                  cache=cache.to_dict()))


def main(argv=None):
    from models.checkpoint import CheckpointError
    from pipelines.batch_generation import RunMismatch, generate_run, make_jobs, msrun_shard

    args = build_parser().parse_args(argv)
    try:
        items, cache, info = check_args(args)
        settings = run_settings(args, cache, info)
    except (UsageError, PromptSourceError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jobs = make_jobs(items, args.images_per_prompt, args.seed, args.negative_prompt)
    num_shards, shard_index = args.num_shards or 1, args.shard_index or 0
    if args.shard_index is None:
        ranks = msrun_shard()
        if ranks is not None:
            num_shards, shard_index = ranks

    import mindspore as ms
    if args.device:
        ms.set_device(args.device)
    from pipelines.flux_pipeline import FluxPipeline  # after set_device: cells read the device when built

    start = time.perf_counter()
    try:
        pipe = FluxPipeline.from_pretrained(args.checkpoint, dtype=args.dtype, mode=args.mode,
                                            compile_cache=args.compile_cache)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"loaded {args.checkpoint} ({args.dtype}, {args.mode} mode) in {time.perf_counter() - start:.1f} s; "
          f"cache: {cache.describe()}; {len(jobs)} image(s), shard {shard_index} of {num_shards}")
    start = time.perf_counter()
    try:
        manifest = generate_run(pipe, jobs, settings, args.out, args.batch_size, num_shards, shard_index,
                                progress=not args.no_progress)
    except (RunMismatch, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    records = list(manifest.records.values())
    if records:
        steps = [s for r in records for s in r["step_s"][1:]]
        print(f"{len(records)} image(s) in {args.out} ({time.perf_counter() - start:.1f} s this run); "
              f"median step {sorted(steps)[len(steps) // 2]:.3f} s" if steps else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
