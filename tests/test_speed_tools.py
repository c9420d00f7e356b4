"""The speed tools: the side-by-side benchmark against diffusers and the step profile (behaviour, not timings)."""
import json

import numpy as np
import pytest

from eval import benchmark_vs_diffusers, profile_afcache, profile_control_flow, profile_step


def test_side_by_side_runs_both_stacks_on_the_same_noise_and_counts_the_work(tiny_dev_checkpoint, tmp_path):
    out = tmp_path / "side.json"
    benchmark_vs_diffusers.main(["--checkpoint", tiny_dev_checkpoint, "--height", "64", "--width", "64",
                                 "--text-tokens", "16", "--steps", "8", "--rounds", "1", "--stacks", "graph,diffusers",
                                 "--methods", "none,fbcache,taylorseer", "--json", str(out),
                                 "--markdown", str(tmp_path / "side.md")])
    result = json.loads(out.read_text())
    rows = {(r["stack"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(s, m) for s in ("graph", "diffusers") for m in ("none", "fbcache", "taylorseer")}
    # same weights, same noise: diffusers uncached lands where we do, and FBCache decides the same steps
    assert rows["diffusers", "none"]["vs_ours"] < 1e-4
    ours, theirs = rows["graph", "fbcache"]["pattern"], rows["diffusers", "fbcache"]["pattern"]
    assert "." in ours and [c == "C" for c in ours] == [c == "C" for c in theirs]
    assert rows["diffusers", "fbcache"]["vs_ours"] < 1e-3
    # diffusers' TaylorSeer forecasts attention only: its forecast steps still run the MLPs
    assert "~" in rows["diffusers", "taylorseer"]["pattern"]
    assert 1 < rows["diffusers", "taylorseer"]["ideal"] < rows["graph", "taylorseer"]["ideal"]
    assert rows["graph", "taylorseer"]["state_bytes"] > 0 and rows["graph", "none"]["ideal"] == 1.0
    table = (tmp_path / "side.md").read_text()
    assert table.count("| graph |") == 3 and table.count("| diffusers |") == 3


@pytest.mark.parametrize("argv, message", [
    (["--stacks", "graph,tensorflow"], "tensorflow"),
    (["--methods", "teacache"], "teacache"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--fbcache-threshold", "2"], "--fbcache-threshold must be in [0, 1]"),
    (["--checkpoint", "/nonexistent"], "is not a folder"),
])
def test_side_by_side_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark_vs_diffusers.parse_args(argv)
    assert message in str(exc.value) + capsys.readouterr().err


def test_profile_variants_remove_their_part(tiny_dev_checkpoint, tmp_path):
    out = tmp_path / "profile.json"
    profile_step.main(["--checkpoint", tiny_dev_checkpoint, "--height", "64", "--width", "64", "--text-tokens",
                       "16", "--repeats", "1", "--variants", "full,rope,linear-only", "--no-torch",
                       "--json", str(out)])
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"full", "rope", "linear-only"}
    outputs = [results[v]["output_mean_abs"] for v in ("full", "rope", "linear-only")]
    assert len(set(np.round(outputs, 6))) == 3  # each variant compiled its own, different, step
    assert all(r["step_s"] > 0 for r in results.values())


def test_profile_bad_variant(capsys):
    with pytest.raises(SystemExit):
        profile_step.parse_args(["--variants", "full,softmax"])
    assert "softmax" in capsys.readouterr().err


def test_afcache_profile_removes_its_parts(tiny_dev_checkpoint, tmp_path):
    out = tmp_path / "afcache.json"
    profile_afcache.main(["--checkpoint", tiny_dev_checkpoint, "--height", "64", "--width", "64", "--text-tokens",
                          "16", "--steps", "3", "--rounds", "1", "--variants", "full,no-stability",
                          "--json", str(out)])
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert results["full"]["stability_moved"] and not results["no-stability"]["stability_moved"]
    assert all(r["uncached_step_s"] > 0 and r["afcache_step_s"] > 0 for r in results.values())


def test_afcache_profile_bad_variant(capsys):
    with pytest.raises(SystemExit):
        profile_afcache.parse_args(["--variants", "full,no-gram"])
    assert "no-gram" in capsys.readouterr().err


def test_control_flow_profile_variants_compute_the_plain_model(tiny_dev_checkpoint, tmp_path):
    out = tmp_path / "control_flow.json"
    profile_control_flow.main(["--checkpoint", tiny_dev_checkpoint, "--height", "64", "--width", "64",
                               "--text-tokens", "16", "--repeats", "1", "--json", str(out)])
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == set(profile_control_flow.VARIANTS)
    assert all(r["max_abs_diff_vs_plain"] == 0 and r["step_s"] > 0 for r in results.values())


def test_control_flow_profile_bad_variant(capsys):
    with pytest.raises(SystemExit):
        profile_control_flow.parse_args(["--variants", "ifs,select"])
    assert "select" in capsys.readouterr().err
