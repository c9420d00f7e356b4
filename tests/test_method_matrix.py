"""The method-matrix command on the embedded model at toy scale: settings file, results, plots, reuse."""
import json
import os

import pytest

from eval import benchmark_quality


def test_matrix_from_a_settings_file_writes_results_and_plots_and_reuses_them(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"fb-0.5": {"method": "fbcache", "threshold": 0.5},
                                    "ts-o1": {"method": "taylorseer", "order": 1, "interval": 2, "warmup": 1},
                                    "af-0.8": {"method": "afcache", "budget": 0.8, "interval": 2, "warmup": 1}}))
    out = tmp_path / "matrix"
    argv = ["--out", str(out), "--settings-file", str(settings), "--one-object", "2", "--two-object", "1",
            "--batch-size", "3", "--steps", "4", "--decoder", "torch"]
    assert benchmark_quality.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["setting"] for r in result["rows"]] == ["none", "fb-0.5", "ts-o1", "af-0.8"]
    ts = result["rows"][2]
    assert ts["common_pattern"] == "CC.C" and ts["ideal_speedup"] == pytest.approx(4 / 3)  # full: warm-up, then every 2nd
    assert result["rows"][0]["psnr"] == float("inf") and result["rows"][0]["speedup"] == 1.0
    # AFCache: steps 0, 1, 3 run all 16 blocks; step 2 the round((0.8 * 4 - 3) * 16) = 3 least stable
    assert result["rows"][3]["ideal_speedup"] == pytest.approx(64 / (3 * 16 + 3))
    for name in ("results.md", "samples.png", "pareto.png", "cache_map.png", "signals.png", "strategy_map.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "| fb-0.5 |" in table and "| ts-o1 |" in table

    stamps = {p: os.path.getmtime(p) for p in list((out / "batches").iterdir()) + list((out / "scores").iterdir())}
    assert benchmark_quality.main(argv) == 0  # a rerun generates and scores nothing again
    assert {p: os.path.getmtime(p) for p in stamps} == stamps

    # a rerun asking for FID adds it to the saved scores and redoes nothing else (marked: a recomputed score
    # would replace the mark)
    saved = out / "scores" / "fb-0.5.json"
    scores = json.loads(saved.read_text())
    saved.write_text(json.dumps(dict(scores, psnr=-1.0)))
    assert benchmark_quality.main(argv + ["--fid"]) == 0
    scores = json.loads(saved.read_text())
    assert scores["psnr"] == -1.0 and scores["fid"] > 0
    assert json.loads((out / "results.json").read_text())["rows"][1]["fid"] == scores["fid"]


@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "expected a JSON object of settings"),
    ('{"x": {"method": "fbcache", "treshold": 0.1}}', "setting 'x': .*unexpected keyword argument 'treshold'"),
    ('{"x": {"method": "fbcache", "threshold": 3}}', "setting 'x': threshold must be in"),
    ('{"none": {"method": "fbcache"}}', "the name 'none' is kept"),
    ('{"x": ', "is not valid JSON"),
])
def test_bad_settings_files(tmp_path, content, message, capsys):
    settings = tmp_path / "s.json"
    settings.write_text(content)
    with pytest.raises(SystemExit) as e:
        benchmark_quality.main(["--out", str(tmp_path / "o"), "--settings-file", str(settings)])
    assert e.value.code == 2
    import re
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_match_compute_writes_equal_compute_settings(tmp_path, monkeypatch):
    from eval import match_compute
    # FBCache at a threshold that never reuses and one that reuses every step it may: 0.6 lies between
    monkeypatch.setattr(match_compute, "SWEEPS", {"fbcache": (dict(method="fbcache"), [1e-6, 1.0])})
    out = tmp_path / "equal.json"
    assert match_compute.main(["--out", str(out), "--fractions", "0.6", "--prompts", "2", "--batch-size", "2",
                               "--steps", "4", "--afcache-warmup", "1", "--afcache-interval", "4",
                               "--afcache-order", "1"]) == 0
    settings = json.loads(out.read_text())
    sweeps = json.loads((tmp_path / "equal_sweeps.json").read_text())["fbcache"]["fractions"]
    assert sweeps[0] == pytest.approx(1.0) and sweeps[1] < 0.6  # block 0 still runs on a reused step
    assert 1e-6 < settings["fbcache-b0.6"]["threshold"] < 1.0
    assert (settings["afcache-b0.6"]["budget"], settings["afcache-b0.6"]["order"]) == (0.6, 1)
    # 4 steps: 2 full steps (0.5) are nearer 0.6 than 3; warm-up 1 and every 3rd step after it: steps 0 and 1
    ts = settings["taylorseer-residual-b0.6"]
    assert (ts["warmup"], ts["interval"]) == (1, 3) and match_compute.taylorseer_schedule(0.6, 4) == (1, 3, 0.5)
    assert settings["fora-b0.6"] == dict(ts, order=0)
    assert (tmp_path / "equal_sweeps.png").stat().st_size > 0


def test_threshold_interpolation_and_schedules():
    from eval.match_compute import taylorseer_schedule, threshold_for
    assert threshold_for(0.45, [0.1, 0.4], [0.9, 0.0]) == pytest.approx(0.2)  # geometric between the points
    assert threshold_for(0.95, [0.1, 0.4], [0.9, 0.0]) is None
    warmup, interval, fraction = taylorseer_schedule(0.25, 28)
    assert (warmup, interval, fraction) == (3, 7, 0.25)  # steps 0-2, 3, 10, 17, 24
