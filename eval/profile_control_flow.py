"""What a tensor `if` per block costs in graph mode on this machine: the transformer's block stack compiled
several ways, every variant in one process and timed in alternation (same weights, same inputs, every block
running, so all variants compute the same output):

  plain       the blocks one after the other (the uncached model)
  ifs         one tensor `if` per block on a [blocks] bool input, the `else` empty
  ifs-reuse   the same with AFCache's reuse in the `else`: add the block's stored residual
  stores      no `if`; every block's residual stored into a Parameter (what a cache's update writes)
  outer-if    one `if` on "every block runs" whose branch runs the blocks plainly, the per-block
              `if`s of ifs-reuse in the other branch

  python -m eval.profile_control_flow                  # FLUX-proportioned random model, 256x256, 64 text tokens
"""
import argparse
import os
import sys
import time

import numpy as np

from utils import write_json_atomic

VARIANTS = ("plain", "ifs", "ifs-reuse", "stores", "outer-if")


def parse_args(argv=None):
    from eval.profile_step import add_model_arguments, check_model_arguments, comma_choices
    p = argparse.ArgumentParser(prog="python -m eval.profile_control_flow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--repeats", type=int, default=6, help="timed calls of each variant (default 6)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--json", help="write the figures to this JSON file")
    args = p.parse_args(argv)
    args.variants = comma_choices(p, args.variants, VARIANTS, "--variants")
    if args.variants[0] != "plain":
        args.variants = ["plain"] + [v for v in args.variants if v != "plain"]  # the baseline is always timed
    check_model_arguments(p, args, repeats=args.repeats)
    return args


def build(model, variant):
    import mindspore as ms
    from mindspore import nn, ops
    from fbcache_ms.state import _buffer

    n_double = len(model.transformer_blocks)

    class Stack(nn.Cell):
        def __init__(self, batch, image_tokens, text_tokens):
            super().__init__()
            self.t = model
            dim = model.config.dim
            self.res_h = ms.ParameterTuple([_buffer((batch, image_tokens, dim), model.dtype, f"h{i}")
                                            for i in range(n_double)])
            self.res_e = ms.ParameterTuple([_buffer((batch, text_tokens, dim), model.dtype, f"e{i}")
                                            for i in range(n_double)])
            self.res_x = ms.ParameterTuple([_buffer((batch, image_tokens + text_tokens, dim), model.dtype, f"x{i}")
                                            for i in range(len(model.single_transformer_blocks))])

        def blocks(self, h, e, temb, cos, sin, run, per_block_if, store):
            b = 0
            for block in self.t.transformer_blocks:
                if per_block_if:
                    if run[b]:
                        h, e = block(h, e, temb, cos, sin)[:2]
                    elif variant != "ifs":
                        h, e = h + self.res_h[b], e + self.res_e[b]
                else:
                    h_new, e_new = block(h, e, temb, cos, sin)[:2]
                    if store:
                        ops.assign(self.res_h[b], h_new - h)
                        ops.assign(self.res_e[b], e_new - e)
                    h, e = h_new, e_new
                b += 1
            txt_len = e.shape[1]
            x = ops.cat([e, h], axis=1)
            for block in self.t.single_transformer_blocks:
                if per_block_if:
                    if run[b]:
                        x = block(x, temb, cos, sin)[0]
                    elif variant != "ifs":
                        x = x + self.res_x[b - n_double]
                else:
                    x_new = block(x, temb, cos, sin)[0]
                    if store:
                        ops.assign(self.res_x[b - n_double], x_new - x)
                    x = x_new
                b += 1
            return x[:, txt_len:]

        def construct(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                      guidance, run):
            t = self.t
            h, e, temb, cos, sin = t.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                           img_ids, txt_ids, guidance)
            if variant == "outer-if":
                if run.all():
                    h = self.blocks(h, e, temb, cos, sin, run, False, False)
                else:
                    h = self.blocks(h, e, temb, cos, sin, run, True, False)
            else:
                h = self.blocks(h, e, temb, cos, sin, run, variant in ("ifs", "ifs-reuse"), variant == "stores")
            return t.head(h, temb)

    return Stack


def main(argv=None):
    args = parse_args(argv)
    import mindspore as ms
    from tqdm import tqdm
    from eval.make_tiny_checkpoint import checkpoint_or_flux_proportioned
    from eval.profile_step import inputs
    from models.checkpoint import read_config
    from models.flux_transformer import load_flux_transformer

    with checkpoint_or_flux_proportioned(args.checkpoint, variant="dev") as checkpoint:
        folder = os.path.join(checkpoint, "transformer")
        model = load_flux_transformer(folder)
        x = inputs(read_config(folder), args, ms.Tensor)
    run = ms.Tensor(np.ones(model.num_blocks, bool))
    image_tokens, text_tokens = x["hidden_states"].shape[1], x["encoder_hidden_states"].shape[1]
    compiled, outputs, first = {}, {}, {}
    for variant in tqdm(args.variants, desc="compiling", file=sys.stderr):
        stack = build(model, variant)(1, image_tokens, text_tokens)
        stack.set_train(False)
        compiled[variant] = ms.jit(stack.construct)
        start = time.perf_counter()
        outputs[variant] = compiled[variant](**x, run=run).asnumpy()
        first[variant] = time.perf_counter() - start
    times = {v: [] for v in args.variants}
    for _ in tqdm(range(args.repeats), desc="timing rounds", file=sys.stderr):
        for variant, step in compiled.items():
            start = time.perf_counter()
            step(**x, run=run).asnumpy()
            times[variant].append(time.perf_counter() - start)
    base = float(np.median(times["plain"]))
    results = [dict(variant=v, step_s=float(np.median(times[v])), overhead=float(np.median(times[v])) / base - 1,
                    first_call_s=first[v], steps=times[v],
                    max_abs_diff_vs_plain=float(np.abs(outputs[v] - outputs["plain"]).max())) for v in args.variants]
    rows = [f"| {r['variant']} | {r['step_s']:.3f} | {r['overhead']:+.1%} | {r['max_abs_diff_vs_plain']:.1e} |"
            for r in results]
    print(f"\n{args.checkpoint or 'FLUX-proportioned random model'}, {model.num_blocks} blocks, {args.height}x{args.width}, {args.text_tokens} text "
          f"tokens, fp32, median of {args.repeats} alternating calls\n\n| variant | step s | vs plain | max abs diff |"
          "\n|---|---|---|---|\n" + "\n".join(rows))
    if args.json:
        write_json_atomic(args.json, dict(args=vars(args), results=results), indent=2)


if __name__ == "__main__":
    main()
