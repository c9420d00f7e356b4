"""Check on an Ascend 910 that the fused fast paths agree with the portable math, before a long FID run.

The model's one device dispatch (`models/layers.py`) uses fused Ascend kernels where they exist (flash attention,
RMSNorm, GeLU) and the portable formulas elsewhere; LayerNorm is one fused kernel on both devices. This script runs each
fused kernel and its portable formula on the same random tensors, then the whole transformer of a checkpoint
built both ways (one compiled step on the same inputs), and prints the relative errors. Exit status 0 when all
are within the tolerance, 1 when one is not, 2 when there is no Ascend device.

  python -m eval.ascend_smoke                                   # the embedded model, fp16
  python -m eval.ascend_smoke --checkpoint /data/FLUX.1-dev --dtype bfloat16 --tolerance 2e-2
"""
import argparse
import os
import sys

import numpy as np
from mindspore import nn

import models.layers as layers
from eval.benchmark_vs_diffusers import rel_err


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="trained-tiny-flux-shapes", help="FLUX.1 folder (default: the embedded model)")
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--tolerance", type=float, default=1e-2,
                   help="largest relative error (max |fast - portable| / max |portable|) accepted (default 1e-2)")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.checkpoint, "transformer")):
        p.error(f"--checkpoint {args.checkpoint!r} has no transformer/ folder")
    if not args.tolerance > 0:
        p.error(f"--tolerance must be positive, got {args.tolerance}")
    return args


class _Gelu(nn.Cell):
    """gelu_tanh with the dispatch read when built, like the model's cells."""

    def __init__(self):
        super().__init__()
        self.fused = layers.fast_paths()

    def construct(self, x):
        return layers.gelu_tanh(x, self.fused)


def kernel_errors(dtype):
    """Each fused kernel against its portable formula on random FLUX-sized tensors."""
    import mindspore as ms
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((1, 1024, 24, 128)).astype(np.float32), dtype)
    q, k, v = (ms.Tensor(rng.standard_normal((1, 1024, 24, 128)).astype(np.float32), dtype) for _ in range(3))
    out = {}
    for name, build, tensors in (("RMSNorm", lambda: layers.RMSNorm(128, 1e-6, dtype), (x,)),
                                 ("attention", lambda: layers.Attention(24, 128), (q, k, v)),
                                 ("GeLU (tanh)", lambda: _Gelu(), (x,))):
        results = []
        for fast in (True, False):
            layers.set_fast_paths(fast)
            results.append(ms.jit(build().construct)(*tensors))
        layers.set_fast_paths(None)
        out[name] = rel_err(*(r.astype(ms.float32).asnumpy() for r in results))
    return out


def model_error(checkpoint, dtype):
    """One compiled transformer call, fast paths on and off, same inputs."""
    import mindspore as ms
    from models.checkpoint import read_config
    from models.flux_transformer import load_flux_transformer
    from eval.profile_step import inputs

    folder = os.path.join(checkpoint, "transformer")
    cfg = read_config(folder)
    shape = argparse.Namespace(height=16 * 16, width=16 * 16, text_tokens=64)
    outs = []
    for fast in (True, False):
        layers.set_fast_paths(fast)
        model = load_flux_transformer(folder, dtype)
        outs.append(ms.jit(model.construct)(**inputs(cfg, shape, ms.Tensor)).astype(ms.float32).asnumpy())
    layers.set_fast_paths(None)
    return rel_err(*outs)


def main(argv=None):
    args = parse_args(argv)
    import mindspore as ms
    from utils import on_ascend, resolve_dtype
    if not on_ascend():
        print(f"error: no Ascend device (device target {ms.get_context('device_target')}): the fused kernels "
              "this script checks exist on Ascend only; run it on a 910", file=sys.stderr)
        return 2
    dtype = resolve_dtype(args.dtype)
    errors = kernel_errors(dtype)
    errors[f"transformer ({args.checkpoint})"] = model_error(args.checkpoint, args.dtype)
    failed = False
    for name, err in errors.items():
        ok = err <= args.tolerance
        failed |= not ok
        print(f"{name:<48} fast vs portable rel. err {err:.2e}  {'ok' if ok else 'ABOVE ' + format(args.tolerance, 'g')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
