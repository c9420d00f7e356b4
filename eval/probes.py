"""Probes: cells that run one uncached step of the transformer and return, beside the velocity, the tensors an
analysis reads (the signals the caches compare, every block's residual). Graph mode compiles a probe with its
read function, so the functions here import at module level."""
from mindspore import nn, ops

from models.layers import modulated_layer_norm


def probe_cell(transformer, read):
    """A cell of the transformer's inputs: it embeds them and returns read(transformer, h, e, temb, cos, sin) ->
    (velocity, *tensors)."""

    class Probe(nn.Cell):
        def __init__(self, t):
            super().__init__()
            self.t = t

        def construct(self, x, embeds, pooled, timestep, img_ids, txt_ids, guidance):
            return read(self.t, *self.t.embed(x, embeds, pooled, timestep, img_ids, txt_ids, guidance))

    return Probe(transformer)


def read_signals(t, h, e, temb, cos, sin):
    """The velocity, block 0's modulated input (TeaCache), block 0's image residual (FBCache) and the stack's
    image residual (MagCache)."""
    block0 = t.transformer_blocks[0]
    mods = block0.modulation(temb)
    modulated = modulated_layer_norm(h, mods[0], mods[1], 1e-6)
    h0, e0 = block0(h, e, temb, cos, sin)[:2]
    h_out = t.run_blocks(h0, e0, temb, cos, sin, 1)[0]
    return t.head(h_out, temb), modulated, h0 - h, h_out - h


def read_block_residuals(t, h, e, temb, cos, sin):
    """The velocity, the stack's image input and every block's residual, [blocks, B, text + image tokens, dim] (a
    double block's text and image streams side by side)."""
    h_in, residuals = h, []
    for block in t.transformer_blocks:
        h_new, e_new = block(h, e, temb, cos, sin)[:2]
        residuals.append(ops.cat([e_new - e, h_new - h], axis=1))
        h, e = h_new, e_new
    txt_len = e.shape[1]
    x = ops.cat([e, h], axis=1)
    for block in t.single_transformer_blocks:
        x_new = block(x, temb, cos, sin)[0]
        residuals.append(x_new - x)
        x = x_new
    return t.head(x[:, txt_len:], temb), h_in, ops.stack(residuals)


def read_stack_io(t, h, e, temb, cos, sin):
    """The velocity, the block stack's image input and its image residual (FastCache's static-token map)."""
    h_out = t.run_blocks(h, e, temb, cos, sin)[0]
    return t.head(h_out, temb), h, h_out - h
