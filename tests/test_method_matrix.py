"""The method-matrix command on the embedded model at toy scale: settings file, results, plots, reuse."""
import json
import os

import pytest

from eval import benchmark_quality


def test_matrix_from_a_settings_file_writes_results_and_plots_and_reuses_them(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"fb-0.5": {"method": "fbcache", "threshold": 0.5},
                                    "ts-o1": {"method": "taylorseer", "order": 1, "interval": 2, "warmup": 1}}))
    out = tmp_path / "matrix"
    argv = ["--out", str(out), "--settings-file", str(settings), "--one-object", "2", "--two-object", "1",
            "--batch-size", "3", "--steps", "4", "--decoder", "torch"]
    assert benchmark_quality.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["setting"] for r in result["rows"]] == ["none", "fb-0.5", "ts-o1"]
    ts = result["rows"][2]
    assert ts["common_pattern"] == "CC.C" and ts["ideal_speedup"] == pytest.approx(4 / 3)  # full: warm-up, then every 2nd
    assert result["rows"][0]["psnr"] == float("inf") and result["rows"][0]["speedup"] == 1.0
    for name in ("results.md", "samples.png", "pareto.png", "cache_map.png", "signals.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "| fb-0.5 |" in table and "| ts-o1 |" in table

    stamps = {p: os.path.getmtime(p) for p in list((out / "batches").iterdir()) + list((out / "scores").iterdir())}
    assert benchmark_quality.main(argv) == 0  # a rerun generates and scores nothing again
    assert {p: os.path.getmtime(p) for p in stamps} == stamps


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
