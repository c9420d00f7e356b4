"""One-off (2026-11-27), run from a tree with afcache_every_unit_not_kept.diff applied: AFCache at threshold 1 in pipeline
calls, the every-unit graph against the per-unit `if` graph (forced), alternating with the uncached model.
  python results/speed/afcache_every_unit_pipeline.py CHECKPOINT ROUNDS"""
import os, sys, time, json
sys.path.insert(0, os.getcwd())
import numpy as np
from fbcache_ms.config import CacheConfig
from fbcache_ms.afcache import AFCache
from pipelines.flux_pipeline import FluxPipeline
pipe = FluxPipeline.from_pretrained(sys.argv[1], dtype="float32", mode="graph")
call = dict(prompt="a photo of a cat on a wooden table", height=256, width=256, num_inference_steps=4,
            max_sequence_length=64, seed=0, progress=False, output_type="latent")
cache = CacheConfig("afcache", threshold=1.0, order=2)
original = AFCache.step_inputs
mode = {"force": False}
def patched(self, *a):
    x = original(self, *a)
    return x[:-1] + (False,) if mode["force"] else x
AFCache.step_inputs = patched
def go(w):
    if w == "uncached":
        return pipe(**call).timings["steps"]
    mode["force"] = w == "ifs"
    return pipe(**call, cache=cache).timings["steps"]
order = ["uncached", "every", "ifs"]
for w in order: go(w)
times = {w: [] for w in order}
for r in range(int(sys.argv[2])):
    for w in (order if r % 2 == 0 else order[::-1]):
        s = go(w); times[w] += s; print(w, [round(x, 3) for x in s], flush=True)
base = np.median(times["uncached"])
for w in order:
    print(w, round(float(np.median(times[w])), 3), round(float(np.median(times[w]) / base), 3))
