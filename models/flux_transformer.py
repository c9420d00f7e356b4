"""The FLUX.1 transformer (dev and schnell) as MindSpore cells.

Parameter names and shapes are those of diffusers' `FluxTransformer2DModel`, so a diffusers-format
`transformer/` folder loads as it is. The forward pass is three separate steps, `embed`, `run_blocks`
and `head`: the cache policies of `fbcache_ms` replace `run_blocks` and nothing else.
"""
import dataclasses
from dataclasses import dataclass
from typing import Tuple

import mindspore as ms
from mindspore import lazy_inline, nn, ops
from mindspore.nn.utils import no_init_parameters

from models.checkpoint import CheckpointError, StateDict, load_weights, read_config
from models.layers import (Attention, RMSNorm, apply_rope, fast_paths, gelu_tanh, linear, modulated_layer_norm,
                           rope_frequencies, rope_over_heads, split_last, timestep_embedding)
from utils import resolve_dtype


@dataclass
class FluxConfig:
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: Tuple[int, ...] = (16, 56, 56)

    @classmethod
    def from_dict(cls, config):
        known = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in config.items() if k in known})
        cfg.axes_dims_rope = tuple(cfg.axes_dims_rope)
        if cfg.out_channels is None:
            cfg.out_channels = cfg.in_channels
        if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
            raise CheckpointError(f"axes_dims_rope {cfg.axes_dims_rope} must sum to attention_head_dim "
                                  f"{cfg.attention_head_dim}")
        return cfg

    @property
    def dim(self):
        return self.num_attention_heads * self.attention_head_dim


class MLPEmbedder(nn.Cell):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding and PixArtAlphaTextProjection)."""

    def __init__(self, in_dim, dim, dtype):
        super().__init__()
        self.linear_1 = linear(in_dim, dim, dtype)
        self.linear_2 = linear(dim, dim, dtype)

    def construct(self, x):
        return self.linear_2(ops.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Cell):
    """temb = MLP(timestep) [+ MLP(guidance)] + MLP(pooled CLIP text)."""

    def __init__(self, cfg: FluxConfig, dtype):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, cfg.dim, dtype)
        self.text_embedder = MLPEmbedder(cfg.pooled_projection_dim, cfg.dim, dtype)
        self.use_guidance = cfg.guidance_embeds
        if self.use_guidance:
            self.guidance_embedder = MLPEmbedder(256, cfg.dim, dtype)

    def construct(self, timestep, guidance, pooled):
        temb = self.timestep_embedder(timestep_embedding(timestep).astype(pooled.dtype))
        if self.use_guidance:
            temb = temb + self.guidance_embedder(timestep_embedding(guidance).astype(pooled.dtype))
        return temb + self.text_embedder(pooled)


class AdaNorm(nn.Cell):
    """Projects SiLU(temb) to `n` modulation vectors (shift, scale, gate, ...), in diffusers' order."""

    def __init__(self, dim, n, dtype):
        super().__init__()
        self.n = n
        self.linear = linear(dim, n * dim, dtype)

    def construct(self, temb):
        return split_last(self.linear(ops.silu(temb)), self.n)


class FeedForward(nn.Cell):
    def __init__(self, dim, dtype):
        super().__init__()
        self.net = nn.CellList([_Proj(dim, 4 * dim, dtype), nn.Identity(), linear(4 * dim, dim, dtype)])
        self.fused_gelu = fast_paths()

    def construct(self, x):
        return self.net[2](gelu_tanh(self.net[0](x), self.fused_gelu))


class _Proj(nn.Cell):
    # holds `proj` so the parameter is named ff.net.0.proj.* as in diffusers
    def __init__(self, in_dim, out_dim, dtype):
        super().__init__()
        self.proj = linear(in_dim, out_dim, dtype)

    def construct(self, x):
        return self.proj(x)


class SingleStreamAttention(nn.Cell):
    """Self-attention with per-head RMSNorm of q and k and RoPE; returns the un-projected output."""

    def __init__(self, dim, heads, head_dim, dtype):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = linear(dim, dim, dtype), linear(dim, dim, dtype), linear(dim, dim, dtype)
        self.norm_q, self.norm_k = RMSNorm(head_dim, 1e-6, dtype), RMSNorm(head_dim, 1e-6, dtype)
        self.attention = Attention(heads, head_dim)

    def _heads(self, x):
        return x.reshape(x.shape[0], x.shape[1], self.heads, -1)

    def qkv(self, x):
        return (self.norm_q(self._heads(self.to_q(x))), self.norm_k(self._heads(self.to_k(x))),
                self._heads(self.to_v(x)))

    def attend(self, q, k, v, cos, sin):
        return self.attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)

    def construct(self, x, cos, sin):
        q, k, v = self.qkv(x)
        return self.attend(q, k, v, cos, sin)


class DoubleStreamAttention(SingleStreamAttention):
    """Joint attention of the text and image streams, each with its own projections."""

    def __init__(self, dim, heads, head_dim, dtype):
        super().__init__(dim, heads, head_dim, dtype)
        self.add_q_proj = linear(dim, dim, dtype)
        self.add_k_proj = linear(dim, dim, dtype)
        self.add_v_proj = linear(dim, dim, dtype)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, 1e-6, dtype), RMSNorm(head_dim, 1e-6, dtype)
        self.to_out = nn.CellList([linear(dim, dim, dtype)])
        self.to_add_out = linear(dim, dim, dtype)

    def construct(self, x, c, cos, sin):
        """x: image tokens, c: text tokens (already modulated). Returns the pre-gate outputs of both."""
        txt_len = c.shape[1]
        q, k, v = self.qkv(x)
        q = ops.cat([self.norm_added_q(self._heads(self.add_q_proj(c))), q], 1)
        k = ops.cat([self.norm_added_k(self._heads(self.add_k_proj(c))), k], 1)
        v = ops.cat([self._heads(self.add_v_proj(c)), v], 1)
        out = self.attend(q, k, v, cos, sin)
        return self.to_out[0](out[:, txt_len:]), self.to_add_out(out[:, :txt_len])


def reused_graph(init):
    """A block class's graph is parsed, type-inferred and optimised once for all its blocks, then inlined into
    every call site (MindSpore's lazy_inline, "front" policy), instead of once per block: FLUX's 57 unrolled
    blocks made that most of the compile time. Blocks share the graph only when their `graph_key` (everything
    of the block that is a compile-time constant besides its Parameters) is equal."""
    return lazy_inline(init, attrs="graph_key", policy="front")


class DoubleStreamBlock(nn.Cell):
    """MM-DiT block: text and image tokens keep separate weights and meet in joint attention."""

    @reused_graph
    def __init__(self, dim, heads, head_dim, dtype):
        super().__init__()
        self.graph_key = (dim, heads, head_dim, str(dtype), fast_paths())
        self.norm1 = AdaNorm(dim, 6, dtype)
        self.norm1_context = AdaNorm(dim, 6, dtype)
        self.attn = DoubleStreamAttention(dim, heads, head_dim, dtype)
        self.ff = FeedForward(dim, dtype)
        self.ff_context = FeedForward(dim, dtype)
        self.clip_fp16 = dtype == ms.float16

    # The block in four steps; construct also returns the image stream's pre-gate attention and MLP outputs,
    # which per-module caches (TaylorSeer) keep and later re-gate with image_gates.
    def modulation(self, temb):
        """12 vectors [B, dim]: image stream's (shift, scale, gate) x (attn, mlp), then the text stream's."""
        return tuple(self.norm1(temb)) + tuple(self.norm1_context(temb))

    def image_gates(self, temb):
        """The image stream's attention and MLP gates: all of the modulation a forecast step uses."""
        mods = self.norm1(temb)
        return mods[2], mods[5]

    def attention_outputs(self, h, e, mods, cos, sin):
        return self.attn(modulated_layer_norm(h, mods[0], mods[1], 1e-6),
                         modulated_layer_norm(e, mods[6], mods[7], 1e-6), cos, sin)

    def mlp_outputs(self, h, e, mods):
        return (self.ff(modulated_layer_norm(h, mods[3], mods[4], 1e-6)),
                self.ff_context(modulated_layer_norm(e, mods[9], mods[10], 1e-6)))

    def add_gated(self, h, e, out_h, out_e, gate_h, gate_e):
        return h + gate_h[:, None] * out_h, e + gate_e[:, None] * out_e

    def clip(self, e):
        return ops.clamp(e, -65504.0, 65504.0) if self.clip_fp16 else e  # as diffusers, for fp16 only

    def construct(self, h, e, temb, cos, sin):
        """-> (h, e, the image stream's pre-gate attention and MLP outputs). Per-module caches keep the last
        two; a caller that drops them pays nothing in graph mode (unused outputs of an inlined block are pruned)."""
        mods = self.modulation(temb)
        attn_h, attn_e = self.attention_outputs(h, e, mods, cos, sin)
        h, e = self.add_gated(h, e, attn_h, attn_e, mods[2], mods[8])
        ff_h, ff_e = self.mlp_outputs(h, e, mods)
        h, e = self.add_gated(h, e, ff_h, ff_e, mods[5], mods[11])
        return h, self.clip(e), attn_h, ff_h


class SingleStreamBlock(nn.Cell):
    """Parallel attention + MLP over the concatenated [text; image] sequence."""

    @reused_graph
    def __init__(self, dim, heads, head_dim, dtype):
        super().__init__()
        self.graph_key = (dim, heads, head_dim, str(dtype), fast_paths())
        self.norm = AdaNorm(dim, 3, dtype)
        self.proj_mlp = linear(dim, 4 * dim, dtype)
        self.proj_out = linear(5 * dim, dim, dtype)
        self.attn = SingleStreamAttention(dim, heads, head_dim, dtype)
        self.clip_fp16 = dtype == ms.float16
        self.fused_gelu = fast_paths()

    def modulation(self, temb):
        return tuple(self.norm(temb))  # shift, scale, gate

    def gate(self, temb):
        return self.norm(temb)[2]

    def block_output(self, x, mods, cos, sin):
        """proj_out([attention, MLP]) before the gate: what per-module caches keep."""
        xm = modulated_layer_norm(x, mods[0], mods[1], 1e-6)
        mlp = gelu_tanh(self.proj_mlp(xm), self.fused_gelu)
        return self.proj_out(ops.cat([self.attn(xm, cos, sin), mlp], axis=-1))

    def add_gated(self, x, out, gate):
        x = x + gate[:, None] * out
        if self.clip_fp16:
            x = ops.clamp(x, -65504.0, 65504.0)
        return x

    def construct(self, x, temb, cos, sin):
        """-> (x, the pre-gate output proj_out(...)), which per-module caches keep."""
        mods = self.modulation(temb)
        out = self.block_output(x, mods, cos, sin)
        return self.add_gated(x, out, mods[2]), out


class FinalLayer(nn.Cell):
    """diffusers' norm_out (AdaLayerNormContinuous): note scale comes before shift here."""

    def __init__(self, dim, dtype):
        super().__init__()
        self.linear = linear(dim, 2 * dim, dtype)

    def construct(self, h, temb):
        scale, shift = split_last(self.linear(ops.silu(temb)), 2)
        return modulated_layer_norm(h, shift, scale, 1e-6)


class FluxTransformer(nn.Cell):
    def __init__(self, cfg: FluxConfig, dtype=ms.float32):
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        dim, heads, head_dim = cfg.dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.x_embedder = linear(cfg.in_channels, dim, dtype)
        self.context_embedder = linear(cfg.joint_attention_dim, dim, dtype)
        self.time_text_embed = TimeTextEmbedding(cfg, dtype)
        self.transformer_blocks = nn.CellList(
            [DoubleStreamBlock(dim, heads, head_dim, dtype) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.CellList(
            [SingleStreamBlock(dim, heads, head_dim, dtype) for _ in range(cfg.num_single_layers)])
        self.norm_out = FinalLayer(dim, dtype)
        self.proj_out = linear(dim, cfg.patch_size ** 2 * cfg.out_channels, dtype)

    def embed(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance):
        """Inputs as diffusers takes them -> (image tokens h, text tokens e, temb, rope cos, rope sin [S, H, D])."""
        h = self.x_embedder(hidden_states.astype(self.dtype))
        e = self.context_embedder(encoder_hidden_states.astype(self.dtype))
        temb = self.time_text_embed(timestep.astype(ms.float32) * 1000, guidance.astype(ms.float32) * 1000,
                                    pooled_projections.astype(self.dtype))
        cos, sin = rope_frequencies(ops.cat([txt_ids, img_ids], axis=0), self.config.axes_dims_rope, 10000)
        return (h, e, temb) + rope_over_heads(cos, sin, self.config.num_attention_heads)

    @property
    def num_blocks(self):
        return len(self.transformer_blocks) + len(self.single_transformer_blocks)

    def run_blocks(self, h, e, temb, cos, sin, start=0, stop=None):
        """Blocks start..stop-1 of the stack (double blocks first, then single): the part the caches replace.
        Image and text tokens go in and come out as separate streams."""
        n_double = len(self.transformer_blocks)
        stop = self.num_blocks if stop is None else stop
        # indexed, not sliced: a sliced CellList re-registers its parameters under graph mode
        for i in range(start, min(stop, n_double)):
            h, e = self.transformer_blocks[i](h, e, temb, cos, sin)[:2]
        if stop > n_double and stop > start:
            txt_len = e.shape[1]
            x = ops.cat([e, h], axis=1)
            for i in range(max(start, n_double) - n_double, stop - n_double):
                x = self.single_transformer_blocks[i](x, temb, cos, sin)[0]
            h, e = x[:, txt_len:], x[:, :txt_len]
        return h, e

    def head(self, h, temb):
        return self.proj_out(self.norm_out(h, temb))

    def construct(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                  guidance):
        """Velocity prediction [B, image tokens, out_channels]. `guidance` is ignored by schnell
        (guidance_embeds false) but always passed, so one signature serves both."""
        h, e, temb, cos, sin = self.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                          img_ids, txt_ids, guidance)
        h = self.run_blocks(h, e, temb, cos, sin)[0]
        return self.head(h, temb)


def load_flux_transformer(folder, dtype="float32"):
    """Build the transformer from a diffusers `transformer/` folder (config.json + safetensors)."""
    dtype = resolve_dtype(dtype)
    cfg = FluxConfig.from_dict(read_config(folder))
    state_dict = StateDict(folder)
    with no_init_parameters():
        model = FluxTransformer(cfg, dtype)
    load_weights(model, state_dict, dtype)
    model.set_train(False)
    return model
