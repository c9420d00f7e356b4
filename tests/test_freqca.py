"""FreqCa: against the torch reference (low band of the last residual + high band of its Taylor forecast, with
torch.fft), low band 1 is plain reuse of the stack's residual (FORA), its state, settings and errors."""
import numpy as np
import pytest

from fbcache_ms.config import CacheConfig
from fbcache_ms.policies import make_policy
from parity import rel_err
from test_cache import CALL, _latents, _ours, reference_run

SCHEDULE = dict(warmup=2, interval=3)  # full steps 0, 1, 2, 5 of 8: forecasts use 3 points at order 2


@pytest.mark.parametrize("order,low_band", [(2, 0.5), (1, 0.3)])
def test_freqca_matches_reference(torch_dev_pipeline, dev_pipeline, order, low_band):
    latents = _latents(seed=4)
    expected, ref_pattern = reference_run(torch_dev_pipeline, latents, "a cat", method="freqca", order=order,
                                          low_band=low_band, grid=(4, 4), **SCHEDULE)
    cache = CacheConfig("freqca", order=order, low_band=low_band, **SCHEDULE)
    ours, pattern = _ours(dev_pipeline, latents, "a cat", cache)
    assert pattern == ref_pattern == {"cond": "CCC..C.."}
    assert rel_err(ours, expected) < 1e-4
    # neither plain reuse nor the full forecast: the split changed what was added
    for other in (CacheConfig("taylorseer", variant="residual", order=0, **SCHEDULE),
                  CacheConfig("taylorseer", variant="residual", order=order, **SCHEDULE)):
        assert np.abs(ours - _ours(dev_pipeline, latents, "a cat", other)[0]).max() > 1e-4


def test_low_band_one_is_plain_reuse(dev_pipeline):
    latents = _latents(seed=5)
    ours, pattern = _ours(dev_pipeline, latents, "a dog", CacheConfig("freqca", low_band=1.0, **SCHEDULE))
    fora, fora_pattern = _ours(dev_pipeline, latents, "a dog",
                               CacheConfig("taylorseer", variant="residual", order=0, **SCHEDULE))
    assert pattern == fora_pattern
    assert rel_err(ours, fora) < 1e-5


def test_true_cfg_and_no_leak(dev_pipeline):
    cache = CacheConfig("freqca", **SCHEDULE)
    kw = dict(negative_prompt="blurry", true_cfg_scale=2.0)
    first = dev_pipeline("a cat", latents=_latents(seed=5), cache=cache, **CALL, **kw)
    dev_pipeline("a dog", latents=_latents(seed=6), cache=cache, **CALL, **kw)
    again = dev_pipeline("a cat", latents=_latents(seed=5), cache=cache, **CALL, **kw)
    np.testing.assert_array_equal(first.images, again.images)
    assert set(first.cache_stats.computed) == {"cond", "uncond"}


def test_state_is_one_residual_per_order(dev_pipeline):
    t = dev_pipeline.transformer
    for order in (0, 2):
        policy = make_policy(CacheConfig("freqca", order=order), t, 2, 16, 8)
        # the order + 1 Newton factors of one [2, 16, dim] float32 tensor, and the clock's few scalars
        factors = (order + 1) * 2 * 16 * t.config.dim * 4
        assert factors <= policy.state_bytes() < factors + 64


def test_defaults_and_errors():
    cache = CacheConfig("freqca")
    assert (cache.order, cache.low_band, cache.interval, cache.warmup, cache.variant) == (2, 0.5, 5, 3, "residual")
    assert CacheConfig("taylorseer").order == 1 and CacheConfig("taylorseer").low_band is None
    for kwargs, match in [(dict(method="fbcache", low_band=0.5), "low_band applies to freqca"),
                          (dict(method="freqca", low_band=0.0), "low_band must be in"),
                          (dict(method="freqca", low_band=1.5), "low_band must be in")]:
        with pytest.raises(ValueError, match=match):
            CacheConfig(**kwargs)
