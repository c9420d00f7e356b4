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


# ---- the static-token map (a calibration's ridge fit) ------------------------------------------------------

def _map_calibration(path, w):
    """A calibration file holding only FastCache's static map `w`."""
    from fbcache_ms import calibration as calib
    entry = calib.save_static_map(str(path), w)
    calib.save_calibration(str(path), {"model": "tiny", "fastcache": entry})
    return str(path)


def _random_map(dim, seed, scale=0.02):
    return (np.random.default_rng(seed).standard_normal((3 * dim + 3, dim)) * scale).astype(np.float32)


def test_static_map_of_zeros_is_plain_reuse(dev_pipeline, tmp_path):
    dim = dev_pipeline.transformer.config.dim
    calibration = _map_calibration(tmp_path / "zeros.json", np.zeros((3 * dim + 3, dim), np.float32))
    kw = dict(threshold=0.12, motion_ratio=0.5)
    plain, plain_pattern = _ours(dev_pipeline, _latents(seed=7), "a cat", CacheConfig("fastcache", **kw))
    mapped, pattern = _ours(dev_pipeline, _latents(seed=7), "a cat",
                            CacheConfig("fastcache", calibration=calibration, **kw))
    assert pattern == plain_pattern and pattern["cond"][1:].count("C") >= 2  # reduced steps, static tokens reused
    np.testing.assert_array_equal(mapped, plain)


@pytest.mark.parametrize("motion_ratio", [0.5, 0.25])
def test_static_map_matches_reference(torch_dev_pipeline, dev_pipeline, tmp_path, motion_ratio):
    dim = dev_pipeline.transformer.config.dim
    w = _random_map(dim, seed=11)
    calibration = _map_calibration(tmp_path / "map.json", w)
    kw = dict(threshold=0.12, alpha=0.05, motion_ratio=motion_ratio)
    expected, ref_pattern = reference_run(torch_dev_pipeline, _latents(seed=7), "a cat", method="fastcache",
                                          static_map=w, steps=STEPS, **kw)
    ours, pattern = _ours(dev_pipeline, _latents(seed=7), "a cat", CacheConfig("fastcache", calibration=calibration,
                                                                               **kw))
    assert pattern == ref_pattern and pattern["cond"][1:].count("C") >= 2
    assert rel_err(ours, expected) < 1e-4
    plain, _ = reference_run(torch_dev_pipeline, _latents(seed=7), "a cat", method="fastcache", **kw)
    assert rel_err(plain, expected) > 1e-3  # the map changes the result: the comparison above can fail


def test_static_map_comes_from_the_call_without_recompiling_or_leaking(dev_pipeline, tmp_path):
    dim = dev_pipeline.transformer.config.dim
    first = _map_calibration(tmp_path / "a.json", _random_map(dim, seed=1))
    second = _map_calibration(tmp_path / "b.json", _random_map(dim, seed=2))
    cache = lambda path: CacheConfig("fastcache", threshold=0.12, motion_ratio=0.5, calibration=path)  # noqa: E731
    a, _ = _ours(dev_pipeline, _latents(seed=7), "a cat", cache(first))
    compiled = len(ms_compile_cache)
    b, _ = _ours(dev_pipeline, _latents(seed=7), "a cat", cache(second))
    again, _ = _ours(dev_pipeline, _latents(seed=7), "a cat", cache(first))
    assert len(ms_compile_cache) == compiled
    assert rel_err(a, b) > 1e-4
    np.testing.assert_array_equal(again, a)


def test_static_map_of_another_hidden_size_is_named(dev_pipeline, tmp_path):
    dim = dev_pipeline.transformer.config.dim
    calibration = _map_calibration(tmp_path / "wide.json", _random_map(dim * 2, seed=1))
    with pytest.raises(ValueError, match="static map is for hidden size"):
        dev_pipeline("a cat", latents=_latents(seed=7), **CALL,
                     cache=CacheConfig("fastcache", threshold=0.12, motion_ratio=0.5, calibration=calibration))


def test_bad_static_maps_are_named(tmp_path):
    from fbcache_ms import calibration as calib
    no_entry = tmp_path / "none.json"
    calib.save_calibration(str(no_entry), {"model": "tiny"})
    with pytest.raises(calib.CalibrationError, match="no fastcache.static_map"):
        CacheConfig("fastcache", calibration=str(no_entry))
    changed = _map_calibration(tmp_path / "changed.json", _random_map(4, seed=1))
    calib.save_static_map(str(tmp_path / "changed.json"), _random_map(4, seed=2))  # the weights rewritten alone
    with pytest.raises(calib.CalibrationError, match="sha256 differs"):
        CacheConfig("fastcache", calibration=changed)
    bad = tmp_path / "bad.json"
    entry = calib.save_static_map(str(bad), np.zeros((5, 4), np.float32))  # not [3D + 3, D]
    calib.save_calibration(str(bad), {"fastcache": entry})
    with pytest.raises(calib.CalibrationError, match=r"\[3D \+ 3, D\]"):
        CacheConfig("fastcache", calibration=str(bad))
    with pytest.raises(ValueError, match="needs motion_ratio < 1"):
        CacheConfig("fastcache", motion_ratio=1.0, calibration=changed)
    for content, match in (({"fastcache": [1]}, "must be an object"),
                           ({"fastcache": {"static_map": "changed.fastcache.safetensors"}}, "no fastcache.sha256")):
        odd = tmp_path / "changed.json"  # beside the weights written above
        calib.save_calibration(str(odd), content)
        with pytest.raises(calib.CalibrationError, match=match):
            CacheConfig("fastcache", calibration=str(odd))
    missing = tmp_path / "missing.json"
    calib.save_calibration(str(missing), {"fastcache": {"static_map": "gone.safetensors", "sha256": "0"}})
    with pytest.raises(calib.CalibrationError, match="does not exist"):
        CacheConfig("fastcache", calibration=str(missing))


def _linear_trajectory(steps=6, batch=3, tokens=10, dim=4, seed=0):
    """Stack inputs and residuals r_t = h_t W1 + p_t b + c (per token c), so that between any two steps the
    residual's change is static_map_features(...) @ W exactly, W = W1 in the input-change rows, b in the progress
    change row, 0 elsewhere. -> (inputs, residuals, W)."""
    rng = np.random.default_rng(seed)
    inputs = np.cumsum(rng.standard_normal((steps, batch, tokens, dim)), axis=0)
    w = np.zeros((3 * dim + 3, dim))
    w[:dim] = rng.standard_normal((dim, dim)) * 0.3
    w[2 * dim + 2] = rng.standard_normal(dim)
    progress = np.arange(steps) / steps
    residuals = inputs @ w[:dim] + progress[:, None, None, None] * w[2 * dim + 2] \
        + rng.standard_normal((batch, tokens, dim))
    return inputs, residuals, w


def test_static_map_fit_recovers_a_known_map():
    from fbcache_ms.calibration import StaticMapFit
    inputs, residuals, w = _linear_trajectory()
    fit = StaticMapFit(motion_ratio=0.3, gaps=(1, 2, 3))
    fit.add(inputs, residuals)
    np.testing.assert_allclose(fit.solve(ridge=1e-10), w, atol=1e-4)
    for stale, mapped, energy in fit.squared_errors(fit.solve(ridge=1e-10)).values():
        assert mapped < 1e-6 * stale and energy > 0


def test_static_map_errors_equal_their_direct_computation():
    """The accumulated ||Y - XW||^2 = Y'Y - 2 <W, X'Y> + <W, X'X W> per gap against the static tokens' errors
    computed directly: at each step t and gap g, the tokens outside the top 3 of 10 by change since t - g."""
    from fbcache_ms.calibration import StaticMapFit, static_map_features
    inputs, residuals, _ = _linear_trajectory(steps=7, seed=1)
    residuals = residuals + np.random.default_rng(2).standard_normal(residuals.shape) * 0.1  # not exactly linear
    w = np.random.default_rng(6).standard_normal((15, 4)) * 0.1
    fit = StaticMapFit(motion_ratio=0.3, gaps=(1, 2))
    fit.add(inputs, residuals)
    errors = fit.squared_errors(w)
    assert set(errors) == {1, 2}
    for gap in (1, 2):
        direct = np.zeros(3)
        for t in range(gap, 7):
            a = t - gap
            static = np.argsort(-((inputs[t] - inputs[a]) ** 2).sum(axis=(0, 2)))[3:]
            x = static_map_features(inputs[t][:, static] - inputs[a][:, static], residuals[a][:, static], t / 7,
                                    gap / 7)
            change = residuals[t][:, static] - residuals[a][:, static]
            direct += [(change ** 2).sum(), ((change - x @ w) ** 2).sum(), (residuals[t][:, static] ** 2).sum()]
        np.testing.assert_allclose(errors[gap], direct, rtol=1e-9)


def test_graph_features_are_the_fits(dev_pipeline, tmp_path):
    """The policy's map inputs (graph code) against calibration.static_map_features (what the map is fitted on),
    from the same anchors: a change of order or of the progress scale on either side fails here."""
    import mindspore as ms
    from fbcache_ms.calibration import static_map_features
    from fbcache_ms.policies import make_policy
    dim = dev_pipeline.transformer.config.dim
    calibration = _map_calibration(tmp_path / "map.json", _random_map(dim, seed=3))
    policy = make_policy(CacheConfig("fastcache", motion_ratio=0.5, calibration=calibration),
                         dev_pipeline.transformer, 2, 16, 16)
    rng = np.random.default_rng(4)
    h, h_a, r_a = (rng.standard_normal((2, 16, dim)).astype(np.float32) for _ in range(3))
    p_a = rng.uniform(0, 0.5, (1, 16, 1)).astype(np.float32)
    for feature, value in ((policy.anchor_h, h_a), (policy.residual, r_a), (policy.anchor_p, p_a)):
        feature.store(ms.Tensor(value))
    ours = policy.map_features(ms.Tensor(h), ms.Tensor(0.75, ms.float32)).asnumpy()
    np.testing.assert_allclose(ours, static_map_features(h - h_a, r_a, 0.75, 0.75 - p_a), rtol=1e-6, atol=1e-6)


def test_calibration_reads_the_stack_from_its_blocks(dev_pipeline):
    """eval.calibrate_cache fits the map on the stack's image residual taken as the sum of its blocks' image
    residuals (one uncached pass feeds AFCache and FastCache): equal to the stack's own output - input."""
    from eval.cache_signals import uncached_trajectory
    from eval.calibrate_cache import block_trajectories
    from eval.probes import probe_cell, read_stack_io
    size = dict(size=CALL["height"], max_sequence_length=CALL["max_sequence_length"])
    [(start, inputs, blocks)] = block_trajectories(dev_pipeline, ["a cat", "a dog"], 3, 2, **size)
    probe = probe_cell(dev_pipeline.transformer, read_stack_io)
    stack = [tensors for _, _, tensors in uncached_trajectory(dev_pipeline, ["a cat", "a dog"], 3, probe, **size)]
    n = inputs.shape[2]
    assert start == 0 and inputs.shape[:2] == (3, 2) and blocks.shape[:3] == (3, 5, 2) and blocks.shape[3] > n
    np.testing.assert_array_equal(inputs, np.stack([h for h, _ in stack]))
    expected = np.stack([r for _, r in stack])
    np.testing.assert_allclose(blocks[:, :, :, -n:].sum(axis=1), expected, rtol=0,
                               atol=1e-5 * np.abs(expected).max())
    assert np.abs(expected).max() > 0 and not np.allclose(blocks[:, :, :, :n].sum(axis=1), expected, atol=1e-3)
