"""Per-step denoising time in graph mode and in PyNative on a FLUX-proportioned model.

The default model has FLUX.1's full depth (19 double-stream + 38 single-stream blocks, so block 0 is
the same small share of the work as in FLUX) at a width that runs on 2 CPU cores (4 heads x 128),
with random weights written by eval/make_tiny_checkpoint.py. Timings are wall-clock seconds of the whole
denoising step (transformer + Euler update) through the pipeline; the first call of each mode (graph
compilation, kernel set-up) is reported apart and excluded from the per-step figures.

  python -m eval.benchmark_speed                      # the reference configuration
  python -m eval.benchmark_speed --checkpoint DIR --height 512 --width 512 --modes graph
"""
import argparse
import json
import os
import platform
import time

import mindspore as ms
import numpy as np

from eval.cache_args import add_compile_cache_argument, compile_cache_problem
from eval.make_tiny_checkpoint import checkpoint_or_flux_proportioned


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="existing FLUX checkpoint folder; default: build the FLUX-proportioned "
                                        "random model in a temporary folder")
    p.add_argument("--variant", default="dev", choices=["dev", "schnell"], help="model variant to build")
    p.add_argument("--num-layers", type=int, default=19, help="double-stream blocks of the built model")
    p.add_argument("--num-single-layers", type=int, default=38, help="single-stream blocks of the built model")
    p.add_argument("--heads", type=int, default=4, help="attention heads of the built model (x 128 dims)")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--text-tokens", type=int, default=64, help="T5 sequence length (default 64)")
    p.add_argument("--steps", type=int, default=6, help="denoising steps per timed call (default 6)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per mode after the first (default 2)")
    p.add_argument("--modes", default="graph,pynative", help="comma-separated: graph, pynative")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--json", help="also write the results to this JSON file")
    add_compile_cache_argument(p)
    args = p.parse_args(argv)
    problem = compile_cache_problem(args.compile_cache)
    if problem:
        p.error(problem)
    return args


def time_mode(checkpoint, mode, args):
    from pipelines.flux_pipeline import FluxPipeline

    pipe = FluxPipeline.from_pretrained(checkpoint, dtype=args.dtype, mode=mode,
                                        compile_cache=args.compile_cache if mode == "graph" else None)
    call = dict(prompt="a photo of a cat", height=args.height, width=args.width, num_inference_steps=args.steps,
                max_sequence_length=args.text_tokens, seed=0, output_type="latent", progress=False)
    start = time.perf_counter()
    first = pipe(**call)
    first_call = time.perf_counter() - start
    steps = []
    for _ in range(args.repeats):
        steps += pipe(**call).timings["steps"]
    cfg = pipe.transformer.config
    return dict(mode=mode, first_call_s=first_call, first_step_s=first.timings["steps"][0],
                step_mean_s=float(np.mean(steps)), step_min_s=float(np.min(steps)),
                step_std_s=float(np.std(steps)), timed_steps=len(steps),
                model=dict(double_blocks=cfg.num_layers, single_blocks=cfg.num_single_layers,
                           heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim, dim=cfg.dim,
                           image_tokens=(args.height // 16) * (args.width // 16), text_tokens=args.text_tokens))


def main(argv=None):
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with checkpoint_or_flux_proportioned(args.checkpoint, variant=args.variant, num_layers=args.num_layers,
                                         num_single_layers=args.num_single_layers,
                                         num_attention_heads=args.heads) as checkpoint:
        results = [time_mode(checkpoint, mode, args) for mode in modes]
    m = results[0]["model"]
    print(f"\nmodel: {m['double_blocks']} double + {m['single_blocks']} single blocks, {m['heads']} heads x "
          f"{m['head_dim']} (dim {m['dim']}), {args.height}x{args.width} -> {m['image_tokens']} image tokens + "
          f"{m['text_tokens']} text tokens, {args.dtype}, batch 1")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, MindSpore {ms.__version__}, "
          f"device {ms.get_context('device_target')}; {args.steps} steps x {args.repeats} timed calls per mode\n")
    print(f"{'mode':<10}{'step mean (s)':>15}{'step min (s)':>14}{'std (s)':>10}{'first call (s)':>16}")
    for r in results:
        print(f"{r['mode']:<10}{r['step_mean_s']:>15.3f}{r['step_min_s']:>14.3f}{r['step_std_s']:>10.3f}"
              f"{r['first_call_s']:>16.1f}")
    if len(results) == 2:
        print(f"\ngraph / pynative speed ratio: {results[1]['step_mean_s'] / results[0]['step_mean_s']:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=2)


if __name__ == "__main__":
    main()
