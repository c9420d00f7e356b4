"""TaylorSeer: full steps on a fixed schedule (warm-up, then every `interval`-th step), Taylor (Newton)
forecasts of the cached features in between. Two variants: per-module (the published one) and the residual
of the whole block stack (one tensor per order: the memory-light one)."""
import mindspore as ms
from mindspore import nn, ops

from fbcache_ms.base import CachePolicy, no_signal
from fbcache_ms.fourier import FourierTaylorFeature
from fbcache_ms.state import NewtonClock, TaylorFeature


class TaylorSeer(CachePolicy):
    """TaylorSeer: full steps on a fixed schedule, Taylor (Newton) forecasts in between.

    per_module: the pre-gate outputs of attention and MLP of each double block and of proj_out of each single
    block are forecast and the current step's modulation gates re-applied. Only the image stream's are kept: a
    forecast does not depend on the stream it is added to and the head reads the image tokens only, so on a
    forecast step the text stream's forecasts would be computed for nothing (the output is the same).
    residual: one forecast per stream of the whole block stack's residual.
    residual_feature: the residual variant's cached tensor with its own forecast rule (FreqCa's); default a
    TaylorFeature, kept Fourier-compressed when `fourier` (grid, ratio) is given.
    """

    def __init__(self, transformer, batch, image_tokens, text_tokens, order, variant, fourier=None,
                 residual_feature=None):
        super().__init__(transformer)
        cfg, dtype = transformer.config, transformer.dtype
        img = (batch, image_tokens, cfg.dim)
        self.per_module = variant == "per_module"
        self.clock = NewtonClock(order, "taylorseer")  # every feature updates on the same (full) steps
        if self.per_module:
            def features(what, n):
                return nn.CellList([TaylorFeature(img, dtype, order, f"{what}{i}") for i in range(n)])
            self.attn = features("attn", cfg.num_layers)
            self.ff = features("ff", cfg.num_layers)
            self.single = features("single", cfg.num_single_layers)  # the image tokens of proj_out
        elif residual_feature is not None:
            self.res_h = residual_feature
        else:
            self.res_h = FourierTaylorFeature(img, dtype, order, *fourier, "res_h") if fourier \
                else TaylorFeature(img, dtype, order, "res_h")

    def step_inputs(self, cache, i, num_steps):
        return ms.Tensor(float(i), ms.float32), ms.Tensor(cache.is_full_step(i))

    def _full_stack(self, h, e, temb, cos, sin, step):
        """The block stack, every image-stream module's pre-gate output kept for the forecasts."""
        t, coef = self.transformer, self.clock.update_scales(step)
        for block, s_attn, s_ff in zip(t.transformer_blocks, self.attn, self.ff):
            h, e, attn_h, ff_h = block(h, e, temb, cos, sin)
            s_attn.update(attn_h, coef)
            s_ff.update(ff_h, coef)
        txt_len = e.shape[1]
        x = ops.cat([e, h], axis=1)
        for block, state in zip(t.single_transformer_blocks, self.single):
            x, out = block(x, temb, cos, sin)
            state.update(out[:, txt_len:], coef)
        self.clock.advance(step)
        return x[:, txt_len:]

    def _forecast_stack(self, h, temb, step):
        """The block stack's image output from the forecasts alone: no block runs, only its gates."""
        t, coef = self.transformer, self.clock.forecast_weights(step)
        for block, s_attn, s_ff in zip(t.transformer_blocks, self.attn, self.ff):
            gate_attn, gate_ff = block.image_gates(temb)
            h = h + gate_attn[:, None] * s_attn.forecast(coef) + gate_ff[:, None] * s_ff.forecast(coef)
        for block, state in zip(t.single_transformer_blocks, self.single):
            h = block.add_gated(h, state.forecast(coef), block.gate(temb))
        return h

    def construct(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                  guidance, step, full):
        t = self.transformer
        h, e, temb, cos, sin = t.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                       img_ids, txt_ids, guidance)
        if self.per_module:
            if full:
                h_out = self._full_stack(h, e, temb, cos, sin, step)
            else:
                h_out = self._forecast_stack(h, temb, step)
        else:
            if full:
                h_out = t.run_blocks(h, e, temb, cos, sin)[0]
                self.res_h.update(h_out - h, self.clock.update_scales(step))
                self.clock.advance(step)
            else:
                h_out = h + self.res_h.forecast(self.clock.forecast_weights(step))
        return t.head(h_out, temb), full, no_signal()
