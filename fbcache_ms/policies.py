"""The cache policy for a CacheConfig: one class per method, each in its own file of this package."""
from fbcache_ms.afcache import AFCache
from fbcache_ms.config import CacheConfig
from fbcache_ms.fastcache import FastCache
from fbcache_ms.fbcache import FBCache
from fbcache_ms.freqca import FreqCa
from fbcache_ms.magcache import MagCache
from fbcache_ms.taylorseer import TaylorSeer
from fbcache_ms.teacache import TeaCache


def make_policy(config: CacheConfig, transformer, batch, image_tokens, text_tokens, grid=None):
    """The policy cell for `config` at one input shape, with freshly allocated (zeroed) state.
    grid: (rows, columns) of the image tokens, needed for Fourier storage (default: a square grid)."""
    if grid is None:
        side = int(round(image_tokens ** 0.5))
        grid = (side, side)
    fourier = (grid, config.fourier_ratio) if config.fourier_ratio < 1 else None
    if config.uses_fbcache:
        order = config.order if config.uses_taylor else None
        return FBCache(transformer, batch, image_tokens, text_tokens, order, config.fn, config.bn, fourier)
    if config.method == "taylorseer":
        return TaylorSeer(transformer, batch, image_tokens, text_tokens, config.order, config.variant, fourier)
    if config.method == "teacache":
        return TeaCache(transformer, batch, image_tokens, text_tokens)
    if config.method == "fastcache":
        return FastCache(transformer, batch, image_tokens, text_tokens, config.motion_ratio,
                         config.static_map)
    if config.method == "magcache":
        return MagCache(transformer, batch, image_tokens, text_tokens)
    if config.method == "freqca":
        return FreqCa(transformer, batch, image_tokens, text_tokens, config.order, grid, config.low_band)
    if config.method == "afcache":
        return AFCache(transformer, batch, image_tokens, text_tokens, config.order, config.group_size)
    raise ValueError(f"no cache policy for method {config.method!r}")
