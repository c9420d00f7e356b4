"""Why the embedded model is trained in PyTorch: one training step of the same transformer in both frameworks.

Builds the embedded model's transformer configuration (eval/train_shapes_model.MODEL_SIZES) with random
weights and times a full training step (forward, MSE loss, backward, AdamW update) on the same batch shape:
this project's MindSpore cell compiled with ms.jit (graph mode) against diffusers' FluxTransformer2DModel in
PyTorch eager. Prints the median step time of each and the ratio.

  python -m eval.benchmark_training
"""
import argparse
import sys
import tempfile
import time

import numpy as np

from eval.train_shapes_model import MAX_SEQUENCE_LENGTH, MODEL_SIZES


def _inputs(batch, tokens, dim_in, txt_dim, pooled_dim, rng):
    return (rng.standard_normal((batch, tokens, dim_in)).astype(np.float32),
            rng.standard_normal((batch, MAX_SEQUENCE_LENGTH, txt_dim)).astype(np.float32),
            rng.standard_normal((batch, pooled_dim)).astype(np.float32), rng.random(batch).astype(np.float32))


def _ids(grid):
    ids = np.zeros((grid, grid, 3), np.float32)
    ids[..., 1], ids[..., 2] = np.arange(grid)[:, None], np.arange(grid)[None, :]
    return ids.reshape(-1, 3), np.zeros((MAX_SEQUENCE_LENGTH, 3), np.float32)


def time_mindspore(folder, batch, steps, data, ids):
    import mindspore as ms
    from mindspore import nn
    from models.flux_transformer import load_flux_transformer

    model = load_flux_transformer(folder)
    model.set_train(True)
    x, e, p, t = (ms.Tensor(a) for a in data)
    img_ids, txt_ids = (ms.Tensor(a) for a in ids)
    g = ms.Tensor(np.zeros(batch, np.float32))
    opt = nn.AdamWeightDecay(model.trainable_params(), 1e-4)

    def loss_fn(x, e, p, t):
        return (model(x, e, p, t, img_ids, txt_ids, g) ** 2).mean()

    grad_fn = ms.value_and_grad(loss_fn, None, opt.parameters)

    @ms.jit
    def step(x, e, p, t):
        loss, grads = grad_fn(x, e, p, t)
        opt(grads)
        return loss

    times = []
    for _ in range(steps + 1):  # the first call compiles
        start = time.perf_counter()
        step(x, e, p, t).asnumpy()
        times.append(time.perf_counter() - start)
    return times[0], times[1:]


def time_torch(folder, batch, steps, data, ids, threads):
    import torch
    from diffusers import FluxTransformer2DModel

    torch.set_num_threads(threads)
    model = FluxTransformer2DModel.from_pretrained(folder).float().train()
    x, e, p, t = (torch.from_numpy(a) for a in data)
    img_ids, txt_ids = (torch.from_numpy(a) for a in ids)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        out = model(hidden_states=x, encoder_hidden_states=e, pooled_projections=p, timestep=t, img_ids=img_ids,
                    txt_ids=txt_ids, return_dict=False)[0]
        (out ** 2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[0], times[1:]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.benchmark_training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=48, help="images per step (default 48, the training run's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per framework (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.threads < 1:
        p.error("--batch, --steps and --threads must be at least 1")
    from eval.make_tiny_checkpoint import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_checkpoint(tmp, force=True, guidance_embeds=False, **MODEL_SIZES)
        folder = f"{tmp}/transformer"
        grid = 8  # 64x64 images through the 4x VAE: 16x16 latents, 8x8 tokens
        data = _inputs(args.batch, grid * grid, 64, MODEL_SIZES["t5_d_model"], MODEL_SIZES["clip_hidden_size"],
                       np.random.default_rng(0))
        ids = _ids(grid)
        ms_first, ms_times = time_mindspore(folder, args.batch, args.steps, data, ids)
        th_first, th_times = time_torch(folder, args.batch, args.steps, data, ids, args.threads)
    s = MODEL_SIZES
    print(f"transformer: {s['num_layers']} double + {s['num_single_layers']} single blocks, "
          f"{s['num_attention_heads']} heads x {s['attention_head_dim']}; batch {args.batch}, 64 image + "
          f"{MAX_SEQUENCE_LENGTH} text tokens, fp32, forward + backward + AdamW")
    print(f"MindSpore graph mode (ms.jit): median {np.median(ms_times):.2f} s/step (first call, with compilation: "
          f"{ms_first:.1f} s)")
    print(f"PyTorch eager ({args.threads} threads): median {np.median(th_times):.2f} s/step (first: {th_first:.1f} s)")
    print(f"MindSpore / PyTorch: {np.median(ms_times) / np.median(th_times):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
