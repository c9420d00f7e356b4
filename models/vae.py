"""FLUX.1 VAE decoder (diffusers `AutoencoderKL`, decode path only) as a portable MindSpore cell.

The math follows diffusers 0.36 `AutoencoderKL.decode` (no tiling, no slicing):

    z -> [post_quant_conv] -> decoder.conv_in -> mid block (resnet, self-attention, resnet)
      -> up blocks (layers_per_block + 1 resnets, then 2x nearest upsample + 3x3 conv, except the last)
      -> conv_norm_out (GroupNorm, eps 1e-6) -> SiLU -> conv_out

Only ops with CPU kernels that also exist on Ascend are used: `ops.conv2d`, `ops.group_norm`, `ops.dense`,
`ops.bmm`, `ops.softmax`, `ops.silu`, `ops.interpolate` (nearest). The cell runs in
PyNative and compiled (`ms.jit` or GRAPH_MODE); GroupNorm statistics and the attention softmax are computed
in float32 whatever the model dtype, so float16 keeps its accuracy.

Parameter names equal diffusers' state-dict names (`decoder.*`, `post_quant_conv.*`), so a `vae/` folder
written by diffusers' `save_pretrained` loads as it is; the encoder's tensors in the file are ignored.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter

from models.checkpoint import CheckpointError, StateDict, load_weights, read_config
from utils import resolve_dtype

# Checkpoint prefixes a decoder does not use (the encoder half of the autoencoder).
_ENCODER_PREFIXES = ("encoder.", "quant_conv.")
# Pre-0.14 diffusers attention-block names, renamed on load the way diffusers itself does it.
_LEGACY_ATTENTION_NAMES = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}


def _zeros(shape, dtype):
    return Parameter(ms.Tensor(np.zeros(shape, np.float32), dtype))


class Conv2d(nn.Cell):
    """Stride-1 2-D convolution with 'same' zero padding (kernel 1 or 3 here); weight [out, in, k, k]."""

    def __init__(self, in_channels, out_channels, kernel_size, dtype=ms.float32):
        super().__init__()
        self.weight = _zeros((out_channels, in_channels, kernel_size, kernel_size), dtype)
        self.bias = _zeros((out_channels,), dtype)
        self.padding = kernel_size // 2

    def construct(self, x):
        if self.padding == 0:
            return ops.conv2d(x, self.weight, self.bias, 1, "valid", 0)
        return ops.conv2d(x, self.weight, self.bias, 1, "pad", self.padding)


class Linear(nn.Cell):
    """y = x W^T + b with torch's [out, in] weight layout."""

    def __init__(self, in_features, out_features, dtype=ms.float32):
        super().__init__()
        self.weight = _zeros((out_features, in_features), dtype)
        self.bias = _zeros((out_features,), dtype)

    def construct(self, x):
        return ops.dense(x, self.weight, self.bias)


class GroupNorm(nn.Cell):
    """torch.nn.GroupNorm (affine) over [B, C, ...]; statistics and normalisation in float32."""

    def __init__(self, num_groups, num_channels, eps=1e-6, dtype=ms.float32):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = Parameter(ms.Tensor(np.ones((num_channels,), np.float32), dtype))
        self.bias = _zeros((num_channels,), dtype)

    def construct(self, x):
        y = ops.group_norm(x.astype(ms.float32), self.num_groups, self.weight.astype(ms.float32),
                           self.bias.astype(ms.float32), self.eps)
        return y.astype(x.dtype)


class ResnetBlock2D(nn.Cell):
    """diffusers ResnetBlock2D without time embedding: norm1-SiLU-conv1-norm2-SiLU-conv2 plus (1x1) shortcut."""

    def __init__(self, in_channels, out_channels, groups, eps=1e-6, dtype=ms.float32):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps, dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, dtype)
        self.norm2 = GroupNorm(groups, out_channels, eps, dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, dtype)
        self.use_shortcut = in_channels != out_channels
        if self.use_shortcut:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1, dtype)

    def construct(self, x):
        h = self.conv1(ops.silu(self.norm1(x)))
        h = self.conv2(ops.silu(self.norm2(h)))  # dropout is identity at inference
        if self.use_shortcut:
            x = self.conv_shortcut(x)
        return x + h


class SpatialSelfAttention(nn.Cell):
    """diffusers Attention as the VAE mid block builds it: one head over all H*W positions, GroupNorm in
    front, residual connection, rescale_output_factor 1."""

    def __init__(self, channels, groups, eps=1e-6, dtype=ms.float32):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps, dtype)
        self.to_q = Linear(channels, channels, dtype)
        self.to_k = Linear(channels, channels, dtype)
        self.to_v = Linear(channels, channels, dtype)
        self.to_out = nn.CellList([Linear(channels, channels, dtype)])
        self.scale = float(channels) ** -0.5

    def construct(self, x):
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).swapaxes(1, 2)  # [B, N, C]
        q = self.to_q(tokens) * self.scale
        k = self.to_k(tokens)
        v = self.to_v(tokens)
        scores = ops.bmm(q, k.swapaxes(1, 2))  # [B, N, N]
        probs = ops.softmax(scores.astype(ms.float32), -1).astype(v.dtype)
        out = self.to_out[0](ops.bmm(probs, v))  # [B, N, C]
        return out.swapaxes(1, 2).reshape(b, c, h, w) + x


class UNetMidBlock2D(nn.Cell):
    def __init__(self, channels, groups, add_attention=True, dtype=ms.float32):
        super().__init__()
        self.add_attention = add_attention
        self.resnets = nn.CellList([ResnetBlock2D(channels, channels, groups, dtype=dtype),
                                    ResnetBlock2D(channels, channels, groups, dtype=dtype)])
        if add_attention:
            self.attentions = nn.CellList([SpatialSelfAttention(channels, groups, dtype=dtype)])

    def construct(self, x):
        x = self.resnets[0](x)
        if self.add_attention:
            x = self.attentions[0](x)
        return self.resnets[1](x)


def upsample_nearest_2x(x):
    """F.interpolate(x, scale_factor=2, mode="nearest") on [B, C, H, W] (pixel (i, j) <- (i // 2, j // 2)).

    ops.interpolate has CPU and Ascend kernels in PyNative and graph mode, and is ~10x faster on CPU than
    the equivalent broadcast_to + reshape."""
    _, _, h, w = x.shape
    return ops.interpolate(x, size=(h * 2, w * 2), mode="nearest")


class Upsample2D(nn.Cell):
    def __init__(self, channels, dtype=ms.float32):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, dtype)

    def construct(self, x):
        return self.conv(upsample_nearest_2x(x))


class UpDecoderBlock2D(nn.Cell):
    def __init__(self, in_channels, out_channels, num_layers, groups, add_upsample, dtype=ms.float32):
        super().__init__()
        self.resnets = nn.CellList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, dtype=dtype)
            for i in range(num_layers)])
        self.add_upsample = add_upsample
        if add_upsample:
            self.upsamplers = nn.CellList([Upsample2D(out_channels, dtype)])

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.add_upsample:
            x = self.upsamplers[0](x)
        return x


class Decoder(nn.Cell):
    """diffusers `autoencoders.vae.Decoder` with norm_type "group" (the AutoencoderKL decoder)."""

    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups,
                 mid_block_add_attention=True, dtype=ms.float32):
        super().__init__()
        channels = list(reversed(block_out_channels))
        self.conv_in = Conv2d(in_channels, channels[0], 3, dtype)
        self.mid_block = UNetMidBlock2D(channels[0], norm_num_groups, mid_block_add_attention, dtype)
        blocks = []
        previous = channels[0]
        for i, ch in enumerate(channels):
            blocks.append(UpDecoderBlock2D(previous, ch, layers_per_block + 1, norm_num_groups,
                                           add_upsample=i != len(channels) - 1, dtype=dtype))
            previous = ch
        self.up_blocks = nn.CellList(blocks)
        self.conv_norm_out = GroupNorm(norm_num_groups, block_out_channels[0], 1e-6, dtype)
        self.conv_out = Conv2d(block_out_channels[0], out_channels, 3, dtype)

    def construct(self, x):
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(ops.silu(self.conv_norm_out(x)))


class AutoencoderKLDecoder(nn.Cell):
    """The decode half of diffusers' `AutoencoderKL`, built from its config dict.

    `construct(z)` equals `AutoencoderKL.decode(z).sample` (z channels-first [B, latent_channels, h, w],
    output [B, out_channels, h * vae_scale_factor, w * vae_scale_factor] in about [-1, 1]). It does not
    undo the latent normalisation: use `decode_latents` (or `denormalize` first) for pipeline latents.
    """

    def __init__(self, config, dtype=ms.float32):
        super().__init__()
        dtype = resolve_dtype(dtype)
        config = dict(config)
        up_types = list(config.get("up_block_types", ["UpDecoderBlock2D"]))
        block_out_channels = list(config.get("block_out_channels", [64]))
        if any(t != "UpDecoderBlock2D" for t in up_types):
            raise ValueError(f"unsupported up_block_types {up_types}: only UpDecoderBlock2D is implemented")
        if len(up_types) != len(block_out_channels):
            raise ValueError(f"{len(up_types)} up_block_types for {len(block_out_channels)} block_out_channels")
        if config.get("act_fn", "silu") not in ("silu", "swish"):
            raise ValueError(f"unsupported act_fn {config.get('act_fn')!r}: only silu is implemented")
        self.config = config
        self.dtype = dtype
        self.latent_channels = int(config.get("latent_channels", 4))
        self.scaling_factor = float(config.get("scaling_factor", 0.18215))
        shift = config.get("shift_factor")
        self.shift_factor = None if shift is None else float(shift)
        self.vae_scale_factor = 2 ** (len(block_out_channels) - 1)
        self.use_post_quant_conv = bool(config.get("use_post_quant_conv", True))
        if self.use_post_quant_conv:
            self.post_quant_conv = Conv2d(self.latent_channels, self.latent_channels, 1, dtype)
        self.decoder = Decoder(self.latent_channels, int(config.get("out_channels", 3)), block_out_channels,
                               int(config.get("layers_per_block", 1)), int(config.get("norm_num_groups", 32)),
                               bool(config.get("mid_block_add_attention", True)), dtype)

    def construct(self, z):
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, z):
        """`AutoencoderKL.decode(z).sample`: z is cast to the model dtype."""
        return self(z.astype(self.dtype))

    def denormalize(self, latents):
        """Undo the latent normalisation: `latents / scaling_factor + shift_factor` (shift optional)."""
        latents = latents / self.scaling_factor
        if self.shift_factor is not None:
            latents = latents + self.shift_factor
        return latents


def decode_latents(vae, latents):
    """The FLUX pipeline's last step before postprocessing: denormalise [B, C, h, w] latents and decode.

    Same as diffusers' `vae.decode(latents / scaling_factor + shift_factor).sample`; output [B, 3, H, W]
    in about [-1, 1], in the VAE's dtype.
    """
    if not isinstance(latents, ms.Tensor):
        latents = ms.Tensor(np.asarray(latents))
    return vae.decode(vae.denormalize(latents.astype(vae.dtype)))


def _as_numpy(images):
    return images.asnumpy() if isinstance(images, ms.Tensor) else np.asarray(images)


def to_float_images(images):
    """diffusers VaeImageProcessor.postprocess(output_type="np"): [B, C, H, W] in [-1, 1] ->
    float32 [B, H, W, C] in [0, 1] (denormalised and clamped in the input dtype, then widened)."""
    x = _as_numpy(images)
    x = np.clip(x * x.dtype.type(0.5) + x.dtype.type(0.5), 0, 1)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).astype(np.float32)


def to_uint8_images(images):
    """The pixels of postprocess(output_type="pil"): `(to_float_images(x) * 255).round()` as uint8
    [B, H, W, C] (numpy round, half to even, as diffusers' numpy_to_pil)."""
    return (to_float_images(images) * 255).round().astype(np.uint8)


def _legacy_attention_rename(cell, state_dict):
    """Map `...attentions.0.to_q.weight` to `...attentions.0.query.weight` etc. where only the old
    (pre-0.14 diffusers) attention names are in the checkpoint."""
    rename = {}
    for name, _ in cell.parameters_and_names():
        if ".attentions." not in name or name in state_dict:
            continue
        for new, old in _LEGACY_ATTENTION_NAMES.items():
            if new in name and name.replace(new, old) in state_dict:
                rename[name] = name.replace(new, old)
    return rename


def load_vae(folder, dtype=ms.float32):
    """Build `AutoencoderKLDecoder` from a diffusers `vae/` folder (config.json + safetensors, possibly
    sharded with an index json) and load its weights in `dtype` (a MindSpore dtype or its name).

    Raises CheckpointError when the folder, config, weight files or a decoder tensor is missing or a
    shape does not fit the config.
    """
    dtype = resolve_dtype(dtype)
    config = read_config(folder)
    cls = config.get("_class_name")
    if cls not in (None, "AutoencoderKL"):
        raise CheckpointError(f"{folder!r} holds a {cls}, not an AutoencoderKL")
    state_dict = StateDict(folder)
    vae = AutoencoderKLDecoder(config, dtype)
    load_weights(vae, state_dict, dtype, rename=_legacy_attention_rename(vae, state_dict),
                 ignore_unexpected=_ENCODER_PREFIXES)
    vae.set_train(False)
    return vae
