"""MagCache (the semantics of diffusers' MagCacheConfig and the authors' FLUX code), one state per CFG branch.

A calibration gives gamma_t, the mean over tokens of |r_t| / |r_t-1| for the block stack's image residual r
on the uncached model. From step round(retention_ratio * steps) on, each step multiplies the accumulated ratio
by gamma_t, adds |1 - ratio| to the accumulated error and counts a skip; the step reuses the residual stored
at the last computed step while the error stays <= threshold and at most `max_skip` steps in a row were
reused; otherwise it computes and the ratio, error and count restart (1, 0, 0). Earlier steps (and step 0,
whatever the retention) always compute.
A reused step runs no block.
"""
import mindspore as ms
from mindspore import ops

from fbcache_ms.base import WholeStackCache, signal_where
from fbcache_ms.state import _buffer


class MagCache(WholeStackCache):
    def __init__(self, transformer, batch, image_tokens, text_tokens):
        super().__init__(transformer, batch, image_tokens)
        self.ratio = _buffer((), ms.float32, "accumulated_ratio")
        self.error = _buffer((), ms.float32, "accumulated_error")
        self.skipped = _buffer((), ms.float32, "consecutive_skips")

    def reset(self):
        super().reset()
        ops.assign(self.ratio, ms.Tensor(1.0, ms.float32))

    def step_inputs(self, cache, i, num_steps):
        gamma = cache.magcache_ratios(num_steps)[i]
        # step 0 always computes, whatever the retention: before it no residual exists to reuse
        always = i == 0 or i < int(cache.retention * num_steps + 0.5)
        return (ms.Tensor(cache.threshold, ms.float32), ms.Tensor(gamma, ms.float32), ms.Tensor(always),
                ms.Tensor(float(cache.max_skip), ms.float32))

    def construct(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                  guidance, threshold, gamma, always_compute, max_skip):
        t = self.transformer
        h, e, temb, cos, sin = t.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                       img_ids, txt_ids, guidance)
        ratio = self.ratio * gamma
        error = self.error + ops.abs(1.0 - ratio)
        skipped = self.skipped + 1.0
        skip = ops.logical_not(always_compute) & (error <= threshold) & (skipped <= max_skip)
        one, zero = ops.ones_like(ratio), ops.zeros_like(ratio)
        ops.assign(self.ratio, ops.select(skip, ratio, one))
        ops.assign(self.error, ops.select(skip, error, zero))
        ops.assign(self.skipped, ops.select(skip, skipped, zero))
        h_out = self.stack_or_reuse(skip, h, e, temb, cos, sin)
        return t.head(h_out, temb), ops.logical_not(skip), signal_where(ops.logical_not(always_compute), error)
