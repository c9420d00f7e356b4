"""Where a compiled transformer step spends its time: the step timed with one part of the block math removed.

Each variant is the whole FLUX transformer compiled in graph mode in its own process with one part replaced by
the identity (or, for attention, by its value input), so that "full minus variant" is what that part costs in
the compiled graph as it really runs, fusion and memory traffic included. `linear-only` removes every part at
once: what is left is the linear layers, the residual adds and the gates, i.e. the matmul floor. The same
transformer in PyTorch eager (diffusers, same weights) is timed for the ratio the speed issue is about.
The variants compute wrong numbers on purpose: this measures cost, never output.

  python -m eval.profile_step                         # FLUX-proportioned random model, 256x256, 64 text tokens
  python -m eval.profile_step --checkpoint DIR --jit-level O1
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from utils import write_json_atomic

PARTS = {  # variant -> what is replaced in models.flux_transformer / models.layers
    "rope": "RoPE of q and k (apply_rope)",
    "qk-norm": "per-head RMSNorm of q and k",
    "norm-modulate": "LayerNorm + adaLN modulation x * (1 + scale) + shift before attention and MLP",
    "gelu": "tanh-GELU of the MLPs",
    "attention-core": "q k^T, softmax, p v and their transposes (q + k + v passes through)",
}


def add_model_arguments(p):
    """--checkpoint / --height / --width / --text-tokens, as both profilers (this one, profile_afcache) take them."""
    p.add_argument("--checkpoint", help="diffusers-format FLUX.1 folder (default: the FLUX-proportioned random model)")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--text-tokens", type=int, default=64)


def check_model_arguments(p, args, **counts):
    """Exit with one line on a bad model argument; counts: other options (name -> value) that must be >= 1."""
    if args.height % 16 or args.width % 16 or min(args.height, args.width, args.text_tokens, *counts.values()) < 1:
        names = ", ".join(["--text-tokens"] + [f"--{n.replace('_', '-')}" for n in counts])
        p.error(f"--height / --width must be positive multiples of 16; {names} at least 1")
    if args.checkpoint and not os.path.isdir(os.path.join(args.checkpoint, "transformer")):
        p.error(f"--checkpoint {args.checkpoint!r} has no transformer/ folder")


def comma_choices(p, text, allowed, flag):
    """The items of a comma-separated option, each one of `allowed`; else exit with one line naming the bad ones."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        p.error(f"{flag}: {'unknown ' + ', '.join(bad) if bad else 'nothing given'}; choose from {', '.join(allowed)}")
    return items


def run_workers(module, variants, argv):
    """Each variant timed by `python -m module --worker VARIANT *argv` in its own process -> its JSON lines."""
    from tqdm.auto import tqdm
    results = []
    for variant in tqdm(variants, desc="variants (one process each)"):
        done = subprocess.run([sys.executable, "-m", module, "--worker", variant, *argv], capture_output=True,
                              text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            raise RuntimeError(f"variant {variant} failed:\n{done.stderr[-2000:]}")
        results.append(json.loads(lines[-1]))
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--repeats", type=int, default=8, help="timed steps per variant after the first (default 8)")
    p.add_argument("--variants", default="full," + ",".join(PARTS) + ",linear-only",
                   help="comma-separated subset of: full, " + ", ".join(PARTS) + ", linear-only")
    p.add_argument("--jit-level", default=None, choices=["O0", "O1", "O2"],
                   help="MindSpore jit_level of the compiled step (default: ms.jit's)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager reference")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: time one variant in this process
    args = p.parse_args(argv)
    args.variants = comma_choices(p, args.variants, ["full", *PARTS, "linear-only"], "--variants")
    check_model_arguments(p, args, repeats=args.repeats)
    return args


# stand-ins for the removed parts (named functions: graph mode does not parse lambdas)
def _rope_off(x, cos, sin):
    return x


def _norm_modulate_off(x, shift, scale, eps):
    return x


def _gelu_off(x, fused=False):
    return x


def _rms_norm_off(self, x):
    return x


def _attention_core_off(self, q, k, v):
    return (q + k + v).reshape(v.shape[0], v.shape[1], -1)  # q and k kept, or the compiler drops their projections


def remove_parts(parts):
    """Patch the model code so that each named part is the identity (before the transformer is built)."""
    import models.flux_transformer as ft
    import models.layers as layers
    removed = set(PARTS) if "linear-only" in parts else set(parts) - {"full"}
    if "rope" in removed:
        ft.apply_rope = layers.apply_rope = _rope_off
    if "qk-norm" in removed:
        layers.RMSNorm.construct = _rms_norm_off
    if "norm-modulate" in removed:
        ft.modulated_layer_norm = layers.modulated_layer_norm = _norm_modulate_off
    if "gelu" in removed:
        ft.gelu_tanh = layers.gelu_tanh = _gelu_off
    if "attention-core" in removed:
        layers.Attention.construct = _attention_core_off


def inputs(cfg, args, backend):
    rng = np.random.default_rng(0)
    tokens = (args.height // 16) * (args.width // 16)
    ids = np.zeros((tokens, 3), np.float32)
    ids[:, 1], ids[:, 2] = np.divmod(np.arange(tokens), args.width // 16)
    arrays = dict(hidden_states=rng.standard_normal((1, tokens, cfg["in_channels"]), np.float32),
                  encoder_hidden_states=rng.standard_normal((1, args.text_tokens, cfg["joint_attention_dim"]),
                                                            np.float32),
                  pooled_projections=rng.standard_normal((1, cfg["pooled_projection_dim"]), np.float32),
                  timestep=np.array([0.5], np.float32), img_ids=ids,
                  txt_ids=np.zeros((args.text_tokens, 3), np.float32), guidance=np.array([3.5], np.float32))
    return {k: backend(v) for k, v in arrays.items()}


def time_variant(args):
    """Worker: build, compile and time the step with args.worker's parts removed -> dict."""
    import mindspore as ms
    remove_parts([args.worker])
    from models.flux_transformer import load_flux_transformer
    from models.checkpoint import read_config
    folder = os.path.join(args.checkpoint, "transformer")
    model = load_flux_transformer(folder)
    step = ms.jit(model.construct, **({"jit_level": args.jit_level} if args.jit_level else {}))
    x = inputs(read_config(folder), args, ms.Tensor)
    start = time.perf_counter()
    out = step(**x).asnumpy()
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step(**x).asnumpy()
        times.append(time.perf_counter() - start)
    # the output's mean magnitude shows that the variant really computed something else
    return dict(variant=args.worker, first_call_s=first, step_s=float(np.median(times)), steps=times,
                output_mean_abs=float(np.abs(out).mean()))


def time_torch(checkpoint, args):
    import torch
    from diffusers import FluxTransformer2DModel
    from models.checkpoint import read_config
    torch.set_num_threads(os.cpu_count())
    folder = os.path.join(checkpoint, "transformer")
    model = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    cfg = read_config(folder)
    x = inputs(cfg, args, torch.from_numpy)
    if not cfg.get("guidance_embeds"):
        x["guidance"] = None
    times = []
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            model(**x, return_dict=False)
            times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def run(args, checkpoint):
    argv = ["--checkpoint", checkpoint, "--height", str(args.height), "--width", str(args.width), "--text-tokens",
            str(args.text_tokens), "--repeats", str(args.repeats)] + (["--jit-level", args.jit_level] if args.jit_level
                                                                      else [])
    results = run_workers("eval.profile_step", args.variants, argv)
    torch_s = None if args.no_torch else time_torch(checkpoint, args)
    return results, torch_s


def report(results, torch_s, args):
    by = {r["variant"]: r for r in results}
    full = by.get("full")
    lines = [f"| variant | step s (median of {args.repeats}) | first call s | part's cost (full - variant) | share |",
             "|---|---|---|---|---|"]
    for r in results:
        cost = share = ""
        if full and r["variant"] != "full":
            cost = f"{full['step_s'] - r['step_s']:.3f} s"
            share = f"{(full['step_s'] - r['step_s']) / full['step_s']:.0%}"
        what = PARTS.get(r["variant"], "every part above removed" if r["variant"] == "linear-only" else "the model")
        lines.append(f"| {r['variant']}: {what} | {r['step_s']:.3f} | {r['first_call_s']:.1f} | {cost} | {share} |")
    if torch_s is not None:
        lines.append(f"\ndiffusers (PyTorch eager, same weights): {torch_s:.3f} s per transformer call"
                     + (f"; ours / diffusers {full['step_s'] / torch_s:.2f}x" if full else ""))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(time_variant(args)))
        return
    from eval.make_tiny_checkpoint import checkpoint_or_flux_proportioned
    with checkpoint_or_flux_proportioned(args.checkpoint, variant="dev") as checkpoint:
        results, torch_s = run(args, checkpoint)
    text = report(results, torch_s, args)
    print(f"\n{args.checkpoint or 'FLUX-proportioned random model'}, {args.height}x{args.width}, {args.text_tokens} "
          f"text tokens, fp32, batch 1, jit_level {args.jit_level or 'default'}, {os.cpu_count()} cores\n\n{text}")
    if args.json:
        write_json_atomic(args.json, dict(args={k: v for k, v in vars(args).items() if k != "worker"}, results=results,
                                           torch_step_s=torch_s), indent=2)


if __name__ == "__main__":
    main()
