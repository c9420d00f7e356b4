"""How long the first call of each cache method spends compiling its graph, each method in a fresh process.

MindSpore keeps a compiled graph for the life of its process, so every method is timed in a process of its own
(nothing compiled before it, no compile cache). Per method, one pipeline call of a few steps: the first
denoising step holds the compile of the method's transformer graph; compile = first step - the median of the
later steps. The text encoders' compile is reported apart ("encode"), being the same for every method.

  python -m eval.compile_time                                   # FLUX-proportioned random model, every method
  python -m eval.compile_time --checkpoint DIR --methods none,taylorseer --json compile.json
"""
import argparse
import json
import os

import numpy as np

from eval.profile_step import add_model_arguments, check_model_arguments, comma_choices, run_workers
from fbcache_ms.config import METHODS
from utils import write_json_atomic, write_text_atomic


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--steps", type=int, default=3, help="denoising steps of the timed call, at least 2 (default 3)")
    p.add_argument("--group-size", type=int, default=1,
                   help="AFCache's blocks per decision unit (default 1: one tensor if per block)")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--markdown", help="write the table to this markdown file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: time one method in this process
    args = p.parse_args(argv)
    args.methods = comma_choices(p, args.methods, METHODS, "--methods")
    if args.steps < 2:
        p.error("--steps must be at least 2 (the later steps give the step time that is not compile)")
    check_model_arguments(p, args, group_size=args.group_size)
    return args


def time_method(args):
    """Worker: one pipeline call with args.worker's cache in this (fresh) process -> dict."""
    from fbcache_ms.config import CacheConfig
    from pipelines.flux_pipeline import FluxPipeline
    pipe = FluxPipeline.from_pretrained(args.checkpoint)
    cache = CacheConfig(method=args.worker, group_size=args.group_size if args.worker == "afcache" else 1)
    out = pipe("a red circle above a blue square", height=args.height, width=args.width,
               num_inference_steps=args.steps, seed=0, max_sequence_length=args.text_tokens, output_type="latent",
               progress=False, cache=cache)
    steps = out.timings["steps"]
    later = float(np.median(steps[1:]))
    return dict(method=args.worker, cache=cache.describe(), first_step_s=steps[0], later_step_s=later,
                compile_s=steps[0] - later,
                encode_s=out.timings["encode"], steps_s=steps)


def report(results):
    lines = ["| method | compile s (first step - later step) | first step s | later step s | encode s (first) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['compile_s']:.1f} | {r['first_step_s']:.1f} | {r['later_step_s']:.2f} | "
              f"{r['encode_s']:.1f} |" for r in results]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(time_method(args)))
        return
    from eval.make_tiny_checkpoint import checkpoint_or_flux_proportioned
    with checkpoint_or_flux_proportioned(args.checkpoint, variant="dev") as checkpoint:
        argv = ["--checkpoint", checkpoint, "--height", str(args.height), "--width", str(args.width),
                "--text-tokens", str(args.text_tokens), "--steps", str(args.steps),
                "--group-size", str(args.group_size)]
        results = run_workers("eval.compile_time", args.methods, argv)
    text = (f"{args.checkpoint or 'FLUX-proportioned random model'}, {args.height}x{args.width}, {args.text_tokens} "
            f"text tokens, fp32, batch 1, {args.steps} steps, {os.cpu_count()} cores, one fresh process per method"
            + (f", AFCache in units of {args.group_size} blocks" if args.group_size > 1 and "afcache" in args.methods
               else "") + "\n\n"
            + report(results))
    print("\n" + text)
    if args.json:
        write_json_atomic(args.json, dict(args={k: v for k, v in vars(args).items() if k != "worker"},
                                          results=results), indent=2)
    if args.markdown:
        write_text_atomic(args.markdown, text + "\n")


if __name__ == "__main__":
    main()
