"""Cache methods: configuration, Taylor exactness, decisions and latents against a torch reference
on the diffusers twin, state isolation, dtype, and no recompilation."""
import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import nn
from mindspore.graph.api import ms_compile_cache

from fbcache_ms.config import CacheConfig
from fbcache_ms.state import CacheState, NewtonClock, TaylorFeature
from pipelines.flux_pipeline import FluxPipeline
from pipelines.scheduling import calculate_shift
from parity import rel_err
from reference_cache import ReferenceCache, TorchFlux, newton_forecast, taylor_factorial_forecast

STEPS = 8
CALL = dict(height=64, width=64, num_inference_steps=STEPS, max_sequence_length=16, output_type="latent",
            progress=False)


# ---- configuration -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(method="fbcach"), "unknown cache method"),
    (dict(method="fbcache", threshold=-0.1), "threshold"),
    (dict(method="fbcache", threshold=1.5), "threshold"),
    (dict(method="taylorseer", order=5), "order"),
    (dict(method="taylorseer", order=1.0), "order"),
    (dict(method="taylorseer", interval=0), "interval"),
    (dict(method="taylorseer", warmup=0), "warmup"),
    (dict(method="taylorseer", variant="layers"), "variant"),
    (dict(method="fbcache_taylorseer", variant="per_module"), "residual"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig(**kwargs)


def test_config_schedule_and_defaults():
    cfg = CacheConfig(method="taylorseer", warmup=2, interval=3)
    assert [cfg.is_full_step(i) for i in range(9)] == [True, True, True, False, False, True, False, False, True]
    assert cfg.variant == "per_module"
    assert CacheConfig(method="fbcache_taylorseer").variant == "residual"


# ---- Taylor forecasts ----------------------------------------------------------------------------------

class _TaylorProbe(CacheState):
    def __init__(self, order):
        super().__init__()
        self.feature = TaylorFeature((3, 4), ms.float32, order)
        self.clock = NewtonClock(order)

    def construct(self, x, step, full):
        if full:
            out = self.feature.update(x, self.clock.update_scales(step))
            self.clock.advance(step)
        else:
            out = self.feature.forecast(self.clock.forecast_weights(step))
        return out


def _poly(step, degree, coefs):
    return sum(c * step ** k for k, c in enumerate(coefs[:degree + 1]))


@pytest.mark.parametrize("order", [0, 1, 2, 3])
@pytest.mark.parametrize("jit", [False, True])
def test_taylor_forecast_exact_for_polynomials(order, jit):
    coefs = np.random.default_rng(order).standard_normal((4, 3, 4)).astype(np.float32)
    probe = _TaylorProbe(order)
    run = ms.jit(probe.construct) if jit else probe
    full_steps = [0, 1, 2, 4, 5, 9]  # irregular spacing, as with FBCache hits in between
    for s in range(12):
        value = _poly(float(s), order, coefs)
        out = run(ms.Tensor(value), ms.Tensor(float(s)), ms.Tensor(s in full_steps)).asnumpy()
        if s not in full_steps and s > order + 1:
            # exact once order + 1 full steps are known, at any distance from them
            np.testing.assert_allclose(out, value, rtol=1e-4, atol=1e-3 * np.abs(value).max())
        if s in full_steps:
            np.testing.assert_array_equal(out, value)


def test_taylor_matches_reference_and_uses_every_order():
    """Against the numpy Newton reference on a non-polynomial feature; the top order matters."""
    rng = np.random.default_rng(0)
    history = []
    probes = {o: _TaylorProbe(o) for o in (1, 2)}
    for s in [0, 1, 2, 5]:
        value = np.sin(0.3 * s + rng.standard_normal((3, 4))).astype(np.float32)
        history.append((s, value))
        for p in probes.values():
            p(ms.Tensor(value), ms.Tensor(float(s)), ms.Tensor(True))
    forecasts = {o: p(ms.Tensor(np.zeros((3, 4), np.float32)), ms.Tensor(7.0), ms.Tensor(False)).asnumpy()
                 for o, p in probes.items()}
    for o, f in forecasts.items():
        np.testing.assert_allclose(f, newton_forecast(history, 7, o), rtol=1e-5, atol=1e-5)
    # order 1 is the published TaylorSeer rule exactly; order 2 adds a term (no off-by-one)
    np.testing.assert_allclose(forecasts[1], taylor_factorial_forecast(history, 7, 1), rtol=1e-5, atol=1e-5)
    assert np.abs(forecasts[2] - forecasts[1]).max() > 1e-2
    assert np.abs(forecasts[1] - history[-1][1]).max() > 1e-2  # order 1 is not plain reuse


def test_taylor_reset_forgets_history():
    probe = _TaylorProbe(1)
    for s in (0, 1):
        probe(ms.Tensor(np.full((3, 4), 10.0 * s, np.float32)), ms.Tensor(float(s)), ms.Tensor(True))
    probe.reset()
    probe(ms.Tensor(np.ones((3, 4), np.float32)), ms.Tensor(0.0), ms.Tensor(True))
    # one full step after the reset: a forecast is plain reuse, not a slope from the old history
    out = probe(ms.Tensor(np.zeros((3, 4), np.float32)), ms.Tensor(3.0), ms.Tensor(False)).asnumpy()
    np.testing.assert_array_equal(out, np.ones((3, 4), np.float32))


# ---- against the torch reference on the diffusers twin -----------------------------------------------

def _latents(batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 16, 64)).astype(np.float32)


def reference_run(torch_pipe, latents, prompt, negative_prompt=None, true_cfg_scale=1.0, guidance=3.5, **cache):
    """The denoising loop in torch with the reference cache; one state per CFG branch."""
    with torch.no_grad():
        enc = lambda p: torch_pipe.encode_prompt(p, None, max_sequence_length=16)  # noqa: E731
        branches = {"cond": enc(prompt)}
        if negative_prompt is not None and true_cfg_scale > 1:
            branches["uncond"] = enc(negative_prompt)
        sched = torch_pipe.scheduler
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=calculate_shift(16))
        x = torch.from_numpy(latents)
        b = x.shape[0]
        img_ids = torch_pipe._prepare_latent_image_ids(b, 4, 4, "cpu", torch.float32)
        flux = TorchFlux(torch_pipe.transformer)
        caches = reference_run.caches = {k: ReferenceCache(**cache) for k in branches}
        pattern = {k: "" for k in branches}
        for i, t in enumerate(sched.timesteps):
            timestep = t.expand(b).to(torch.float32) / 1000
            v = {}
            for k, (embeds, pooled, text_ids) in branches.items():
                v[k], computed = caches[k].step(flux, i, x, embeds.repeat(b, 1, 1), pooled.repeat(b, 1), timestep,
                                                img_ids, text_ids, torch.full((b,), guidance))
                pattern[k] += "C" if computed else "."
            vel = v["cond"] if "uncond" not in v else v["uncond"] + true_cfg_scale * (v["cond"] - v["uncond"])
            x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * vel
        return x.numpy(), pattern


def _ours(dev_pipeline, latents, prompt, cache, **kw):
    out = dev_pipeline(prompt, latents=latents, cache=cache, **CALL, **kw)
    _ours.stats = out.cache_stats
    return out.images, {k: out.cache_stats.pattern(k) for k in out.cache_stats.computed}


@pytest.mark.parametrize("threshold", [0.3, 0.35, 0.45])
def test_fbcache_matches_reference(torch_dev_pipeline, dev_pipeline, threshold):
    latents = _latents()
    expected, ref_pattern = reference_run(torch_dev_pipeline, latents, "a cat", method="fbcache", threshold=threshold)
    ours, pattern = _ours(dev_pipeline, latents, "a cat", CacheConfig("fbcache", threshold=threshold))
    assert pattern == ref_pattern
    assert pattern["cond"][0] == "C" and "." in pattern["cond"] and "C" in pattern["cond"][1:]
    changes = _ours.stats.changes["cond"]
    assert changes[0] is None  # step 0 has nothing to compare with
    np.testing.assert_allclose(changes[1:], reference_run.caches["cond"].changes, rtol=1e-4)
    assert rel_err(ours, expected) < 1e-4


def test_fbcache_patterns_differ_across_thresholds(dev_pipeline):
    patterns = [_ours(dev_pipeline, _latents(), "a cat", CacheConfig("fbcache", threshold=t))[1]["cond"]
                for t in (0.0, 0.35, 1.0)]
    assert patterns[0] == "C" * STEPS  # threshold 0 never reuses
    assert patterns[0] != patterns[1] != patterns[2] and "." in patterns[1]
    assert patterns[2] == "C" + "." * (STEPS - 1)  # the loosest threshold reuses all but step 0


@pytest.mark.parametrize("order,variant", [(1, "per_module"), (2, "per_module"), (1, "residual"), (0, "residual")])
def test_taylorseer_matches_reference(torch_dev_pipeline, dev_pipeline, order, variant):
    latents = _latents(seed=1)
    kw = dict(order=order, interval=3, warmup=2)
    expected, ref_pattern = reference_run(torch_dev_pipeline, latents, "a dog", method="taylorseer", variant=variant, **kw)
    ours, pattern = _ours(dev_pipeline, latents, "a dog", CacheConfig("taylorseer", variant=variant, **kw))
    assert pattern == ref_pattern == {"cond": "CCC..C.."}
    assert rel_err(ours, expected) < 1e-4


def test_per_module_taylorseer_keeps_image_tokens_only(dev_pipeline):
    """On a forecast step the text stream's forecasts reach no output (the test above shows the same result as the
    reference, which forecasts them): only the image stream's module outputs are held."""
    policy = dev_pipeline.cache_policy(CacheConfig("taylorseer", order=2), "cond", 1, 16, 8)[0]
    cfg = dev_pipeline.transformer.config
    features = [tuple(p.shape) for n, p in policy.parameters_and_names()
                if not n.startswith("transformer.") and p.ndim == 3]
    assert features == [(1, 16, cfg.dim)] * (3 * (2 * cfg.num_layers + cfg.num_single_layers))


def test_fbcache_taylorseer_matches_reference(torch_dev_pipeline, dev_pipeline):
    latents = _latents(seed=2)
    expected, ref_pattern = reference_run(torch_dev_pipeline, latents, "a cat", method="fbcache_taylorseer",
                                          threshold=0.35, order=1)
    ours, pattern = _ours(dev_pipeline, latents, "a cat", CacheConfig("fbcache_taylorseer", threshold=0.35, order=1))
    plain, _ = _ours(dev_pipeline, latents, "a cat", CacheConfig("fbcache", threshold=0.35))
    assert pattern == ref_pattern and "." in pattern["cond"]
    assert rel_err(ours, expected) < 1e-4
    assert np.abs(ours - plain).max() > 1e-4  # the forecast replaced plain reuse


def test_true_cfg_keeps_one_state_per_branch(torch_dev_pipeline, dev_pipeline):
    latents = _latents(seed=3)
    kw = dict(negative_prompt="blurry", true_cfg_scale=2.5)
    expected, ref_pattern = reference_run(torch_dev_pipeline, latents, "a cat", method="fbcache", threshold=0.35, **kw)
    ours, pattern = _ours(dev_pipeline, latents, "a cat", CacheConfig("fbcache", threshold=0.35), **kw)
    assert set(pattern) == {"cond", "uncond"} and pattern == ref_pattern
    assert rel_err(ours, expected) < 1e-4


# ---- behaviour -------------------------------------------------------------------------------------------

def test_threshold_zero_equals_uncached(dev_pipeline):
    latents = _latents(batch=2, seed=4)
    uncached = dev_pipeline(["a cat", "a dog"], latents=latents, **CALL).images
    cached = dev_pipeline(["a cat", "a dog"], latents=latents, cache=CacheConfig("fbcache", threshold=0.0), **CALL)
    assert cached.cache_stats.pattern() == "C" * STEPS
    np.testing.assert_allclose(cached.images, uncached, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cache", [CacheConfig("fbcache", threshold=0.35),
                                   CacheConfig("taylorseer", order=1, interval=3, warmup=2),
                                   CacheConfig("fbcache_taylorseer", threshold=0.35)])
def test_state_does_not_leak_between_calls(dev_pipeline, cache):
    a, b = _latents(seed=5), _latents(seed=6)
    alone = dev_pipeline("a dog", latents=b, cache=cache, **CALL)
    dev_pipeline("a cat", latents=a, cache=cache, **CALL)
    after = dev_pipeline("a dog", latents=b, cache=cache, **CALL)
    assert after.cache_stats.pattern() == alone.cache_stats.pattern()
    np.testing.assert_array_equal(after.images, alone.images)


def test_step_zero_always_computes_even_at_max_threshold(dev_pipeline):
    cache = CacheConfig("fbcache", threshold=1.0)
    for seed in (7, 8):  # the second call starts with state left by the first
        out = dev_pipeline("a cat", latents=_latents(seed=seed), cache=cache, **CALL)
        assert out.cache_stats.pattern()[0] == "C"
        assert out.cache_stats.blocks_run["cond"][0] == 5 and out.cache_stats.blocks_run["cond"][1] == 1


def test_threshold_change_does_not_recompile(dev_pipeline):
    dev_pipeline("a cat", latents=_latents(), cache=CacheConfig("fbcache", threshold=0.1), **CALL)
    compiled = len(ms_compile_cache)
    patterns = {dev_pipeline("a cat", latents=_latents(), cache=CacheConfig("fbcache", threshold=t), **CALL)
                .cache_stats.pattern() for t in (0.0, 0.3, 0.9)}
    assert len(patterns) > 1  # the thresholds did act
    assert len(ms_compile_cache) == compiled


def test_fp16_cache_state_has_model_dtype(tiny_dev_checkpoint):
    half = FluxPipeline.from_pretrained(tiny_dev_checkpoint, dtype="float16", mode="graph")
    for cache in (CacheConfig("fbcache", threshold=0.35), CacheConfig("taylorseer", interval=3, warmup=2)):
        out = half("a cat", latents=_latents(), cache=cache, **CALL)
        assert np.isfinite(out.images).all() and "." in out.cache_stats.pattern()
        policy = next(p for k, (p, _) in half._policies.items() if k[1] == cache.method)
        state = [p for n, p in policy.parameters_and_names() if not n.startswith("transformer.")]
        floats = [p for p in state if p.dtype in (ms.float16, ms.float32)]
        assert any(p.dtype == ms.float16 for p in floats)
        assert all(p.dtype == ms.float16 for p in floats if p.ndim == 3)  # cached features: model dtype


def test_cache_state_allocated_once_per_shape(dev_pipeline):
    cache = CacheConfig("fbcache", threshold=0.35)
    dev_pipeline("a cat", latents=_latents(), cache=cache, **CALL)
    policy = dev_pipeline.cache_policy(cache, "cond", 1, 16, 16, (4, 4))[0]
    dev_pipeline("a dog", latents=_latents(seed=9), cache=CacheConfig("fbcache", threshold=0.5), **CALL)
    assert dev_pipeline.cache_policy(cache, "cond", 1, 16, 16, (4, 4))[0] is policy


def test_pipeline_rejects_non_config(dev_pipeline):
    with pytest.raises(TypeError, match="CacheConfig"):
        dev_pipeline("a cat", cache="fbcache", **CALL)
