"""One-off: what a computed step of a cache policy costs beside the plain compiled transformer on the same
inputs, every policy set so that every step computes, in one process, alternating.

  python results/speed/branch_cost.py CHECKPOINT [ROUNDS] [METHOD ...]
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

ALWAYS_COMPUTE = {  # every step computes (asserted below)
    "magcache": dict(method="magcache", threshold=0.0, retention=1.0),
    "teacache": dict(method="teacache", threshold=0.0),
    "fbcache": dict(method="fbcache", threshold=0.0),
    "fastcache": dict(method="fastcache", threshold=0.05, alpha=0.999, motion_ratio=1.0),
}
checkpoint = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 8
methods = sys.argv[3:] or list(ALWAYS_COMPUTE)
text, grid = 64, 32
pipe = FluxPipeline.from_pretrained(checkpoint)
embeds, pooled = pipe.encode_prompt(["a photo of a cat"], 1, text)
ids = ms.Tensor(latent_image_ids(grid, grid))
n = ids.shape[0]
rng = np.random.default_rng(0)
xs = [ms.Tensor(rng.standard_normal((1, n, pipe.transformer.config.in_channels)).astype(np.float32))
      for _ in range(2)]  # alternating inputs: a change-based rule sees a large change every step
t = ms.Tensor(np.full(1, 0.5, np.float32))
tail = (ms.Tensor(np.zeros((text, 3), np.float32)), ms.Tensor(np.full(1, 3.5, np.float32)))
policies = {}
for m in methods:
    cache = CacheConfig(**ALWAYS_COMPUTE[m])
    policy, step = pipe.cache_policy(cache, "cond", 1, n, text, (grid // 2, grid // 2))
    policy.reset()
    policy.load(cache)
    policies[m] = (cache, policy, step, [0])


def call(which):
    start = time.perf_counter()
    if which == "uncached":
        pipe._transformer(xs[0], embeds, pooled, t, ids, *tail).asnumpy()
    else:
        cache, policy, step, count = policies[which]
        i = count[0]
        count[0] += 1
        v, computed, _ = step(xs[i % 2], embeds, pooled, t, ids, *tail, *policy.step_inputs(cache, min(i, 7), 8))
        v.asnumpy()
        assert bool(computed.asnumpy()), f"{which}: step {i} was not computed"
    return time.perf_counter() - start


order = ["uncached"] + methods
for w in order:
    call(w)
    call(w)
times = {w: [] for w in order}
for r in range(rounds):
    for w in (order if r % 2 == 0 else order[::-1]):
        times[w].append(call(w))
base = float(np.median(times["uncached"]))
for w in order:
    print(f"{w:10s} {np.median(times[w]):.3f} s, {np.median(times[w]) / base:.3f} of the plain transformer")
write_json_atomic(os.path.join(os.path.dirname(os.path.abspath(__file__)), "branch_cost.json"),
                  dict(rounds=rounds, times=times, of_plain={w: float(np.median(v)) / base for w, v in times.items()}))
