"""CacheConfig: which cache method runs and with what settings, validated before anything compiles."""
from dataclasses import asdict, dataclass

METHODS = ("none", "fbcache", "taylorseer", "fbcache_taylorseer")
TAYLOR_VARIANTS = ("per_module", "residual")
MAX_ORDER = 4


@dataclass(frozen=True)
class CacheConfig:
    """
    method:    none | fbcache | taylorseer | fbcache_taylorseer
    threshold: FBCache's relative-L1 threshold on block 0's residual (0 never reuses; FLUX default 0.08)
    order:     TaylorSeer's forecast order O (0 = plain reuse, FORA; 1 = the published default)
    interval:  TaylorSeer: one full step every `interval` steps after the warm-up
    warmup:    TaylorSeer: the first `warmup` steps always compute (FBCache's first step always computes too)
    variant:   TaylorSeer: per_module (attention/MLP outputs of every block, best quality, most memory;
               the default for taylorseer) or residual (one tensor per order and stream: the residual of
               the whole block stack; the only choice for fbcache_taylorseer, whose decision is per stack)
    """
    method: str = "none"
    threshold: float = 0.08
    order: int = 1
    interval: int = 5
    warmup: int = 3
    variant: str = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown cache method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not (isinstance(self.order, int) and 0 <= self.order <= MAX_ORDER):
            raise ValueError(f"order must be an integer in 0..{MAX_ORDER}, got {self.order!r}")
        if not (isinstance(self.interval, int) and self.interval >= 1):
            raise ValueError(f"interval must be an integer >= 1, got {self.interval!r}")
        if not (isinstance(self.warmup, int) and self.warmup >= 1):
            raise ValueError(f"warmup must be an integer >= 1 (the first step always computes), got {self.warmup!r}")
        if self.variant is None:
            object.__setattr__(self, "variant", "residual" if self.method == "fbcache_taylorseer" else "per_module")
        if self.variant not in TAYLOR_VARIANTS:
            raise ValueError(f"unknown TaylorSeer variant {self.variant!r}: choose one of {', '.join(TAYLOR_VARIANTS)}")
        if self.method == "fbcache_taylorseer" and self.variant != "residual":
            raise ValueError("fbcache_taylorseer forecasts the residual of the whole block stack: variant must be "
                             "'residual'")

    @property
    def uses_fbcache(self):
        return self.method in ("fbcache", "fbcache_taylorseer")

    @property
    def uses_taylor(self):
        return self.method in ("taylorseer", "fbcache_taylorseer")

    def is_full_step(self, step):
        """TaylorSeer's fixed schedule: warm-up steps, then every `interval`-th step computes."""
        return step < self.warmup or (step - self.warmup) % self.interval == 0

    def describe(self):
        if self.method == "none":
            return "no cache"
        parts = []
        if self.uses_fbcache:
            parts.append(f"threshold {self.threshold:g}")
        if self.method == "taylorseer":
            parts.append(f"order {self.order}, interval {self.interval}, warmup {self.warmup}, {self.variant}")
        elif self.method == "fbcache_taylorseer":
            parts.append(f"order {self.order}")
        return f"{self.method} ({'; '.join(parts)})"

    def to_dict(self):
        return asdict(self)
