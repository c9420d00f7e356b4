"""Calibrations of the caches that need one: TeaCache's rescaling polynomial, MagCache's magnitude ratios and
AFCache's stability threshold, one JSON file per checkpoint (written by `python -m eval.calibrate_cache`, read by
CacheConfig).

  {"model": ..., "steps": 28, "source": ...,
   "teacache": {"coefficients": [c4, c3, c2, c1, c0], "r2": ..., "points": ...},
   "magcache": {"ratios": [1.0, gamma_1, ..., gamma_27]},
   "afcache": {"threshold": ..., "target_cosine": ..., "tolerance": ..., "forecast_fraction": ...}}
"""
import functools
import json
import os

import numpy as np

CALIBRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibrations")
FLUX_DEV = os.path.join(CALIBRATIONS, "flux1-dev.json")
TEACACHE_DEGREE = 4


class CalibrationError(ValueError):
    pass


@functools.lru_cache(maxsize=16)
def load_calibration(path):
    """The calibration in `path`, checked; CalibrationError names the file and what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CalibrationError(f"calibration file {path!r} does not exist") from None
    except IsADirectoryError:
        raise CalibrationError(f"calibration {path!r} is a folder, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CalibrationError(f"calibration file {path!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"calibration file {path!r}: expected a JSON object")
    coefficients = data.get("teacache", {}).get("coefficients")
    if coefficients is not None and not (isinstance(coefficients, list) and len(coefficients) == TEACACHE_DEGREE + 1
                                         and all(np.isfinite(c) for c in coefficients)):
        raise CalibrationError(f"calibration file {path!r}: teacache.coefficients must be {TEACACHE_DEGREE + 1} "
                               "finite numbers")
    ratios = data.get("magcache", {}).get("ratios")
    if ratios is not None and not (isinstance(ratios, list) and len(ratios) >= 2
                                   and all(np.isfinite(r) and r > 0 for r in ratios)):
        raise CalibrationError(f"calibration file {path!r}: magcache.ratios must be at least 2 positive numbers")
    threshold = data.get("afcache", {}).get("threshold")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise CalibrationError(f"calibration file {path!r}: afcache.threshold must be a number in [0, 1]")
    return data


def afcache_threshold(path):
    threshold = load_calibration(path).get("afcache", {}).get("threshold")
    if threshold is None:
        raise CalibrationError(f"calibration file {path!r} has no afcache.threshold")
    return float(threshold)


def teacache_coefficients(path):
    coefficients = load_calibration(path).get("teacache", {}).get("coefficients")
    if coefficients is None:
        raise CalibrationError(f"calibration file {path!r} has no teacache.coefficients")
    return [float(c) for c in coefficients]


def magcache_ratios(path, num_steps):
    """gamma_t for each of `num_steps` steps: the calibrated curve, nearest-neighbour resampled when it was
    calibrated at another step count (as the MagCache authors do)."""
    ratios = load_calibration(path).get("magcache", {}).get("ratios")
    if ratios is None:
        raise CalibrationError(f"calibration file {path!r} has no magcache.ratios")
    ratios = np.asarray(ratios, np.float64)
    if num_steps == len(ratios):
        return ratios
    if num_steps == 1:
        return ratios[-1:]
    index = np.round(np.arange(num_steps) * (len(ratios) - 1) / (num_steps - 1)).astype(int)
    return ratios[index]


def fit_teacache(input_change, output_change, degree=TEACACHE_DEGREE):
    """Least-squares polynomial mapping the modulated input's relative change to the output's, as the TeaCache
    authors fit theirs. -> (coefficients highest degree first, R^2)."""
    x, y = np.ravel(input_change).astype(np.float64), np.ravel(output_change).astype(np.float64)
    if len(x) <= degree:
        raise CalibrationError(f"a degree-{degree} fit needs more than {degree} points, got {len(x)}")
    coefficients = np.polyfit(x, y, degree)
    residual = y - np.polyval(coefficients, x)
    r2 = 1.0 - float(residual @ residual) / max(float(((y - y.mean()) ** 2).sum()), 1e-30)
    return [float(c) for c in coefficients], r2


def mean_magnitude_ratios(per_image_ratios):
    """[images, steps - 1] ratios |r_t| / |r_t-1| -> the calibrated curve [steps], 1.0 first (no previous)."""
    return [1.0] + [float(v) for v in np.mean(per_image_ratios, axis=0)]


def forecast_cosines(stability, ema_keep, start):
    """AFCache's per-step cosine of each predictor's forecast, recovered from its stability EMA in a run where
    every block ran: stability [steps, blocks, predictors] (after each step) -> cosine [steps, blocks, predictors],
    NaN where the predictor had no history yet (step i: p < i earlier runs)."""
    s = np.asarray(stability, np.float64) - start
    before = np.concatenate([np.zeros_like(s[:1]), s[:-1]])
    cosine = start + (s - ema_keep * before) / (1 - ema_keep)
    steps, predictors = np.arange(len(s))[:, None, None], np.arange(s.shape[2])[None, None, :]
    return np.where(steps > predictors, cosine, np.nan)


def fit_afcache_threshold(best_stability, cosine, target, tolerance):
    """The lowest stability threshold whose forecasts (a block forecasts when its best stability is at least the
    threshold) miss `target` cosine in at most `tolerance` of cases. best_stability, cosine: one entry per
    block decision (the stability before the step, the cosine its best predictor then reached).
    -> (threshold, fraction of decisions it forecasts, their miss rate); (1.0, 0.0, 0.0) when none qualifies."""
    s, c = np.ravel(best_stability), np.ravel(cosine)
    keep = np.isfinite(s) & np.isfinite(c)
    s, c = s[keep], c[keep]
    if not len(s):
        raise CalibrationError("no AFCache decisions to calibrate on")
    order = np.argsort(-s, kind="stable")
    misses = np.cumsum(c[order] < target) / np.arange(1, len(s) + 1)
    ok = np.nonzero(misses <= tolerance)[0]
    # ties: a threshold allows every decision at its stability, so only the last of a run of equals counts
    ok = ok[(ok == len(s) - 1) | (s[order][np.minimum(ok + 1, len(s) - 1)] < s[order][ok])]
    if not len(ok):
        return 1.0, 0.0, 0.0
    k = ok[-1]
    return float(s[order][k]), (k + 1) / len(s), float(misses[k])


def save_calibration(path, data):
    """Write atomically (temporary name, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    load_calibration.cache_clear()
