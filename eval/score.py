"""Score a generation run (python -m eval.generate): FID, CLIP score, fidelity to an uncached run, adherence.

  python -m eval.score outputs/coco-fb08 --fid-reference /data/coco/val2017 --clip-model /data/clip-vit-large-patch14 \
      --fidelity-reference outputs/coco-none
  python -m eval.score outputs/heldout-fb08 --fid-reference shapes-ground-truth --adherence \
      --fidelity-reference outputs/heldout-none

- FID: torchmetrics' FrechetInceptionDistance on the genuine FID InceptionV3 (eval/metrics.py) against every
  picture of --fid-reference (COCO: val2017/, the 5000 images the captions describe); its statistics are cached
  in --fid-cache under a key of the exact file list. `shapes-ground-truth`: the data generator's own pictures of
  the run's held-out prompts (runs made with --prompt-file shapes-heldout).
- CLIP score: torchmetrics' CLIPScore code with the local model folder --clip-model (ViT-L/14 for published
  figures; nothing ships CLIP weights offline).
- Fidelity: PSNR and SSIM against --fidelity-reference, a run of the same prompts and seeds (the uncached one).
- Adherence: colour / shape / position / size read back by rules, for shapes-heldout runs.

The run is verified first (python -m eval.verify_run). Scores go to RUN/scores.json (and are printed).
"""
import argparse
import json
import os
import sys

import numpy as np

from utils import write_json_atomic

SHAPES_GROUND_TRUTH = "shapes-ground-truth"


def build_parser():
    p = argparse.ArgumentParser(prog="python -m eval.score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the --out folder of eval.generate")
    p.add_argument("--fid-reference", help=f"folder of real pictures, or {SHAPES_GROUND_TRUTH}")
    p.add_argument("--fid-cache", default=os.path.join("outputs", ".fid-cache"),
                   help="where reference statistics are cached (default outputs/.fid-cache)")
    p.add_argument("--clip-model", help="local CLIP model folder (transformers CLIPModel + CLIPProcessor files)")
    p.add_argument("--fidelity-reference", help="a run of the same prompts and seeds to compare with (PSNR, SSIM)")
    p.add_argument("--adherence", action="store_true", help="prompt adherence (runs of shapes-heldout prompts)")
    return p


def check_args(args):
    """Everything checkable before a picture is read or a model loaded: MetricsError / ValueError."""
    from eval.metrics import MetricsError, check_clip_model, fid_inception_path

    if not any((args.fid_reference, args.clip_model, args.fidelity_reference, args.adherence)):
        raise ValueError("nothing to score: give --fid-reference, --clip-model, --fidelity-reference or --adherence")
    for flag, path in (("run", args.run), ("--fidelity-reference", args.fidelity_reference)):
        if path is not None and not os.path.isdir(path):
            raise ValueError(f"{flag} {path!r} is not a folder")
    if args.fid_reference:
        fid_inception_path()
        if args.fid_reference != SHAPES_GROUND_TRUTH and not os.path.isdir(args.fid_reference):
            raise MetricsError(f"--fid-reference {args.fid_reference!r} is not a folder (nor {SHAPES_GROUND_TRUTH})")
    if args.clip_model:
        check_clip_model(args.clip_model)


def load_run(folder):
    """(header, records, uint8 pictures [N, H, W, 3]) of a complete, consistent run."""
    from eval.metrics import read_rgb
    from pipelines.batch_generation import read_run

    header, records = read_run(folder)
    return header, records, np.stack([read_rgb(os.path.join(folder, r["file"])) for r in records])


def heldout_scenes(records, what):
    from eval.shapes_data import heldout_prompts

    if not all("heldout_index" in r["extra"] for r in records):
        raise ValueError(f"{what} needs a run of the shapes-heldout prompts (--prompt-file shapes-heldout)")
    scenes = heldout_prompts()
    return [scenes[r["extra"]["heldout_index"]] for r in records]


def score_run(args, progress=True):
    from eval import metrics

    header, records, images = load_run(args.run)
    scores = {"images": len(records), "cache": header["settings"]["call"]["cache"]}
    if args.fidelity_reference:
        _, ref_records, ref_images = load_run(args.fidelity_reference)
        ours = [(r["prompt"], r["seed"]) for r in records]
        if ours != [(r["prompt"], r["seed"]) for r in ref_records]:
            raise ValueError(f"--fidelity-reference {args.fidelity_reference!r} has other prompts or seeds")
        scores["psnr"], scores["ssim"] = metrics.fidelity(images, ref_images)
    if args.adherence:
        from eval.adherence import summarize
        scores["adherence"] = summarize(heldout_scenes(records, "--adherence"), images)
    if args.clip_model:
        scores["clip_score"], raw = metrics.clip_score(images, [r["prompt"] for r in records], args.clip_model,
                                                       progress=progress)
        scores["clip_raw_mean"] = float(np.mean(raw))
    if args.fid_reference == SHAPES_GROUND_TRUTH:
        from eval.shapes_data import render
        truth = np.stack([render(s) for s in heldout_scenes(records, "--fid-reference shapes-ground-truth")])
        scores["fid"] = metrics.frechet_distance(images, truth, progress=progress)
    elif args.fid_reference:
        scores["fid"] = metrics.reference_fid(args.fid_reference, args.fid_cache, progress=progress)(images)
    scores["fid_reference"] = args.fid_reference
    return scores


def main(argv=None):
    from eval.metrics import MetricsError
    from pipelines.batch_generation import RunMismatch

    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        scores = score_run(args)
    except (MetricsError, ValueError, RunMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = os.path.join(args.run, "scores.json")
    write_json_atomic(path, scores)
    print(json.dumps(scores, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
