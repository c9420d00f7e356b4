"""The cache policy for a CacheConfig: one class per method, each in its own file of this package."""
from fbcache_ms.config import CacheConfig
from fbcache_ms.fbcache import FBCache
from fbcache_ms.magcache import MagCache
from fbcache_ms.taylorseer import TaylorSeer
from fbcache_ms.teacache import TeaCache


def make_policy(config: CacheConfig, transformer, batch, image_tokens, text_tokens):
    """The policy cell for `config` at one input shape, with freshly allocated (zeroed) state."""
    if config.uses_fbcache:
        order = config.order if config.uses_taylor else None
        return FBCache(transformer, batch, image_tokens, text_tokens, order, config.fn, config.bn)
    if config.method == "taylorseer":
        return TaylorSeer(transformer, batch, image_tokens, text_tokens, config.order, config.variant)
    if config.method == "teacache":
        return TeaCache(transformer, batch, image_tokens, text_tokens)
    if config.method == "magcache":
        return MagCache(transformer, batch, image_tokens, text_tokens)
    raise ValueError(f"no cache policy for method {config.method!r}")
