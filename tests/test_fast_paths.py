"""The device dispatch of models/layers.py: the portable math each fused Ascend kernel replaces, checked on CPU
against the formula that kernel computes (flash attention, RMSNorm), plus the LayerNorm and RoPE rewrites."""
import numpy as np
import mindspore as ms
import pytest
import torch

import models.layers as layers
from eval import ascend_smoke

RNG = np.random.default_rng(0)


def _graph(fn, *arrays, dtype=ms.float32):
    return ms.jit(fn)(*(ms.Tensor(a, dtype) for a in arrays)).astype(ms.float32).asnumpy()


@pytest.mark.parametrize("dtype, tol", [(ms.float32, 1e-6), (ms.float16, 2e-3)])
def test_rms_norm_portable_equals_the_fused_kernels_formula(dtype, tol):
    x = RNG.standard_normal((2, 40, 3, 16)).astype(np.float32) * 3
    cell = layers.RMSNorm(16, 1e-6, dtype)
    gamma = RNG.standard_normal(16).astype(np.float32)
    cell.weight.set_data(ms.Tensor(gamma, dtype))
    assert not cell.fused  # CPU: the portable path
    ours = _graph(cell.construct, x, dtype=dtype)
    # ops.rms_norm: x * rsqrt(mean(x^2) + eps) * gamma
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * gamma
    assert np.abs(ours - ref).max() / np.abs(ref).max() < tol


def test_attention_portable_equals_flash_attention_semantics():
    b, s, h, d = 2, 37, 3, 16
    q, k, v = (RNG.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(3))
    cell = layers.Attention(h, d)
    assert not cell.use_flash
    ours = _graph(cell.construct, q, k, v)
    # flash_attention_score(q, k, v, h, scalar_value=1/sqrt(d), input_layout="BSND") -> [B, S, H*D]
    scores = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(d)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    ref = np.einsum("bhst,bthd->bshd", p / p.sum(-1, keepdims=True), v).reshape(b, s, h * d)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5


@pytest.mark.parametrize("dtype, tol", [(ms.float32, 1e-5), (ms.float16, 2e-3)])
def test_layer_norm_kernel_equals_torch(dtype, tol):
    x = (RNG.standard_normal((2, 50, 64)) * 4 + 1).astype(np.float32)
    ours = _graph(_layer_norm, x, dtype=dtype)
    ref = torch.nn.functional.layer_norm(torch.from_numpy(x), (64,), eps=1e-6).numpy()
    assert np.abs(ours - ref).max() / np.abs(ref).max() < tol


def _layer_norm(x):
    return layers.layer_norm(x, 1e-6)


def _modulated(x, shift, scale):
    return layers.modulated_layer_norm(x, shift, scale, 1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_modulated_layer_norm_equals_torch(batch):
    """One image: the modulation is the LayerNorm kernel's affine; several: LayerNorm then modulate."""
    x = (RNG.standard_normal((batch, 50, 64)) * 4 + 1).astype(np.float32)
    shift, scale = (RNG.standard_normal((batch, 64)).astype(np.float32) for _ in range(2))
    ours = _graph(_modulated, x, shift, scale)
    norm = torch.nn.functional.layer_norm(torch.from_numpy(x), (64,), eps=1e-6).numpy()
    ref = norm * (1 + scale[:, None]) + shift[:, None]
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5


@pytest.mark.parametrize("dtype, tol", [(ms.float32, 1e-6), (ms.float16, 2e-3)])
def test_gelu_portable_rewrite_equals_the_fused_kernels_formula(dtype, tol):
    x = (RNG.standard_normal((3, 40, 64)) * 4).astype(np.float32)
    ours = _graph(layers.gelu_tanh, x, dtype=dtype)
    ref = torch.nn.functional.gelu(torch.from_numpy(x).double(), approximate="tanh").numpy()
    assert np.abs(ours - ref).max() / np.abs(ref).max() < tol


def test_rope_equals_diffusers():
    from diffusers.models.embeddings import FluxPosEmbed, apply_rotary_emb
    ids = np.stack([np.zeros(30), np.arange(30) // 6, np.arange(30) % 6], -1).astype(np.float32)
    x = RNG.standard_normal((2, 30, 3, 32)).astype(np.float32)
    cos, sin = layers.rope_over_heads(*layers.rope_frequencies(ms.Tensor(ids), (8, 12, 12), 10000), 3)
    ours = layers.apply_rope(ms.Tensor(x), cos, sin).asnumpy()
    rope = FluxPosEmbed(theta=10000, axes_dim=[8, 12, 12])(torch.from_numpy(ids))
    ref = apply_rotary_emb(torch.from_numpy(x).transpose(1, 2), rope, sequence_dim=2).transpose(1, 2).numpy()
    assert np.abs(ours - ref).max() < 1e-5


def test_fast_paths_are_off_on_cpu_and_cannot_be_forced():
    assert layers.fast_paths() is False
    with pytest.raises(RuntimeError, match="Ascend kernels only"):
        layers.set_fast_paths(True)
    layers.set_fast_paths(False)
    assert layers.fast_paths() is False
    layers.set_fast_paths(None)


def test_ascend_smoke_says_it_needs_ascend(capsys):
    assert ascend_smoke.main([]) == 2
    assert "no Ascend device" in capsys.readouterr().err
