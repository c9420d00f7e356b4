"""Building blocks from ops that have both CPU and Ascend kernels (see mindspore-notes.md), and the one
device dispatch: fused Ascend kernels (flash attention, RMSNorm, GeLU) where they exist, the portable math elsewhere.
A cell reads the switch when it is built; `eval/ascend_smoke.py` builds the model both ways on a 910 and
compares them, and the tests check the portable math against the formulas the fused kernels compute."""
import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from utils import on_ascend

_FAST_PATHS = None  # None: on Ascend only


def fast_paths():
    """Whether cells built now use the fused Ascend kernels."""
    return on_ascend() if _FAST_PATHS is None else _FAST_PATHS


def set_fast_paths(enabled):
    """Force the fused kernels on (Ascend only) or off for the cells built after this call; None: automatic."""
    global _FAST_PATHS
    if enabled and not on_ascend():
        raise RuntimeError("the fused fast paths (flash attention, RMSNorm, GeLU) have Ascend kernels only")
    _FAST_PATHS = enabled


def linear(in_dim, out_dim, dtype, bias=True):
    # zeros, not random: the checkpoint overwrites every weight, and random init of 12B params is slow
    return nn.Dense(in_dim, out_dim, weight_init="zeros", bias_init="zeros", has_bias=bias, dtype=dtype)


def _layer_norm_kernel(x, gamma, beta, eps):
    """The fused LayerNorm kernel (CPU and Ascend) over the last axis, in fp32 like torch does for fp16."""
    out, _, _ = ops.LayerNorm(-1, -1, eps)(x.astype(ms.float32), gamma.astype(ms.float32), beta.astype(ms.float32))
    return out.astype(x.dtype)


def layer_norm(x, eps):
    """LayerNorm over the last axis without affine parameters: one kernel instead of the ~8 element-wise ops."""
    dim = x.shape[-1]
    return _layer_norm_kernel(x, ops.ones(dim, ms.float32), ops.zeros(dim, ms.float32), eps)


def modulated_layer_norm(x, shift, scale, eps):
    """modulate(layer_norm(x), shift, scale) for x [B, S, D], shift / scale [B, D]. With one image the modulation
    is the LayerNorm kernel's own affine (gamma = 1 + scale, beta = shift): one kernel instead of three, the
    broadcasting element-wise ops being the slow ones on CPU."""
    if x.shape[0] != 1:
        return modulate(layer_norm(x, eps), shift, scale)
    return _layer_norm_kernel(x, 1 + scale[0], shift[0], eps)


class RMSNorm(nn.Cell):
    def __init__(self, dim, eps, dtype):
        super().__init__()
        self.eps = eps
        self.weight = ms.Parameter(ops.ones(dim, dtype), name="weight")
        self.fused = fast_paths()

    def construct(self, x):
        if self.fused:
            return ops.rms_norm(x, self.weight, self.eps)[0]
        shape, dtype = x.shape, x.dtype
        x = x.astype(ms.float32).reshape(-1, shape[-1])  # a 2-D reduction: ~30% faster on CPU
        x = x * ops.rsqrt((x * x).mean(-1, keep_dims=True) + self.eps)
        return x.reshape(shape).astype(dtype) * self.weight


_GELU_A = 2 * math.sqrt(2 / math.pi)
_GELU_B = _GELU_A * 0.044715


def gelu_tanh(x, fused=False):
    """tanh-approximated GELU. fused: the GeLU kernel (Ascend); otherwise its exact rewrite
    0.5 x (1 + tanh(z)) = x sigmoid(2z), which MindSpore's CPU kernels run 3x faster than ops.gelu."""
    if fused:
        return ops.gelu(x, approximate="tanh")
    return x * ops.sigmoid(x * (_GELU_A + _GELU_B * x * x))


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
        self.use_flash = fast_paths()
        self.scores = ops.BatchMatMul(transpose_b=True)  # q k^T without materialising k^T

    def construct(self, q, k, v):
        b, s, h, d = q.shape
        if self.use_flash:
            out = ops.flash_attention_score(q, k, v, h, scalar_value=self.scale, input_layout="BSND")
            return out.reshape(b, s, h * d)
        # the scale on q (S x D values) rather than on the scores (S x S)
        q, k, v = (q * self.scale).transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        probs = ops.softmax(self.scores(q, k).astype(ms.float32), axis=-1).astype(v.dtype)
        out = ops.matmul(probs, v)
        return out.transpose(0, 2, 1, 3).reshape(b, s, h * d)


def rope_frequencies(ids, axes_dim, theta):
    """RoPE tables [N, sum(axes_dim)] for position ids [N, n_axes]: cos, and sin with the rotation's sign folded
    in (-sin on the first channel of each pair, +sin on the second), each frequency twice (pairs)."""
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dim):
        omega = ms.Tensor(1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim), ms.float32)
        angles = ids[:, axis:axis + 1].astype(ms.float32) * omega[None]
        n = angles.shape[0]
        cos_parts.append(ops.stack([ops.cos(angles)] * 2, axis=-1).reshape(n, dim))
        sin_parts.append(ops.stack([-ops.sin(angles), ops.sin(angles)], axis=-1).reshape(n, dim))
    return ops.cat(cos_parts, axis=-1), ops.cat(sin_parts, axis=-1)


def _pair_swap(d):
    """[d, d] permutation: x @ P swaps the channels of each consecutive pair, (x0, x1) -> (x1, x0)."""
    p = np.zeros((d, d), np.float32)
    p[np.arange(1, d, 2), np.arange(0, d, 2)] = 1
    p[np.arange(0, d, 2), np.arange(1, d, 2)] = 1
    return p


def rope_over_heads(cos, sin, heads):
    """The RoPE tables [S, D] broadcast once per forward to [S, heads, D]: every block's rotation is then an
    element-wise op over equal shapes (CPU: 1.5x faster than broadcasting inside each block)."""
    s, d = cos.shape
    return ops.broadcast_to(cos[:, None], (s, heads, d)), ops.broadcast_to(sin[:, None], (s, heads, d))


def apply_rope(x, cos, sin):
    """Rotate consecutive channel pairs of x [B, S, H, D] by the angles in cos / signed sin [S, H, D], in fp32:
    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin). The pair swap is a matmul with a permutation (exact: one
    product by 1 and zeros per output), 3x faster on CPU than slicing and stacking the pairs."""
    b, s, h, d = x.shape
    dtype, x = x.dtype, x.astype(ms.float32)
    swapped = ops.matmul(x.reshape(-1, d), ms.Tensor(_pair_swap(d))).reshape(b, s, h, d)
    return (x * cos[None] + swapped * sin[None]).astype(dtype)


def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal embedding of fp32 timesteps [B] -> [B, dim], cos half first (diffusers' flip_sin_to_cos)."""
    half = dim // 2
    freqs = ms.Tensor(np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half), ms.float32)
    args = t.astype(ms.float32)[:, None] * freqs[None]
    return ops.cat([ops.cos(args), ops.sin(args)], axis=-1)
