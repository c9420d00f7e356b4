"""Generation at scale: numbered image jobs, batches, shards, a manifest per shard, crash-safe writes.

- Image k (the k-th job of the run) uses seed `base_seed + k` unless its prompt carries its own seed.
- Jobs are cut into batches of `batch_size` consecutive indices; batch b belongs to shard b % num_shards. A
  partial last batch is padded with copies of its last job (results dropped), so every call has one shape and
  nothing recompiles. Resuming and re-sharding keep every batch's members, so both give bit-identical images:
  a cache decides from the whole batch, and the matmul kernels round by batch size, so a different
  `batch_size` gives different images (the run settings record it, and resume refuses a change).
- Each shard appends to its own manifest (JSON lines): a header with every setting that decides an image, then
  one line per finished image. An image is written to a temporary name, renamed, and only then recorded; a
  rerun trusts the manifest, not the files: unrecorded images are made again, a torn last line is dropped,
  stray temporary files are removed, and a run whose settings differ is refused.
"""
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

MANIFEST = "manifest.jsonl"


class RunMismatch(ValueError):
    """The output folder holds a run with other settings or prompts."""


@dataclass(frozen=True)
class ImageJob:
    index: int
    prompt: str
    seed: int
    negative_prompt: str = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def file(self):
        return f"{self.index:06d}.png"


def make_jobs(items, images_per_prompt=1, base_seed=0, negative_prompt=None):
    """PromptItems (eval.prompt_sources) -> ImageJobs, image k of the run seeded base_seed + k by default."""
    jobs = []
    for i, item in enumerate(items):
        for j in range(images_per_prompt):
            k = len(jobs)
            seed = base_seed + k if item.seed is None else item.seed + j
            negative = negative_prompt if item.negative_prompt is None else item.negative_prompt
            jobs.append(ImageJob(k, item.prompt, seed, negative, dict(item.extra, prompt_index=i)))
    return jobs


def jobs_digest(jobs):
    """A fingerprint of what the jobs ask for: a rerun with other prompts or seeds is refused."""
    text = json.dumps([(j.prompt, j.seed, j.negative_prompt) for j in jobs])
    return hashlib.sha256(text.encode()).hexdigest()


def shard_batches(num_jobs, batch_size, num_shards=1, shard_index=0):
    """The index ranges (batches) of one shard: batch b of the whole run goes to shard b % num_shards."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard index {shard_index} is outside 0..{num_shards - 1}")
    starts = range(0, num_jobs, batch_size)
    return [range(s, min(s + batch_size, num_jobs)) for b, s in enumerate(starts) if b % num_shards == shard_index]


def msrun_shard(environ=os.environ):
    """(num_shards, shard_index) from MindSpore's communication API in a process started by msrun, else None.

    msrun starts the same command in its scheduler process (MS_ROLE=MS_SCHED) as in its workers
    (MS_WORKER): the scheduler must call init() too, where it serves the cluster until the workers are done,
    and must never generate (it would run the whole job unsharded, and the workers' init() would wait for a
    scheduler that never starts)."""
    role = environ.get("MS_ROLE")
    if role not in ("MS_WORKER", "MS_SCHED"):
        return None
    from mindspore.communication import get_group_size, get_rank, init
    init()
    if role == "MS_SCHED":
        sys.exit(0)
    return get_group_size(), get_rank()


def manifest_name(num_shards, shard_index):
    return MANIFEST if num_shards == 1 else f"manifest.shard-{shard_index:03d}-of-{num_shards:03d}.jsonl"


def _differences(a, b, prefix=""):
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} there, {b.get(k)!r} now")
    return out


class Manifest:
    """One shard's JSON-lines manifest: a header, then one record per finished image."""

    def __init__(self, path, header):
        self.path, self.records = path, {}
        self.header = json.loads(json.dumps(header))  # as it reads back: tuples become lists
        if os.path.isdir(path):
            raise RunMismatch(f"{path} is a folder, expected the run's manifest file")
        self._lock = self._take_lock()
        if os.path.isfile(path):
            self._load()
        else:
            self._write_atomic([header])

    def _take_lock(self):
        """Two processes writing one shard would interleave images and records: the second one is refused.
        The lock (flock on MANIFEST.lock) goes with the process, so a killed run leaves nothing held."""
        import fcntl

        lock = open(self.path + ".lock", "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise RunMismatch(f"another process is writing {self.path}: wait for it to finish, or give each "
                              "process its own shard (--num-shards N --shard-index K)") from None
        return lock

    def close(self):
        """Release the writer lock (the records stay readable)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _load(self):
        with open(self.path, "rb") as f:
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]  # a tail without its newline is a torn write: dropped
        parsed = []
        for n, line in enumerate(complete.split(b"\n")[:-1]):
            try:
                parsed.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise RunMismatch(f"{self.path}: line {n + 1} is not JSON: the manifest is damaged") from None
        if len(complete) < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        if not parsed or parsed[0].get("kind") != "run":
            raise RunMismatch(f"{self.path}: no run header: not a manifest this tool wrote")
        diff = _differences(parsed[0], self.header)
        if diff:
            raise RunMismatch(f"{os.path.dirname(self.path) or '.'} holds a run with other settings ("
                              + "; ".join(diff[:4]) + (" ..." if len(diff) > 4 else "")
                              + "): use another output folder")
        self.records = {r["index"]: r for r in parsed[1:] if r.get("kind") == "image"}

    def _write_atomic(self, records):
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, record):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[record["index"]] = record


def save_png_atomic(image, path):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        image.save(f, format="PNG")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_stray_temporaries(out_dir, indices):
    for k in indices:
        tmp = os.path.join(out_dir, f"{k:06d}.png.tmp")
        if os.path.exists(tmp):
            os.remove(tmp)


def generate_run(pipe, jobs, settings, out_dir, batch_size, num_shards=1, shard_index=0, progress=True, log=print):
    """Make every image of one shard that its manifest lacks. `settings`: what decides an image besides the
    job (checkpoint, size, steps, guidance, cache, ...), recorded in the header; the keyword arguments of the
    pipeline call are settings["call"]. Returns the shard's Manifest."""
    from tqdm.auto import tqdm
    from fbcache_ms.config import CacheConfig

    header = dict(kind="run", settings=settings, num_jobs=len(jobs), jobs_sha256=jobs_digest(jobs),
                  batch_size=batch_size, num_shards=num_shards, shard_index=shard_index)
    os.makedirs(out_dir, exist_ok=True)
    manifest = Manifest(os.path.join(out_dir, manifest_name(num_shards, shard_index)), header)
    batches = shard_batches(len(jobs), batch_size, num_shards, shard_index)
    remove_stray_temporaries(out_dir, [k for b in batches for k in b])
    todo = [b for b in batches if any(k not in manifest.records for k in b)]
    done = sum(len(b) for b in batches) - sum(sum(k not in manifest.records for k in b) for b in todo)
    if done:
        log(f"resuming: {done} image(s) of this shard already in {manifest.path}")
    call = dict(settings["call"])
    cache = CacheConfig(**call.pop("cache"))
    bar = tqdm(total=sum(len(b) for b in batches), initial=done, desc="images", unit="image", disable=not progress)
    try:
        _generate_batches(pipe, jobs, todo, call, cache, manifest, out_dir, batch_size, bar)
    finally:
        manifest.close()
        bar.close()
    return manifest


def _generate_batches(pipe, jobs, todo, call, cache, manifest, out_dir, batch_size, bar):
    for batch in todo:
        members = [jobs[k] for k in batch] + [jobs[batch[-1]]] * (batch_size - len(batch))  # pad: one shape
        negatives = [j.negative_prompt or "" for j in members]
        out = pipe([j.prompt for j in members], generator=[np.random.default_rng(j.seed) for j in members],
                   negative_prompt=negatives if call.get("true_cfg_scale", 1.0) > 1 else None, cache=cache,
                   progress=False, **call)
        stats = out.cache_stats
        for job, image in zip(members[:len(batch)], out.images):
            if job.index in manifest.records:
                continue
            save_png_atomic(image, os.path.join(out_dir, job.file))
            manifest.append(dict(
                kind="image", index=job.index, file=job.file, prompt=job.prompt, seed=job.seed,
                negative_prompt=job.negative_prompt if call.get("true_cfg_scale", 1.0) > 1 else None,
                extra=job.extra, batch=batch.start // batch_size, batch_members=[batch.start, batch.stop],
                denoise_s=out.timings["denoise"], step_s=out.timings["steps"], decode_s=out.timings.get("decode"),
                cache_pattern={b: stats.pattern(b) for b in stats.computed} if stats else None,
                block_fraction=stats.block_fraction() if stats else 1.0,
                cache_signal={b: v for b, v in stats.changes.items()} if stats else None,
                tokens_run=dict(stats.tokens) if stats and stats.tokens else None,
                block_strategies=dict(stats.strategies) if stats and stats.strategies else None,
                cache_state_bytes=stats.state_bytes if stats else 0))
            bar.update()


def read_run(out_dir):
    """Check the shards of one run: every index exactly once, the same settings everywhere, every file there.
    Returns (header, records sorted by index); RunMismatch naming what is wrong."""
    names = sorted(n for n in os.listdir(out_dir) if n == MANIFEST or
                   (n.startswith("manifest.shard-") and n.endswith(".jsonl")))
    if not names:
        raise RunMismatch(f"{out_dir}: no manifest (manifest.jsonl or manifest.shard-*.jsonl)")
    headers, records = {}, {}
    for name in names:
        path = os.path.join(out_dir, name)
        with open(path, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
        head = dict(lines[0])
        headers[name] = head
        for r in lines[1:]:
            if r["index"] in records:
                raise RunMismatch(f"image {r['index']} is recorded twice ({records[r['index']][0]} and {name})")
            records[r["index"]] = (name, r)
    first_name, first = next(iter(headers.items()))
    shards = {h["shard_index"] for h in headers.values()}
    for name, h in headers.items():
        diff = _differences({k: v for k, v in first.items() if k != "shard_index"},
                            {k: v for k, v in h.items() if k != "shard_index"})
        if diff:
            raise RunMismatch(f"{name} and {first_name} disagree: " + "; ".join(diff[:4]))
    if shards != set(range(first["num_shards"])):
        missing = sorted(set(range(first["num_shards"])) - shards)
        raise RunMismatch(f"{out_dir}: shard(s) {missing} of {first['num_shards']} have no manifest")
    missing = [k for k in range(first["num_jobs"]) if k not in records]
    if missing:
        raise RunMismatch(f"{len(missing)} of {first['num_jobs']} images are not recorded (first: {missing[:5]})")
    from PIL import Image
    for k, (name, r) in sorted(records.items()):
        path = os.path.join(out_dir, r["file"])
        try:
            with Image.open(path) as im:
                im.load()
        except (OSError, ValueError) as e:
            raise RunMismatch(f"image {k} ({path}) is recorded in {name} but cannot be read: {e}") from None
    return {k: v for k, v in first.items() if k != "shard_index"}, [records[k][1] for k in sorted(records)]
