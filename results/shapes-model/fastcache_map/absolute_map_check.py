"""One-off check behind the README's remark on FastCache's published static-token map: a single linear map from a
static token's stack input h_t to its residual r_t ([h_t, 1] @ W, ridge), fitted on the embedded model's uncached
runs of 32 calibration prompts and scored on 25 held-out ones, against reusing the residual from `gap` steps
before (the static tokens: outside the top half by change over the gap). Run from the repository root:

  python results/shapes-model/fastcache_map/absolute_map_check.py > results/shapes-model/fastcache_map/absolute_map_check.txt
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.getcwd())
from eval.cache_signals import uncached_trajectory  # noqa: E402
from eval.probes import probe_cell, read_stack_io  # noqa: E402
from eval.shapes_data import heldout_prompts, training_sample  # noqa: E402
from pipelines.flux_pipeline import FluxPipeline  # noqa: E402
from utils import EMBEDDED_MODEL  # noqa: E402

STEPS = 28
pipe = FluxPipeline.from_pretrained(EMBEDDED_MODEL)
probe = probe_cell(pipe.transformer, read_stack_io)


def runs(prompts):
    out = [tensors for _, _, tensors in uncached_trajectory(pipe, prompts, STEPS, probe)]
    return (np.stack([t[k] for t in out]).astype(np.float64) for k in (0, 1))  # [steps, B, N, D]


def static_pairs(h, r, gap):
    for t in range(gap, STEPS):
        saliency = ((h[t] - h[t - gap]) ** 2).sum(axis=(0, 2))
        static = np.argsort(-saliency)[h.shape[2] // 2:]
        yield h[t][:, static], r[t][:, static], r[t - gap][:, static]


def with_one(x):
    return np.concatenate([x, np.ones(x.shape[:-1] + (1,))], -1).reshape(-1, x.shape[-1] + 1)


hc, rc = runs([training_sample(987_654_321 + k).caption for k in range(32)])  # calibrate_cache's prompts
ht, rt = runs([s.caption for s in heldout_prompts(25, 0)])
for gap in (1, 2, 3, 4):
    x = np.concatenate([with_one(h) for h, _, _ in static_pairs(hc, rc, gap)])
    y = np.concatenate([r.reshape(-1, r.shape[-1]) for _, r, _ in static_pairs(hc, rc, gap)])
    a = x.T @ x
    w = np.linalg.solve(a + 1e-3 * np.trace(a) / len(a) * np.eye(len(a)), x.T @ y)
    err = {"reused": 0.0, "input->residual map": 0.0}
    energy = 0.0
    for h, r, r0 in static_pairs(ht, rt, gap):
        err["reused"] += ((r0 - r) ** 2).sum()
        err["input->residual map"] += ((with_one(h) @ w - r.reshape(-1, r.shape[-1])) ** 2).sum()
        energy += (r ** 2).sum()
    print(f"gap {gap}: " + ", ".join(f"{k} {-10 * np.log10(v / energy):.1f} dB" for k, v in err.items()))
