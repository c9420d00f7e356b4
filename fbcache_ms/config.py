"""CacheConfig: which cache method runs and with what settings, validated before anything compiles."""
import math
import os
from dataclasses import asdict, dataclass

from fbcache_ms import calibration as calib

METHODS = ("none", "fbcache", "taylorseer", "fbcache_taylorseer", "teacache", "magcache", "fastcache", "afcache",
           "freqca")
TAYLOR_VARIANTS = ("per_module", "residual")
MAX_ORDER = 4
# FLUX.1-dev defaults of each method's own signal (they mean different things: see each method's file)
DEFAULT_THRESHOLDS = {"fbcache": 0.08, "fbcache_taylorseer": 0.08, "teacache": 0.4, "magcache": 0.06,
                      "fastcache": 0.05, "afcache": 0.8}


@dataclass(frozen=True)
class CacheConfig:
    """
    method:      none | fbcache | taylorseer | fbcache_taylorseer | teacache | magcache | fastcache | afcache |
                 freqca
    threshold:   the method's skip threshold (default: its FLUX.1-dev default, DEFAULT_THRESHOLDS).
                 FBCache: relative-L1 change of the first blocks' residual, in [0, 1] (0 never reuses);
                 TeaCache: accumulated rescaled input change; MagCache: accumulated magnitude error
    FBCache family (fbcache, fbcache_taylorseer), cache-dit's DBCache generalisation:
      fn:        the first `fn` blocks always run and give the signal (1 = FBCache)
      bn:        the last `bn` blocks also run on a reused step, on top of the reused residual (0 = FBCache)
    TaylorSeer (taylorseer, and fbcache_taylorseer's forecast) and FreqCa (its schedule):
      order:     forecast order O (0 = plain reuse, FORA; default 1, FreqCa 2: the published ones)
      interval:  one full step every `interval` steps after the warm-up
      warmup:    the first `warmup` steps always compute
      variant:   per_module (attention/MLP outputs of every block: best quality, most memory; the default
                 for taylorseer) or residual (one tensor per order: the residual of the whole block stack;
                 the only choice for fbcache_taylorseer, whose decision is per stack)
    TeaCache and MagCache:
      calibration: JSON file with the model's TeaCache polynomial / MagCache ratios
                 (default: FLUX.1-dev's published ones; `python -m eval.calibrate_cache` writes one)
      max_skip:  MagCache: at most this many reused steps in a row
      retention: MagCache: the first round(retention * steps) steps always compute
    FastCache (fastcache.py):
      threshold: b0 of the adaptive noise scale tau (FastCache's default 0.05)
      alpha:     level of the chi-square test: a step is reused when its change is not significant at alpha
      motion_ratio: fraction of image tokens that run on a computed step (the most changed); 1 = all
      calibration: with one (eval.calibrate_cache), a static token's residual is its last computed one
                 corrected by the calibration's ridge-fitted map; without, reused as it is
    AFCache (afcache.py): per block and step, run or forecast the block's residual by its most stable predictor
      threshold: a block runs when its best stability (EMA of cosine similarity, extrapolated to the steps since
                 the block last ran) is below this (1 = all run;
                 default: the calibration's afcache.threshold when `calibration` is given, else 0.8)
      budget:    instead of threshold: the fraction of an uncached call's blocks to run, spent on the least
                 stable blocks (None: threshold mode)
      order:     the highest Taylor order among the predictors (0 = reuse only)
      warmup, interval: the first `warmup` steps and every `interval`-th step after them run every block
      group_size: decide for this many consecutive blocks at once (one residual, stability and tensor `if`
                 per unit; default 1: per block). A calibration's threshold is the one fitted for this
                 group_size (eval.calibrate_cache --group-sizes)
    Fourier storage (fbcache, fbcache_taylorseer, taylorseer's residual variant):
      fourier_ratio: the cached image residual is kept as the low-frequency block of its 2-D FFT over the
                 token grid, |u|, v <= ratio x (grid / 2) (fourier.py); 1 stores it uncompressed
    FreqCa (freqca.py): the stack's image residual on TaylorSeer's schedule, low frequencies reused, high forecast
      low_band:  the reused low-frequency block, |u|, v <= low_band x (grid / 2), DC always (default 0.5;
                 1 = every frequency reused: plain reuse)
    """
    method: str = "none"
    threshold: float = None
    order: int = None
    interval: int = 5
    warmup: int = 3
    variant: str = None
    fn: int = 1
    bn: int = 0
    calibration: str = None
    max_skip: int = 3
    retention: float = 0.2
    fourier_ratio: float = 1.0
    alpha: float = 0.05
    motion_ratio: float = 0.5
    budget: float = None
    low_band: float = None
    group_size: int = 1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown cache method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not (isinstance(self.group_size, int) and not isinstance(self.group_size, bool) and self.group_size >= 1):
            raise ValueError(f"group_size must be an integer >= 1, got {self.group_size!r}")
        if self.group_size != 1 and self.method != "afcache":
            raise ValueError(f"group_size applies to afcache, not {self.method}")
        if self.threshold is None:
            if self.method == "afcache" and self.calibration is not None:
                object.__setattr__(self, "threshold", calib.afcache_threshold(self.calibration, self.group_size))
            else:
                object.__setattr__(self, "threshold", DEFAULT_THRESHOLDS.get(self.method, 0.0))
        limit = 1.0 if self.uses_fbcache or self.method in ("none", "afcache") else math.inf
        if not (isinstance(self.threshold, (int, float)) and 0.0 <= float(self.threshold) <= limit):
            raise ValueError(f"threshold must be in [0, {limit:g}] for {self.method}, got {self.threshold}")
        object.__setattr__(self, "threshold", float(self.threshold))
        if self.order is None:
            object.__setattr__(self, "order", 2 if self.method == "freqca" else 1)
        if not (isinstance(self.order, int) and 0 <= self.order <= MAX_ORDER):
            raise ValueError(f"order must be an integer in 0..{MAX_ORDER}, got {self.order!r}")
        if not (isinstance(self.interval, int) and self.interval >= 1):
            raise ValueError(f"interval must be an integer >= 1, got {self.interval!r}")
        if not (isinstance(self.warmup, int) and self.warmup >= 1):
            raise ValueError(f"warmup must be an integer >= 1 (the first step always computes), got {self.warmup!r}")
        if self.variant is None:
            residual_only = self.method in ("fbcache_taylorseer", "freqca")  # FreqCa: TaylorSeer's residual variant
            object.__setattr__(self, "variant", "residual" if residual_only else "per_module")
        if self.variant not in TAYLOR_VARIANTS:
            raise ValueError(f"unknown TaylorSeer variant {self.variant!r}: choose one of {', '.join(TAYLOR_VARIANTS)}")
        if self.method == "fbcache_taylorseer" and self.variant != "residual":
            raise ValueError("fbcache_taylorseer forecasts the residual of the whole block stack: variant must be "
                             "'residual'")
        if not (isinstance(self.fn, int) and self.fn >= 1):
            raise ValueError(f"fn must be an integer >= 1 (the first block always runs), got {self.fn!r}")
        if not (isinstance(self.bn, int) and self.bn >= 0):
            raise ValueError(f"bn must be an integer >= 0, got {self.bn!r}")
        if not (isinstance(self.max_skip, int) and self.max_skip >= 1):
            raise ValueError(f"max_skip must be an integer >= 1, got {self.max_skip!r}")
        if not (isinstance(self.retention, (int, float)) and 0.0 <= self.retention <= 1.0):
            raise ValueError(f"retention must be in [0, 1], got {self.retention!r}")
        if not (isinstance(self.fourier_ratio, (int, float)) and 0.0 < self.fourier_ratio <= 1.0):
            raise ValueError(f"fourier_ratio must be in (0, 1], got {self.fourier_ratio!r}")
        object.__setattr__(self, "fourier_ratio", float(self.fourier_ratio))
        if self.fourier_ratio < 1 and not self.compressible:
            raise ValueError(f"fourier_ratio < 1 compresses a cached residual: it applies to fbcache, "
                             f"fbcache_taylorseer and taylorseer's residual variant, not {self.method}"
                             + (" (per_module)" if self.method == "taylorseer" else ""))
        if not (isinstance(self.alpha, (int, float)) and 0.0 < self.alpha < 1.0):
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if not (isinstance(self.motion_ratio, (int, float)) and 0.0 < self.motion_ratio <= 1.0):
            raise ValueError(f"motion_ratio must be in (0, 1], got {self.motion_ratio!r}")
        if self.budget is not None:
            if self.method != "afcache":
                raise ValueError(f"budget applies to afcache, not {self.method}")
            if not (isinstance(self.budget, (int, float)) and 0.0 < self.budget <= 1.0):
                raise ValueError(f"budget must be in (0, 1] (the fraction of blocks run), got {self.budget!r}")
            object.__setattr__(self, "budget", float(self.budget))
        if self.low_band is not None and self.method != "freqca":
            raise ValueError(f"low_band applies to freqca, not {self.method}")
        if self.method == "freqca":
            low_band = 0.5 if self.low_band is None else self.low_band
            if not (isinstance(low_band, (int, float)) and 0.0 < low_band <= 1.0):
                raise ValueError(f"low_band must be in (0, 1], got {low_band!r}")
            object.__setattr__(self, "low_band", float(low_band))
        if self.method == "afcache" and self.order > 2:
            raise ValueError(f"afcache forecasts with Taylor order 0, 1 or 2, got order {self.order}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be finite, got {self.threshold}")
        if self.method in ("teacache", "magcache"):
            if self.calibration is None:
                object.__setattr__(self, "calibration", calib.FLUX_DEV)
            # read now, so a bad file is named before anything loads or compiles
            self.teacache_coefficients() if self.method == "teacache" else self.magcache_ratios(2)
        if self.method == "fastcache" and self.calibration is not None:
            if self.motion_ratio >= 1:
                raise ValueError("a fastcache calibration is its static-token map, for the tokens a reduced step does "
                                 "not run: it needs motion_ratio < 1 (at 1 every token runs)")
            calib.fastcache_static_map(self.calibration)

    @property
    def uses_fbcache(self):
        return self.method in ("fbcache", "fbcache_taylorseer")

    @property
    def compressible(self):
        """Methods whose cached image residual can be Fourier-compressed."""
        return self.uses_fbcache or (self.method == "taylorseer" and self.variant == "residual")

    def model_problem(self, num_blocks, hidden_size):
        """What makes this config unusable with a model of these sizes (a line naming it), or None."""
        if self.uses_fbcache and self.fn + self.bn >= num_blocks:
            return f"--fn + --bn must be below the model's {num_blocks} blocks, got {self.fn} + {self.bn}"
        if self.static_map:
            dim = calib.fastcache_static_map(self.calibration).shape[1]
            if dim != hidden_size:
                return (f"calibration {self.calibration!r}: its FastCache static map is for hidden size {dim}, the "
                        f"model's is {hidden_size}")
        return None

    @property
    def static_map(self):
        """FastCache with a calibration: static tokens' residuals are predicted by its map."""
        return self.method == "fastcache" and self.calibration is not None

    @property
    def uses_taylor(self):
        return self.method in ("taylorseer", "fbcache_taylorseer", "freqca")

    def is_full_step(self, step):
        """TaylorSeer's fixed schedule: warm-up steps, then every `interval`-th step computes."""
        return step < self.warmup or (step - self.warmup) % self.interval == 0

    def teacache_coefficients(self):
        return calib.teacache_coefficients(self.calibration)

    def magcache_ratios(self, num_steps):
        return calib.magcache_ratios(self.calibration, num_steps)

    @property
    def structure(self):
        """What decides the policy cell's graph (thresholds and calibrations do not: they are tensors)."""
        return (self.method, self.order, self.variant, self.fn, self.bn, self.fourier_ratio, self.motion_ratio,
                self.low_band, self.group_size, self.static_map)

    def describe(self):
        if self.method == "none":
            return "no cache"
        parts = []
        if self.method == "afcache" and self.budget is not None:
            parts.append(f"budget {self.budget:g}")
        elif self.method not in ("taylorseer", "freqca"):
            parts.append(f"threshold {self.threshold:g}")
        if self.uses_fbcache and (self.fn, self.bn) != (1, 0):
            parts.append(f"F{self.fn}B{self.bn}")
        if self.method == "taylorseer":
            parts.append(f"order {self.order}, interval {self.interval}, warmup {self.warmup}, {self.variant}")
        elif self.method == "fbcache_taylorseer":
            parts.append(f"order {self.order}")
        elif self.method == "freqca":
            parts.append(f"low band {self.low_band:g}, order {self.order}, interval {self.interval}, "
                         f"warmup {self.warmup}")
        if self.method in ("teacache", "magcache"):
            parts.append(f"calibration {os.path.basename(self.calibration)}")
        if self.method == "magcache":
            parts.append(f"max_skip {self.max_skip}, retention {self.retention:g}")
        if self.method == "afcache":
            parts.append(f"order {self.order}, interval {self.interval}, warmup {self.warmup}")
            if self.group_size > 1:
                parts.append(f"units of {self.group_size} blocks")
            if self.calibration is not None:
                parts.append(f"calibration {os.path.basename(self.calibration)}")
        if self.method == "fastcache":
            parts.append(f"alpha {self.alpha:g}, motion ratio {self.motion_ratio:g}")
            if self.calibration is not None:
                parts.append(f"static map {os.path.basename(self.calibration)}")
        if self.fourier_ratio < 1:
            parts.append(f"Fourier ratio {self.fourier_ratio:g}")
        return f"{self.method} ({'; '.join(parts)})"

    def to_dict(self):
        return asdict(self)
