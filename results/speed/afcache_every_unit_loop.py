"""One-off (2026-11-27), run from a tree with afcache_every_unit_not_kept.diff applied: AFCache at threshold 1 in a loop of
its compiled step, the every-unit graph against the per-unit `if` graph, with and without the host reads that
AFCache.record makes.  python results/speed/afcache_every_unit_loop.py CHECKPOINT ROUNDS"""
import os, sys, time
sys.path.insert(0, os.getcwd())
import numpy as np
import mindspore as ms
from fbcache_ms.config import CacheConfig
from pipelines.flux_pipeline import FluxPipeline, latent_image_ids
checkpoint, rounds = sys.argv[1], int(sys.argv[2])
text, grid = 64, 32
pipe = FluxPipeline.from_pretrained(checkpoint)
embeds, pooled = pipe.encode_prompt(["a photo of a cat"], 1, text)
ids = ms.Tensor(latent_image_ids(grid, grid))
n = ids.shape[0]
rng = np.random.default_rng(0)
xs = [ms.Tensor(rng.standard_normal((1, n, pipe.transformer.config.in_channels)).astype(np.float32)) for _ in range(2)]
t = ms.Tensor(np.full(1, 0.5, np.float32))
tail = (ms.Tensor(np.zeros((text, 3), np.float32)), ms.Tensor(np.full(1, 3.5, np.float32)))
cache = CacheConfig("afcache", threshold=1.0, order=2)
policy, step = pipe.cache_policy(cache, "cond", 1, n, text, (grid // 2, grid // 2))
policy.reset()
count = [0]
def call(which):
    i = count[0]; count[0] += 1
    start = time.perf_counter()
    if which == "uncached":
        pipe._transformer(xs[0], embeds, pooled, t, ids, *tail).asnumpy()
    else:
        if i % 4 == 0:
            policy.reset()
        inputs = policy.step_inputs(cache, i % 4, 8)
        if which.startswith("ifs"):
            inputs = inputs[:-1] + (False,)
        v, computed, codes = step(xs[i % 2], embeds, pooled, t, ids, *tail, *inputs)
        v.asnumpy()
    elapsed = time.perf_counter() - start
    if which.endswith("-read"):
        codes.asnumpy(); policy.stability.asnumpy()
    return elapsed
order = ["uncached", "every", "every-read", "ifs", "ifs-read"]
for w in order:
    call(w); call(w)
times = {w: [] for w in order}
for r in range(rounds):
    for w in (order if r % 2 == 0 else order[::-1]):
        for _ in range(2):
            times[w].append(call(w))
base = float(np.median(times["uncached"]))
for w in order:
    print(f"{w:12s} {np.median(times[w]):.3f} s, {np.median(times[w]) / base:.3f} of the plain transformer", flush=True)
