"""Parity of models/vae.py with diffusers' AutoencoderKL.decode on a tiny FLUX-shaped VAE."""
import json
import os
import shutil

import mindspore as ms
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from safetensors.torch import load_file, save_file

from models.checkpoint import CheckpointError
from models.vae import AutoencoderKLDecoder, decode_latents, load_vae, to_float_images, to_uint8_images
from parity import rel_err

SCALING, SHIFT = 0.3611, 0.1159
WEIGHTS = "diffusion_pytorch_model.safetensors"


def tiny_flux_vae(seed=0, **overrides):
    """FLUX VAE structure (16 latent channels, 4 blocks, no quant convs) at toy width. Every parameter is
    perturbed so GroupNorm scales/shifts and biases differ from their default 1/0 and are really tested."""
    kwargs = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  block_out_channels=(8, 16, 16, 16), norm_num_groups=4, sample_size=64,
                  scaling_factor=SCALING, shift_factor=SHIFT, use_quant_conv=False, use_post_quant_conv=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = AutoencoderKL(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def latents(seed=1, shape=(2, 16, 16, 24)):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def torch_decode(model, z):
    """What diffusers' FluxPipeline does with (unpacked) latents before postprocessing."""
    with torch.no_grad():
        shift = model.config.shift_factor or 0.0
        return model.decode(z / model.config.scaling_factor + shift).sample


@pytest.fixture(scope="module")
def flux_vae(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("flux_vae") / "vae")
    model = tiny_flux_vae()
    model.save_pretrained(folder)
    z = latents()
    ref = torch_decode(model, z)
    assert ref.shape == (2, 3, 128, 192)
    assert ref.abs().max() > 0.1  # a non-trivial reference
    return folder, z, ref, model


def test_decode_matches_diffusers_fp32_pynative(flux_vae):
    folder, z, ref, model = flux_vae
    vae = load_vae(folder, "float32")
    assert isinstance(vae, AutoencoderKLDecoder)
    assert vae.vae_scale_factor == 8
    assert (vae.scaling_factor, vae.shift_factor) == (SCALING, SHIFT)
    assert not vae.use_post_quant_conv
    names = {n for n, _ in vae.parameters_and_names()}
    assert names == {k for k in load_file(os.path.join(folder, WEIGHTS)) if k.startswith("decoder.")}
    out = decode_latents(vae, ms.Tensor(z.numpy()))
    assert out.dtype == ms.float32
    assert rel_err(out, ref) < 1e-4
    # decode() alone is AutoencoderKL.decode without the latent denormalisation
    z_small = z[:1, :, :8, :12]
    with torch.no_grad():
        raw_ref = model.decode(z_small).sample
    assert rel_err(vae.decode(ms.Tensor(z_small.numpy())), raw_ref) < 1e-4


@pytest.mark.parametrize("how", ["jit", "graph_mode"])
def test_decode_matches_diffusers_compiled(flux_vae, how):
    folder, z, ref, model = flux_vae
    vae = load_vae(folder, ms.float32)
    if how == "jit":  # the full test batch, compiled with ms.jit
        vae.construct = ms.jit(vae.construct)
        shapes = [(None, ref), (None, ref), ((1, 16, 8, 12), None)]
    else:  # GRAPH_MODE, smaller latents to keep the test fast
        ms.set_context(mode=ms.GRAPH_MODE)
        shapes = [((1, 16, 8, 12), None), ((1, 16, 8, 12), None), ((2, 16, 6, 10), None)]
    # a repeated shape reuses its compiled graph; another shape compiles its own and is still right
    for i, (shape, expected) in enumerate(shapes):
        zi = z if shape is None else latents(seed=10 + i, shape=shape)
        expected = torch_decode(model, zi) if expected is None else expected
        assert rel_err(decode_latents(vae, ms.Tensor(zi.numpy())), expected) < 1e-4


def test_decode_fp16(flux_vae):
    folder, z, ref, _ = flux_vae
    vae = load_vae(folder, "float16")
    assert vae.decoder.conv_in.weight.dtype == ms.float16
    out = decode_latents(vae, ms.Tensor(z.numpy()))  # fp32 latents are cast to the model dtype
    assert out.dtype == ms.float16
    assert np.isfinite(out.asnumpy()).all()
    assert rel_err(out.astype(ms.float32), ref) < 1e-2


def test_post_quant_conv_sharded_and_no_shift(tmp_path):
    """use_post_quant_conv=True, a sharded checkpoint (index json), shift_factor null, other widths."""
    model = tiny_flux_vae(seed=3, use_post_quant_conv=True, use_quant_conv=True, latent_channels=4,
                          block_out_channels=(8, 16), norm_num_groups=8, layers_per_block=2,
                          down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                          scaling_factor=0.18215, shift_factor=None)
    folder = str(tmp_path / "vae")
    model.save_pretrained(folder, max_shard_size="20KB")
    assert os.path.isfile(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"))
    vae = load_vae(folder, "float32")
    assert vae.use_post_quant_conv and vae.shift_factor is None and vae.vae_scale_factor == 2
    assert "post_quant_conv.weight" in {n for n, _ in vae.parameters_and_names()}
    z = latents(seed=4, shape=(2, 4, 10, 6))
    assert rel_err(decode_latents(vae, ms.Tensor(z.numpy())), torch_decode(model, z)) < 1e-4


def test_legacy_attention_names_load(flux_vae, tmp_path):
    """Checkpoints with pre-0.14 attention names (query/key/value/proj_attn) load like diffusers does."""
    folder, _, _, model = flux_vae
    legacy = str(tmp_path / "vae")
    shutil.copytree(folder, legacy)
    tensors = load_file(os.path.join(legacy, WEIGHTS))
    for new, old in (("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."), ("to_out.0.", "proj_attn.")):
        for key in [k for k in tensors if ".attentions.0." + new in k]:
            tensors[key.replace(new, old)] = tensors.pop(key)
    save_file(tensors, os.path.join(legacy, WEIGHTS))
    z = latents(seed=5, shape=(1, 16, 8, 12))
    assert rel_err(decode_latents(load_vae(legacy), ms.Tensor(z.numpy())), torch_decode(model, z)) < 1e-4


def test_uint8_and_float_images_match_vae_image_processor(flux_vae):
    out = ms.Tensor(flux_vae[2].numpy())  # a decoded image batch (the reference's: the same up to 1e-4)
    processor = VaeImageProcessor(vae_scale_factor=16)  # what FluxPipeline builds (2 * 8)
    images = to_uint8_images(out)
    assert images.dtype == np.uint8 and images.shape == (2, 128, 192, 3)
    assert images.min() == 0 and images.max() == 255  # the clamp at both ends is exercised
    pil = processor.postprocess(torch.from_numpy(out.asnumpy()), output_type="pil")
    np.testing.assert_array_equal(images, np.stack([np.asarray(p) for p in pil]))
    floats = processor.postprocess(torch.from_numpy(out.asnumpy()), output_type="np")
    np.testing.assert_array_equal(to_float_images(out), floats)
    # out-of-range values, both ends and everything between, on a grid fine enough to hit every uint8 level
    grid = np.linspace(-1.2, 1.2, 3 * 64 * 64, dtype=np.float32).reshape(1, 3, 64, 64)
    pil = processor.postprocess(torch.from_numpy(grid), output_type="pil")[0]
    np.testing.assert_array_equal(to_uint8_images(ms.Tensor(grid))[0], np.asarray(pil))
    assert len(np.unique(to_uint8_images(grid))) == 256


def test_missing_folder_config_and_tensor(flux_vae, tmp_path):
    folder = flux_vae[0]
    with pytest.raises(CheckpointError, match="does not exist|no config.json"):
        load_vae(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_vae(str(empty))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), no_weights)
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_vae(str(no_weights))

    broken = str(tmp_path / "broken")
    shutil.copytree(folder, broken)
    tensors = load_file(os.path.join(broken, WEIGHTS))
    del tensors["decoder.mid_block.attentions.0.to_v.bias"]
    save_file(tensors, os.path.join(broken, WEIGHTS))
    with pytest.raises(CheckpointError, match=r"missing from checkpoint.*decoder\.mid_block\.attentions\.0\.to_v\.bias"):
        load_vae(broken)


def test_config_that_does_not_fit_the_weights(flux_vae, tmp_path):
    folder = flux_vae[0]
    wrong = str(tmp_path / "wrong")
    shutil.copytree(folder, wrong)
    with open(os.path.join(wrong, "config.json")) as f:
        config = json.load(f)
    config["use_post_quant_conv"] = True  # the file has no post_quant_conv tensors
    config["block_out_channels"] = [8, 16, 16, 32]
    with open(os.path.join(wrong, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match=r"post_quant_conv\.weight.*shape mismatch"):
        load_vae(wrong)
