"""TeaCache (TeaCache4FLUX rules), with one state per CFG branch.

Signal: block 0's modulated image input LN(h)(1 + scale_msa) + shift_msa. Its relative L1 change since the
previous step (the reference input is updated at every step, computed or not) is rescaled by a degree-4
polynomial fitted per model (a calibration) and accumulated. The rescaled value is floored at 0: the
published rule has no floor and FLUX's polynomial never needs one, but a fit can dip below 0 outside its
data, and a change must never lower the sum. While the accumulator stays below the threshold the step
reuses the image residual of the whole block stack stored at the last computed step; when it reaches the
threshold the step computes and the accumulator restarts at 0. The first and the last step always compute.
A reused step runs no block: only the embedding, block 0's modulation and the head.
"""
import mindspore as ms
from mindspore import ops

from fbcache_ms.base import WholeStackCache, relative_l1, signal_where
from fbcache_ms.state import Feature, _buffer
from models.layers import modulated_layer_norm


def polyval(coefficients, x):
    """Horner's rule, coefficients highest degree first (numpy.polyval's order)."""
    out = coefficients[0]
    for i in range(1, coefficients.shape[0]):
        out = out * x + coefficients[i]
    return out


class TeaCache(WholeStackCache):
    def __init__(self, transformer, batch, image_tokens, text_tokens):
        super().__init__(transformer, batch, image_tokens)
        self.prev_input = Feature(self.residual.value.shape, transformer.dtype, "prev_modulated_input")
        self.accumulated = _buffer((), ms.float32, "accumulated")

    def step_inputs(self, cache, i, num_steps):
        coefficients = ms.Tensor(cache.teacache_coefficients(), ms.float32)
        return ms.Tensor(cache.threshold, ms.float32), coefficients, ms.Tensor(i == 0 or i == num_steps - 1)

    def construct(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                  guidance, threshold, coefficients, always_compute):
        t = self.transformer
        h, e, temb, cos, sin = t.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                       img_ids, txt_ids, guidance)
        mods = t.transformer_blocks[0].modulation(temb)
        modulated = modulated_layer_norm(h, mods[0], mods[1], 1e-6)
        # a fitted polynomial can dip below 0 outside its data; a change never lowers the sum
        rescaled = ops.maximum(polyval(coefficients, relative_l1(self.prev_input.value, modulated)), 0.0)
        # at an always-computed step the sum is not formed (step 0 has no previous input to compare with)
        accumulated = ops.select(always_compute, ops.zeros_like(rescaled), self.accumulated + rescaled)
        skip = ops.logical_not(always_compute) & (accumulated < threshold)
        ops.assign(self.accumulated, ops.select(skip, accumulated, ops.zeros_like(accumulated)))
        self.prev_input.store(modulated)
        h_out = self.stack_or_reuse(skip, h, e, temb, cos, sin)
        return t.head(h_out, temb), ops.logical_not(skip), signal_where(ops.logical_not(always_compute), accumulated)
