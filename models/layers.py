"""Portable building blocks: only ops that have both CPU and Ascend kernels (see mindspore-notes.md)."""
import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from utils import on_ascend


def linear(in_dim, out_dim, dtype, bias=True):
    # zeros, not random: the checkpoint overwrites every weight, and random init of 12B params is slow
    return nn.Dense(in_dim, out_dim, weight_init="zeros", bias_init="zeros", has_bias=bias, dtype=dtype)


def layer_norm(x, eps):
    """LayerNorm over the last axis without affine parameters, computed in fp32 like torch does for fp16."""
    dtype = x.dtype
    x = x.astype(ms.float32)
    mean = x.mean(-1, keep_dims=True)
    var = ((x - mean) ** 2).mean(-1, keep_dims=True)
    return ((x - mean) * ops.rsqrt(var + eps)).astype(dtype)


class RMSNorm(nn.Cell):
    def __init__(self, dim, eps, dtype):
        super().__init__()
        self.eps = eps
        self.weight = ms.Parameter(ops.ones(dim, dtype), name="weight")

    def construct(self, x):
        dtype = x.dtype
        x = x.astype(ms.float32)
        x = x * ops.rsqrt((x * x).mean(-1, keep_dims=True) + self.eps)
        return x.astype(dtype) * self.weight


def gelu_tanh(x):
    return ops.gelu(x, approximate="tanh")


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def split_last(x, n):
    """`n` equal slices of the last axis (Tensor.chunk fails on computed tensors in graph mode)."""
    size = x.shape[-1] // n
    return [x[..., i * size:(i + 1) * size] for i in range(n)]


class Attention(nn.Cell):
    """softmax(q k^T / sqrt(d)) v for q, k, v shaped [B, S, H, D]; returns [B, S, H*D].

    The one device dispatch of the model: flash attention on Ascend, plain math elsewhere.
    """

    def __init__(self, heads, head_dim):
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(head_dim)
        self.use_flash = on_ascend()

    def construct(self, q, k, v):
        b, s, h, d = q.shape
        if self.use_flash:
            out = ops.flash_attention_score(q, k, v, h, scalar_value=self.scale, input_layout="BSND")
            return out.reshape(b, s, h * d)
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        scores = ops.matmul(q, k.transpose(0, 1, 3, 2)).astype(ms.float32) * self.scale
        probs = ops.softmax(scores, axis=-1).astype(v.dtype)
        out = ops.matmul(probs, v)
        return out.transpose(0, 2, 1, 3).reshape(b, s, h * d)


def rope_frequencies(ids, axes_dim, theta):
    """cos, sin tables [N, sum(axes_dim)] for position ids [N, n_axes]; each frequency twice (pairs)."""
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dim):
        omega = ms.Tensor(1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim), ms.float32)
        angles = ids[:, axis:axis + 1].astype(ms.float32) * omega[None]
        n = angles.shape[0]
        cos_parts.append(ops.stack([ops.cos(angles)] * 2, axis=-1).reshape(n, dim))
        sin_parts.append(ops.stack([ops.sin(angles)] * 2, axis=-1).reshape(n, dim))
    return ops.cat(cos_parts, axis=-1), ops.cat(sin_parts, axis=-1)


def apply_rope(x, cos, sin):
    """Rotate consecutive channel pairs of x [B, S, H, D] by the angles in cos/sin [S, D], in fp32."""
    b, s, h, d = x.shape
    pairs = x.astype(ms.float32).reshape(b, s, h, d // 2, 2)
    rotated = ops.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(b, s, h, d)
    out = x.astype(ms.float32) * cos[None, :, None] + rotated * sin[None, :, None]
    return out.astype(x.dtype)


def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal embedding of fp32 timesteps [B] -> [B, dim], cos half first (diffusers' flip_sin_to_cos)."""
    half = dim // 2
    freqs = ms.Tensor(np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half), ms.float32)
    args = t.astype(ms.float32)[:, None] * freqs[None]
    return ops.cat([ops.cos(args), ops.sin(args)], axis=-1)
