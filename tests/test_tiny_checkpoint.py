"""The tiny random FLUX.1 checkpoint: layout, consistency, loading by diffusers, tokenizers, the script."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from eval.make_tiny_checkpoint import COMPONENTS, make_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "eval", "make_tiny_checkpoint.py")
SUBFOLDERS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae")


@pytest.fixture(params=["dev", "schnell"])
def checkpoint(request):
    return request.param, request.getfixturevalue(f"tiny_{request.param}_checkpoint")


def _config(folder, sub, name="config.json"):
    with open(os.path.join(folder, sub, name), encoding="utf-8") as f:
        return json.load(f)


def test_layout_and_consistent_sizes(checkpoint):
    variant, folder = checkpoint
    assert sorted(os.listdir(folder)) == sorted(SUBFOLDERS + ("model_index.json",))
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    assert index["_class_name"] == "FluxPipeline"
    assert {k: v for k, v in index.items() if not k.startswith("_")} == COMPONENTS

    tr, vae = _config(folder, "transformer"), _config(folder, "vae")
    clip, t5 = _config(folder, "text_encoder"), _config(folder, "text_encoder_2")
    sched = _config(folder, "scheduler", "scheduler_config.json")
    assert tr["guidance_embeds"] is (variant == "dev")
    assert tr["in_channels"] == 4 * vae["latent_channels"] == 64
    assert tr["joint_attention_dim"] == t5["d_model"]
    assert tr["pooled_projection_dim"] == clip["hidden_size"]
    assert sum(tr["axes_dims_rope"]) == tr["attention_head_dim"]
    assert clip["max_position_embeddings"] == 77 and clip["vocab_size"] == 49408
    assert t5["feed_forward_proj"] == "gated-gelu"
    assert vae["use_quant_conv"] is False and vae["use_post_quant_conv"] is False
    assert (vae["scaling_factor"], vae["shift_factor"]) == (0.3611, 0.1159)
    assert len(vae["block_out_channels"]) == 4
    assert all(c % vae["norm_num_groups"] == 0 for c in vae["block_out_channels"])
    expected = {"dev": dict(use_dynamic_shifting=True, shift=3.0), "schnell": dict(use_dynamic_shifting=False, shift=1.0)}
    for key, value in {**expected[variant], "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                       "max_image_seq_len": 4096, "num_train_timesteps": 1000}.items():
        assert sched[key] == value, key

    files = os.listdir(os.path.join(folder, "transformer"))
    if variant == "dev":   # the fixture shards the dev transformer
        assert "diffusion_pytorch_model.safetensors.index.json" in files
        assert len([f for f in files if f.endswith(".safetensors")]) >= 2
    else:
        assert "diffusion_pytorch_model.safetensors" in files
    assert {"tokenizer.json", "spiece.model"} <= set(os.listdir(os.path.join(folder, "tokenizer_2")))


def test_flux_pipeline_loads_and_runs(checkpoint):
    from diffusers import FluxPipeline

    variant, folder = checkpoint
    pipe = FluxPipeline.from_pretrained(folder)
    assert pipe.transformer.config.guidance_embeds is (variant == "dev")
    assert pipe.vae_scale_factor == 8 and pipe.tokenizer_max_length == 77
    out = pipe("a photo of a cat", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
               guidance_scale=3.5, output_type="latent", generator=torch.Generator().manual_seed(0))
    latents = out.images
    assert latents.shape == (1, (64 // 16) ** 2, 64)   # packed: 4x4 tokens of 16 channels x 2x2
    assert torch.isfinite(latents).all()
    assert latents.abs().mean() > 1e-3


def test_random_weights_are_not_trivial(tiny_dev_checkpoint):
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    g = torch.Generator().manual_seed(0)
    tr = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_dev_checkpoint, "transformer")).eval()
    seq, txt = 16, 8
    kwargs = dict(
        encoder_hidden_states=torch.randn(1, txt, tr.config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, tr.config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
        img_ids=torch.zeros(seq, 3), txt_ids=torch.zeros(txt, 3), return_dict=False)
    x = torch.randn(1, seq, 64, generator=g)
    with torch.no_grad():
        y = tr(hidden_states=x, **kwargs)[0]
        y2 = tr(hidden_states=2 * x, **kwargs)[0]
    assert y.shape == x.shape
    assert y.abs().max() > 1e-3 and y.std() > 1e-3
    assert (y - y2).abs().max() > 1e-4   # output depends on the input

    vae = AutoencoderKL.from_pretrained(os.path.join(tiny_dev_checkpoint, "vae")).eval()
    with torch.no_grad():
        img = vae.decode(torch.randn(1, 16, 8, 8, generator=g)).sample
    assert img.shape == (1, 3, 64, 64)
    assert img.std() > 1e-3
    assert img.std(dim=(2, 3)).min() > 1e-4   # varies over space in every channel


def test_tokenizers(tiny_dev_checkpoint):
    from transformers import CLIPTokenizer, T5Tokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(os.path.join(tiny_dev_checkpoint, "tokenizer"))
    assert clip("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip.model_max_length == 77

    folder = os.path.join(tiny_dev_checkpoint, "tokenizer_2")
    fast = T5TokenizerFast.from_pretrained(folder)
    slow = T5Tokenizer.from_pretrained(folder)
    t5_vocab = _config(tiny_dev_checkpoint, "text_encoder_2")["vocab_size"]
    assert (fast.pad_token_id, fast.eos_token_id, fast.unk_token_id) == (0, 1, 2)
    assert len(fast) <= t5_vocab
    assert len(fast.additional_special_tokens) == 100
    for text in ("a photo of a cat", "A red double-decker bus drives past a tall building in London."):
        ids = fast(text).input_ids
        assert ids[-1] == 1 and 1 not in ids[:-1]
        assert 2 not in ids   # no unknown pieces in plain English
        assert max(ids) < len(fast)
        assert ids == slow(text).input_ids
        assert fast.decode(ids, skip_special_tokens=True) == text
    padded = fast("a photo of a cat", padding="max_length", max_length=32, truncation=True).input_ids
    assert len(padded) == 32 and padded[-1] == 0


def test_same_seed_same_shared_weights(tiny_dev_checkpoint, tiny_schnell_checkpoint):
    from safetensors.numpy import load_file

    for sub in ("text_encoder", "text_encoder_2", "vae"):
        name = "model.safetensors" if sub.startswith("text") else "diffusion_pytorch_model.safetensors"
        a = load_file(os.path.join(tiny_dev_checkpoint, sub, name))
        b = load_file(os.path.join(tiny_schnell_checkpoint, sub, name))
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a), sub


def test_refuses_non_empty_dir_and_bad_sizes(tmp_path):
    (tmp_path / "keep.txt").write_text("do not overwrite")
    with pytest.raises(FileExistsError):
        make_tiny_checkpoint(tmp_path)
    assert os.listdir(tmp_path) == ["keep.txt"]

    run = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2
    assert "not empty" in run.stderr and "--force" in run.stderr
    assert os.listdir(tmp_path) == ["keep.txt"]

    with pytest.raises(ValueError, match="axes_dims_rope"):
        make_tiny_checkpoint(tmp_path / "bad", axes_dims_rope=(4, 6, 8))
    with pytest.raises(TypeError, match="unknown size"):
        make_tiny_checkpoint(tmp_path / "bad", num_heads=3)
    assert not (tmp_path / "bad").exists()


def test_force_overwrites_and_sizes_are_overridable(tmp_path):
    (tmp_path / "keep.txt").write_text("old")
    summary = make_tiny_checkpoint(tmp_path, variant="schnell", force=True, num_layers=1, num_single_layers=1,
                                   num_attention_heads=3, attention_head_dim=8, axes_dims_rope=(2, 2, 4),
                                   t5_d_model=24, clip_hidden_size=16, vae_block_out_channels=(8, 8, 8, 8),
                                   vae_norm_num_groups=4, vae_layers_per_block=1)
    assert set(SUBFOLDERS) <= set(os.listdir(tmp_path))
    tr = _config(tmp_path, "transformer")
    assert (tr["num_layers"], tr["num_single_layers"], tr["num_attention_heads"], tr["attention_head_dim"]) == (1, 1, 3, 8)
    assert (tr["joint_attention_dim"], tr["pooled_projection_dim"]) == (24, 16)
    assert _config(tmp_path, "vae")["block_out_channels"] == [8, 8, 8, 8]
    assert summary["components"]["transformer"]["params"] > 0


def test_help():
    run = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    for flag in ("out_dir", "--variant", "--seed", "--force", "--max-shard-size", "--num-layers",
                 "--num-single-layers", "--attention-head-dim", "--axes-dims-rope", "--t5-d-model"):
        assert flag in run.stdout, flag
