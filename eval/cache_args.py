"""The cache options shared by the eval scripts (--cache, --threshold, ...)."""
import os

from fbcache_ms.config import DEFAULT_THRESHOLDS, METHODS, TAYLOR_VARIANTS, CacheConfig


def add_cache_arguments(parser):
    g = parser.add_argument_group("cache (see README: Cache methods)")
    g.add_argument("--cache", default="none", choices=METHODS, help="cache method (default none)")
    defaults = ", ".join(f"{m} {t:g}" for m, t in DEFAULT_THRESHOLDS.items())
    g.add_argument("--threshold", type=float, default=None,
                   help="the method's skip threshold (default FLUX.1-dev's: " + defaults + "). FBCache: relative "
                        "change of the first blocks' residual, 0..1; TeaCache: accumulated rescaled change of "
                        "block 0's modulated input (0.25 / 0.4 / 0.6 / 0.8 published); MagCache: accumulated "
                        "magnitude-ratio error")
    g.add_argument("--fn", type=int, default=1,
                   help="FBCache (DBCache): the first N blocks always run and give the signal (default 1)")
    g.add_argument("--bn", type=int, default=0,
                   help="FBCache (DBCache): the last N blocks still run on a reused step (default 0)")
    g.add_argument("--order", type=int, default=None,
                   help="TaylorSeer / FreqCa: forecast order 0..4 (default 1; FreqCa 2); AFCache: highest Taylor order "
                        "of its predictors, 0..2 (default 1)")
    g.add_argument("--interval", type=int, default=5,
                   help="TaylorSeer / FreqCa / AFCache: one full step every N steps after the warm-up (default 5)")
    g.add_argument("--warmup", type=int, default=3, help="TaylorSeer / FreqCa / AFCache: full steps at the start (default 3)")
    g.add_argument("--taylor-variant", default=None, choices=TAYLOR_VARIANTS,
                   help="TaylorSeer: per_module (default for taylorseer) or residual (memory-light; the only "
                        "choice for fbcache_taylorseer)")
    g.add_argument("--calibration", default=None, metavar="JSON",
                   help="TeaCache / MagCache / AFCache: the model's calibration (python -m eval.calibrate_cache "
                        "writes one; default FLUX.1-dev's published coefficients and ratios; AFCache takes its "
                        "threshold from it unless --threshold is given; FastCache: its static-token map, which "
                        "corrects the residuals of the tokens a reduced step does not run)")
    g.add_argument("--max-skip", type=int, default=3, help="MagCache: most reused steps in a row (default 3)")
    g.add_argument("--retention", type=float, default=0.2,
                   help="MagCache: fraction of the first steps that always compute (default 0.2)")
    g.add_argument("--fourier-ratio", type=float, default=1.0,
                   help="FBCache / DBCache / TaylorSeer residual: keep the cached image residual as the low-frequency "
                        "block of its 2-D FFT over the token grid, this fraction of each axis' frequencies "
                        "(default 1: uncompressed)")
    g.add_argument("--alpha", type=float, default=0.05,
                   help="FastCache: level of its chi-square test (default 0.05; larger: fewer reused steps)")
    g.add_argument("--motion-ratio", type=float, default=0.5,
                   help="FastCache: fraction of image tokens recomputed on a computed step (default 0.5; 1 = all)")
    g.add_argument("--budget", type=float, default=None,
                   help="AFCache: fraction of an uncached run's blocks to run, spent on the least stable blocks "
                        "(default: threshold mode, a block runs while its stability is below --threshold)")
    g.add_argument("--group-size", type=int, default=1,
                   help="AFCache: decide for this many consecutive blocks at once (one stability and one tensor if "
                        "per unit: less control flow and bookkeeping, coarser choices; default 1: per block)")
    g.add_argument("--low-band", type=float, default=None,
                   help="FreqCa: the low-frequency block of the stack's residual that is reused as stored, this "
                        "fraction of each token-grid axis' frequencies (default 0.5; the rest is forecast)")
    return g


def cache_config_from_args(args):
    """CacheConfig from parsed arguments; raises ValueError with the reason for bad values."""
    return CacheConfig(method=args.cache, threshold=args.threshold, order=args.order, interval=args.interval,
                       warmup=args.warmup, variant=args.taylor_variant, fn=args.fn, bn=args.bn,
                       calibration=args.calibration, max_skip=args.max_skip, retention=args.retention,
                       fourier_ratio=args.fourier_ratio, alpha=args.alpha, motion_ratio=args.motion_ratio,
                       budget=args.budget, low_band=args.low_band, group_size=args.group_size)


COMPILE_CACHE_HELP = ("keep the compiled graphs in this folder and load them on later runs that compile the same "
                      "graphs in the same order (a first call then takes seconds instead of a compile; "
                      "see README: compile cache); default: compile every run")


def add_compile_cache_argument(parser):
    parser.add_argument("--compile-cache", default=None, metavar="DIR", help=COMPILE_CACHE_HELP)


def compile_cache_problem(path):
    """One line on why `path` cannot be a compile cache folder, or None."""
    if path is None:
        return None
    from pipelines.compile_cache import ENV_CONFLICT, mindspores_own_cache_is_on
    if mindspores_own_cache_is_on():
        return f"--compile-cache: {ENV_CONFLICT}"
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--compile-cache {path!r} is a file, not a folder"
    from utils import writable_parent
    if writable_parent(path) is None:
        return f"--compile-cache {path!r}: no writable folder to make it in"
    return None
