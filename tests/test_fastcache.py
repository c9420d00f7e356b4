"""FastCache: the chi-square skip and the top-k token reduction against the torch reference (which uses the
exact chi-square quantile and diffusers' blocks on the gathered tokens and RoPE rows), alpha moving the hit
rate, exactness when nothing is skipped or reduced, no recompilation, no state leak, true CFG."""
import numpy as np
import pytest
from mindspore.graph.api import ms_compile_cache

from fbcache_ms.config import CacheConfig
from parity import rel_err
from test_cache import CALL, STEPS, _latents, _ours, reference_run


def test_nothing_skipped_or_reduced_equals_uncached(dev_pipeline):
    latents = _latents(batch=2, seed=4)
    uncached = dev_pipeline(["a cat", "a dog"], latents=latents, **CALL).images
    out = dev_pipeline(["a cat", "a dog"], latents=latents, **CALL,
                       cache=CacheConfig("fastcache", threshold=0.0, alpha=0.999, motion_ratio=1.0))
    assert out.cache_stats.pattern() == "C" * STEPS and out.cache_stats.block_fraction() == 1.0
    np.testing.assert_allclose(out.images, uncached, rtol=0, atol=1e-6)


@pytest.mark.parametrize("motion_ratio", [1.0, 0.5, 0.25])
def test_fastcache_matches_reference(torch_dev_pipeline, dev_pipeline, motion_ratio):
    latents = _latents(seed=7)
    kw = dict(threshold=0.12, alpha=0.05, motion_ratio=motion_ratio)
    expected, ref_pattern = reference_run(torch_dev_pipeline, latents, "a cat", method="fastcache", **kw)
    ours, pattern = _ours(dev_pipeline, latents, "a cat", CacheConfig("fastcache", **kw))
    assert pattern == ref_pattern
    computed_after_first = pattern["cond"][1:].count("C")
    assert "." in pattern["cond"] and computed_after_first >= 1  # both a reuse and a (reduced) compute
    np.testing.assert_allclose(_ours.stats.changes["cond"][1:], reference_run.caches["cond"].changes, rtol=1e-4)
    assert rel_err(ours, expected) < 1e-4
    share = _ours.stats.blocks_run["cond"]
    assert share[0] == 5  # step 0 runs every token
    tokens = _ours.stats.tokens["cond"]
    assert tokens[0] == 16 and all(t == 0 for t, c in zip(tokens, pattern["cond"]) if c == ".")
    if motion_ratio < 1:  # a reduced step counts the tokens that ran: text 16 + k of 16 image tokens
        k = int(np.ceil(motion_ratio * 16))
        assert max(share[1:]) == pytest.approx(5 * (16 + k) / 32) and k in tokens


def test_alpha_moves_the_hit_rate_without_recompiling(dev_pipeline):
    cache = lambda alpha: CacheConfig("fastcache", threshold=0.12, alpha=alpha, motion_ratio=0.5)  # noqa: E731
    dev_pipeline("a cat", latents=_latents(seed=7), cache=cache(0.05), **CALL)
    compiled = len(ms_compile_cache)
    hits = [dev_pipeline("a cat", latents=_latents(seed=7), cache=cache(a), **CALL).cache_stats.hits()
            for a in (0.5, 0.05, 0.001)]
    assert hits[0] < hits[2] and hits == sorted(hits)  # a smaller alpha tolerates larger changes
    assert len(ms_compile_cache) == compiled


def test_true_cfg_and_no_leak(torch_dev_pipeline, dev_pipeline):
    kw = dict(negative_prompt="blurry", true_cfg_scale=2.5)
    cache = CacheConfig("fastcache", threshold=0.12, motion_ratio=0.5)
    expected, ref_pattern = reference_run(torch_dev_pipeline, _latents(seed=3), "a cat", method="fastcache",
                                          threshold=0.12, alpha=0.05, motion_ratio=0.5, **kw)
    ours, pattern = _ours(dev_pipeline, _latents(seed=3), "a cat", cache, **kw)
    assert set(pattern) == {"cond", "uncond"} and pattern == ref_pattern
    assert rel_err(ours, expected) < 1e-4
    dev_pipeline("a dog", latents=_latents(seed=9), cache=cache, **CALL, **kw)
    again, _ = _ours(dev_pipeline, _latents(seed=3), "a cat", cache, **kw)
    np.testing.assert_array_equal(again, ours)


@pytest.mark.parametrize("kwargs,match", [(dict(alpha=0.0), "alpha must be in"), (dict(alpha=1.0), "alpha must be in"),
                                          (dict(motion_ratio=0.0), "motion_ratio must be in"),
                                          (dict(motion_ratio=1.5), "motion_ratio must be in")])
def test_fastcache_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig("fastcache", **kwargs)
