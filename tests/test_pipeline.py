"""The whole pipeline against diffusers' FluxPipeline on the same tiny checkpoint, noise for noise."""
import os

import mindspore as ms
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline as TorchFluxPipeline
from mindspore.graph.api import ms_compile_cache

from models.checkpoint import CheckpointError
from pipelines.flux_pipeline import FluxPipeline, pack_latents, unpack_latents
from parity import rel_err

PROMPTS = ["a photo of a cat", "a red bicycle leaning on a wall"]


def _noise(batch, tokens, channels=64, seed=3):
    return np.random.default_rng(seed).standard_normal((batch, tokens, channels)).astype(np.float32)


def _torch_run(pipe, latents, **kw):
    with torch.no_grad():
        return pipe(latents=torch.from_numpy(latents), output_type="latent", return_dict=False, **kw)[0].numpy()


def test_dev_latents_match_diffusers(torch_dev_pipeline, dev_pipeline):
    # batch of 2 prompts x 2 images, non-square 64x96 image (4x6 tokens), guidance 4.0, 3 steps
    kw = dict(prompt=PROMPTS, height=64, width=96, num_inference_steps=3, guidance_scale=4.0,
              num_images_per_prompt=2, max_sequence_length=16)
    latents = _noise(4, 24)
    expected = _torch_run(torch_dev_pipeline, latents, **kw)
    ours = dev_pipeline(latents=latents, output_type="latent", progress=False, **kw).images
    assert np.abs(expected - latents).max() > 0.1  # the steps did move the latents
    assert rel_err(ours, expected) < 1e-4


def test_schnell_latents_match_diffusers(tiny_schnell_checkpoint):
    kw = dict(prompt="a lighthouse at dusk", height=96, width=64, num_inference_steps=2, max_sequence_length=12)
    latents = _noise(1, 24, seed=5)
    expected = _torch_run(TorchFluxPipeline.from_pretrained(tiny_schnell_checkpoint), latents, **kw)
    ours = FluxPipeline.from_pretrained(tiny_schnell_checkpoint, mode="pynative")(
        latents=latents, output_type="latent", progress=False, **kw).images
    assert rel_err(ours, expected) < 1e-4


def test_true_cfg_matches_diffusers(torch_dev_pipeline, dev_pipeline):
    kw = dict(prompt=PROMPTS[0], negative_prompt="blurry", true_cfg_scale=3.0, height=64, width=64,
              num_inference_steps=2, max_sequence_length=16)
    latents = _noise(1, 16, seed=7)
    expected = _torch_run(torch_dev_pipeline, latents, **kw)
    ours = dev_pipeline(latents=latents, output_type="latent", progress=False, **kw).images
    without_cfg = dev_pipeline(latents=latents, output_type="latent", progress=False,
                         **{**kw, "true_cfg_scale": 1.0}).images
    assert rel_err(ours, expected) < 1e-4
    assert np.abs(ours - without_cfg).max() > 1e-3  # the negative branch really ran


def test_decoded_images_match_diffusers(torch_dev_pipeline, dev_pipeline):
    kw = dict(prompt=PROMPTS[1], height=64, width=96, num_inference_steps=2, max_sequence_length=16)
    latents = _noise(1, 24, seed=11)
    with torch.no_grad():
        expected = torch_dev_pipeline(latents=torch.from_numpy(latents), output_type="np", **kw).images
    expected = (expected * 255).round().astype(np.uint8)
    ours = dev_pipeline(latents=latents, output_type="np", progress=False, **kw).images
    assert ours.shape == expected.shape == (1, 64, 96, 3)
    assert expected.std() > 5  # not a flat image
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1  # at most one rounding level


def test_pil_output(dev_pipeline):
    out = dev_pipeline("a cat", height=32, width=48, num_inference_steps=1, max_sequence_length=8, seed=0,
                 progress=False)
    assert len(out.images) == 1 and out.images[0].size == (48, 32)
    assert set(out.timings) >= {"encode", "denoise", "steps", "decode"} and len(out.timings["steps"]) == 1


def test_graph_and_pynative_agree(tiny_dev_checkpoint, dev_pipeline):
    kw = dict(prompt=PROMPTS, height=64, width=64, num_inference_steps=2, max_sequence_length=16, seed=1,
              output_type="latent", progress=False)
    graph = dev_pipeline(**kw).images
    eager = FluxPipeline.from_pretrained(tiny_dev_checkpoint, mode="pynative")(**kw).images
    assert rel_err(graph, eager) < 1e-5


def test_no_recompilation_across_steps_and_calls(dev_pipeline):
    kw = dict(prompt="a cat", height=48, width=48, num_inference_steps=3, max_sequence_length=8,
              output_type="latent", progress=False)
    dev_pipeline(seed=0, **kw)  # compiles the graphs for this shape
    compiled = len(ms_compile_cache)
    dev_pipeline(seed=1, guidance_scale=5.0, **{**kw, "num_inference_steps": 4})
    dev_pipeline(prompt="another prompt", **{k: v for k, v in kw.items() if k != "prompt"}, seed=2)
    assert len(ms_compile_cache) == compiled
    dev_pipeline(seed=0, **{**kw, "height": 64})  # a new shape compiles
    assert len(ms_compile_cache) > compiled


def test_seed_reproducible(dev_pipeline):
    kw = dict(prompt="a cat", height=32, width=32, num_inference_steps=1, max_sequence_length=8,
              output_type="latent", progress=False)
    a, b, c = dev_pipeline(seed=4, **kw).images, dev_pipeline(seed=4, **kw).images, dev_pipeline(seed=5, **kw).images
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_per_image_generators_independent_of_batch(dev_pipeline):
    kw = dict(height=32, width=32, num_inference_steps=1, max_sequence_length=8, output_type="latent",
              progress=False)
    pair = dev_pipeline(["a cat", "a dog"], generator=[np.random.default_rng(s) for s in (10, 11)], **kw).images
    alone = dev_pipeline(["a dog"], generator=[np.random.default_rng(11)], **kw).images
    assert rel_err(pair[1:], alone) < 1e-5


def test_pack_unpack_roundtrip():
    x = np.random.default_rng(0).standard_normal((2, 16, 4, 6)).astype(np.float32)
    packed = pack_latents(x)
    assert packed.shape == (2, 6, 64)
    assert np.array_equal(unpack_latents(packed, 4, 6), x)
    assert np.array_equal(packed, TorchFluxPipeline._pack_latents(torch.from_numpy(x), 2, 16, 4, 6).numpy())


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=[]), "empty"),
    (dict(prompt=""), None),  # an empty string is a valid prompt
    (dict(prompt="x", height=40), "multiples of 16"),
    (dict(prompt="x", width=0), "multiples of 16"),
    (dict(prompt="x", output_type="jpeg"), "output_type"),
    (dict(prompt="x", latents=np.zeros((1, 3, 64), np.float32)), "latents"),
    (dict(prompt="x", max_sequence_length=600), "max_sequence_length"),
    (dict(prompt=["a", "b"], negative_prompt=["n1", "n2", "n3"], true_cfg_scale=2.0), "negative"),
])
def test_call_errors(dev_pipeline, kwargs, match):
    kw = dict(height=32, width=32, num_inference_steps=1, max_sequence_length=8, output_type="latent",
              progress=False)
    kw.update(kwargs)
    if match is None:
        assert dev_pipeline(**kw).images.shape == (1, 4, 64)
    else:
        with pytest.raises(ValueError, match=match):
            dev_pipeline(**kw)


def test_load_errors(tmp_path, tiny_dev_checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        FluxPipeline.from_pretrained(str(tmp_path / "missing"))
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in os.listdir(tiny_dev_checkpoint):
        if name != "vae":
            os.symlink(os.path.join(tiny_dev_checkpoint, name), partial / name)
    with pytest.raises(CheckpointError, match="vae"):
        FluxPipeline.from_pretrained(str(partial))
    with pytest.raises(ValueError, match="dtype"):
        FluxPipeline.from_pretrained(tiny_dev_checkpoint, dtype="int8")
    with pytest.raises(ValueError, match="bfloat16 is not supported on CPU"):
        FluxPipeline.from_pretrained(tiny_dev_checkpoint, dtype="bfloat16")
    with pytest.raises(ValueError, match="mode"):
        FluxPipeline.from_pretrained(tiny_dev_checkpoint, mode="eager")


def test_fp16_pipeline_runs_close(tiny_dev_checkpoint, dev_pipeline):
    kw = dict(prompt="a cat", height=32, width=32, num_inference_steps=2, max_sequence_length=8, seed=3,
              output_type="latent", progress=False)
    half = FluxPipeline.from_pretrained(tiny_dev_checkpoint, dtype="float16", mode="pynative")(**kw).images
    assert rel_err(half.astype(np.float32), dev_pipeline(**kw).images) < 2e-2


def test_truncated_prompt_warns(dev_pipeline):
    long_prompt = " ".join(["a very long prompt about a cat"] * 20)
    kw = dict(height=32, width=32, num_inference_steps=1, max_sequence_length=8, output_type="latent",
              progress=False, seed=0)
    with pytest.warns(UserWarning, match="truncated"):
        dev_pipeline(long_prompt, **kw)
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*truncated")
        dev_pipeline("a cat", **kw)
