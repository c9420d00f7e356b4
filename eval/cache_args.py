"""The cache options shared by the eval scripts (--cache, --threshold, ...)."""
from fbcache_ms.config import METHODS, TAYLOR_VARIANTS, CacheConfig


def add_cache_arguments(parser):
    g = parser.add_argument_group("cache (see README: Cache methods)")
    g.add_argument("--cache", default="none", choices=METHODS,
                   help="cache method (default none): fbcache | taylorseer | fbcache_taylorseer")
    g.add_argument("--threshold", type=float, default=0.08,
                   help="FBCache: relative change of block 0's residual below which a step reuses the cache "
                        "(0..1, default 0.08; 0.12 is more aggressive)")
    g.add_argument("--order", type=int, default=1, help="TaylorSeer: forecast order 0..4 (default 1)")
    g.add_argument("--interval", type=int, default=5,
                   help="TaylorSeer: one full step every N steps after the warm-up (default 5)")
    g.add_argument("--warmup", type=int, default=3, help="TaylorSeer: full steps at the start (default 3)")
    g.add_argument("--taylor-variant", default=None, choices=TAYLOR_VARIANTS,
                   help="TaylorSeer: per_module (default for taylorseer) or residual (memory-light; the only "
                        "choice for fbcache_taylorseer)")
    return g


def cache_config_from_args(args):
    """CacheConfig from parsed arguments; raises ValueError with the reason for bad values."""
    return CacheConfig(method=args.cache, threshold=args.threshold, order=args.order, interval=args.interval,
                       warmup=args.warmup, variant=args.taylor_variant)
