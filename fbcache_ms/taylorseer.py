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

    per_module: the pre-gate outputs of attention and MLP (both streams) of each double block and of
    proj_out of each single block are forecast; the current step's modulation gates are re-applied.
    residual: one forecast per stream of the whole block stack's residual.
    """

    def __init__(self, transformer, batch, image_tokens, text_tokens, order, variant, fourier=None):
        super().__init__(transformer)
        cfg, dtype = transformer.config, transformer.dtype
        dim = cfg.dim
        img, txt, joint = (batch, image_tokens, dim), (batch, text_tokens, dim), (batch, text_tokens + image_tokens, dim)
        self.per_module = variant == "per_module"
        self.clock = NewtonClock(order, "taylorseer")  # every feature updates on the same (full) steps
        if self.per_module:
            def features(shape, what, n):
                return nn.CellList([TaylorFeature(shape, dtype, order, f"{what}{i}") for i in range(n)])
            # pre-gate outputs: attention and MLP of both streams in double blocks, proj_out in single blocks
            self.attn = features(img, "attn", cfg.num_layers)
            self.attn_ctx = features(txt, "attn_ctx", cfg.num_layers)
            self.ff = features(img, "ff", cfg.num_layers)
            self.ff_ctx = features(txt, "ff_ctx", cfg.num_layers)
            self.single = features(joint, "single", cfg.num_single_layers)
        else:
            self.res_h = FourierTaylorFeature(img, dtype, order, *fourier, "res_h") if fourier \
                else TaylorFeature(img, dtype, order, "res_h")

    def step_inputs(self, cache, i, num_steps):
        return ms.Tensor(float(i), ms.float32), ms.Tensor(cache.is_full_step(i))

    def _per_module_stack(self, h, e, temb, cos, sin, step, full):
        """The block stack with every module's pre-gate output computed (full) or forecast."""
        t = self.transformer
        coef = self.clock.update_scales(step) if full else self.clock.forecast_weights(step)
        for block, s_attn, s_attn_ctx, s_ff, s_ff_ctx in zip(t.transformer_blocks, self.attn, self.attn_ctx,
                                                             self.ff, self.ff_ctx):
            mods = block.modulation(temb)
            if full:
                attn_h, attn_e = block.attention_outputs(h, e, mods, cos, sin)
                s_attn.update(attn_h, coef)
                s_attn_ctx.update(attn_e, coef)
            else:
                attn_h, attn_e = s_attn.forecast(coef), s_attn_ctx.forecast(coef)
            h, e = block.add_gated(h, e, attn_h, attn_e, mods[2], mods[8])
            if full:
                ff_h, ff_e = block.mlp_outputs(h, e, mods)
                s_ff.update(ff_h, coef)
                s_ff_ctx.update(ff_e, coef)
            else:
                ff_h, ff_e = s_ff.forecast(coef), s_ff_ctx.forecast(coef)
            h, e = block.add_gated(h, e, ff_h, ff_e, mods[5], mods[11])
            e = block.clip(e)
        txt_len = e.shape[1]
        x = ops.cat([e, h], axis=1)
        for block, state in zip(t.single_transformer_blocks, self.single):
            mods = block.modulation(temb)
            if full:
                out = block.block_output(x, mods, cos, sin)
                state.update(out, coef)
            else:
                out = state.forecast(coef)
            x = block.add_gated(x, out, mods[2])
        if full:
            self.clock.advance(step)
        return x[:, txt_len:]

    def construct(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                  guidance, step, full):
        t = self.transformer
        h, e, temb, cos, sin = t.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                       img_ids, txt_ids, guidance)
        if self.per_module:
            if full:
                h_out = self._per_module_stack(h, e, temb, cos, sin, step, True)
            else:
                h_out = self._per_module_stack(h, e, temb, cos, sin, step, False)
        else:
            if full:
                h_out, _ = t.run_blocks(h, e, temb, cos, sin)
                self.res_h.update(h_out - h, self.clock.update_scales(step))
                self.clock.advance(step)
            else:
                h_out = h + self.res_h.forecast(self.clock.forecast_weights(step))
        return t.head(h_out, temb), full, no_signal()
