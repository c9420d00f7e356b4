"""The method matrix: every cache setting on the trained embedded model, over its held-out prompts, in one
command: generated, scored, tabulated and plotted.

Every setting generates the same held-out prompts (eval/shapes_data.py) from the same noise (image k: seed
base + k), in graph mode, and is scored on
- prompt adherence: colour / shape / position / size / background read back by rules (eval/adherence.py),
  per attribute and "all attributes right", one-object and two-object prompts apart;
- fidelity to the uncached images of the same seeds: PSNR (over all pixels of all images) and mean SSIM
  (torchmetrics);
- FID against the generator's own pictures of the same prompts (--fid) and CLIP score (--clip-model);
- speed: denoising seconds per image after compilation and its ratio to the uncached run (measured
  speedup), next to the ideal speedup implied by the blocks that ran (1 / fraction of blocks run).

The settings are a JSON file (--settings-file, {name: CacheConfig arguments}) or the built-in table below;
the uncached "none" always runs, as the reference. Writes results.json, results.md, samples.png (the same
prompts under every setting), pareto.png (speed against PSNR, adherence and FID, with the Pareto front),
cache_map.png (steps computed / reused per setting) and signals.png (the signal each cache read, per step).

Batches run round robin over the settings (batch 1 of every setting, then batch 2, ...), so a slow spell of
the machine spreads over all settings. Each finished batch is saved (written under a temporary name, then
renamed) and a rerun with the same arguments resumes from there; each setting's scores are saved too and
reused while its images are unchanged. A cache decides once per batch from the whole batch (as the
reference implementations do), so hit patterns depend on --batch-size.

  python -m eval.benchmark_quality --out outputs/matrix --decoder torch --fid
  python -m eval.benchmark_quality --out outputs/mine --settings-file my_settings.json --one-object 100 --two-object 50
  python -m eval.benchmark_quality --out outputs/quality-cfg --settings none --true-cfg-scale 3
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np

from fbcache_ms.calibration import CALIBRATIONS, load_calibration
from fbcache_ms.config import CacheConfig
from utils import EMBEDDED_MODEL


OWN_CALIBRATION = os.path.join(CALIBRATIONS, "trained-tiny-flux-shapes.json")  # python -m eval.calibrate_cache
SETTINGS = {  # name -> CacheConfig arguments; "none" (uncached) is the reference for fidelity and speed
    "none": dict(method="none"),
    "fbcache-0.08": dict(method="fbcache", threshold=0.08),
    "fbcache-0.12": dict(method="fbcache", threshold=0.12),
    "dbcache-F4B0-0.08": dict(method="fbcache", threshold=0.08, fn=4),
    "dbcache-F4B0-0.12": dict(method="fbcache", threshold=0.12, fn=4),
    "dbcache-F1B2-0.08": dict(method="fbcache", threshold=0.08, bn=2),
    "dbcache-F1B2-0.12": dict(method="fbcache", threshold=0.12, bn=2),
    "taylorseer-n5-o1": dict(method="taylorseer", order=1, interval=5, warmup=3, variant="per_module"),
    "taylorseer-n5-o1-residual": dict(method="taylorseer", order=1, interval=5, warmup=3, variant="residual"),
    "fbcache_taylorseer-0.08": dict(method="fbcache_taylorseer", threshold=0.08, order=1),
    "fbcache_taylorseer-0.12": dict(method="fbcache_taylorseer", threshold=0.12, order=1),
    **{f"teacache-flux-{t}": dict(method="teacache", threshold=t) for t in (0.25, 0.4, 0.6, 0.8)},
    **{f"teacache-own-{t}": dict(method="teacache", threshold=t, calibration=OWN_CALIBRATION)
       for t in (0.25, 0.4, 0.6, 0.8)},
    **{f"fbcache-0.08-fourier-{r}": dict(method="fbcache", threshold=0.08, fourier_ratio=r) for r in (0.25, 0.5, 0.75)},
    "taylorseer-n5-o1-residual-fourier-0.5": dict(method="taylorseer", order=1, interval=5, warmup=3,
                                                  variant="residual", fourier_ratio=0.5),
    "fastcache-0.05-m0.5": dict(method="fastcache", threshold=0.05, alpha=0.05, motion_ratio=0.5),
    "fastcache-0.05-m1": dict(method="fastcache", threshold=0.05, alpha=0.05, motion_ratio=1.0),
    "magcache-flux-0.06": dict(method="magcache", threshold=0.06),
    "magcache-own-0.06": dict(method="magcache", threshold=0.06, calibration=OWN_CALIBRATION),
    "magcache-own-0.12": dict(method="magcache", threshold=0.12, calibration=OWN_CALIBRATION),
}


def cache_config(name, table=None):
    return CacheConfig(**(table or SETTINGS)[name])


def read_settings_file(path):
    """{name: CacheConfig arguments} from a JSON object; ValueError naming the file, setting and reason."""
    from models.checkpoint import CheckpointError, read_json

    try:
        table = read_json(path, "settings")
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    if not isinstance(table, dict) or not table or not all(isinstance(v, dict) for v in table.values()):
        raise ValueError(f"{path}: expected a JSON object of settings, e.g. "
                         '{"fbcache-0.08": {"method": "fbcache", "threshold": 0.08}}')
    for name, kwargs in table.items():
        try:
            CacheConfig(**kwargs)
        except TypeError as e:
            raise ValueError(f"{path}: setting {name!r}: {e}") from None
        except ValueError as e:
            raise ValueError(f"{path}: setting {name!r}: {e}") from None
    if table.get("none", {"method": "none"}).get("method", "none") != "none":
        raise ValueError(f"{path}: the name 'none' is kept for the uncached reference")
    return {"none": dict(method="none"), **table}


def _config_key(cfg):
    """What decides a setting's images: its settings and, for calibrated methods, the calibration's content."""
    key = cfg.to_dict()
    if cfg.calibration:
        key["calibration"] = load_calibration(cfg.calibration)
    return key


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.benchmark_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=EMBEDDED_MODEL, help="trained shapes model folder (default: the embedded one)")
    p.add_argument("--out", required=True, help="folder for batches, results.json, results.md and samples.png")
    p.add_argument("--settings-file", metavar="JSON",
                   help="the settings to compare: a JSON object {name: CacheConfig arguments}, e.g. "
                        '{"fb-0.08": {"method": "fbcache", "threshold": 0.08}}; the uncached "none" is always '
                        "added (default: the built-in table below)")
    p.add_argument("--settings", default=None,
                   help=f"comma-separated subset of the table's names (default: all): {', '.join(SETTINGS)}")
    p.add_argument("--clip-model", help="also CLIP score with this local CLIP model folder")
    p.add_argument("--one-object", type=int, default=500, help="held-out one-object prompts (default 500)")
    p.add_argument("--two-object", type=int, default=200, help="held-out two-object prompts (default 200)")
    p.add_argument("--batch-size", type=int, default=25, help="prompts per pipeline call (default 25)")
    p.add_argument("--steps", type=int, default=28, help="denoising steps (default 28)")
    p.add_argument("--true-cfg-scale", type=float, default=1.0,
                   help="true CFG with an empty negative prompt when > 1 (default 1: off)")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed + k (default 0)")
    p.add_argument("--fid", action="store_true",
                   help="also FID of each setting against the generator's own pictures of the same prompts "
                        "(the data's ground truth; genuine FID InceptionV3, ~0.2 s per picture on 2 CPU cores)")
    p.add_argument("--decoder", default="mindspore", choices=("mindspore", "torch"),
                   help="VAE decoder for scoring: this project's MindSpore cell (default) or diffusers' "
                        "AutoencoderKL on the same weights (they agree to one level; MindSpore's CPU conv2d is "
                        "~15x slower than torch's, which dominates a CPU run of this tiny model)")
    args = p.parse_args(argv)
    try:
        args.table = read_settings_file(args.settings_file) if args.settings_file else SETTINGS
    except ValueError as e:
        p.error(f"--settings-file: {e}")
    names = [n.strip() for n in (args.settings or ",".join(args.table)).split(",") if n.strip()]
    unknown = [n for n in names if n not in args.table]
    if unknown or not names:
        p.error(f"--settings: unknown setting(s) {unknown}; choose from {', '.join(args.table)}")
    if "none" not in names:
        names = ["none"] + names  # the reference is always generated
    args.names = list(dict.fromkeys(names))
    for flag, value, low in (("--one-object", args.one_object, 0), ("--two-object", args.two_object, 0),
                             ("--batch-size", args.batch_size, 1), ("--steps", args.steps, 1)):
        if value < low:
            p.error(f"{flag} must be at least {low}, got {value}")
    if args.one_object > 500 or args.two_object > 200:
        p.error("the held-out set has 500 one-object and 200 two-object prompts")
    if args.one_object + args.two_object == 0:
        p.error("no prompts: --one-object and --two-object are both 0")
    if not (math.isfinite(args.true_cfg_scale) and args.true_cfg_scale >= 1):
        p.error(f"--true-cfg-scale must be a finite number >= 1, got {args.true_cfg_scale}")
    if not os.path.isdir(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint!r} is not a folder")
    from eval.metrics import MetricsError, check_clip_model, fid_inception_path
    try:
        if args.fid:
            fid_inception_path()
        if args.clip_model:
            check_clip_model(args.clip_model)
    except MetricsError as e:
        p.error(str(e))
    for name in args.names:
        try:
            cache_config(name, args.table)
        except ValueError as e:  # e.g. a calibration file not written yet
            p.error(f"setting {name}: {e}")
    return args


def _signature(args, name, prompts):
    """What decides a batch's images: a rerun reuses a saved batch only when this is unchanged."""
    key = json.dumps([os.path.abspath(args.checkpoint), _config_key(cache_config(name, args.table)), prompts,
                      args.steps, args.true_cfg_scale, args.seed, args.batch_size, args.decoder, BATCH_FORMAT],
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


BATCH_FORMAT = 3  # 2: per-step signals saved with each batch; 3: cache state bytes


def _save_atomic(path, **arrays):
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def make_decoder(args, pipe):
    """packed latents [B, tokens, channels] of 64x64 images -> uint8 [B, 64, 64, 3]."""
    if args.decoder == "mindspore":
        return lambda latents: pipe.decode_latents(latents, 64, 64)
    import torch
    from diffusers import AutoencoderKL
    from models.vae import to_uint8_images
    from pipelines.flux_pipeline import unpack_latents

    vae = AutoencoderKL.from_pretrained(os.path.join(args.checkpoint, "vae"), torch_dtype=torch.float32).eval()
    grid = 2 * (64 // (2 * pipe.vae_scale_factor))

    def decode(latents):
        z = unpack_latents(np.asarray(latents, np.float32), grid, grid) / vae.config.scaling_factor
        with torch.no_grad():
            return to_uint8_images(vae.decode(torch.from_numpy(z + vae.config.shift_factor)).sample.numpy())
    return decode


def generate_all(args, scenes):
    """Round-robin generation; returns {name: {"images", "denoise_s", "block_fraction", "patterns"}}."""
    import mindspore as ms  # noqa: F401  (device chosen by MindSpore: CPU here, Ascend there)
    from tqdm.auto import tqdm
    from pipelines.flux_pipeline import FluxPipeline

    os.makedirs(os.path.join(args.out, "batches"), exist_ok=True)
    prompts = [s.caption for s in scenes]
    starts = list(range(0, len(prompts), args.batch_size))
    pipe, decode, compiled = None, None, set()
    results = {n: {"images": [], "denoise_s": [], "block_fraction": [], "patterns": [], "signals": [], "signature": [],
                   "state_bytes": []} for n in args.names}
    cfg = dict(negative_prompt="" if args.true_cfg_scale > 1 else None, true_cfg_scale=args.true_cfg_scale)
    bar = tqdm(total=len(starts) * len(args.names), desc="generating", unit="batch")
    for b, start in enumerate(starts):
        batch = prompts[start:start + args.batch_size]
        for name in args.names:
            path = os.path.join(args.out, "batches", f"{name}_{b:04d}.npz")
            sig = _signature(args, name, batch)
            if os.path.isfile(path):
                saved = np.load(path)
                if str(np.ravel(saved["signature"])[0]) == sig:
                    for k in results[name]:
                        results[name][k].append(saved[k] if k in ("images", "signals") else saved[k].tolist())
                    bar.update()
                    continue
            if pipe is None:
                pipe = FluxPipeline.from_pretrained(args.checkpoint, mode="graph")
                decode = make_decoder(args, pipe)
            cache = cache_config(name, args.table)
            call = dict(height=64, width=64, max_sequence_length=32, progress=False, cache=cache, **cfg)
            if (name, len(batch)) not in compiled:  # compile outside the timed run
                pipe(batch, num_inference_steps=2, seed=0, output_type="latent", **call)
                compiled.add((name, len(batch)))
            gens = [np.random.default_rng(args.seed + start + i) for i in range(len(batch))]
            out = pipe(batch, num_inference_steps=args.steps, generator=gens, output_type="latent", **call)
            stats = out.cache_stats
            record = dict(images=decode(out.images), denoise_s=[out.timings["denoise"]],
                          block_fraction=[stats.block_fraction() if stats else 1.0],
                          patterns=[stats.pattern() if stats else "C" * args.steps],
                          signals=np.array([[np.nan if c is None else c for c in stats.changes["cond"]]
                                            if stats else [np.nan] * args.steps], np.float64),
                          signature=[sig], state_bytes=[stats.state_bytes / len(batch) if stats else 0.0])
            _save_atomic(path, **{k: np.asarray(v) for k, v in record.items()})
            for k, v in record.items():
                results[name][k].append(v)
            bar.update()
    bar.close()
    for r in results.values():
        r["images"] = np.concatenate(r["images"])
        r["denoise_s"] = [x for xs in r["denoise_s"] for x in xs]
        r["block_fraction"] = [x for xs in r["block_fraction"] for x in xs]
        r["state_bytes"] = [x for xs in r["state_bytes"] for x in xs]
        r["patterns"] = [x for xs in r["patterns"] for x in xs]
        r["signals"] = np.concatenate(r["signals"])  # [batches, steps]: the signal each batch's cache read
        r["signature"] = hashlib.sha256("".join(np.ravel(r["signature"]).tolist()).encode()).hexdigest()[:16]
    return results


def score(args, scenes, results):
    """One row per setting. A setting's scores are saved (scores/NAME.json) with the signature of its images
    and of the scoring options, and reused by a rerun when both are unchanged."""
    from tqdm.auto import tqdm
    from eval.adherence import summarize
    from eval.metrics import FrechetDistance, clip_score, fidelity
    from eval.shapes_data import render

    ref = results["none"]
    n = len(scenes)
    os.makedirs(os.path.join(args.out, "scores"), exist_ok=True)
    fid_of = None
    rows = []
    for name in tqdm(args.names, desc="scoring", unit="setting"):
        r, cfg = results[name], cache_config(name, args.table)
        key = [r["signature"], ref["signature"], args.fid, args.clip_model and os.path.abspath(args.clip_model)]
        path = os.path.join(args.out, "scores", f"{name}.json")
        saved = None
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        if saved is None or saved.get("key") != key:
            saved = dict(key=key, adherence=summarize(scenes, r["images"]))
            saved["psnr"], saved["ssim"] = fidelity(r["images"], ref["images"])
            if args.fid:
                fid_of = fid_of or FrechetDistance(np.stack([render(s) for s in scenes]), progress=True)
                saved["fid"] = fid_of(r["images"])
            if args.clip_model:
                saved["clip_score"] = clip_score(r["images"], [s.caption for s in scenes], args.clip_model)[0]
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(saved, f)
            os.replace(path + ".tmp", path)
        per_image = sum(r["denoise_s"]) / n
        patterns = r["patterns"]
        rows.append(dict(
            setting=name, cache=cfg.describe(), config=cfg.to_dict(),
            denoise_s_per_image=per_image, speedup=(sum(ref["denoise_s"]) / n) / per_image,
            ideal_speedup=1 / float(np.mean(r["block_fraction"])),
            steps_computed=float(np.mean([p.count("C") for p in patterns])),
            state_kib_per_image=float(np.mean(r["state_bytes"])) / 1024,
            common_pattern=max(set(patterns), key=patterns.count), psnr=saved["psnr"], ssim=saved["ssim"],
            fid=saved.get("fid"), clip_score=saved.get("clip_score"), adherence=saved["adherence"]))
    return rows


def _pct(summary, group, attr):
    s = summary.get(group, {})
    return f"{100 * s[attr]:.1f}" if attr in s else "-"


def markdown(args, rows):
    n_one, n_two = args.one_object, args.two_object
    lines = [f"{n_one} one-object + {n_two} two-object held-out prompts, {args.steps} steps, 64x64, batch "
             f"{args.batch_size}, true CFG {args.true_cfg_scale:g}, graph mode, fp32, {args.decoder} VAE decoder. Adherence in %: one-object "
             "all / colour / shape / position / size, two-object all.", "",
             "| setting | s/image (denoise) | measured speedup | ideal speedup | steps computed | one-object all | "
             "colour | shape | position | size | two-object all | PSNR dB | SSIM | FID | CLIP | cache state KiB/image | "
             "usual pattern |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["adherence"]
        lines.append(
            f"| {r['setting']} | {r['denoise_s_per_image']:.3f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
            f"{r['steps_computed']:.1f} | {_pct(a, 'one object', 'all')} | {_pct(a, 'one object', 'colour')} | "
            f"{_pct(a, 'one object', 'shape')} | {_pct(a, 'one object', 'position')} | {_pct(a, 'one object', 'size')} | "
            f"{_pct(a, 'two objects', 'all')} | {r['psnr']:.1f} | {r['ssim']:.4f} | "
            f"{'-' if r['fid'] is None else format(r['fid'], '.2f')} | "
            f"{'-' if r.get('clip_score') is None else format(r['clip_score'], '.2f')} | "
            f"{r['state_kib_per_image']:.0f} | `{r['common_pattern']}` |")
    return "\n".join(lines)


def pareto_front(points):
    """Indices of the points no other point beats on both coordinates (larger is better on both)."""
    return [i for i, (x, y) in enumerate(points)
            if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)]


def plot_pareto(rows, path):
    """Measured speedup against each quality figure, the Pareto front of each panel drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("PSNR against uncached (dB)", lambda r: min(r["psnr"], 60.0), 1),
              ("one-object adherence, all attributes (%)", lambda r: 100 * r["adherence"]["one object"]["all"], 1)]
    if rows[0].get("fid") is not None:
        panels.append(("FID against ground truth (lower is better)", lambda r: r["fid"], -1))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5))
    families = sorted({r["config"]["method"] for r in rows})
    colour = {m: f"C{k}" for k, m in enumerate(families)}
    for ax, (label, value, sign) in zip(axes, panels):
        points = [(r["speedup"], sign * value(r)) for r in rows]
        for r, (x, y) in zip(rows, points):
            ax.scatter(x, sign * y, color=colour[r["config"]["method"]], s=30, zorder=3)
            ax.annotate(r["setting"], (x, sign * y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = sorted((points[i] for i in pareto_front(points)))
        ax.plot([x for x, _ in front], [sign * y for _, y in front], color="0.3", ls="--", lw=1, zorder=2,
                label="Pareto front")
        ax.set_xlabel("measured speedup (denoising, x uncached)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for m in families:
        axes[0].scatter([], [], color=colour[m], label=m)
    axes[0].legend(fontsize=8)
    fig.suptitle("cache settings: speed against quality (psnr of the uncached run is shown at 60 dB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cache_maps(names, results, path):
    """Per setting and step: the fraction of batches whose cache computed the step (1 = always computed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array([[np.mean([p[i] == "C" for p in results[n]["patterns"]]) for i in range(len(results[n]["patterns"][0]))]
                     for n in names])
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(names) + 1.5))
    im = ax.imshow(grid, cmap="Greys", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("denoising step")
    ax.set_title("steps computed (black) and reused (white), fraction of batches")
    fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_signals(names, results, path):
    """The signal each cache compared with its threshold, per step (mean over batches)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for k, n in enumerate(names):
        sig = results[n]["signals"]
        if np.isnan(sig).all():
            continue
        seen = ~np.isnan(sig).all(axis=0)  # steps where no batch read a signal stay empty
        mean = np.full(sig.shape[1], np.nan)
        mean[seen] = np.nanmean(sig[:, seen], axis=0)
        ax.plot(mean, marker=".", lw=1, label=n, color=f"C{k % 10}", ls="-" if k < 10 else "--")
    ax.set_yscale("log")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("signal read by the cache (its own units)")
    ax.set_title("per-step cache signals (FBCache: relative change of the first blocks' residual; TeaCache: "
                 "accumulated rescaled change; MagCache: accumulated error)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_grid(args, scenes, results, path, columns=10):
    """One row of images per setting, the same prompts in every row."""
    from PIL import Image, ImageDraw

    pick = list(range(min(columns // 2, args.one_object))) + \
        list(range(args.one_object, args.one_object + min(columns // 2, args.two_object)))
    cell, label = 96, 190
    grid = Image.new("RGB", (label + cell * len(pick), cell * len(args.names)), "white")
    draw = ImageDraw.Draw(grid)
    for row, name in enumerate(args.names):
        draw.text((6, row * cell + cell // 2 - 6), name, fill="black")
        for col, k in enumerate(pick):
            im = Image.fromarray(results[name]["images"][k]).resize((cell - 4, cell - 4), Image.NEAREST)
            grid.paste(im, (label + col * cell + 2, row * cell + 2))
    grid.save(path)
    with open(os.path.splitext(path)[0] + "_prompts.txt", "w", encoding="utf-8") as f:
        f.write("\n".join(f"column {c + 1}: {scenes[k].caption}" for c, k in enumerate(pick)) + "\n")


def main(argv=None):
    args = parse_args(argv)
    from eval.shapes_data import heldout_prompts

    scenes = heldout_prompts(args.one_object, args.two_object)
    start = time.perf_counter()
    results = generate_all(args, scenes)
    rows = score(args, scenes, results)
    table = markdown(args, rows)
    print(table)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(dict(args={k: v for k, v in vars(args).items() if k != "table"}, settings=args.table, rows=rows),
                  f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    sample_grid(args, scenes, results, os.path.join(args.out, "samples.png"))
    plot_pareto(rows, os.path.join(args.out, "pareto.png"))
    plot_cache_maps(args.names, results, os.path.join(args.out, "cache_map.png"))
    plot_signals(args.names, results, os.path.join(args.out, "signals.png"))
    print(f"\nwrote {args.out}/results.json, results.md, samples.png, pareto.png, cache_map.png, signals.png in "
          f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
