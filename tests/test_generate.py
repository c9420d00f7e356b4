"""The generation script end to end on the tiny checkpoint: files, metadata, resume, errors."""
import json

import pytest
from PIL import Image

from eval import generate

ARGS = ["--height", "32", "--width", "48", "--steps", "2", "--max-sequence-length", "8"]


def test_generates_and_resumes(tiny_dev_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na red bicycle\na lighthouse\n")
    out = tmp_path / "out"
    generate.main(["--checkpoint", tiny_dev_checkpoint, "--prompt-file", str(prompts), "--out", str(out),
                   "--batch-size", "2", "--seed", "7"] + ARGS)
    printed = capsys.readouterr().out
    assert "s/step" in printed and "steady-state step time" in printed
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["00000_0.png", "00001_0.png", "00002_0.png"]
    assert Image.open(out / "00001_0.png").size == (48, 32)
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [m["prompt"] for m in meta] == ["a photo of a cat", "a red bicycle", "a lighthouse"]
    assert [m["seed"] for m in meta] == [7, 8, 9]

    # an interrupted run: remove one image; the rerun makes only that one, identical to the first time
    first = (out / "00001_0.png").read_bytes()
    (out / "00001_0.png").unlink()
    generate.main(["--checkpoint", tiny_dev_checkpoint, "--prompt-file", str(prompts), "--out", str(out),
                   "--seed", "7"] + ARGS)
    assert "resuming: 2 of 3 prompts already done" in capsys.readouterr().out
    assert (out / "00001_0.png").read_bytes() == first
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 4


def test_cli_errors(tiny_dev_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit, match="no prompts"):
        generate.main(["--checkpoint", tiny_dev_checkpoint, "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        generate.main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="prompt file"):
        generate.main(["--checkpoint", tiny_dev_checkpoint, "--prompt-file", str(tmp_path / "none.txt"),
                       "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    assert "--checkpoint" in capsys.readouterr().out


def test_cache_flags_reach_the_pipeline(tiny_dev_checkpoint, tmp_path, capsys):
    """mindone's example parsed --threshold and never passed it on: here it must change what runs."""
    out = tmp_path / "cached"
    generate.main(["--checkpoint", tiny_dev_checkpoint, "--prompt", "a cat", "--out", str(out),
                   "--cache", "fbcache", "--threshold", "1.0"] + ARGS[:4] + ["--steps", "4"] + ARGS[6:])
    printed = capsys.readouterr().out
    assert "cache: fbcache (threshold 1)" in printed
    assert "cond: C... " in printed  # threshold 1 reuses every step after the first
    meta = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    assert meta["cache"]["method"] == "fbcache" and meta["cache"]["threshold"] == 1.0


@pytest.mark.parametrize("flags,match", [(["--cache", "fbcache", "--threshold", "2"], "threshold"),
                                         (["--cache", "taylorseer", "--interval", "0"], "interval")])
def test_bad_cache_flags(tiny_dev_checkpoint, tmp_path, flags, match):
    with pytest.raises(SystemExit, match=match):
        generate.main(["--checkpoint", tiny_dev_checkpoint, "--prompt", "x", "--out", str(tmp_path)] + flags)
