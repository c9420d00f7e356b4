"""TeaCache, MagCache and DBCache (Fn / Bn): decisions and latents against the torch reference of their
published rules on the diffusers twin, calibration files and fits, no recompilation, no state leak."""
import json

import numpy as np
import pytest
from mindspore.graph.api import ms_compile_cache

from fbcache_ms import calibration as calib
from fbcache_ms.config import CacheConfig
from parity import rel_err
from test_cache import STEPS, _latents, _ours, reference_run

# a calibration for the tiny random model: its input changes are ~0.1-0.5 per step, so FLUX's polynomial
# (tuned to ~0.01-0.05) would never let it skip; identity rescaling keeps the thresholds readable
IDENTITY = [0.0, 0.0, 0.0, 1.0, 0.0]
RATIOS = [1.0, 1.3, 1.1, 1.02, 0.98, 1.05, 0.97, 0.9]


@pytest.fixture(scope="module")
def tiny_calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration") / "tiny.json"
    calib.save_calibration(str(path), {"model": "tiny", "steps": STEPS, "teacache": {"coefficients": IDENTITY},
                                       "magcache": {"ratios": RATIOS}})
    return str(path)


# ---- TeaCache ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("threshold", [0.4, 0.8])
def test_teacache_matches_reference(torch_dev_pipeline, dev_pipeline, tiny_calibration, threshold):
    latents = _latents(seed=11)
    expected, ref_pattern = reference_run(torch_dev_pipeline, latents, "a cat", method="teacache",
                                          threshold=threshold, steps=STEPS, coefficients=IDENTITY)
    cache = CacheConfig("teacache", threshold=threshold, calibration=tiny_calibration)
    ours, pattern = _ours(dev_pipeline, latents, "a cat", cache)
    assert pattern == ref_pattern
    assert pattern["cond"][0] == "C" and pattern["cond"][-1] == "C" and "." in pattern["cond"]
    signals = [s for s in _ours.stats.changes["cond"] if s is not None]
    np.testing.assert_allclose(signals, reference_run.caches["cond"].changes, rtol=1e-4)
    assert rel_err(ours, expected) < 1e-4
    assert all(b == 0 for b, c in zip(_ours.stats.blocks_run["cond"], pattern["cond"]) if c == ".")


def test_teacache_true_cfg_keeps_one_state_per_branch(torch_dev_pipeline, dev_pipeline, tiny_calibration):
    latents = _latents(seed=12)
    kw = dict(negative_prompt="blurry", true_cfg_scale=2.5)
    expected, ref_pattern = reference_run(torch_dev_pipeline, latents, "a cat", method="teacache", threshold=0.6,
                                          steps=STEPS, coefficients=IDENTITY, **kw)
    ours, pattern = _ours(dev_pipeline, latents, "a cat",
                          CacheConfig("teacache", threshold=0.6, calibration=tiny_calibration), **kw)
    assert set(pattern) == {"cond", "uncond"} and pattern == ref_pattern and "." in pattern["uncond"]
    assert rel_err(ours, expected) < 1e-4


# ---- MagCache ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("threshold,max_skip", [(0.06, 3), (0.5, 2), (0.5, 5)])
def test_magcache_matches_reference(torch_dev_pipeline, dev_pipeline, tiny_calibration, threshold, max_skip):
    latents = _latents(seed=13)
    expected, ref_pattern = reference_run(torch_dev_pipeline, latents, "a dog", method="magcache",
                                          threshold=threshold, steps=STEPS, ratios=RATIOS, max_skip=max_skip,
                                          retention=0.25)
    cache = CacheConfig("magcache", threshold=threshold, calibration=tiny_calibration, max_skip=max_skip,
                        retention=0.25)
    ours, pattern = _ours(dev_pipeline, latents, "a dog", cache)
    assert pattern == ref_pattern and pattern["cond"][:2] == "CC"  # round(0.25 * 8) = 2 steps retained
    assert "." in pattern["cond"]
    assert "." * (max_skip + 1) not in pattern["cond"]
    signals = [s for s in _ours.stats.changes["cond"] if s is not None]
    np.testing.assert_allclose(signals, reference_run.caches["cond"].changes, rtol=1e-5)
    assert rel_err(ours, expected) < 1e-4


def test_magcache_without_retention_still_computes_step_zero(torch_dev_pipeline, dev_pipeline, tiny_calibration):
    latents = _latents(seed=17)
    expected, ref_pattern = reference_run(torch_dev_pipeline, latents, "a dog", method="magcache", threshold=0.5,
                                          steps=STEPS, ratios=RATIOS, max_skip=3, retention=0.0)
    ours, pattern = _ours(dev_pipeline, latents, "a dog", CacheConfig(
        "magcache", threshold=0.5, calibration=tiny_calibration, max_skip=3, retention=0.0))
    assert pattern == ref_pattern and pattern["cond"][0] == "C" and "." in pattern["cond"][1:3]
    assert rel_err(ours, expected) < 1e-4


def test_magcache_true_cfg_keeps_one_state_per_branch(torch_dev_pipeline, dev_pipeline, tiny_calibration):
    latents = _latents(seed=16)
    kw = dict(negative_prompt="blurry", true_cfg_scale=2.5)
    expected, ref_pattern = reference_run(torch_dev_pipeline, latents, "a cat", method="magcache", threshold=0.5,
                                          steps=STEPS, ratios=RATIOS, max_skip=2, retention=0.25, **kw)
    ours, pattern = _ours(dev_pipeline, latents, "a cat", CacheConfig(
        "magcache", threshold=0.5, calibration=tiny_calibration, max_skip=2, retention=0.25), **kw)
    assert set(pattern) == {"cond", "uncond"} and pattern == ref_pattern and "." in pattern["uncond"]
    assert rel_err(ours, expected) < 1e-4


def test_magcache_ratios_resample_to_other_step_counts(tiny_calibration):
    cfg = CacheConfig("magcache", calibration=tiny_calibration)
    np.testing.assert_array_equal(cfg.magcache_ratios(STEPS), RATIOS)
    np.testing.assert_array_equal(cfg.magcache_ratios(4), [RATIOS[0], RATIOS[2], RATIOS[5], RATIOS[7]])
    assert len(CacheConfig("magcache").magcache_ratios(28)) == 28  # FLUX.1-dev's published curve


# ---- DBCache: Fn / Bn --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,bn,threshold", [(2, 0, 0.3), (1, 2, 0.35), (3, 1, 0.3)])
def test_dbcache_matches_reference(torch_dev_pipeline, dev_pipeline, fn, bn, threshold):
    latents = _latents(seed=14)
    expected, ref_pattern = reference_run(torch_dev_pipeline, latents, "a cat", method="fbcache",
                                          threshold=threshold, fn=fn, bn=bn)
    ours, pattern = _ours(dev_pipeline, latents, "a cat", CacheConfig("fbcache", threshold=threshold, fn=fn, bn=bn))
    assert pattern == ref_pattern and "." in pattern["cond"]
    assert {b for b, c in zip(_ours.stats.blocks_run["cond"], pattern["cond"]) if c == "."} == {fn + bn}
    assert rel_err(ours, expected) < 1e-4


def test_dbcache_with_taylorseer_matches_reference(torch_dev_pipeline, dev_pipeline):
    latents = _latents(seed=15)
    expected, ref_pattern = reference_run(torch_dev_pipeline, latents, "a cat", method="fbcache_taylorseer",
                                          threshold=0.35, order=1, fn=1, bn=2)
    ours, pattern = _ours(dev_pipeline, latents, "a cat",
                          CacheConfig("fbcache_taylorseer", threshold=0.35, order=1, fn=1, bn=2))
    assert pattern == ref_pattern and "." in pattern["cond"]
    assert rel_err(ours, expected) < 1e-4


def test_dbcache_rejects_more_blocks_than_the_model_has(dev_pipeline):
    with pytest.raises(ValueError, match="fn=4, bn=1"):
        dev_pipeline("a cat", latents=_latents(), cache=CacheConfig("fbcache", fn=4, bn=1), **_call())


# ---- no recompilation, no leaks ----------------------------------------------------------------------------

def test_thresholds_and_calibrations_do_not_recompile(dev_pipeline, tiny_calibration, tmp_path):
    other = tmp_path / "other.json"
    calib.save_calibration(str(other), {"teacache": {"coefficients": [0, 0, 0, 2.0, 0.01]},
                                        "magcache": {"ratios": [1.0, 1.5, 0.7]}})
    for method in ("teacache", "magcache"):
        dev_pipeline("a cat", latents=_latents(), cache=CacheConfig(method, calibration=tiny_calibration), **_call())
        compiled = len(ms_compile_cache)
        patterns = {dev_pipeline("a cat", latents=_latents(), **_call(),
                                 cache=CacheConfig(method, threshold=t, calibration=c)).cache_stats.pattern()
                    for t in (0.0, 0.3, 2.0) for c in (tiny_calibration, str(other))}
        assert len(patterns) > 1
        assert len(ms_compile_cache) == compiled


@pytest.mark.parametrize("method", ["teacache", "magcache"])
def test_state_does_not_leak_between_calls(dev_pipeline, tiny_calibration, method):
    cache = CacheConfig(method, threshold=0.5, calibration=tiny_calibration)
    alone = dev_pipeline("a dog", latents=_latents(seed=6), cache=cache, **_call())
    dev_pipeline("a cat", latents=_latents(seed=5), cache=cache, **_call())
    after = dev_pipeline("a dog", latents=_latents(seed=6), cache=cache, **_call())
    assert after.cache_stats.pattern() == alone.cache_stats.pattern() and "." in alone.cache_stats.pattern()
    np.testing.assert_array_equal(after.images, alone.images)


# ---- calibration files and fits ------------------------------------------------------------------------------

def test_fit_recovers_a_known_polynomial():
    rng = np.random.default_rng(0)
    truth = [120.0, -40.0, 6.0, 0.5, 0.02]
    x = rng.uniform(0.0, 0.3, 400)
    y = np.polyval(truth, x) + rng.normal(0, 1e-4, x.shape)
    coefficients, r2 = calib.fit_teacache(x, y)
    np.testing.assert_allclose(np.polyval(coefficients, x), np.polyval(truth, x), atol=1e-3)
    assert r2 > 0.999
    _, r2_noise = calib.fit_teacache(x, rng.normal(size=x.shape))
    assert r2_noise < 0.1


def test_calibration_round_trips(tmp_path):
    path = str(tmp_path / "c.json")
    data = {"model": "m", "steps": 3, "teacache": {"coefficients": [1.0, 2.0, 3.0, 4.0, 5.0], "r2": 0.9},
            "magcache": {"ratios": calib.mean_magnitude_ratios(np.array([[1.2, 0.9], [1.0, 0.7]]))}}
    calib.save_calibration(path, data)
    assert calib.load_calibration(path) == data
    cfg = CacheConfig("teacache", calibration=path)
    assert cfg.teacache_coefficients() == [1.0, 2.0, 3.0, 4.0, 5.0]
    np.testing.assert_allclose(CacheConfig("magcache", calibration=path).magcache_ratios(3), [1.0, 1.1, 0.8])


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"teacache": {"coefficients": [1, 2]}}), "5 finite numbers"),
    (json.dumps({"magcache": {"ratios": [1.0, -1.0]}}), "positive"),
    (json.dumps({"magcache": {"ratios": [1.0, 1.0]}}), "no teacache.coefficients"),
])
def test_bad_calibration_files_are_named(tmp_path, content, match):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        CacheConfig("teacache", calibration=str(path))
    assert str(path) in str(err.value)


def test_calibration_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="folder"):
        CacheConfig("magcache", calibration=str(tmp_path))


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="teacache", threshold=-0.1), "threshold"),
    (dict(method="fbcache", fn=0), "fn"),
    (dict(method="fbcache", bn=-1), "bn"),
    (dict(method="magcache", max_skip=0), "max_skip"),
    (dict(method="magcache", retention=1.5), "retention"),
])
def test_new_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig(**kwargs)


def test_default_thresholds_are_each_methods_flux_default():
    assert CacheConfig("fbcache").threshold == 0.08
    assert CacheConfig("teacache").threshold == 0.4
    assert CacheConfig("magcache").threshold == 0.06
    assert CacheConfig("teacache", threshold=0.8).threshold == 0.8  # TeaCache's range goes past 1


def _call():
    from test_cache import CALL
    return CALL


# ---- the calibration command -----------------------------------------------------------------------------

def test_calibrate_command_writes_a_loadable_calibration(tmp_path):
    from eval.calibrate_cache import main

    out = tmp_path / "model.json"
    assert main(["--out", str(out), "--prompts", "3", "--steps", "6"]) == 0
    data = json.loads(out.read_text())
    assert len(data["magcache"]["ratios"]) == 6 and data["magcache"]["ratios"][0] == 1.0
    assert data["teacache"]["points"] == 3 * 5 and np.isfinite(data["teacache"]["r2"])
    assert (tmp_path / "model.png").stat().st_size > 10_000
    cfg = CacheConfig("teacache", calibration=str(out))
    assert cfg.teacache_coefficients() == data["teacache"]["coefficients"]
    af = data["afcache"]  # one call of 3 prompts; 6 steps of the default schedule: steps 4 and 5 decide, per block
    assert af["decisions"] == 2 * 16 and (af["warmup"], af["interval"]) == (3, 5)
    assert 0.3 <= af["threshold"] <= 1.0 and af["miss_rate"] <= af["tolerance"]
    assert CacheConfig("afcache", calibration=str(out)).threshold == af["threshold"]
    # default unit sizes 2 and 4 on 5 double + 11 single blocks: 3 + 6 and 2 + 3 units
    assert {g: e["decisions"] for g, e in af["by_group_size"].items()} == {"2": 2 * 9, "4": 2 * 5}
    assert CacheConfig("afcache", calibration=str(out), group_size=4).threshold == af["by_group_size"]["4"]["threshold"]
    fc = data["fastcache"]  # the static map, for the embedded model's hidden size (4 heads x 32)
    assert (tmp_path / fc["static_map"]).is_file() and fc["motion_ratio"] == 0.5
    assert calib.fastcache_static_map(str(out)).shape == (3 * 128 + 3, 128)
    assert set(fc["held_out_db"]) == {"1", "2", "3", "4", "all"}
    assert all(np.isfinite([e["stale"], e["mapped"]]).all() for e in fc["held_out_db"].values())
    assert CacheConfig("fastcache", calibration=str(out)).static_map


@pytest.mark.parametrize("argv,match", [
    (["--out", "x.txt"], ".json"),
    (["--out", "x.json", "--steps", "4"], "--steps"),
    (["--out", "x.json", "--target-cosine", "1"], "--target-cosine"),
    (["--out", "x.json", "--tolerance", "-0.1"], "--tolerance"),
    (["--out", "x.json", "--prompts", "0"], "--prompts"),
    (["--out", "x.json", "--group-sizes", "4", "1"], "--group-sizes"),
    (["--out", "x.json", "--motion-ratio", "1"], "--motion-ratio"),
    (["--out", "x.json", "--checkpoint", "/nonexistent"], "--checkpoint"),
    (["--out", "x.json", "--prompt-file", "/nonexistent.txt"], "cannot be read"),
])
def test_calibrate_command_checks_arguments(capsys, argv, match):
    from eval.calibrate_cache import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and match in capsys.readouterr().err
