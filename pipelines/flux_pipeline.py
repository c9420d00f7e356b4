"""FLUX.1 text-to-image generation: prompt encoding, the denoising loop and decoding.

Mirrors diffusers' FluxPipeline (same tokenisation, latent packing, schedule and true-CFG rule), so that a
run can be compared with diffusers noise for noise by passing the same packed `latents`.
"""
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import ops
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTokenizer, T5TokenizerFast

from fbcache_ms.config import CacheConfig
from fbcache_ms.policies import make_policy
from fbcache_ms.stats import CacheStats
from models.checkpoint import CheckpointError
from models.flux_transformer import load_flux_transformer
from models.text_encoders import load_clip_text_encoder, load_t5_encoder
from models.vae import load_vae, to_uint8_images
from pipelines.compile_cache import DiskCompiled, mindspores_own_cache_is_on
from pipelines.scheduling import euler_step, flux_timesteps, load_scheduler
from utils import resolve_dtype

SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
MODES = ("graph", "pynative")
OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass
class PipelineOutput:
    images: object  # list of PIL images, uint8 array [B, H, W, 3], or packed latents [B, tokens, channels]
    timings: dict = field(default_factory=dict)  # seconds: encode, denoise (total), steps (list), decode
    cache_stats: Optional[CacheStats] = None  # per-step computed / reused, when a cache ran


def _compiled(fn, mode, compile_cache=None, cell=None, identity=None):
    """fn compiled (graph mode), through the on-disk compile cache when a folder is given."""
    if mode != "graph":
        return fn
    return ms.jit(fn) if compile_cache is None else DiskCompiled(fn, compile_cache, cell, identity)


def _config_of(cell):
    config = getattr(cell, "config", None)
    return repr(sorted(vars(config).items())) if config is not None and hasattr(config, "__dict__") else repr(config)


def pack_latents(latents):
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: 2x2 latent patches become tokens (diffusers' layout)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack_latents(latents, height, width):
    """Inverse of `pack_latents` for a latent grid of height x width."""
    b, _, d = latents.shape
    c = d // 4
    return latents.reshape(b, height // 2, width // 2, c, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def latent_image_ids(height, width):
    """Position ids [(H/2)(W/2), 3] of the packed tokens: (0, row, column)."""
    ids = np.zeros((height // 2, width // 2, 3), np.float32)
    ids[..., 1] = np.arange(height // 2)[:, None]
    ids[..., 2] = np.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def _as_list(prompt, what):
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
    if not prompts:
        raise ValueError(f"{what} is empty: give a string or a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{what} must be a string or a list of strings")
    return prompts


def _tokenize(tokenizer, prompts, max_length, name):
    """Token ids padded to max_length, as diffusers does; says when a prompt loses its end."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np").input_ids
    lengths = [len(x) for x in tokenizer(prompts, truncation=False).input_ids]
    cut = [p for p, n in zip(prompts, lengths) if n > max_length]
    if cut:
        warnings.warn(f"{len(cut)} prompt(s) longer than the {name} limit of {max_length} tokens were truncated, "
                      f"e.g. {cut[0][:80]!r}", stacklevel=3)
    return ids


def _default_steps(scheduler_config):
    return 28 if scheduler_config.get("use_dynamic_shifting") else 4


def _default_size(vae_config):
    sample = vae_config.get("sample_size", 1024)
    return int(sample[0] if isinstance(sample, (list, tuple)) else sample)


def _default_sequence_length(guidance_embeds, tokenizer_max_length):
    return min(512 if guidance_embeds else 256, int(tokenizer_max_length))


@dataclass(frozen=True)
class CheckpointInfo:
    """What a FLUX.1 folder implies for a run, read from its config files without loading any weights."""
    path: str
    default_size: int
    default_steps: int
    default_sequence_length: int
    tokenizer_max_length: int
    size_multiple: int  # height and width must be multiples of this (2 x the VAE's scale factor)
    num_blocks: int
    hidden_size: int  # the transformer's inner dimension: heads x head dim
    guidance_embeds: bool


def inspect_checkpoint(path):
    """Check a diffusers-format FLUX.1 folder before loading it: every sub-folder, config file, tokenizer file
    and safetensors header (a truncated file is named). CheckpointError naming the file and the reason."""
    from models.checkpoint import StateDict, read_json, safetensors_header

    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is not a folder" if os.path.exists(path)
                              else f"checkpoint folder {path!r} does not exist")
    missing = [s for s in SUBFOLDERS if not os.path.isdir(os.path.join(path, s))]
    if missing:
        raise CheckpointError(f"{path!r} is not a complete FLUX.1 checkpoint: missing sub-folder(s) {missing}")
    sub = lambda *names: os.path.join(path, *names)  # noqa: E731
    configs = {name: read_json(sub(name, "config.json")) for name in ("transformer", "vae", "text_encoder",
                                                                         "text_encoder_2")}
    scheduler = read_json(sub("scheduler", "scheduler_config.json"), "scheduler config")
    for name, needed in (("tokenizer", (("vocab.json", "merges.txt"), ("tokenizer.json",))),
                         ("tokenizer_2", (("spiece.model",), ("tokenizer.json",)))):
        if not any(all(os.path.isfile(sub(name, f)) for f in files) for files in needed):
            raise CheckpointError(f"tokenizer folder {sub(name)} lacks its files (expected "
                                  + " or ".join(" + ".join(files) for files in needed) + ")")
    tok_config = sub("tokenizer_2", "tokenizer_config.json")
    tok_max = read_json(tok_config, "tokenizer config").get("model_max_length", 512) \
        if os.path.exists(tok_config) else 512
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        for file in StateDict.weight_files(sub(name)):
            safetensors_header(file)
    t, v = configs["transformer"], configs["vae"]
    return CheckpointInfo(
        path=os.path.abspath(path), default_size=_default_size(v), default_steps=_default_steps(scheduler),
        default_sequence_length=_default_sequence_length(t.get("guidance_embeds", False), min(tok_max, 512)),
        tokenizer_max_length=int(min(tok_max, 512)),
        size_multiple=2 * 2 ** (len(v.get("block_out_channels", (1, 1, 1, 1))) - 1),
        num_blocks=int(t.get("num_layers", 19)) + int(t.get("num_single_layers", 38)),
        hidden_size=int(t.get("num_attention_heads", 24)) * int(t.get("attention_head_dim", 128)),
        guidance_embeds=bool(t.get("guidance_embeds", False)))


class FluxPipeline:
    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, transformer, vae, scheduler,
                 dtype=ms.float32, mode="graph", compile_cache=None):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: choose one of {MODES}")
        if compile_cache is None and mindspores_own_cache_is_on():
            warnings.warn("MindSpore's own compile cache is on: it loads graphs by their compile order and can give "
                          "one graph another's compiled code; use compile_cache=DIR (--compile-cache) instead, which "
                          "checks every file against a manifest of the graph it holds")
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.dtype, self.mode, self.compile_cache = dtype, mode, compile_cache
        self.vae_scale_factor = vae.vae_scale_factor
        compiled = lambda name, cell: _compiled(cell.construct, mode, compile_cache, cell,  # noqa: E731
                                                (name, _config_of(cell), str(dtype)))
        self._clip = compiled("clip", text_encoder)
        self._t5 = compiled("t5", text_encoder_2)
        self._transformer = compiled("transformer", transformer)
        self._decode = compiled("vae", vae)
        self._policies = {}  # (branch, structure, shape) -> (policy cell, compiled construct)

    @classmethod
    def from_pretrained(cls, path, dtype="float32", mode="graph", compile_cache=None):
        """Load a diffusers-format FLUX.1 folder (dev or schnell). mode: "graph" (compiled) or "pynative".
        compile_cache: a folder where compiled graphs are kept between runs (pipelines/compile_cache.py)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: choose one of {MODES}")
        dtype = resolve_dtype(dtype)
        inspect_checkpoint(path)  # a missing or truncated file is named before any weights load
        sub = lambda name: os.path.join(path, name)  # noqa: E731
        return cls(
            tokenizer=CLIPTokenizer.from_pretrained(sub("tokenizer")),
            text_encoder=load_clip_text_encoder(sub("text_encoder"), dtype),
            tokenizer_2=T5TokenizerFast.from_pretrained(sub("tokenizer_2")),
            text_encoder_2=load_t5_encoder(sub("text_encoder_2"), dtype),
            transformer=load_flux_transformer(sub("transformer"), dtype),
            vae=load_vae(sub("vae"), dtype),
            scheduler=load_scheduler(sub("scheduler")),
            dtype=dtype, mode=mode, compile_cache=compile_cache)

    @property
    def is_dev(self):
        return self.transformer.config.guidance_embeds

    @property
    def default_steps(self):
        """28 on FLUX.1-dev's resolution-shifted schedule (dev, and base models trained on it), 4 for schnell's."""
        return _default_steps(self.scheduler.config)

    @property
    def default_size(self):
        """The VAE's sample_size: 1024 for FLUX.1, the training resolution of a small model."""
        return _default_size(self.vae.config)

    @property
    def default_sequence_length(self):
        """512 tokens for dev, 256 for schnell, or less where the T5 tokenizer says its model was trained on less."""
        return _default_sequence_length(self.is_dev, self.tokenizer_2.model_max_length)

    def cache_policy(self, cache: CacheConfig, branch, batch, image_tokens, text_tokens, grid=None):
        """The policy (and its compiled step) for one CFG branch and shape: built once, reset per call.
        grid: (rows, columns) of the image tokens (default square)."""
        key = (branch, *cache.structure, batch, image_tokens, text_tokens, grid)
        if key not in self._policies:
            policy = make_policy(cache, self.transformer, batch, image_tokens, text_tokens, grid)
            self._policies[key] = (policy, _compiled(policy.construct, self.mode, self.compile_cache, policy,
                                                     ("policy", key, _config_of(self.transformer), str(self.dtype))))
        return self._policies[key]

    def encode_prompt(self, prompts, num_images_per_prompt, max_sequence_length):
        """-> (T5 token embeddings [B, L, D], pooled CLIP embedding [B, P]), B = len(prompts) * images."""
        clip_ids = _tokenize(self.tokenizer, prompts, self.tokenizer.model_max_length, "CLIP")
        t5_ids = _tokenize(self.tokenizer_2, prompts, max_sequence_length, "T5 (max_sequence_length)")
        pooled = self._clip(ms.Tensor(clip_ids.astype(np.int32)))
        embeds = self._t5(ms.Tensor(t5_ids.astype(np.int32)))
        repeat = np.repeat(np.arange(len(prompts)), num_images_per_prompt)  # image-major, as diffusers
        index = ms.Tensor(repeat.astype(np.int32))
        return ops.gather(embeds, index, 0).astype(self.dtype), ops.gather(pooled, index, 0).astype(self.dtype)

    def _initial_latents(self, batch, grid_h, grid_w, seed, generator, latents):
        channels = self.transformer.config.in_channels // 4
        expected = (batch, grid_h * grid_w // 4, channels * 4)
        if latents is not None:
            latents = latents.asnumpy() if isinstance(latents, ms.Tensor) else np.asarray(latents)
            if latents.shape != expected:
                raise ValueError(f"latents must be packed [batch, tokens, channels] = {expected}, got {latents.shape}")
            return latents.astype(np.float32)
        if generator is None:
            generator = np.random.default_rng(seed)
        gens = generator if isinstance(generator, (list, tuple)) else None
        if gens is not None and len(gens) != batch:
            raise ValueError(f"{len(gens)} generators for {batch} images")
        shape = (channels, grid_h, grid_w)
        noise = (np.stack([g.standard_normal(shape, np.float32) for g in gens]) if gens is not None
                 else generator.standard_normal((batch,) + shape, np.float32))
        return pack_latents(noise)

    def __call__(self, prompt, height=None, width=None, num_inference_steps=None, guidance_scale=3.5,
                 seed=None, generator=None, num_images_per_prompt=1, negative_prompt=None, true_cfg_scale=1.0,
                 max_sequence_length=None, latents=None, output_type="pil", progress=True, cache=None,
                 step_callback=None):
        """Generate images.

        prompt: str or list of str. seed: int (or None for fresh noise); generator: a numpy Generator or one per
        image. latents: packed initial noise [B, tokens, 4*C] (as diffusers takes it). True CFG runs when a
        negative_prompt is given and true_cfg_scale > 1. output_type: "pil", "np" (uint8 [B,H,W,3]) or "latent".
        cache: a CacheConfig (fbcache_ms.config); None or method "none" runs the uncached model.
        step_callback(i, latents): called after step i with the packed latents (an analysis hook; not timed).
        Defaults: height and width `default_size`, steps `default_steps`, max_sequence_length
        `default_sequence_length`.
        """
        cache = cache or CacheConfig()
        if not isinstance(cache, CacheConfig):
            raise TypeError(f"cache must be a fbcache_ms.config.CacheConfig, got {type(cache).__name__}")
        prompts = _as_list(prompt, "prompt")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}: choose one of {OUTPUT_TYPES}")
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        multiple = 2 * self.vae_scale_factor
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
        if num_images_per_prompt < 1:
            raise ValueError("num_images_per_prompt must be at least 1")
        num_inference_steps = num_inference_steps or self.default_steps
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be at least 1")
        max_sequence_length = max_sequence_length or self.default_sequence_length
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in 1..512, got {max_sequence_length}")
        for name, value in (("guidance_scale", guidance_scale), ("true_cfg_scale", true_cfg_scale)):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        do_true_cfg = negative_prompt is not None and true_cfg_scale > 1
        if do_true_cfg:
            negative = _as_list(negative_prompt, "negative_prompt")
            if len(negative) == 1:
                negative = negative * len(prompts)
            if len(negative) != len(prompts):
                raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        batch = len(prompts) * num_images_per_prompt
        timings = {}

        start = time.perf_counter()
        embeds, pooled = self.encode_prompt(prompts, num_images_per_prompt, max_sequence_length)
        if do_true_cfg:
            neg_embeds, neg_pooled = self.encode_prompt(negative, num_images_per_prompt, max_sequence_length)
        timings["encode"] = time.perf_counter() - start

        grid_h, grid_w = 2 * (height // multiple), 2 * (width // multiple)
        x = ms.Tensor(self._initial_latents(batch, grid_h, grid_w, seed, generator, latents), self.dtype)
        img_ids = ms.Tensor(latent_image_ids(grid_h, grid_w))
        txt_ids = ms.Tensor(np.zeros((max_sequence_length, 3), np.float32))
        guidance = ms.Tensor(np.full(batch, guidance_scale, np.float32))
        timesteps, sigmas = flux_timesteps(self.scheduler, num_inference_steps, x.shape[1])

        branches = {"cond": (embeds, pooled)}
        if do_true_cfg:
            branches["uncond"] = (neg_embeds, neg_pooled)
        predict, stats = self._predictors(cache, branches, x.shape[1], max_sequence_length, len(timesteps),
                                          (grid_h // 2, grid_w // 2))

        step_times = []
        for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress, leave=False)):
            start = time.perf_counter()
            # diffusers passes t / 1000 in the latents' dtype; the transformer scales it back
            timestep = ms.Tensor(np.full(batch, t, np.float32), self.dtype) / 1000
            inputs = (x, timestep, img_ids, txt_ids, guidance)
            v = predict("cond", i, *inputs)
            if do_true_cfg:
                v_neg = predict("uncond", i, *inputs)
                v = v_neg + true_cfg_scale * (v - v_neg)
            x = euler_step(x, v, sigmas[i], sigmas[i + 1])
            x.asnumpy()  # wait for the step, so the timing is real
            step_times.append(time.perf_counter() - start)
            if step_callback is not None:
                step_callback(i, x)
        timings["steps"] = step_times
        timings["denoise"] = float(sum(step_times))

        latents_out = x.astype(ms.float32).asnumpy()
        if not np.isfinite(latents_out).all():  # would decode to black or noise and look like a result
            bad = int((~np.isfinite(latents_out).reshape(batch, -1)).any(axis=1).sum())
            raise FloatingPointError(f"the denoised latents of {bad} of {batch} image(s) are not finite (NaN or "
                                     f"inf; dtype {self.dtype}): nothing was decoded")
        if output_type == "latent":
            return PipelineOutput(x.asnumpy(), timings, stats)
        start = time.perf_counter()
        images = self.decode_latents(latents_out, height, width)
        timings["decode"] = time.perf_counter() - start
        if output_type == "pil":
            images = [Image.fromarray(im) for im in images]
        return PipelineOutput(images, timings, stats)

    def decode_latents(self, latents, height, width):
        """Packed latents [B, tokens, channels] of a height x width image -> uint8 images [B, H, W, 3]."""
        multiple = 2 * self.vae_scale_factor
        grid = unpack_latents(np.asarray(latents, np.float32), 2 * (height // multiple), 2 * (width // multiple))
        shift = self.vae.shift_factor or 0.0
        return to_uint8_images(self._decode(ms.Tensor(grid / self.vae.scaling_factor + shift, self.dtype)))

    def _predictors(self, cache, branches, image_tokens, text_tokens, num_steps, grid=None):
        """-> (predict(branch, step_index, x, timestep, img_ids, txt_ids, guidance) -> velocity, stats)."""
        if cache.method == "none":
            def predict(branch, i, x, timestep, img_ids, txt_ids, guidance):
                return self._transformer(x, *branches[branch], timestep, img_ids, txt_ids, guidance)
            return predict, None

        batch = branches["cond"][0].shape[0]
        policies = {b: self.cache_policy(cache, b, batch, image_tokens, text_tokens, grid) for b in branches}
        for policy, _ in policies.values():
            policy.reset()  # in place: the compiled graph keeps these very Parameters
            policy.load(cache)
        stats = CacheStats(cache.method, self.transformer.num_blocks,
                           state_bytes=sum(policy.state_bytes() for policy, _ in policies.values()))

        def predict(branch, i, x, timestep, img_ids, txt_ids, guidance):
            policy, step = policies[branch]
            v, computed, signal = step(x, *branches[branch], timestep, img_ids, txt_ids, guidance,
                                       *policy.step_inputs(cache, i, num_steps))
            policy.record(stats, branch, i, computed, signal)
            return v
        return predict, stats
