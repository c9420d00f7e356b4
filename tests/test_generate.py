"""The generation command end to end on the tiny checkpoint: manifest, resume, shards, SIGKILL, mindone's flags."""
import json
import os
import signal
import subprocess
import sys

import pytest
from PIL import Image

from eval import generate, verify_run

ARGS = ["--height", "32", "--width", "48", "--steps", "2", "--max-sequence-length", "8", "--no-progress"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records(out, name="manifest.jsonl"):
    lines = [json.loads(line) for line in (out / name).read_text().splitlines()]
    assert lines[0]["kind"] == "run"
    return lines[0], lines[1:]


def pictures(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def test_generates_records_and_resumes(tiny_dev_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na red bicycle\na lighthouse\n")
    out = tmp_path / "out"
    cmd = ["--checkpoint", tiny_dev_checkpoint, "--prompt-file", str(prompts), "--out", str(out),
           "--batch-size", "2", "--seed", "7"] + ARGS
    assert generate.main(cmd) == 0
    assert sorted(pictures(out)) == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(out / "000001.png").size == (48, 32)
    header, recs = records(out)
    assert [r["prompt"] for r in recs] == ["a photo of a cat", "a red bicycle", "a lighthouse"]
    assert [r["seed"] for r in recs] == [7, 8, 9]
    assert header["settings"]["call"]["num_inference_steps"] == 2 and header["batch_size"] == 2
    assert len(recs[0]["step_s"]) == 2 and recs[2]["batch_members"] == [2, 3]

    # the manifest, not the file, says what is done: drop image 2's record, and it is made again, identically
    first = (out / "000002.png").read_bytes()
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    (out / "000002.png").write_bytes(b"")  # a file that exists proves nothing
    capsys.readouterr()
    assert generate.main(cmd) == 0
    assert "resuming: 2 image(s)" in capsys.readouterr().out
    assert (out / "000002.png").read_bytes() == first
    assert [r["index"] for r in records(out)[1]] == [0, 1, 2]


def test_other_settings_into_the_same_folder_are_refused(tiny_dev_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--checkpoint", tiny_dev_checkpoint, "--prompt", "a cat", "--out", str(out)] + ARGS
    assert generate.main(base) == 0
    before = pictures(out)
    for other, what in ((["--seed", "3"], "jobs_sha256"), (["--guidance", "2"], "guidance_scale"),
                        (["--cache", "fbcache"], "cache")):
        assert generate.main(base + other) == 1
        err = capsys.readouterr().err
        assert "holds a run with other settings" in err and what in err
    assert pictures(out) == before


def test_a_second_writer_of_one_shard_is_refused(tiny_dev_checkpoint, tmp_path, capsys):
    import fcntl

    out = tmp_path / "out"
    base = ["--checkpoint", tiny_dev_checkpoint, "--prompt", "a cat", "--out", str(out)] + ARGS
    assert generate.main(base) == 0  # the finished run released its lock
    before = pictures(out)
    with open(out / "manifest.jsonl.lock", "a") as held:  # another process writing this shard
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert generate.main(base) == 1
        assert "another process is writing" in capsys.readouterr().err
    assert pictures(out) == before
    assert generate.main(base) == 0  # released: the run resumes (nothing left to do)


def test_shards_and_resume_make_the_same_images(tiny_dev_checkpoint, tmp_path, capsys):
    prompts = [f"prompt number {k}" for k in range(5)]
    common = ["--checkpoint", tiny_dev_checkpoint, "--batch-size", "2", "--cache", "fbcache", "--threshold", "0.5",
              "--prompt"] + prompts + ARGS[:-3] + ["--steps", "3", "--no-progress"]
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert generate.main(common + ["--out", str(whole)]) == 0
    assert generate.main(common + ["--out", str(sharded), "--num-shards", "2", "--shard-index", "1"]) == 0
    assert verify_run.main([str(sharded)]) == 1
    assert "shard(s) [0] of 2 have no manifest" in capsys.readouterr().err
    assert generate.main(common + ["--out", str(sharded), "--num-shards", "2", "--shard-index", "0"]) == 0
    assert verify_run.main([str(sharded)]) == 0 and verify_run.main([str(whole)]) == 0
    assert pictures(sharded) == pictures(whole)  # bit-identical, cache decisions included
    _, shard0 = records(sharded, "manifest.shard-000-of-002.jsonl")
    assert [r["index"] for r in shard0] == [0, 1, 4]  # batches 0 and 2; the last one padded to 2
    assert set(shard0[0]["cache_pattern"]) == {"cond"} and shard0[0]["cache_pattern"]["cond"][0] == "C"


KILL_DRIVER = r"""
import json, os, signal, sys
import pipelines.batch_generation as bg
import pipelines.flux_pipeline as fp
moment, at = sys.argv[1], int(sys.argv[2])
calls = [0]
def now():
    calls[0] += 1
    return calls[0] == at
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if moment == "mid-step":
    euler = fp.euler_step
    def step(*a):
        if now():
            die()
        return euler(*a)
    fp.euler_step = step
elif moment == "mid-png":
    save = bg.save_png_atomic
    def save_png(image, path):
        if now():
            with open(path + ".tmp", "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n partial")
            die()
        save(image, path)
    bg.save_png_atomic = save_png
elif moment in ("before-record", "mid-record"):
    append = bg.Manifest.append
    def append_record(self, record):
        if now():
            if moment == "mid-record":
                with open(self.path, "a") as f:
                    f.write(json.dumps(record)[:40])
            die()
        append(self, record)
    bg.Manifest.append = append_record
from eval.generate import main
sys.exit(main(sys.argv[3:]))
"""


def test_sigkill_at_any_moment_loses_and_duplicates_nothing(tiny_dev_checkpoint, tmp_path):
    cmd = ["--checkpoint", tiny_dev_checkpoint, "--batch-size", "2", "--mode", "pynative",
           "--prompt"] + [f"prompt {k}" for k in range(6)] + ARGS
    reference = tmp_path / "reference"
    assert generate.main(cmd + ["--out", str(reference)]) == 0
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=ROOT)
    # killed: while denoising the second batch, while writing image 2, after renaming image 3 before its
    # record, and half-way through image 4's record
    for moment, at in (("mid-step", 3), ("mid-png", 1), ("before-record", 1), ("mid-record", 1)):
        run = subprocess.run([sys.executable, "-c", KILL_DRIVER, moment, str(at)] + cmd + ["--out", str(out)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == -signal.SIGKILL, (moment, run.stderr[-2000:])
        assert not any(p.stat().st_size == 0 for p in out.glob("*.png"))
    assert generate.main(cmd + ["--out", str(out)]) == 0
    assert verify_run.main([str(out)]) == 0
    assert pictures(out) == pictures(reference)  # 0 lost, 0 unreadable, bit-identical
    assert not list(out.glob("*.tmp"))
    _, recs = records(out)
    assert sorted(r["index"] for r in recs) == list(range(6))  # 0 duplicated


def test_mindone_flags(tiny_dev_checkpoint, tmp_path):
    """mindone's FBCache_ms command line runs unchanged; --taylorseer_derivative N is TaylorSeer order N."""
    out = tmp_path / "mindone"
    assert generate.main(["--ckpt", tiny_dev_checkpoint, "-p", "a cat", "a dog", "--image_size", "32", "48",
                          "--save_path", str(out), "--residual_diff_threshold", "1.0", "--taylorseer_derivative",
                          "1", "--use_graph_mode", "--guidance_scale", "4.5", "--steps", "4",
                          "--max-sequence-length", "8", "--no-progress"]) == 0
    header, recs = records(out)
    call = header["settings"]["call"]
    assert (call["height"], call["width"], call["guidance_scale"]) == (32, 48, 4.5)
    assert call["cache"]["method"] == "fbcache_taylorseer" and call["cache"]["order"] == 1
    assert call["cache"]["threshold"] == 1.0 and header["settings"]["mode"] == "graph"
    assert recs[0]["cache_pattern"]["cond"] == "C..."  # threshold 1 reuses every step after the first
    assert [r["prompt"] for r in recs] == ["a cat", "a dog"]


def test_prompt_sources(tiny_dev_checkpoint, tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat", "seed": 42, "id": "x1"}\n\n{"prompt": "a dog", "negative_prompt": "blur"}\n')
    out = tmp_path / "out"
    assert generate.main(["--checkpoint", tiny_dev_checkpoint, "--prompt-file", str(jsonl), "--out", str(out),
                          "--true-cfg-scale", "2", "--negative-prompt", "ugly", "--seed", "5"] + ARGS) == 0
    _, recs = records(out)
    assert [(r["seed"], r["negative_prompt"], r["extra"].get("id")) for r in recs] == \
        [(42, "ugly", "x1"), (6, "blur", None)]

    from eval.prompt_sources import load_prompts
    tsv = tmp_path / "parti.tsv"
    tsv.write_text("Prompt\tCategory\tChallenge\na red cube\tArtifacts\tBasic\n\nan owl\tAnimals\tFine\n")
    items = load_prompts(str(tsv))
    assert [(i.prompt, i.extra["Category"]) for i in items] == [("a red cube", "Artifacts"), ("an owl", "Animals")]
    coco = tmp_path / "captions_val2017.json"
    coco.write_text(json.dumps({"images": [{"id": 9, "file_name": "000000000009.jpg"},
                                           {"id": 4, "file_name": "000000000004.jpg"}],
                                "annotations": [{"id": 30, "image_id": 9, "caption": "later caption"},
                                                {"id": 12, "image_id": 9, "caption": "A plate of food. "},
                                                {"id": 7, "image_id": 4, "caption": "a bus"}]}))
    items = load_prompts(str(coco))
    assert [(i.prompt, i.extra["coco_file_name"], i.extra["coco_caption_id"]) for i in items] == \
        [("a bus", "000000000004.jpg", 7), ("A plate of food.", "000000000009.jpg", 12)]
    held = load_prompts("shapes-heldout")
    assert len(held) == 700 and held[0].extra["heldout_index"] == 0


def test_non_finite_latents_are_refused(dev_pipeline):
    import numpy as np
    latents = np.zeros((1, 6, 64), np.float32)
    latents[0, 0, 0] = np.nan
    with pytest.raises(FloatingPointError, match="1 of 1 image"):
        dev_pipeline("x", height=32, width=48, num_inference_steps=1, max_sequence_length=8, latents=latents,
                     progress=False)


def test_msrun_ranks_choose_their_shard(monkeypatch, tiny_dev_checkpoint, tmp_path):
    """Under msrun (MS_ROLE=MS_WORKER) the shard comes from mindspore.communication's rank and group size."""
    import mindspore.communication as comm
    from pipelines import batch_generation

    assert batch_generation.msrun_shard({}) is None
    calls = []
    monkeypatch.setattr(comm, "init", lambda *a, **k: calls.append("init"))
    monkeypatch.setattr(comm, "get_rank", lambda *a: 1)
    monkeypatch.setattr(comm, "get_group_size", lambda *a: 2)
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    assert batch_generation.msrun_shard() == (2, 1) and calls == ["init"]
    monkeypatch.setenv("MS_ROLE", "MS_SCHED")  # msrun's scheduler runs the command too: it serves, then leaves
    with pytest.raises(SystemExit):
        batch_generation.msrun_shard()
    assert calls == ["init", "init"]
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    out = tmp_path / "ranked"
    assert generate.main(["--checkpoint", tiny_dev_checkpoint, "--prompt", "a", "b", "c", "--out", str(out)]
                         + ARGS) == 0
    header, recs = records(out, "manifest.shard-001-of-002.jsonl")
    assert (header["num_shards"], header["shard_index"]) == (2, 1) and [r["index"] for r in recs] == [1]


def test_msrun_workers_take_their_shards_and_the_scheduler_generates_nothing(tiny_dev_checkpoint, tmp_path):
    """A real msrun on this CPU: 2 workers and the scheduler all run the same command."""
    import shutil
    if shutil.which("msrun") is None:
        pytest.skip("msrun is not on PATH")
    out = tmp_path / "out"
    cmd = ["msrun", "--worker_num", "2", "--local_worker_num", "2", "--master_port", "8157", "--join", "True",
           "--log_dir", str(tmp_path / "logs"), "python", "-m", "eval.generate", "--checkpoint", tiny_dev_checkpoint,
           "--prompt", "a", "b", "c", "d", "e", "--out", str(out), "--batch-size", "1"] + ARGS
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.glob("manifest*.jsonl")) == ["manifest.shard-000-of-002.jsonl",
                                                                   "manifest.shard-001-of-002.jsonl"]
    shards = [records(out, f"manifest.shard-00{k}-of-002.jsonl")[1] for k in (0, 1)]
    assert [r["index"] for r in shards[0]] == [0, 2, 4] and [r["index"] for r in shards[1]] == [1, 3]
    assert verify_run.main([str(out)]) == 0
