"""AFCache: every block running is the uncached model; forecasting every block by reuse is TaylorSeer's
residual variant at order 0 (FORA on the whole stack); budget mode runs the blocks it promises; the stability
persists within a call and never across calls; thresholds and budgets are tensors (no recompile)."""
import itertools

import numpy as np
import pytest
from mindspore.graph.api import ms_compile_cache

from fbcache_ms.config import CacheConfig
from parity import rel_err
from test_cache import CALL, STEPS, _latents, reference_run

BLOCKS = 5  # the tiny checkpoint's 2 double + 3 single blocks
SCHEDULE = dict(warmup=2, interval=3)  # full steps 0, 1, 2, 5 of 8


def run(pipe, cache, seed=4, prompt="a cat", **kw):
    return pipe(prompt, latents=_latents(seed=seed), cache=cache, **CALL, **kw)


@pytest.mark.parametrize("group_size", [1, 2])
def test_threshold_one_runs_every_block_and_is_the_uncached_model(dev_pipeline, group_size):
    uncached = dev_pipeline("a cat", latents=_latents(seed=4), **CALL).images
    out = run(dev_pipeline, CacheConfig("afcache", threshold=1.0, order=2, group_size=group_size, **SCHEDULE))
    assert out.cache_stats.strategies["cond"] == [[0] * BLOCKS] * STEPS
    np.testing.assert_allclose(out.images, uncached, rtol=0, atol=1e-6)


@pytest.mark.parametrize("group_size", [1, 2, 3])
def test_reuse_everywhere_is_fora_on_the_stack(dev_pipeline, group_size):
    # budget 4/8: the full steps spend it all, so every other step forecasts every block by reuse; the
    # per-block (per-unit) residuals then add up to the stack's residual of the last full step
    out = run(dev_pipeline, CacheConfig("afcache", budget=0.5, order=0, group_size=group_size, **SCHEDULE))
    fora = run(dev_pipeline, CacheConfig("taylorseer", order=0, variant="residual", **SCHEDULE))
    strategies = out.cache_stats.strategies["cond"]
    assert [s == [0] * BLOCKS for s in strategies] == [c == "C" for c in fora.cache_stats.pattern()]
    assert all(s == [1] * BLOCKS for s in strategies if s != [0] * BLOCKS)
    assert out.cache_stats.block_fraction() == pytest.approx(0.5)
    assert rel_err(out.images, fora.images) < 1e-5


@pytest.mark.parametrize("cache", [dict(threshold=0.95, order=2), dict(threshold=0.94, order=1),
                                   dict(budget=0.6, order=2),
                                   # units of 2: (double 0-1), (single 2-3), (single 4); of 3: (double 0-1), (single 2-4):
                                   # 2 blocks a step are then nearest by running the 3 when it is the least stable
                                   dict(threshold=0.95, order=1, group_size=2),
                                   dict(budget=0.7, order=2, group_size=3)])
def test_afcache_matches_reference(torch_dev_pipeline, dev_pipeline, cache):
    """Decisions, stabilities and latents against a torch reference on diffusers' blocks (tests/reference_cache.py)."""
    kw = dict(cache, **SCHEDULE)
    expected, _ = reference_run(torch_dev_pipeline, _latents(seed=4), "a cat", method="afcache", steps=STEPS,
                                **{"threshold": 0.0, **kw})
    out = run(dev_pipeline, CacheConfig("afcache", **kw))
    strategies = out.cache_stats.strategies["cond"]
    assert strategies == reference_run.caches["cond"].strategies
    between = [c for i in (3, 4, 6, 7) for c in strategies[i]]  # the steps that are not full ones
    assert 0 in between and any(c > 0 for c in between)  # some blocks ran there, some were forecast
    if cache.get("group_size") == 3:  # k = 2 blocks: the 3-block unit runs when it is the least stable
        assert 3 in [sum(c == 0 for c in strategies[i]) for i in (3, 4, 6, 7)]
    assert rel_err(out.images, expected) < 1e-4


def test_stabilities_after_each_step_are_the_references(torch_dev_pipeline, dev_pipeline):
    kw = dict(threshold=1.0, order=2, **SCHEDULE)
    reference_run(torch_dev_pipeline, _latents(seed=4), "a cat", method="afcache", steps=STEPS, **kw)
    out = run(dev_pipeline, CacheConfig("afcache", **kw))
    np.testing.assert_allclose(np.asarray(out.cache_stats.stability["cond"]),
                               np.asarray(reference_run.caches["cond"].stability_trace), atol=1e-5)


def test_newton_history_is_the_reference_forecast():
    from fbcache_ms.calibration import NewtonHistory
    from reference_cache import newton_forecast
    rng = np.random.default_rng(0)
    history, points = NewtonHistory(2), []
    for step in (0, 1, 3, 7):  # uneven spacing, as full steps are
        value = rng.normal(size=6)
        history.update(value, step)
        points.append((step, value))
        for p, forecast in enumerate(history.forecasts(9)):
            np.testing.assert_allclose(forecast, newton_forecast(points, 9, p), rtol=1e-12)


@pytest.mark.parametrize("group_size", [1, 2])
def test_calibration_replays_the_policy_and_fits_a_threshold(dev_pipeline, tmp_path, group_size):
    """Open-loop replay of the threshold rule on the uncached residuals (of blocks, or summed over units): on the
    first decision step nothing has been forecast yet, so the replay must pick exactly the units the policy picks."""
    from eval.calibrate_cache import AFCacheReplays, block_trajectories
    from fbcache_ms import calibration as calib
    from fbcache_ms.afcache import EMA_KEEP, START, stack_units

    cache = CacheConfig("afcache", order=2, threshold=1.0, **SCHEDULE)
    size = dict(size=CALL["height"], max_sequence_length=CALL["max_sequence_length"])
    [(_, _, block_residuals)] = block_trajectories(dev_pipeline, ["a cat"], STEPS, 1, **size)
    bounds = stack_units(2, 3, group_size)
    assert bounds == ([(b, b + 1) for b in range(BLOCKS)] if group_size == 1 else [(0, 2), (2, 4), (4, 5)])
    residuals = calib.unit_residuals(block_residuals, bounds)
    full = [cache.is_full_step(i) for i in range(STEPS)]
    n = len(bounds)

    def replay(threshold):  # which units the replay runs at step 3
        return tuple(calib.simulate_afcache(residuals[:, u], full, threshold, 2, EMA_KEEP, START)[2][3]
                     for u in range(n))

    # the middle of the widest stretch of a fine grid where the replay runs some units and forecasts others
    # (far from any unit's predicted cosine, where float32 and float64 could decide apart)
    grid = np.linspace(0.0, 1.0, 201)[:-1]
    ran_at_3 = [replay(t) for t in grid]
    stretches = [[t for t, _ in g] for d, g in itertools.groupby(zip(grid, ran_at_3), key=lambda x: x[1])
                 if 0 < sum(d) < n]
    assert stretches, "no threshold splits the units at step 3"
    threshold = float(np.mean(max(stretches, key=len)))
    policy = dev_pipeline("a cat", seed=0, cache=CacheConfig("afcache", order=2, threshold=threshold,
                                                              group_size=group_size, **SCHEDULE),
                          **CALL).cache_stats.strategies["cond"][3]
    assert replay(threshold) == tuple(policy[a] == 0 for a, _ in bounds) and 0 < sum(replay(threshold)) < n

    thresholds = np.array([0.0, 0.5, 0.9, 1.0])
    replays = AFCacheReplays(STEPS, cache, 2, 3, thresholds, (group_size,))
    replays.add(block_residuals)
    decisions, cosines = replays.replays[group_size]
    assert list(decisions) == [4 * n] * 4 and cosines[-1] == []  # 4 decision steps; 1 runs every unit
    assert len(cosines[0]) == 4 * n  # threshold 0: every decision forecasts
    target = float(np.median(cosines[0]))
    chosen, fraction, missed = calib.fit_afcache_threshold(thresholds, decisions, cosines, target, 0.5)
    k = list(thresholds).index(chosen)
    assert fraction == len(cosines[k]) / decisions[k] and missed <= 0.5
    assert all(np.mean(np.asarray(c) < target) <= 0.5 for c in cosines[k:] if c)
    path = str(tmp_path / "af.json")
    entry = {"threshold": chosen}
    calib.save_calibration(path, {"afcache": entry if group_size == 1 else {"by_group_size": {"2": entry}}})
    assert CacheConfig("afcache", calibration=path, group_size=group_size).threshold == chosen
    assert CacheConfig("afcache", calibration=path, group_size=group_size, threshold=0.3).threshold == 0.3


def test_calibrated_threshold_is_the_one_fitted_for_the_unit_size(tmp_path):
    from fbcache_ms import calibration as calib
    path = str(tmp_path / "af.json")
    calib.save_calibration(path, {"afcache": {"threshold": 0.94, "by_group_size": {"4": {"threshold": 0.9}}}})
    assert CacheConfig("afcache", calibration=path).threshold == 0.94
    assert CacheConfig("afcache", calibration=path, group_size=4).threshold == 0.9
    with pytest.raises(calib.CalibrationError, match="no afcache threshold for units of 2 blocks"):
        CacheConfig("afcache", calibration=path, group_size=2)
    for bad, match in (({"1": {"threshold": 0.9}}, "group sizes >= 2"),
                       ({"2": {"threshold": 1.5}}, r"by_group_size\.2\.threshold")):
        calib.save_calibration(path, {"afcache": {"by_group_size": bad}})
        with pytest.raises(calib.CalibrationError, match=match):
            CacheConfig("afcache", calibration=path, group_size=2)


def test_threshold_fit_takes_the_lowest_threshold_that_keeps_every_higher_one_within_tolerance():
    from fbcache_ms.calibration import fit_afcache_threshold
    thresholds = [0.2, 0.4, 0.6, 0.8, 1.0]
    decisions = [10] * 5
    cosines = [[0.5] * 8 + [0.99] * 2, [0.99] * 6, [0.5, 0.99, 0.99], [0.99, 0.99], []]
    # 0.6 misses 1/3: above a tolerance of 0.2, so 0.4 (all within) does not count: 0.8 is the answer
    assert fit_afcache_threshold(thresholds, decisions, cosines, 0.95, 0.2) == (0.8, 0.2, 0.0)
    assert fit_afcache_threshold(thresholds, decisions, cosines, 0.95, 0.34) == (0.4, 0.6, 0.0)
    assert fit_afcache_threshold(thresholds, decisions, [[0.5]] * 4 + [[0.5]], 0.95, 0.0) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("budget", [0.7, 0.6])
def test_budget_runs_the_promised_blocks(dev_pipeline, budget):
    out = run(dev_pipeline, CacheConfig("afcache", budget=budget, order=2, **SCHEDULE))
    stats = out.cache_stats
    # 4 full steps of 5 blocks, and k blocks on each of the other 4: k = (budget * 8 - 4) * 5 / 4
    k = int(np.floor((budget * STEPS - 4) * BLOCKS / 4 + 0.5))
    ran = [sum(c == 0 for c in s) for s in stats.strategies["cond"]]
    assert ran == [BLOCKS if i in (0, 1, 2, 5) else k for i in range(STEPS)]
    assert stats.block_fraction() == pytest.approx((4 * BLOCKS + 4 * k) / (STEPS * BLOCKS))
    forecast = {c for s in stats.strategies["cond"] for c in s if c}
    assert forecast <= {1, 2, 3} and forecast


def test_state_never_leaks_between_calls_and_branches_are_apart(dev_pipeline):
    cache = CacheConfig("afcache", budget=0.625, order=2, **SCHEDULE)
    first = run(dev_pipeline, cache)
    run(dev_pipeline, cache, seed=9, prompt="a dog")  # other features in between
    again = run(dev_pipeline, cache)
    assert first.cache_stats.strategies == again.cache_stats.strategies
    np.testing.assert_array_equal(first.images, again.images)
    cfg = run(dev_pipeline, cache, negative_prompt="blurry", true_cfg_scale=2.5)
    assert set(cfg.cache_stats.strategies) == {"cond", "uncond"}


def test_thresholds_and_budgets_do_not_recompile(dev_pipeline):
    run(dev_pipeline, CacheConfig("afcache", threshold=0.9, order=1, **SCHEDULE))
    compiled = len(ms_compile_cache)
    ran = []
    for cache in (CacheConfig("afcache", threshold=0.5, order=1, **SCHEDULE),
                  CacheConfig("afcache", threshold=0.99, order=1, **SCHEDULE),
                  CacheConfig("afcache", budget=0.75, order=1, **SCHEDULE)):
        ran.append(run(dev_pipeline, cache).cache_stats.block_fraction())
    assert len(ms_compile_cache) == compiled
    assert ran[0] <= ran[1]  # a higher stability threshold runs more blocks


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="afcache", budget=0.0), "budget"),
    (dict(method="afcache", budget=1.5), "budget"),
    (dict(method="fbcache", budget=0.5), "budget applies to afcache"),
    (dict(method="afcache", order=3), "order 0, 1 or 2"),
    (dict(method="afcache", threshold=1.2), "threshold"),
    (dict(method="afcache", group_size=0), "group_size must be an integer >= 1"),
    (dict(method="teacache", group_size=2), "group_size applies to afcache"),
    (dict(method="afcache", group_size=True), "group_size must be an integer"),
])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig(**kwargs)
