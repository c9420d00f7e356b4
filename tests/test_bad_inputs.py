"""Every bad input of the generation command is refused before the model loads, with one line naming it, and
neither creates the output folder nor touches an earlier run in it."""
import json
import re
import shutil

import pytest

from eval import generate

def _write(name, data):
    def make(tmp):
        path = tmp / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        return str(path)
    return make


def _folder(tmp):
    (tmp / "afolder.txt").mkdir()
    return str(tmp / "afolder.txt")


def _damaged_checkpoint(damage):
    def make(tmp, source):
        path = tmp / "ckpt"
        shutil.copytree(source, path)
        damage(path)
        return str(path)
    return make


def _truncate(path):
    f = path / "transformer" / "diffusion_pytorch_model.safetensors"
    if not f.exists():  # the tiny dev transformer is sharded
        f = sorted((path / "transformer").glob("*.safetensors"))[0]
    f.write_bytes(f.read_bytes()[:-1000])


# (name, arguments; "{file}" is replaced by the file the maker writes, "{ckpt}" by the checkpoint), message
def _wide_static_map(tmp_path, checkpoint):
    """A FastCache calibration whose static map is for a hidden size 4 wider than the checkpoint's."""
    import numpy as np
    from fbcache_ms import calibration as calib
    config = json.loads((tmp_path.__class__(checkpoint) / "transformer" / "config.json").read_text())
    dim = config["num_attention_heads"] * config["attention_head_dim"] + 4
    path = str(tmp_path / "wide.json")
    calib.save_calibration(path, {"fastcache": calib.save_static_map(path, np.zeros((3 * dim + 3, dim), np.float32))})
    return path


CASES = [
    ("no prompts", [], "no prompts"),
    ("empty prompt", ["--prompt", " "], "--prompt: an empty prompt"),
    ("missing prompt file", ["--prompt-file", "/nonexistent/p.txt"], "does not exist"),
    ("prompt file is a folder", ["--prompt-file", _folder], "is a folder, expected a file"),
    ("prompt file not UTF-8", ["--prompt-file", _write("latin.txt", "caf\xe9\n".encode("latin-1"))],
     r"is not UTF-8 text \(byte 0xe9 at offset 3\)"),
    ("unknown prompt format", ["--prompt-file", _write("p.csv", "a,b\n")], "unknown format '.csv'"),
    ("empty prompt file", ["--prompt-file", _write("empty.txt", "\n\n")], "holds no prompts"),
    ("jsonl not JSON", ["--prompt-file", _write("p.jsonl", '{"prompt": "a"}\n{"prompt": \n')],
     r"p.jsonl:2: invalid JSON"),
    ("jsonl without prompt", ["--prompt-file", _write("p.jsonl", '{"text": "a"}\n')],
     "p.jsonl:1: prompt must be a non-empty string"),
    ("jsonl bad seed", ["--prompt-file", _write("p.jsonl", '{"prompt": "a", "seed": -4}\n')],
     "p.jsonl:1: seed must be an integer"),
    ("tsv without Prompt column", ["--prompt-file", _write("p.tsv", "Text\tCategory\na\tb\n")],
     "no 'Prompt' column"),
    ("json not COCO", ["--prompt-file", _write("c.json", '{"images": []}')], "not a COCO captions file"),
    ("json invalid", ["--prompt-file", _write("c.json", '{"images": [')], r"c.json: invalid JSON"),
    ("steps 0", ["--prompt", "a", "--steps", "0"], "--steps must be at least 1, got 0"),
    ("steps huge", ["--prompt", "a", "--steps", "5000"], "--steps must be at most 1000"),
    ("sequence length 0", ["--prompt", "a", "--max-sequence-length", "0"], "--max-sequence-length must be at least 1"),
    ("sequence length over the tokenizer", ["--prompt", "a", "--max-sequence-length", "600"],
     "--max-sequence-length must be at most"),
    ("height not a multiple", ["--prompt", "a", "--height", "30"], "--height must be a multiple of"),
    ("negative width", ["--prompt", "a", "--width", "-16"], "--width must be at least 1"),
    ("image_size and height", ["--prompt", "a", "--image_size", "32", "32", "--height", "32"],
     "either --image_size or --height"),
    ("NaN guidance", ["--prompt", "a", "--guidance", "nan"], "--guidance must be a finite number"),
    ("infinite true CFG", ["--prompt", "a", "--true-cfg-scale", "inf"], "--true-cfg-scale must be a finite number"),
    ("negative seed", ["--prompt", "a", "--seed", "-1"], "--seed must be in 0.."),
    ("seed overflow", ["--prompt", "a", "b", "--seed", str(2 ** 63 - 1)], "the last image's seed would exceed"),
    ("batch size 0", ["--prompt", "a", "--batch-size", "0"], "--batch-size must be at least 1"),
    ("images per prompt 0", ["--prompt", "a", "--images-per-prompt", "0"], "--images-per-prompt must be at least 1"),
    ("limit 0", ["--prompt-file", "shapes-heldout", "--limit", "0"], "--limit must be at least 1"),
    ("shard index out of range", ["--prompt", "a", "--num-shards", "2", "--shard-index", "2"],
     "--shard-index must be in 0..1"),
    ("shards without index", ["--prompt", "a", "--num-shards", "2"], "--num-shards needs --shard-index"),
    ("index without shards", ["--prompt", "a", "--shard-index", "0"], "--shard-index needs --num-shards"),
    ("bfloat16 on CPU", ["--prompt", "a", "--dtype", "bfloat16"], "bfloat16 needs --device Ascend"),
    ("threshold out of range", ["--prompt", "a", "--cache", "fbcache", "--threshold", "2"], "threshold must be in"),
    ("TaylorSeer interval 0", ["--prompt", "a", "--cache", "taylorseer", "--interval", "0"], "interval must be"),
    ("fn + bn too many", ["--prompt", "a", "--cache", "fbcache", "--fn", "3", "--bn", "3"],
     "--fn \\+ --bn must be below the model's"),
    ("Fourier ratio 0", ["--prompt", "a", "--cache", "fbcache", "--fourier-ratio", "0"], "fourier_ratio must be in"),
    ("Fourier ratio on TeaCache", ["--prompt", "a", "--cache", "teacache", "--fourier-ratio", "0.5"], "not teacache"),
    ("low band on FBCache", ["--prompt", "a", "--cache", "fbcache", "--low-band", "0.5"], "low_band applies to freqca"),
    ("FreqCa low band 0", ["--prompt", "a", "--cache", "freqca", "--low-band", "0"], "low_band must be in"),
    ("AFCache units of 0 blocks", ["--prompt", "a", "--cache", "afcache", "--group-size", "0"], "group_size must be"),
    ("FastCache alpha 1", ["--prompt", "a", "--cache", "fastcache", "--alpha", "1"], "alpha must be in"),
    ("FastCache motion ratio 0", ["--prompt", "a", "--cache", "fastcache", "--motion-ratio", "0"],
     "motion_ratio must be in"),
    ("missing calibration", ["--prompt", "a", "--cache", "teacache", "--calibration", "/nonexistent.json"],
     "nonexistent.json"),
    ("negative TaylorSeer derivative", ["--prompt", "a", "--residual_diff_threshold", "0.1",
                                        "--taylorseer_derivative", "-1"], "--taylorseer_derivative must be >= 0"),
    ("two cache flag styles", ["--prompt", "a", "--cache", "fbcache", "--residual_diff_threshold", "0.1"],
     "either --cache or mindone's"),
    ("FastCache static map of another size", ["--prompt", "a", "--cache", "fastcache", "--calibration",
                                              _wide_static_map], "static map is for hidden size"),
    ("missing checkpoint", ["--prompt", "a", "--checkpoint", "/nonexistent/flux"], "does not exist"),
    ("checkpoint without vae", ["--prompt", "a", "--checkpoint",
                                _damaged_checkpoint(lambda p: shutil.rmtree(p / "vae"))], r"missing sub-folder\(s\) \['vae'\]"),
    ("config.json invalid", ["--prompt", "a", "--checkpoint", _damaged_checkpoint(
        lambda p: (p / "vae" / "config.json").write_text('{"in_channels": 3,'))], r"vae/config.json is not valid JSON"),
    ("config.json a folder", ["--prompt", "a", "--checkpoint", _damaged_checkpoint(
        lambda p: ((p / "vae" / "config.json").unlink(), (p / "vae" / "config.json").mkdir()))],
     r"vae/config.json is a folder"),
    ("truncated safetensors", ["--prompt", "a", "--checkpoint", _damaged_checkpoint(_truncate)],
     r"transformer/.*\.safetensors: truncated"),
    ("compile cache a file", ["--prompt", "a", "--compile-cache", _write("cache.bin", "x")],
     r"--compile-cache .*cache.bin' is a file, not a folder"),
    ("tokenizer without files", ["--prompt", "a", "--checkpoint", _damaged_checkpoint(
        lambda p: [f.unlink() for f in (p / "tokenizer_2").iterdir()])], "tokenizer_2 lacks its files"),
]


@pytest.mark.parametrize("args,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_loading(args, message, tiny_dev_checkpoint, tmp_path, capsys):
    resolved = []
    for a in args:
        if callable(a):
            a = a(tmp_path, tiny_dev_checkpoint) if a.__code__.co_argcount == 2 else a(tmp_path)
        resolved.append(a)
    if "--checkpoint" not in resolved:
        resolved += ["--checkpoint", tiny_dev_checkpoint]
    earlier = tmp_path / "earlier"  # a finished run in the output folder must survive a bad rerun
    earlier.mkdir()
    (earlier / "000000.png").write_bytes(b"an earlier image")
    (earlier / "manifest.jsonl").write_text(json.dumps({"kind": "run"}) + "\n")
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    for out in (tmp_path / "new", earlier):
        assert generate.main(resolved + ["--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
        assert re.search(message, err), err
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before


def test_out_is_a_file(tiny_dev_checkpoint, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert generate.main(["--checkpoint", tiny_dev_checkpoint, "--prompt", "a", "--out", str(f)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert f.read_text() == "x"


@pytest.mark.parametrize("args,message", [(["--dtype", "int8"], "invalid choice"),
                                          (["--steps", "many"], "invalid int value"),
                                          (["--device", "GPU"], "invalid choice")])
def test_malformed_flags_are_argparse_errors(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(["--prompt", "a", "--out", str(tmp_path / "o")] + args)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_explains(capsys):
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    text = capsys.readouterr().out
    for phrase in ("manifest", "--num-shards", "msrun", "shapes-heldout", "COCO", "--residual_diff_threshold"):
        assert phrase in text


def test_compile_cache_beside_mindspores_own_is_refused(tiny_dev_checkpoint, tmp_path, monkeypatch, capsys):
    # MindSpore's own cache would number graphs compiled outside ours and break the manifest's count
    monkeypatch.setenv("MS_COMPILER_CACHE_ENABLE", "1")
    out = tmp_path / "out"
    assert generate.main(["--checkpoint", tiny_dev_checkpoint, "--prompt", "a", "--compile-cache",
                          str(tmp_path / "cache"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --compile-cache: MindSpore's own compile cache is on") and "\n" not in err
    assert not out.exists()
