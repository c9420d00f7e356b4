"""FreqCa (frequency-aware caching): TaylorSeer's residual variant (its schedule, one cached tensor: the image
residual of the whole block stack, the paper's cumulative residual feature) with another forecast. The residual
is split over the image-token grid's 2-D spectrum: its low frequencies (the block |u|, v <= low_band x grid / 2
of fourier.py, DC always) are reused as stored at the last full step; its high frequencies are forecast from
the last full steps (order 2 by default, as published).

The split is linear, so the forecast is the stored residual plus the high band of the Taylor change:
    r_hat = low(r_n) + high(r_n + change) = r_n + change - low(change),
one low-band projection (two matmuls with the codec's matrices) per forecast step. The paper forecasts its
high band with a second-order Hermite predictor; here it is TaylorSeer's Newton forecast over the actual
full-step positions (exact for residuals that are polynomials of degree <= order in the step index).
low_band 1 reuses every frequency: plain reuse of the residual (TaylorSeer residual at order 0, FORA).
"""
from fbcache_ms.fourier import FourierCodec, check_grid
from fbcache_ms.state import TaylorFeature
from fbcache_ms.taylorseer import TaylorSeer


class LowBandReuse(TaylorFeature):
    """A TaylorFeature of an image-token tensor whose forecast keeps the low band as stored."""

    def __init__(self, shape, dtype, order, grid, low_band, name="cumulative_residual"):
        check_grid(grid, shape[1])
        super().__init__(shape, dtype, order, name)
        self.low = FourierCodec(grid, low_band)

    def forecast(self, weights):
        change = self.change(weights)
        stored = self.diffs[0]
        return stored if change is None else stored + (change - self.low.low_band(change))


class FreqCa(TaylorSeer):
    def __init__(self, transformer, batch, image_tokens, text_tokens, order, grid, low_band):
        residual = LowBandReuse((batch, image_tokens, transformer.config.dim), transformer.dtype, order, grid,
                                low_band)
        super().__init__(transformer, batch, image_tokens, text_tokens, order, "residual",
                         residual_feature=residual)
