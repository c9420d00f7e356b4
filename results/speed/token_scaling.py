"""One-off: how the compiled uncached transformer's step time scales with the image tokens it runs, and what
FastCache's reduced step (motion ratio 0.5: the top half of the image tokens run) costs beside the plain
transformer on as many tokens, in one process, alternating (FastCache's ideal counts a reduced step as
(text + k) / (text + N) of a full one).

  python results/speed/token_scaling.py CHECKPOINT [ROUNDS]   # FLUX-proportioned model, 256x256, 64 text tokens
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import mindspore as ms  # noqa: E402

from fbcache_ms.config import CacheConfig  # noqa: E402
from pipelines.flux_pipeline import FluxPipeline, latent_image_ids  # noqa: E402
from utils import write_json_atomic  # noqa: E402

checkpoint, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 12
text, grid = 64, 32  # 256x256: a 32x32 latent grid, 16x16 = 256 image tokens after 2x2 packing
pipe = FluxPipeline.from_pretrained(checkpoint)
embeds, pooled = pipe.encode_prompt(["a photo of a cat"], 1, text)
ids = latent_image_ids(grid, grid)
n = ids.shape[0]
rng = np.random.default_rng(0)
x = rng.standard_normal((1, n, pipe.transformer.config.in_channels)).astype(np.float32)
common = (embeds, pooled, ms.Tensor(np.full(1, 0.5, np.float32)))
tail = (ms.Tensor(np.zeros((text, 3), np.float32)), ms.Tensor(np.full(1, 3.5, np.float32)))
shapes = {k: (ms.Tensor(x[:, :k]), ms.Tensor(ids[:k])) for k in (n, n // 2, n // 4)}  # motion ratio 1, 0.5, 0.25


# FastCache, every step after the first reduced: alpha near 1 makes any change significant, and the input
# alternates between two noises, so the change is never small
cache = CacheConfig("fastcache", threshold=0.05, alpha=0.999, motion_ratio=0.5)
policy, step = pipe.cache_policy(cache, "cond", 1, n, text, (grid // 2, grid // 2))
policy.reset()
other = ms.Tensor(rng.standard_normal(x.shape).astype(np.float32))
calls = [0]


def call(k):
    start = time.perf_counter()
    if k == "fastcache":
        xs = shapes[n][0] if calls[0] % 2 else other
        calls[0] += 1
        v, computed, _ = step(xs, *common, shapes[n][1], *tail, *policy.step_inputs(cache, min(calls[0] - 1, 1), 8))
        v.asnumpy()
        assert bool(computed.asnumpy()) and policy.k == n // 2, calls[0]  # the first call: step 0, every token
    else:
        xs, img_ids = shapes[k]
        pipe._transformer(xs, *common, img_ids, *tail).asnumpy()
    return time.perf_counter() - start


order = list(shapes) + ["fastcache"]
for k in order:
    call(k)  # compile (FastCache's first call runs every token)
times = {k: [] for k in order}
for r in range(rounds):
    for k in (order if r % 2 == 0 else order[::-1]):
        times[k].append(call(k))
full = float(np.median(times[n]))
rows = []
for k, t in times.items():
    med = float(np.median(t))
    tokens = n // 2 if k == "fastcache" else k
    rows.append(dict(run=k if k == "fastcache" else "uncached", image_tokens=tokens, text_tokens=text, step_s=med,
                     of_full=med / full, token_share=(text + tokens) / (text + n)))
    print(f"{'fastcache reduced' if k == 'fastcache' else 'uncached'}, image tokens {tokens:4d} (+{text} text): "
          f"{med:.3f} s, {med / full:.3f} of the full step; token share {(text + tokens) / (text + n):.3f}")
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "token_scaling.json")
write_json_atomic(out, dict(checkpoint=os.path.basename(os.path.normpath(checkpoint)), rounds=rounds, rows=rows,
                           times={str(k): v for k, v in times.items()}))
