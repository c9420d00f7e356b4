"""Check a generation run (eval.generate), sharded or not: every image index exactly once across the shards'
manifests, every shard with the same settings and prompts, every recorded image readable.

  python -m eval.verify_run outputs/coco-fb08

Exit status 0 when the run is complete and consistent, 1 (with one line naming the problem) otherwise.
"""
import argparse
import os
import sys


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.verify_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the --out folder of eval.generate")
    args = p.parse_args(argv)
    from pipelines.batch_generation import RunMismatch, read_run

    if not os.path.isdir(args.out):
        print(f"error: {args.out!r} is not a folder", file=sys.stderr)
        return 2
    try:
        header, records = read_run(args.out)
    except RunMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"ok: {len(records)} images, indices 0..{len(records) - 1} each exactly once, "
          f"{header['num_shards']} shard(s) with the same settings, every image readable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
