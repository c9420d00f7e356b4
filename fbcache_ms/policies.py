"""Cache policies: cells that run one denoising step of the FLUX transformer with a cache.

Each policy replaces the transformer's block stack (`run_blocks`) and keeps its state in fixed-shape
Parameters of its own, so one policy instance serves one CFG branch at one input shape. Every input that
changes between steps or runs is a tensor: `step` (float32 step index), `threshold` (float32) and
`full` (bool, TaylorSeer's schedule, decided on the host), so nothing recompiles when they change.
The skip is a tensor `if`, which graph mode compiles to real control flow: a skipped branch costs nothing.

construct(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance,
          step, threshold, full) -> (velocity, computed, change): computed is True when the full stack ran;
change is FBCache's relative change of block 0's residual (-1 where a policy has no such signal).
"""
import mindspore as ms
from mindspore import nn, ops

from fbcache_ms.config import CacheConfig
from fbcache_ms.state import CacheState, Feature, TaylorFeature

EPS = 1e-8


class CachePolicy(CacheState):
    not_state = ("transformer",)  # shared, not copied: its weights are not state
    blocks_on_reuse = 0  # transformer blocks a reused step runs

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def blocks_run(self, computed):
        """Transformer blocks that ran at a step, from the step's `computed` flag."""
        cfg = self.transformer.config
        return cfg.num_layers + cfg.num_single_layers if computed else self.blocks_on_reuse


class FBCache(CachePolicy):
    """First-Block Cache (ParaAttention semantics), optionally with a Taylor forecast of the residual.

    Block 0 always runs; its image residual r1 is compared with r1 of the last fully computed step.
    Hit: the remaining blocks are replaced by the residuals stored at the last miss (or, with `order`
    set, by their Taylor forecast). Miss: everything runs and the residuals are stored.
    """

    blocks_on_reuse = 1

    def __init__(self, transformer, batch, image_tokens, text_tokens, order=None):
        super().__init__(transformer)
        dim, dtype = transformer.config.dim, transformer.dtype
        self.prev_r1 = Feature((batch, image_tokens, dim), dtype, "prev_r1")
        self.use_taylor = order is not None
        if self.use_taylor:
            self.res_h = TaylorFeature((batch, image_tokens, dim), dtype, order, "res_h")
            self.res_e = TaylorFeature((batch, text_tokens, dim), dtype, order, "res_e")
        else:
            self.res_h = Feature((batch, image_tokens, dim), dtype, "res_h")
            self.res_e = Feature((batch, text_tokens, dim), dtype, "res_e")
        self.filled = ms.Parameter(ms.Tensor(False), name="filled", requires_grad=False)  # a miss has stored

    def relative_change(self, r1):
        prev = self.prev_r1.value.astype(ms.float32)
        return ops.abs(prev - r1.astype(ms.float32)).mean() / (ops.abs(prev).mean() + EPS)

    def reused_residual(self, step):
        return self.res_h.forecast(step) if self.use_taylor else self.res_h.value

    def store(self, r1, res_h, res_e, step):
        self.prev_r1.store(r1)
        if self.use_taylor:
            self.res_h.update(res_h, step)
            self.res_e.update(res_e, step)
        else:
            self.res_h.store(res_h)
            self.res_e.store(res_e)
        ops.assign(self.filled, ms.Tensor(True))

    def construct(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                  guidance, step, threshold, full):
        t = self.transformer
        h, e, temb, cos, sin = t.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                       img_ids, txt_ids, guidance)
        h0, e0 = t.transformer_blocks[0](h, e, temb, cos, sin)
        r1 = h0 - h
        change = self.relative_change(r1)
        hit = self.filled & (step > 0) & (change < threshold)
        # read before the branch below stores: no reference yet means no signal
        change = ops.select(self.filled, change, ops.full_like(change, -1.0))
        if hit:
            # FLUX's head reads only the image stream, so the stored text residual is not needed here
            h_out = h0 + self.reused_residual(step)
        else:
            h_out, e_out = t.run_blocks(h0, e0, temb, cos, sin, first_double=1)
            self.store(r1, h_out - h0, e_out - e0, step)
        return t.head(h_out, temb), ops.logical_not(hit), change


class TaylorSeer(CachePolicy):
    """TaylorSeer: full steps on a fixed schedule, Taylor (Newton) forecasts in between.

    per_module: the pre-gate outputs of attention and MLP (both streams) of each double block and of
    proj_out of each single block are forecast; the current step's modulation gates are re-applied.
    residual: one forecast per stream of the whole block stack's residual.
    """

    def __init__(self, transformer, batch, image_tokens, text_tokens, order, variant):
        super().__init__(transformer)
        cfg, dtype = transformer.config, transformer.dtype
        dim = cfg.dim
        img, txt, joint = (batch, image_tokens, dim), (batch, text_tokens, dim), (batch, text_tokens + image_tokens, dim)
        self.per_module = variant == "per_module"
        if self.per_module:
            def features(shape, what, n):
                return nn.CellList([TaylorFeature(shape, dtype, order, f"{what}{i}") for i in range(n)])
            # pre-gate outputs: attention and MLP of both streams in double blocks, proj_out in single blocks
            self.attn = features(img, "attn", cfg.num_layers)
            self.attn_ctx = features(txt, "attn_ctx", cfg.num_layers)
            self.ff = features(img, "ff", cfg.num_layers)
            self.ff_ctx = features(txt, "ff_ctx", cfg.num_layers)
            self.single = features(joint, "single", cfg.num_single_layers)
        else:
            self.res_h = TaylorFeature(img, dtype, order, "res_h")

    def _per_module_stack(self, h, e, temb, cos, sin, step, full):
        """The block stack with every module's pre-gate output computed (full) or forecast."""
        t = self.transformer
        for block, s_attn, s_attn_ctx, s_ff, s_ff_ctx in zip(t.transformer_blocks, self.attn, self.attn_ctx,
                                                             self.ff, self.ff_ctx):
            mods = block.modulation(temb)
            if full:
                attn_h, attn_e = block.attention_outputs(h, e, mods, cos, sin)
                s_attn.update(attn_h, step)
                s_attn_ctx.update(attn_e, step)
            else:
                attn_h, attn_e = s_attn.forecast(step), s_attn_ctx.forecast(step)
            h, e = block.add_gated(h, e, attn_h, attn_e, mods[2], mods[8])
            if full:
                ff_h, ff_e = block.mlp_outputs(h, e, mods)
                s_ff.update(ff_h, step)
                s_ff_ctx.update(ff_e, step)
            else:
                ff_h, ff_e = s_ff.forecast(step), s_ff_ctx.forecast(step)
            h, e = block.add_gated(h, e, ff_h, ff_e, mods[5], mods[11])
            e = block.clip(e)
        txt_len = e.shape[1]
        x = ops.cat([e, h], axis=1)
        for block, state in zip(t.single_transformer_blocks, self.single):
            mods = block.modulation(temb)
            if full:
                out = block.block_output(x, mods, cos, sin)
                state.update(out, step)
            else:
                out = state.forecast(step)
            x = block.add_gated(x, out, mods[2])
        return x[:, txt_len:]

    def construct(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                  guidance, step, threshold, full):
        t = self.transformer
        h, e, temb, cos, sin = t.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                       img_ids, txt_ids, guidance)
        if self.per_module:
            if full:
                h_out = self._per_module_stack(h, e, temb, cos, sin, step, True)
            else:
                h_out = self._per_module_stack(h, e, temb, cos, sin, step, False)
        else:
            if full:
                h_out, _ = t.run_blocks(h, e, temb, cos, sin)
                self.res_h.update(h_out - h, step)
            else:
                h_out = h + self.res_h.forecast(step)
        return t.head(h_out, temb), full, ms.Tensor(-1.0, ms.float32)


def make_policy(config: CacheConfig, transformer, batch, image_tokens, text_tokens):
    """The policy cell for `config` at one input shape, with freshly allocated (zeroed) state."""
    if config.uses_fbcache:
        order = config.order if config.uses_taylor else None
        return FBCache(transformer, batch, image_tokens, text_tokens, order)
    if config.method == "taylorseer":
        return TaylorSeer(transformer, batch, image_tokens, text_tokens, config.order, config.variant)
    raise ValueError(f"no cache policy for method {config.method!r}")
