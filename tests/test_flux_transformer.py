"""Our FLUX transformer against diffusers' FluxTransformer2DModel with the same saved weights."""
import json
import os

import mindspore as ms
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

from models.checkpoint import CheckpointError
from models.flux_transformer import load_flux_transformer, reused_graph
from parity import rel_err

CONFIGS = {
    # dev: guidance embedding, batch 2, non-square latent grid
    "dev": dict(config=dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                            joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
                            axes_dims_rope=(4, 6, 6)), batch=2, grid=(4, 6), txt=7),
    # schnell: no guidance embedding, more heads, other RoPE axes
    "schnell": dict(config=dict(num_layers=1, num_single_layers=3, attention_head_dim=8, num_attention_heads=4,
                                joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=False,
                                axes_dims_rope=(2, 2, 4)), batch=1, grid=(6, 4), txt=5),
    # larger head dim, in_channels other than 64, batch 3
    "wide": dict(config=dict(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=3,
                             joint_attention_dim=20, pooled_projection_dim=12, guidance_embeds=True, in_channels=16,
                             axes_dims_rope=(8, 12, 12)), batch=3, grid=(2, 8), txt=4),
}


def _inputs(spec, seed=1):
    cfg = spec["config"]
    g = torch.Generator().manual_seed(seed)
    b, (h, w), txt = spec["batch"], spec["grid"], spec["txt"]
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None]
    return dict(
        hidden_states=torch.randn(b, h * w, cfg.get("in_channels", 64), generator=g),
        encoder_hidden_states=torch.randn(b, txt, cfg["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(b, cfg["pooled_projection_dim"], generator=g),
        timestep=torch.rand(b, generator=g),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(txt, 3),
        guidance=torch.full((b,), 3.5),
    )


def _save_reference(spec, folder, **save_kwargs):
    torch.manual_seed(0)
    ref = FluxTransformer2DModel(**spec["config"]).eval()
    ref.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    return ref


def _run_both(ref, model, inputs, jit=False):
    with torch.no_grad():
        expected = ref(**{k: (None if k == "guidance" and not ref.config.guidance_embeds else v)
                          for k, v in inputs.items()}, return_dict=False)[0]
    fn = ms.jit(model.construct) if jit else model
    ours = fn(*[ms.Tensor(inputs[k].numpy()) for k in ("hidden_states", "encoder_hidden_states",
                                                       "pooled_projections", "timestep", "img_ids", "txt_ids",
                                                       "guidance")])
    return ours, expected


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers_fp32(name, tmp_path):
    spec = CONFIGS[name]
    ref = _save_reference(spec, tmp_path)
    model = load_flux_transformer(str(tmp_path), "float32")
    ours, expected = _run_both(ref, model, _inputs(spec))
    assert float(expected.abs().max()) > 0.1  # a meaningful, non-degenerate reference
    assert rel_err(ours, expected) < 1e-4


def test_graph_mode_matches_pynative_and_diffusers(tmp_path):
    spec = CONFIGS["dev"]
    ref = _save_reference(spec, tmp_path)
    model = load_flux_transformer(str(tmp_path), "float32")
    inputs = _inputs(spec)
    eager, expected = _run_both(ref, model, inputs)
    graph, _ = _run_both(ref, model, inputs, jit=True)
    assert rel_err(graph, expected) < 1e-4
    assert rel_err(graph, eager.asnumpy()) < 1e-5


class _Scaled(ms.nn.Cell):
    @reused_graph
    def __init__(self, factor, key):
        super().__init__()
        self.factor = factor  # a compile-time constant, as a block's head count or fp16 clamp is
        self.weight = ms.Parameter(ms.Tensor(np.ones(3, np.float32)), name="weight")
        self.graph_key = key

    def construct(self, x):
        return x * self.weight * self.factor


class _Pair(ms.nn.Cell):
    def __init__(self, key_a, key_b):
        super().__init__()
        self.a, self.b = _Scaled(2.0, key_a), _Scaled(3.0, key_b)

    def construct(self, x):
        return self.a(x), self.b(x)


def test_reused_graph_is_shared_only_between_equal_graph_keys():
    """Cells of one class in one graph share one compiled graph (lazy_inline) when their graph_key is equal:
    a constant left out of the key is silently taken from the first cell compiled, so the blocks' keys must
    hold every compile-time constant (shape, dtype, fast paths)."""
    x = ms.Tensor(np.ones(3, np.float32))
    apart = ms.jit(_Pair((2.0,), (3.0,)).construct)(x)
    assert [float(o.asnumpy()[0]) for o in apart] == [2.0, 3.0]
    shared = ms.jit(_Pair((), ()).construct)(x)  # what a key missing the constant gives
    assert [float(o.asnumpy()[0]) for o in shared] == [2.0, 2.0]


@pytest.mark.parametrize("name,changes", [("dev", True), ("schnell", False)])
def test_guidance_input_used_by_dev_only(name, changes, tmp_path):
    spec = CONFIGS[name]
    ref = _save_reference(spec, tmp_path)
    model = load_flux_transformer(str(tmp_path), "float32")
    inputs = _inputs(spec)
    base = _run_both(ref, model, inputs)[0].asnumpy()
    inputs["guidance"] = torch.full_like(inputs["guidance"], 1.0)
    other = _run_both(ref, model, inputs)[0].asnumpy()
    assert (np.abs(base - other).max() > 1e-3) == changes


def test_sharded_checkpoint_loads(tmp_path):
    spec = CONFIGS["dev"]
    ref = _save_reference(spec, tmp_path, max_shard_size="50KB")
    assert os.path.exists(tmp_path / "diffusion_pytorch_model.safetensors.index.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model = load_flux_transformer(str(tmp_path), "float32")
    ours, expected = _run_both(ref, model, _inputs(spec))
    assert rel_err(ours, expected) < 1e-4


def test_fp16_close_to_fp32(tmp_path):
    spec = CONFIGS["dev"]
    ref = _save_reference(spec, tmp_path)
    model = load_flux_transformer(str(tmp_path), "float16")
    assert model.x_embedder.weight.dtype == ms.float16
    inputs = _inputs(spec)
    ours, expected = _run_both(ref, model, inputs)
    assert ours.dtype == ms.float16
    assert rel_err(ours.astype(ms.float32), expected) < 2e-2


def test_missing_tensor_is_named(tmp_path):
    _save_reference(CONFIGS["schnell"], tmp_path)
    from safetensors.numpy import load_file, save_file
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    del tensors["proj_out.bias"]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="proj_out.bias"):
        load_flux_transformer(str(tmp_path))


def test_config_mismatch_is_reported(tmp_path):
    _save_reference(CONFIGS["schnell"], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_attention_heads"] = 2
    config["attention_head_dim"] = 16
    config["axes_dims_rope"] = [4, 6, 6]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_flux_transformer(str(tmp_path))


def test_bad_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist|config.json"):
        load_flux_transformer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_flux_transformer(str(tmp_path / "empty"))
