"""T5 v1.1 encoder (FLUX's `text_encoder_2`) as a portable MindSpore cell.

Parameter names equal transformers' `T5EncoderModel` state-dict names, so a `save_pretrained`
folder loads as it is. Only ops with CPU kernels that also exist on Ascend are used.

Precision follows transformers' fp16 recipe: the residual stream, layer-norm variance, attention
softmax and the FFN output projection `wo` (kept in fp32 like `_keep_in_fp32_modules`) are fp32;
the other matmuls run in the model dtype. T5 v1.1 activations overflow fp16 otherwise.
"""
import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops


def relative_position_buckets(max_distance, num_buckets):
    """Bucket of every relative position in [-max_distance, max_distance] (bidirectional T5 buckets).

    Beyond +-max_distance every position falls in the last bucket of its side, so this table covers
    any sequence length once positions are clipped. Computed in fp32 like transformers, so bucket
    edges (where the log lands on an integer) round the same way.
    """
    rel = np.arange(-max_distance, max_distance + 1)
    half = num_buckets // 2  # one half per direction
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2  # small distances get one bucket each, larger ones log-spaced buckets
    log_ratio = np.log(np.maximum(dist, max_exact).astype(np.float32) / np.float32(max_exact))
    large = max_exact + (log_ratio / np.float32(math.log(max_distance / max_exact))
                         * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(dist < max_exact, dist, large)).astype(np.int32)


class T5LayerNorm(nn.Cell):
    """RMS norm: no mean subtraction, no bias; variance in fp32."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = ms.Parameter(ops.ones((dim,), ms.float32))
        self.eps = eps

    def construct(self, x):
        x = x.astype(ms.float32)
        x = x * ops.rsqrt((x * x).mean(-1, keep_dims=True) + self.eps)
        return self.weight * x.astype(self.weight.dtype)


class T5Embedding(nn.Cell):
    def __init__(self, num, dim):
        super().__init__()
        self.weight = ms.Parameter(ops.zeros((num, dim), ms.float32))

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class T5RelativeBias(nn.Cell):
    """Learned per-head bias for each relative-position bucket: [1, heads, L, L]."""

    def __init__(self, num_buckets, max_distance, heads):
        super().__init__()
        self.weight = ms.Parameter(ops.zeros((num_buckets, heads), ms.float32))
        self.max_distance = max_distance
        self.buckets = ms.Tensor(relative_position_buckets(max_distance, num_buckets))

    def construct(self, seq_len_like):
        pos = ops.arange(seq_len_like.shape[1], dtype=ms.int32)
        rel = ops.clip_by_value(pos[None, :] - pos[:, None], -self.max_distance, self.max_distance)  # key - query
        buckets = ops.gather(self.buckets, rel + self.max_distance, 0)
        bias = ops.gather(self.weight, buckets, 0)  # [L, L, heads]
        return bias.astype(ms.float32).transpose(2, 0, 1)[None]


class T5Attention(nn.Cell):
    def __init__(self, cfg, has_relative_bias=False):
        super().__init__()
        self.heads, self.d_kv = cfg["num_heads"], cfg["d_kv"]
        inner = self.heads * self.d_kv
        self.q = nn.Dense(cfg["d_model"], inner, has_bias=False)
        self.k = nn.Dense(cfg["d_model"], inner, has_bias=False)
        self.v = nn.Dense(cfg["d_model"], inner, has_bias=False)
        self.o = nn.Dense(inner, cfg["d_model"], has_bias=False)
        if has_relative_bias:  # only block 0 holds the table; its bias is shared by all layers
            self.relative_attention_bias = T5RelativeBias(
                cfg["relative_attention_num_buckets"], cfg["relative_attention_max_distance"], self.heads)

    def _heads(self, x):
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.d_kv).transpose(0, 2, 1, 3)

    def construct(self, x, position_bias):
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        # T5 folds the 1/sqrt(d) scale into its initialisation: no scaling here
        scores = ops.matmul(q, k.transpose(0, 1, 3, 2)).astype(ms.float32) + position_bias
        weights = ops.softmax(scores, -1).astype(v.dtype)
        out = ops.matmul(weights, v).transpose(0, 2, 1, 3)
        b, n = out.shape[0], out.shape[1]
        return self.o(out.reshape(b, n, self.heads * self.d_kv))


class T5LayerSelfAttention(nn.Cell):
    def __init__(self, cfg, has_relative_bias=False):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_bias)
        self.layer_norm = T5LayerNorm(cfg["d_model"], cfg["layer_norm_epsilon"])

    def construct(self, x, position_bias):
        return x + self.SelfAttention(self.layer_norm(x), position_bias).astype(x.dtype)


class T5DenseGatedActDense(nn.Cell):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.wi_0 = nn.Dense(d_model, d_ff, has_bias=False)
        self.wi_1 = nn.Dense(d_model, d_ff, has_bias=False)
        self.wo = nn.Dense(d_ff, d_model, has_bias=False)

    def construct(self, x):
        h = ops.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)  # gelu_new is the tanh approximation
        return self.wo(h.astype(self.wo.weight.dtype))


class T5LayerFF(nn.Cell):
    def __init__(self, cfg):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg["d_model"], cfg["d_ff"])
        self.layer_norm = T5LayerNorm(cfg["d_model"], cfg["layer_norm_epsilon"])

    def construct(self, x):
        return x + self.DenseReluDense(self.layer_norm(x)).astype(x.dtype)


class T5Block(nn.Cell):
    def __init__(self, cfg, has_relative_bias=False):
        super().__init__()
        self.layer = nn.CellList([T5LayerSelfAttention(cfg, has_relative_bias), T5LayerFF(cfg)])

    def construct(self, x, position_bias):
        return self.layer[1](self.layer[0](x, position_bias))


class T5Stack(nn.Cell):
    def __init__(self, cfg):
        super().__init__()
        self.block = nn.CellList([T5Block(cfg, has_relative_bias=i == 0) for i in range(cfg["num_layers"])])
        self.final_layer_norm = T5LayerNorm(cfg["d_model"], cfg["layer_norm_epsilon"])

    def construct(self, x):
        # the checkpoint keeps the bias table in block 0; every layer adds the same bias
        position_bias = self.block[0].layer[0].SelfAttention.relative_attention_bias(x)
        x = x.astype(ms.float32)  # fp32 residual stream
        for block in self.block:
            x = block(x, position_bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nn.Cell):
    """input_ids [B, L] (int32/int64, no attention mask: FLUX pads to max length) -> last hidden state [B, L, d_model]."""

    def __init__(self, config):
        super().__init__()
        cfg = t5_config(config)
        self.shared = T5Embedding(cfg["vocab_size"], cfg["d_model"])
        self.encoder = T5Stack(cfg)

    def construct(self, input_ids):
        return self.encoder(self.shared(input_ids))


def t5_config(config):
    """The fields of a transformers T5Config dict this encoder uses, with transformers' defaults."""
    ff = config.get("feed_forward_proj", "relu")
    if ff != "gated-gelu":
        raise ValueError(f"T5 feed_forward_proj {ff!r} is not supported: only T5 v1.1 'gated-gelu' (FLUX's T5-XXL)")
    if config.get("is_decoder", False):
        raise ValueError("this is the T5 encoder: a decoder config is not supported")
    d_model = config.get("d_model", 512)
    return {
        "vocab_size": config.get("vocab_size", 32128),
        "d_model": d_model,
        "d_kv": config.get("d_kv", 64),
        "d_ff": config.get("d_ff", 2048),
        "num_layers": config.get("num_layers", 6),
        "num_heads": config.get("num_heads", 8),
        "relative_attention_num_buckets": config.get("relative_attention_num_buckets", 32),
        "relative_attention_max_distance": config.get("relative_attention_max_distance", 128),
        "layer_norm_epsilon": config.get("layer_norm_epsilon", 1e-6),
    }
