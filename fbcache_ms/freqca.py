"""FreqCa (frequency-aware caching): TaylorSeer's schedule on one cached tensor, the image residual of the whole
block stack (the paper's cumulative residual feature), split over the image-token grid's 2-D spectrum. Its low
frequencies (the block |u|, v <= low_band x grid / 2 of fourier.py, DC always) are reused as stored at the last
full step; its high frequencies are forecast from the last full steps (order 2 by default, as published).

The split is linear, so the forecast is the stored residual plus the high band of the Taylor change:
    r_hat = low(r_n) + high(r_n + change) = r_n + change - low(change),
one low-band projection (two matmuls with the codec's matrices) per forecast step. The paper forecasts its
high band with a second-order Hermite predictor; here it is TaylorSeer's Newton forecast over the actual
full-step positions (exact for residuals that are polynomials of degree <= order in the step index).
low_band 1 reuses every frequency: plain reuse of the residual (TaylorSeer residual at order 0, FORA).
"""
import mindspore as ms

from fbcache_ms.base import CachePolicy, no_signal
from fbcache_ms.fourier import FourierCodec, check_grid
from fbcache_ms.state import NewtonClock, TaylorFeature


class FreqCa(CachePolicy):
    def __init__(self, transformer, batch, image_tokens, text_tokens, order, grid, low_band):
        super().__init__(transformer)
        check_grid(grid, image_tokens)
        self.clock = NewtonClock(order, "freqca")
        self.residual = TaylorFeature((batch, image_tokens, transformer.config.dim), transformer.dtype, order,
                                      "cumulative_residual")
        self.low = FourierCodec(grid, low_band)

    def step_inputs(self, cache, i, num_steps):
        return ms.Tensor(float(i), ms.float32), ms.Tensor(cache.is_full_step(i))

    def forecast(self, step):
        """The residual's forecast at `step`: low band as stored, high band forecast."""
        change = self.residual.change(self.clock.forecast_weights(step))
        stored = self.residual.diffs[0]
        return stored if change is None else stored + (change - self.low.low_band(change))

    def construct(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                  guidance, step, full):
        t = self.transformer
        h, e, temb, cos, sin = t.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                       img_ids, txt_ids, guidance)
        if full:
            h_out = t.run_blocks(h, e, temb, cos, sin)[0]
            self.residual.update(h_out - h, self.clock.update_scales(step))
            self.clock.advance(step)
        else:
            h_out = h + self.forecast(step)
        return t.head(h_out, temb), full, no_signal()
