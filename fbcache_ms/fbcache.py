"""First-Block Cache (ParaAttention semantics), generalised to cache-dit's DBCache Fn / Bn, optionally
with a Taylor forecast of the reused residual (FBCache + TaylorSeer).

The first `fn` blocks always run; the relative L1 change of their image residual against the one stored
at the last fully computed step is the signal. Hit (change < threshold, never at step 0 or before a first
full step): the middle blocks are replaced by the residuals they added at the last miss (or their Taylor
forecast); the last `bn` blocks still run on top. Miss: everything runs and the residuals are stored.
fn=1, bn=0 is FBCache, the same operations as before the generalisation. With `fourier` the stored image
residual is kept as its low-frequency Fourier block over the token grid (fourier.py); the decision reference
(prev_r1) stays exact, so compression changes what is reused, never when.
"""
import mindspore as ms
from mindspore import ops

from fbcache_ms.base import CachePolicy, relative_l1, signal_where
from fbcache_ms.fourier import FourierFeature, FourierTaylorFeature
from fbcache_ms.state import Feature, NewtonClock, TaylorFeature


class FBCache(CachePolicy):
    def __init__(self, transformer, batch, image_tokens, text_tokens, order=None, fn=1, bn=0, fourier=None):
        super().__init__(transformer)
        total = transformer.num_blocks
        if not (fn >= 1 and bn >= 0 and fn + bn < total):
            raise ValueError(f"fn={fn}, bn={bn}: need fn >= 1, bn >= 0 and fn + bn < {total} blocks")
        self.fn, self.bn, self.mid_stop = fn, bn, total - bn
        self.blocks_on_reuse = fn + bn
        dim, dtype = transformer.config.dim, transformer.dtype
        img, txt = (batch, image_tokens, dim), (batch, text_tokens, dim)
        self.prev_r1 = Feature(img, dtype, "prev_r1")
        self.use_taylor = order is not None
        # fourier = (grid, ratio): the image residual is kept compressed (fourier.py); text tokens have no grid
        if self.use_taylor:
            self.res_h = FourierTaylorFeature(img, dtype, order, *fourier, "res_h") if fourier \
                else TaylorFeature(img, dtype, order, "res_h")
            self.res_e = TaylorFeature(txt, dtype, order, "res_e")
            self.clock = NewtonClock(order, "res")
        else:
            self.res_h = FourierFeature(img, dtype, *fourier, "res_h") if fourier else Feature(img, dtype, "res_h")
            self.res_e = Feature(txt, dtype, "res_e")

    def step_inputs(self, cache, i, num_steps):
        return ms.Tensor(float(i), ms.float32), ms.Tensor(cache.threshold, ms.float32)

    def reused(self, feature, weights):
        return feature.forecast(weights) if self.use_taylor else feature.value

    def store(self, r1, res_h, res_e, step):
        self.prev_r1.store(r1)
        if self.use_taylor:
            scales = self.clock.update_scales(step)
            self.res_h.update(res_h, scales)
            self.res_e.update(res_e, scales)
            self.clock.advance(step)
        else:
            self.res_h.store(res_h)
            self.res_e.store(res_e)

    def construct(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                  guidance, step, threshold):
        t = self.transformer
        h, e, temb, cos, sin = t.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                       img_ids, txt_ids, guidance)
        h_f, e_f = t.run_blocks(h, e, temb, cos, sin, 0, self.fn)
        r1 = h_f - h
        change = relative_l1(self.prev_r1.value, r1)
        # step 0 always misses (and stores), so every later step has a reference. Not `filled`, which the branch
        # below sets: a condition reading what its branch writes cost FastCache ~10% of a step (results/speed)
        has_signal = step > 0
        hit = has_signal & (change < threshold)
        change = signal_where(has_signal, change)
        if hit:
            weights = self.clock.forecast_weights(step) if self.use_taylor else None
            h_mid = h_f + self.reused(self.res_h, weights)
            # FLUX's head reads only the image stream: the text residual matters only when blocks follow
            e_mid = e_f + self.reused(self.res_e, weights) if self.bn > 0 else e_f
        else:
            h_mid, e_mid = t.run_blocks(h_f, e_f, temb, cos, sin, self.fn, self.mid_stop)
            self.store(r1, h_mid - h_f, e_mid - e_f, step)
        h_out = t.run_blocks(h_mid, e_mid, temb, cos, sin, self.mid_stop)[0]
        return t.head(h_out, temb), ops.logical_not(hit), change
