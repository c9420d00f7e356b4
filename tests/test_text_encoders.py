"""Parity of our CLIP / T5 text encoders with transformers on tiny random models saved by save_pretrained."""
import json
import os

import mindspore as ms
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from models.checkpoint import CheckpointError
from models.t5 import relative_position_buckets
from models.text_encoders import load_clip_text_encoder, load_t5_encoder
from parity import rel_err

BOS, EOS, PAD = 98, 99, 1

# batch 2, different prompt lengths; L=16 exceeds the T5 max_distance below, so clipped buckets are used
IDS = np.array([[BOS, 5, 7, 23, EOS, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD],
                [BOS, 31, 4, 52, 6, 17, 88, 9, 12, 3, 40, 41, EOS, PAD, PAD, PAD]], np.int64)


def _perturb(model, seed):
    """Randomise every tensor, so layer-norm weights/biases are not the trivial ones/zeros of the init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _clip(**overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=16, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    cfg.update(overrides)
    return _perturb(CLIPTextModel(CLIPTextConfig(**cfg)), 1).eval()


def _t5():
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                   relative_attention_max_distance=12, dropout_rate=0.1)  # dropout: .eval() must matter
    return _perturb(T5EncoderModel(cfg), 2).eval()


@pytest.fixture(scope="module")
def clip_ref(tmp_path_factory):
    model = _clip()
    folder = str(tmp_path_factory.mktemp("clip"))
    model.save_pretrained(folder, safe_serialization=True)
    with torch.no_grad():
        pooled = model(torch.from_numpy(IDS)).pooler_output
    return folder, pooled


@pytest.fixture(scope="module")
def t5_ref(tmp_path_factory):
    model = _t5()
    single, sharded = str(tmp_path_factory.mktemp("t5")), str(tmp_path_factory.mktemp("t5_sharded"))
    model.save_pretrained(single, safe_serialization=True)
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    with torch.no_grad():
        hidden = model(torch.from_numpy(IDS)).last_hidden_state
    return single, sharded, hidden


def _compiled(cell, mode):
    if mode == "jit":
        cell.construct = ms.jit(cell.construct)
    return cell


@pytest.mark.parametrize("mode", ["pynative", "jit"])
def test_clip_pooled_matches_transformers(clip_ref, mode):
    folder, ref = clip_ref
    encoder = _compiled(load_clip_text_encoder(folder, "float32"), mode)
    out = encoder(ms.Tensor(IDS, ms.int32))
    assert out.shape == (2, 32)
    assert rel_err(out, ref) < 1e-4
    # the two prompts pool at different EOS positions: the rows must differ
    assert np.abs(out.asnumpy()[0] - out.asnumpy()[1]).max() > 1e-2


def test_clip_int64_ids_and_float16(clip_ref):
    folder, ref = clip_ref
    assert rel_err(load_clip_text_encoder(folder, "float32")(ms.Tensor(IDS, ms.int64)), ref) < 1e-4
    out = load_clip_text_encoder(folder, ms.float16)(ms.Tensor(IDS, ms.int32))
    assert out.dtype == ms.float16
    assert rel_err(out, ref) < 5e-3


def test_clip_pads_with_eos_pools_first_eos(tmp_path):
    """FLUX's CLIP tokenizer pads with the EOS id itself: the pooled token is the first EOS."""
    model = _clip()
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    ids = np.where(IDS == PAD, EOS, IDS)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).pooler_output
        last = model(torch.from_numpy(ids)).last_hidden_state[:, -1]
    out = load_clip_text_encoder(str(tmp_path))(ms.Tensor(ids, ms.int32))
    assert rel_err(out, ref) < 1e-4
    assert rel_err(out, last) > 1e-2  # pooling the last EOS would be wrong


def test_clip_legacy_eos_id_pools_at_argmax(tmp_path):
    """Configs with eos_token_id=2 (before transformers PR #24773) pool at argmax(input_ids)."""
    model = _clip(eos_token_id=2)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    ids = IDS.copy()
    ids[:, 2] = 2  # a token 2 before the largest id: the first-EOS rule would pick a different position
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).pooler_output
        first_two = model(torch.from_numpy(ids)).last_hidden_state[:, 2]
    out = load_clip_text_encoder(str(tmp_path))(ms.Tensor(ids, ms.int32))
    assert rel_err(out, ref) < 1e-4
    assert rel_err(out, first_two) > 1e-2


@pytest.mark.parametrize("mode", ["pynative", "jit"])
def test_t5_matches_transformers(t5_ref, mode):
    single, sharded, ref = t5_ref
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1  # really sharded
    folder = sharded if mode == "jit" else single
    encoder = _compiled(load_t5_encoder(folder, "float32"), mode)
    out = encoder(ms.Tensor(IDS, ms.int32))
    assert out.shape == (2, 16, 32)
    assert rel_err(out, ref) < 1e-4


def test_t5_sharded_int64_and_float16(t5_ref):
    single, sharded, ref = t5_ref
    assert rel_err(load_t5_encoder(sharded, "float32")(ms.Tensor(IDS, ms.int64)), ref) < 1e-4
    encoder = load_t5_encoder(single, "float16")
    assert encoder.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == ms.float32  # as transformers keeps it
    assert encoder.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.dtype == ms.float16
    out = encoder(ms.Tensor(IDS, ms.int32))
    assert out.dtype == ms.float16
    assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("keep", ["encoder.embed_tokens.weight", "both"])
def test_t5_tied_embedding_under_either_name(t5_ref, tmp_path, keep):
    single, _, ref = t5_ref
    tensors = load_file(os.path.join(single, "model.safetensors"))
    shared = tensors.pop("shared.weight")
    tensors["encoder.embed_tokens.weight"] = shared
    if keep == "both":
        tensors["shared.weight"] = shared.clone()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(open(os.path.join(single, "config.json")).read())
    assert rel_err(load_t5_encoder(str(tmp_path))(ms.Tensor(IDS, ms.int32)), ref) < 1e-4


@pytest.mark.parametrize("buckets, distance", [(32, 128), (8, 12), (16, 32), (10, 50)])
def test_t5_bucket_table_matches_transformers(buckets, distance):
    rel = np.arange(-distance, distance + 1)
    ref = T5Attention._relative_position_bucket(torch.from_numpy(rel), True, buckets, distance).numpy()
    np.testing.assert_array_equal(relative_position_buckets(distance, buckets), ref)
    # beyond +-max_distance transformers saturates, which is what lets us clip positions to the table
    far = T5Attention._relative_position_bucket(torch.tensor([-10 * distance, 10 * distance]), True, buckets, distance)
    assert far.tolist() == [ref[0], ref[-1]]


def _copy_without(src, dst, drop=None, add=None):
    tensors = load_file(os.path.join(src, "model.safetensors"))
    if drop:
        del tensors[drop]
    tensors.update(add or {})
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    return str(dst)


def test_missing_tensor_raises(t5_ref, clip_ref, tmp_path):
    for folder, name, load in [(t5_ref[0], "encoder.block.1.layer.1.DenseReluDense.wi_1.weight", load_t5_encoder),
                               (clip_ref[0], "text_model.final_layer_norm.bias", load_clip_text_encoder)]:
        dst = tmp_path / name
        dst.mkdir()
        with pytest.raises(CheckpointError, match="missing from checkpoint.*" + name.replace(".", r"\.")):
            load(_copy_without(folder, dst, drop=name))


def test_unexpected_tensor_raises(t5_ref, tmp_path):
    extra = {"encoder.block.9.layer.0.layer_norm.weight": torch.ones(32)}
    with pytest.raises(CheckpointError, match=r"not used by the model.*block\.9"):
        load_t5_encoder(_copy_without(t5_ref[0], tmp_path, add=extra))


def test_nonexistent_folder_raises(tmp_path):
    for load in (load_clip_text_encoder, load_t5_encoder):
        with pytest.raises(CheckpointError, match="does not exist"):
            load(str(tmp_path / "nope"))
