"""The scoring command on two small runs of the tiny checkpoint: fidelity, CLIP score, FID, adherence, errors."""
import json

import numpy as np
import pytest
from PIL import Image

from eval import generate, score

ARGS = ["--height", "64", "--width", "64", "--steps", "3", "--max-sequence-length", "8", "--no-progress",
        "--prompt-file", "shapes-heldout", "--limit", "4", "--batch-size", "2"]


@pytest.fixture(scope="module")
def two_runs(tiny_dev_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name, cache in (("none", []), ("fb", ["--cache", "fbcache", "--threshold", "1.0"])):
        assert generate.main(["--checkpoint", tiny_dev_checkpoint, "--out", str(root / name)] + ARGS + cache) == 0
    return root


def test_scores_a_run(two_runs, tiny_clip, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(real / f"{k}.png")
    assert score.main([str(two_runs / "fb"), "--fidelity-reference", str(two_runs / "none"), "--adherence",
                       "--clip-model", tiny_clip, "--fid-reference", str(real),
                       "--fid-cache", str(tmp_path / "cache")]) == 0
    saved = json.loads((two_runs / "fb" / "scores.json").read_text())
    assert saved["images"] == 4 and saved["cache"]["method"] == "fbcache"
    assert 0 < saved["psnr"] < 100 and 0 < saved["ssim"] < 1  # threshold 1 reuses: not the uncached images
    assert set(saved["adherence"]) == {"one object"} and 0 <= saved["adherence"]["one object"]["all"] <= 1
    assert saved["clip_score"] == max(saved["clip_raw_mean"], 0.0)
    assert saved["fid"] > 0 and list((tmp_path / "cache").glob("fid-reference-*.npz"))
    assert score.main([str(two_runs / "none"), "--fidelity-reference", str(two_runs / "none")]) == 0
    assert json.loads((two_runs / "none" / "scores.json").read_text())["psnr"] == float("inf")


@pytest.mark.parametrize("extra,message", [
    ([], "nothing to score"),
    (["--fid-reference", "/nonexistent"], "is not a folder"),
    (["--clip-model", "/nonexistent"], "--clip-model '/nonexistent' is not a folder"),
    (["--fidelity-reference", "/nonexistent"], "--fidelity-reference '/nonexistent' is not a folder"),
])
def test_bad_score_arguments(two_runs, extra, message, capsys):
    assert score.main([str(two_runs / "fb")] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_fidelity_needs_the_same_prompts(two_runs, tiny_dev_checkpoint, tmp_path, capsys):
    other = tmp_path / "other"
    assert generate.main(["--checkpoint", tiny_dev_checkpoint, "--out", str(other), "--seed", "9"] + ARGS) == 0
    assert score.main([str(other), "--fidelity-reference", str(two_runs / "none")]) == 2
    assert "other prompts or seeds" in capsys.readouterr().err
    (other / "000001.png").unlink()
    assert score.main([str(other), "--adherence"]) == 2
    assert "cannot be read" in capsys.readouterr().err
