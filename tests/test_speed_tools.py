"""The speed tools: the side-by-side benchmark against diffusers and the step profile (behaviour, not timings)."""
import json

import numpy as np
import pytest

from eval import (benchmark_vs_diffusers, compile_time, profile_afcache, profile_cache_steps, profile_control_flow,
                  profile_step)


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
                          "--group-size", "2", "--json", str(out)])
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert all(r["cache"].endswith("units of 2 blocks)") for r in results.values())  # what the workers built
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


def test_compile_time_times_each_method_in_its_own_process(tiny_dev_checkpoint, tmp_path):
    out, table = tmp_path / "compile.json", tmp_path / "compile.md"
    compile_time.main(["--checkpoint", tiny_dev_checkpoint, "--height", "64", "--width", "64", "--text-tokens", "16",
                       "--steps", "2", "--methods", "none,afcache", "--group-size", "2", "--json", str(out),
                       "--markdown", str(table)])
    results = json.loads(out.read_text())["results"]
    assert [r["method"] for r in results] == ["none", "afcache"]
    assert results[1]["cache"].endswith("units of 2 blocks)")  # the worker built what it was given
    for r in results:
        assert len(r["steps_s"]) == 2 and r["compile_s"] == r["first_step_s"] - r["later_step_s"]
    assert "| none |" in table.read_text() and "| afcache |" in table.read_text()
    assert "AFCache in units of 2 blocks" in table.read_text()


@pytest.mark.parametrize("argv, message", [
    (["--methods", "none,deepcache"], "deepcache"),
    (["--steps", "1"], "--steps must be at least 2"),
    (["--checkpoint", "/nonexistent"], "has no transformer/ folder"),
    (["--group-size", "0"], "--group-size at least 1"),
])
def test_compile_time_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        compile_time.parse_args(argv)
    assert message in capsys.readouterr().err


def test_cache_step_profile_replays_the_pipelines_run(tiny_dev_checkpoint, tmp_path):
    """The replay is the pipeline's run (same final latents as a pipeline call with the same noise), every replay
    takes the recorded decisions, and the ideal speedup counts the blocks the method ran."""
    from fbcache_ms.config import CacheConfig
    from pipelines.flux_pipeline import FluxPipeline, pack_latents
    out = tmp_path / "steps.json"
    results = profile_cache_steps.main(["--checkpoint", tiny_dev_checkpoint, "--height", "64", "--width", "64",
                                        "--text-tokens", "16", "--steps", "8", "--rounds", "2",
                                        "--methods", "fbcache,taylorseer", "--json", str(out)])
    by = {r["method"]: r for r in results}
    pipe = FluxPipeline.from_pretrained(tiny_dev_checkpoint)
    grid = 64 // pipe.vae_scale_factor
    noise = pack_latents(np.random.default_rng(0).standard_normal(
        (1, pipe.transformer.config.in_channels // 4, grid, grid), np.float32))  # the profile's noise
    for method, r in by.items():
        assert r["method_step_s"] and len(r["method_step_s"]) == len(r["uncached_step_s"]) == 8
        ran = pipe(profile_cache_steps.PROMPT, height=64, width=64, num_inference_steps=8, max_sequence_length=16,
                   latents=noise, output_type="latent", progress=False,
                   cache=CacheConfig(method, threshold=r["threshold"]))
        assert np.abs(ran.images - r["final_latents"]).max() < 1e-6, method
        assert r["pattern"] == ran.cache_stats.pattern()
        full = pipe.transformer.num_blocks
        assert r["ideal"] == pytest.approx(8 * full / sum(r["blocks_run"]))
        assert r["ideal"] > 1 and r["efficiency"] == pytest.approx(r["measured"] / r["ideal"])
        assert len(r["efficiency_per_replay"]) == 2
    assert by["taylorseer"]["pattern"] == "CCCC...."
    assert "." in by["fbcache"]["pattern"]
    assert json.loads(out.read_text())["results"][0]["method"] == "fbcache"


@pytest.mark.parametrize("argv, message", [
    (["--methods", "none"], "none"),
    (["--fbcache-threshold", "1.5"], "--fbcache-threshold must be in [0, 1]"),
    (["--rounds", "0"], "at least 1"),
])
def test_cache_step_profile_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        profile_cache_steps.parse_args(argv)
    assert message in capsys.readouterr().err
