"""Calibrations of the caches that need one: TeaCache's rescaling polynomial, MagCache's magnitude ratios and
AFCache's stability threshold, one JSON file per checkpoint (written by `python -m eval.calibrate_cache`, read by
CacheConfig).

  {"model": ..., "steps": 28, "source": ...,
   "teacache": {"coefficients": [c4, c3, c2, c1, c0], "r2": ..., "points": ...},
   "magcache": {"ratios": [1.0, gamma_1, ..., gamma_27]},
   "afcache": {"threshold": ..., "target_cosine": ..., "tolerance": ..., "forecast_fraction": ...,
               "by_group_size": {"4": {"threshold": ..., "forecast_fraction": ..., "miss_rate": ...}, ...}},
   "fastcache": {"static_map": "<name>.fastcache.safetensors", "sha256": ..., "motion_ratio": ..., ...}}

afcache.threshold is fitted per block (group_size 1); by_group_size holds the thresholds fitted for units of
blocks (AFCache's group_size > 1: one residual and one stability per unit), replayed on the units' residuals.
fastcache.static_map names a safetensors file beside the JSON (its weights are too many for JSON): the ridge map
that predicts a static token's residual (StaticMapFit); its sha256 is in the JSON, so the JSON's content
decides the images and a changed weights file is refused.
"""
import functools
import hashlib
import json
import math
import os

import numpy as np

from utils import write_bytes_atomic, write_json_atomic

CALIBRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibrations")
FLUX_DEV = os.path.join(CALIBRATIONS, "flux1-dev.json")
TEACACHE_DEGREE = 4
STATIC_MAP_GAPS = (1, 2, 3, 4)  # steps between the pairs the static-token map is fitted on
STATIC_MAP_RIDGE = 1e-3  # ridge, relative to the mean diagonal of X^T X


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
    af = data.get("afcache", {})
    by_size = af.get("by_group_size", {})
    if not (isinstance(by_size, dict) and all(g.isdigit() and int(g) >= 2 and isinstance(e, dict)
                                              for g, e in by_size.items())):
        raise CalibrationError(f"calibration file {path!r}: afcache.by_group_size must map group sizes >= 2 to "
                               "objects")
    for where, entry in [("afcache", af)] + [(f"afcache.by_group_size.{g}", e) for g, e in by_size.items()]:
        threshold = entry.get("threshold")
        if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
            raise CalibrationError(f"calibration file {path!r}: {where}.threshold must be a number in [0, 1]")
    return data


def afcache_threshold(path, group_size=1):
    """The calibrated threshold for AFCache per block (group_size 1) or in units of `group_size` blocks."""
    af = load_calibration(path).get("afcache", {})
    entry = af if group_size == 1 else af.get("by_group_size", {}).get(str(group_size), {})
    threshold = entry.get("threshold")
    if threshold is None:
        what = "afcache.threshold" if group_size == 1 else \
            f"afcache threshold for units of {group_size} blocks (python -m eval.calibrate_cache --group-sizes)"
        raise CalibrationError(f"calibration file {path!r} has no {what}")
    return float(threshold)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def fastcache_static_map(path):
    """FastCache's static-token map [3D + 3, D] (float32) from the calibration in `path`; CalibrationError names a
    missing entry or file, a changed file (sha256) or a wrong shape."""
    entry = load_calibration(path).get("fastcache", {})
    if not isinstance(entry, dict):
        raise CalibrationError(f"calibration file {path!r}: fastcache must be an object")
    name = entry.get("static_map")
    if not isinstance(name, str):
        raise CalibrationError(f"calibration file {path!r} has no fastcache.static_map (python -m "
                               "eval.calibrate_cache writes one)")
    weights = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    if not os.path.isfile(weights):
        raise CalibrationError(f"calibration file {path!r}: its fastcache.static_map {weights!r} does not exist")
    if not isinstance(entry.get("sha256"), str):
        raise CalibrationError(f"calibration file {path!r} has no fastcache.sha256 for {weights!r}")
    if _sha256(weights) != entry["sha256"]:
        raise CalibrationError(f"calibration file {path!r}: {weights!r} is not the file it was written with "
                               "(sha256 differs)")
    from safetensors.numpy import load_file
    w = load_file(weights).get("static_map")
    if w is None or w.ndim != 2 or w.shape[0] != 3 * w.shape[1] + 3 or not np.isfinite(w).all():
        raise CalibrationError(f"calibration file {path!r}: {weights!r} must hold a finite [3D + 3, D] "
                               "'static_map'")
    return w.astype(np.float32)


def static_map_features(dh, r0, p, dp):
    """Inputs of FastCache's static-token map, in this order: the token's input change since its anchor (the last
    step it ran) dh [..., D], its residual there r0 [..., D], 1, the step's progress p = step / steps, dp = p - the
    anchor's progress (scalars or [..., 1]) and r0 * dp. -> [..., 3D + 3]. The map predicts the residual's change
    since the anchor. Progress, not the timestep: it is exact on the host, where a bf16 timestep is not."""
    one = np.ones(r0.shape[:-1] + (1,))
    return np.concatenate([dh, r0, one, one * p, one * dp, r0 * dp], axis=-1)


class StaticMapFit:
    """Normal equations of the ridge fit (r_t - r_a) ~ static_map_features(h_t - h_a, r_a, p_t, p_t - p_a) @ W over
    static tokens of uncached runs, open loop on pairs of steps: at each step t and gap t - a in `gaps`, the image
    tokens outside the top ceil(motion_ratio * N) by change over the pair, ||h_t - h_a||^2 summed over the batch.
    Not the policy's own selection (by change since the previous computed step, so that most static tokens keep
    the anchor of step 0): a fit on that selection, replayed on the same runs, was tried and did worse end to end
    (README, "FastCache's static-token map"). Accumulated per gap, so that errors per gap are exact without keeping
    the runs: ||Y - X W||^2 = Y'Y - 2 <W, X'Y> + <W, X'X W>. Memory: (3D + 3)^2 + (3D + 3) D float64 per gap."""

    def __init__(self, motion_ratio, gaps=STATIC_MAP_GAPS):
        self.motion_ratio, self.gaps = motion_ratio, tuple(gaps)
        self.xtx, self.xty, self.yty, self.rtr, self.rows = {}, {}, {}, {}, {}

    def add(self, inputs, residuals):
        """inputs, residuals [steps, B, N, D]: the stack's image input and residual at every step of one call."""
        from fbcache_ms.fastcache import motion_tokens
        inputs, residuals = np.asarray(inputs, np.float64), np.asarray(residuals, np.float64)
        steps, _, tokens, _ = inputs.shape
        k = motion_tokens(tokens, self.motion_ratio)
        for gap in self.gaps:
            for t in range(gap, steps):
                a = t - gap
                saliency = ((inputs[t] - inputs[a]) ** 2).sum(axis=(0, 2))
                static = np.sort(np.argsort(-saliency, kind="stable")[k:])
                x = static_map_features(inputs[t][:, static] - inputs[a][:, static], residuals[a][:, static],
                                        t / steps, gap / steps)
                x = x.reshape(-1, x.shape[-1])
                y = (residuals[t] - residuals[a])[:, static].reshape(len(x), -1)
                self._add(gap, x.T @ x, x.T @ y, float((y * y).sum()), float((residuals[t][:, static] ** 2).sum()),
                          len(x))

    def _add(self, gap, xtx, xty, yty, rtr, rows):
        if gap not in self.xtx:
            self.xtx[gap], self.xty[gap], self.yty[gap], self.rtr[gap], self.rows[gap] = \
                np.zeros_like(xtx), np.zeros_like(xty), 0.0, 0.0, 0
        self.xtx[gap] += xtx
        self.xty[gap] += xty
        self.yty[gap] += yty
        self.rtr[gap] += rtr
        self.rows[gap] += rows

    def solve(self, ridge=STATIC_MAP_RIDGE):
        """W [3D + 3, D] (float32) of the fit pooled over every gap."""
        if not self.rows:
            raise CalibrationError("the static-token map has no token rows: run more steps than its smallest gap")
        xtx, xty = sum(self.xtx.values()), sum(self.xty.values())
        a = xtx + ridge * np.trace(xtx) / len(xtx) * np.eye(len(xtx))
        return np.linalg.solve(a, xty).astype(np.float32)

    def squared_errors(self, w):
        """{gap: (||r_t - r_a||^2, ||r_t - r_a - X W||^2, ||r_t||^2)} over the static tokens: the error of reusing
        the anchor's residual as it is, with the map's correction, and the residual's own energy."""
        w = np.asarray(w, np.float64)
        return {gap: (self.yty[gap],
                      self.yty[gap] - 2 * float((w * self.xty[gap]).sum()) + float((w * (self.xtx[gap] @ w)).sum()),
                      self.rtr[gap]) for gap in self.xtx}

    def merged(self, other):
        """This fit's equations plus `other`'s."""
        out = StaticMapFit(self.motion_ratio, self.gaps)
        for fit in (self, other):
            for gap in fit.xtx:
                out._add(gap, fit.xtx[gap], fit.xty[gap], fit.yty[gap], fit.rtr[gap], fit.rows[gap])
        return out


def to_db(error, energy):
    """-10 log10(error / energy): a prediction's PSNR-like quality against the energy of what it predicts."""
    return -10 * math.log10(max(error, 1e-30) / energy)


def save_static_map(json_path, w):
    """Write the map beside `json_path` (temporary name, then rename) -> its fastcache entry's name and sha256."""
    from safetensors.numpy import save
    name = os.path.basename(json_path)[:-len(".json")] + ".fastcache.safetensors"
    path = os.path.join(os.path.dirname(os.path.abspath(json_path)), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_bytes_atomic(path, save({"static_map": np.ascontiguousarray(w, np.float32)}))
    fastcache_static_map.cache_clear()
    return {"static_map": name, "sha256": _sha256(path)}


def unit_residuals(residuals, bounds):
    """[steps, blocks, ...] residuals of every block -> [steps, units, ...] for units given as (first, stop) block
    indices: a unit's residual (its output - input) is the sum of its blocks' residuals."""
    residuals = np.asarray(residuals)
    return np.stack([residuals[:, a:b].sum(axis=1) for a, b in bounds], axis=1)


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


class NewtonHistory:
    """numpy twin of state.TaylorFeature: Newton divided differences of a feature over the steps it was computed."""

    def __init__(self, order):
        self.order, self.diffs, self.positions = order, [], []

    def update(self, x, step):
        new = [x]
        for i in range(min(len(self.diffs), self.order)):
            new.append((new[i] - self.diffs[i]) / (step - self.positions[i]))
        self.diffs, self.positions = new, ([step] + self.positions)[:self.order + 1]

    def spans(self, step):
        """prod_{i<p} (step - s_i) for p = 1..(positions kept): the weight of the order-p term, and the size of the
        order-(p-1) forecast's Newton remainder."""
        return list(np.cumprod([step - s for s in self.positions]))

    def forecasts(self, step):
        """The forecast at `step` by each predictor p = 0 .. (terms with history) - 1: each adds one term."""
        out = []
        for d, weight in zip(self.diffs, [1.0] + self.spans(step)):
            out.append(d if not out else out[-1] + d * weight)
        return out


def _cosine(a, b):
    return float(np.vdot(a, b) / (np.sqrt(np.vdot(a, a) * np.vdot(b, b)) + 1e-8))


def simulate_afcache(residuals, full, threshold, order, ema_keep, start):
    """AFCache's threshold rule on one block, open loop: residuals [steps, ...] are the block's fresh residuals
    in an uncached run (one call; the cosine pools everything, as the policy does), full [steps] the schedule's
    full steps. The block runs on full steps and while its best predicted cosine (its stability per unit span,
    extrapolated to this step's span: afcache.py) is below `threshold`; otherwise it is forecast by that
    predictor from the steps it ran, and the cosine of that forecast with the fresh residual is recorded.
    Open loop: the other blocks' forecast errors do not reach this block's input.
    -> (decision steps, [cosine of each forecast], [ran, per step])."""
    history, stability, cosines, decisions, ran = NewtonHistory(order), np.full(order + 1, start), [], 0, []
    measured = np.zeros(order + 1)  # the EMA's weight on measured cosines
    for i, r in enumerate(residuals):
        r = np.asarray(r, np.float64).ravel()
        forecasts = history.forecasts(i)
        n = len(forecasts)
        spans = np.asarray(history.spans(i))[:n]
        w = measured[:n]
        mean = (stability[:n] - start * (1 - w)) / np.where(w > 0, w, 1.0)
        predicted = np.where(w > 0, np.cos(np.minimum(np.arccos(np.clip(mean, -1.0, 1.0)) * spans, np.pi)), -2.0)
        best = int(np.argmax(predicted)) if n else 0  # ties: the lower order, as the policy
        decisions += not full[i]
        ran.append(bool(full[i] or threshold >= 1.0 or not n or predicted[best] < threshold))
        if ran[-1]:
            for p, (f, span) in enumerate(zip(forecasts, spans)):
                per_span = np.cos(np.arccos(np.clip(_cosine(f, r), -1.0, 1.0)) / span)
                stability[p] = ema_keep * stability[p] + (1 - ema_keep) * per_span
                measured[p] = ema_keep * measured[p] + (1 - ema_keep)
            history.update(r, i)
        else:
            cosines.append(_cosine(forecasts[best], r))
    return decisions, cosines, ran


def miss_rates(cosines, target):
    """Per threshold: the fraction of its forecasts whose cosine is below `target` (0 where none was made)."""
    return [float(np.mean(np.asarray(c) < target)) if len(c) else 0.0 for c in cosines]


def fit_afcache_threshold(thresholds, decisions, cosines, target, tolerance):
    """thresholds ascending; decisions[k], cosines[k]: all blocks' decision steps and forecast cosines at
    thresholds[k]. -> (the lowest threshold at and above which the forecasts miss `target` in at most `tolerance`
    of cases, the fraction of decisions it forecasts, its miss rate); 1.0 (every block runs) when none does."""
    miss = miss_rates(cosines, target)
    best = len(thresholds)
    for k in range(len(thresholds) - 1, -1, -1):
        if miss[k] > tolerance:
            break
        best = k
    if best == len(thresholds):
        return 1.0, 0.0, 0.0
    return float(thresholds[best]), len(cosines[best]) / max(decisions[best], 1), miss[best]


def save_calibration(path, data):
    """Write atomically (temporary name, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(path, data)
    load_calibration.cache_clear()
    fastcache_static_map.cache_clear()
