"""Train the embedded tiny FLUX.1 model on the procedural shapes data (eval/shapes_data.py).

One command writes a complete diffusers-format FLUX.1 folder:
  tokenizer/, tokenizer_2/   the offline CLIP-L tokenizer; a T5 SentencePiece model trained on the captions
  text_encoder/, _2/         small CLIP and T5 encoders, random and frozen (their features are the condition)
  vae/                       AutoencoderKL (16 latent channels like FLUX's, no quant convs) trained on the
                             images; scaling_factor / shift_factor from the latent statistics as FLUX's
  transformer/               FluxTransformer2DModel trained with rectified flow on FLUX's shifted schedule,
                             with caption dropout (so true CFG with an empty negative prompt helps); the
                             EMA of its weights is saved, in float16 to keep the folder small. Optionally
                             (--distill-guidance) a continued run distils the model's true CFG into
                             FLUX.1-dev's guidance embedding, as FLUX.1-dev was made from its teacher
  scheduler/                 FLUX.1-dev's FlowMatchEulerDiscreteScheduler (dynamic shifting)
plus training_log.json (settings, losses, timings) and training_loss.png.

Trained in PyTorch (diffusers' and transformers' own modules, so the folder is diffusers' format by
construction). MindSpore graph mode on this project's cells was measured 5x slower per training step on
this 2-core CPU (see the README), which would not fit the hour this run is allowed.

Reproducible from --seed: the data stream, the initial weights and the caption dropout all derive from it.
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from eval.shapes_data import IMAGE_SIZE, SHAPES, tokenizer_corpus, training_batch

# The embedded model's sizes: deep and narrow (16 blocks, FLUX's 1:2 double:single ratio), 64 image tokens.
# (A 2x VAE, 256 image tokens, costs 3.4x per sample: 24k samples in 25 minutes had not learned colour yet.)
MODEL_SIZES = dict(
    num_layers=5, num_single_layers=11, num_attention_heads=4, attention_head_dim=32, axes_dims_rope=(8, 12, 12),
    clip_hidden_size=32, clip_intermediate_size=64, clip_num_layers=2, clip_num_heads=2,
    t5_d_model=64, t5_d_ff=128, t5_d_kv=32, t5_num_layers=2, t5_num_heads=2,
    vae_block_out_channels=(16, 32, 64), vae_norm_num_groups=8, vae_layers_per_block=1,  # 64x64 -> 16x16x16
    spm_vocab_size=200,
)
MAX_SEQUENCE_LENGTH = 32  # T5 tokens; the longest caption has about 25
CAPTION_DROPOUT = 0.1
OBJECT_WEIGHT = 10.0


def log(msg):
    print(msg, flush=True)


def _images_to_tensor(torch, images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _lr(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def object_weights(torch, x):
    """Per-pixel loss weights [B, 1, H, W]: OBJECT_WEIGHT on object pixels (saturated), 1 on the background.
    Objects cover ~2-10% of an image; unweighted, the autoencoder learns the background and blurs their colour."""
    chroma = x.max(1, keepdim=True).values - x.min(1, keepdim=True).values  # x in [-1, 1]: 2 = full range
    return 1.0 + OBJECT_WEIGHT * (chroma > 0.6).float()


def train_vae(torch, vae, args, stream, history, decoder_only=False):
    """Object-weighted L1 reconstruction + a small KL term, like a latent-diffusion autoencoder without the GAN.
    decoder_only: the encoder is frozen, so the latent space (and a transformer trained on it) stays valid."""
    from tqdm.auto import tqdm

    params = list(vae.decoder.parameters()) if decoder_only else list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    first = history[-1]["step"] + 1 if history else 0
    bar = tqdm(range(args.vae_steps), desc="VAE decoder" if decoder_only else "VAE", unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.vae_steps, args.vae_lr, 50)
        images, _ = training_batch(stream.take(args.vae_batch), args.vae_batch)
        x = _images_to_tensor(torch, images)
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x).latent_dist
        recon = vae.decode(post.mode()).sample
        rec = ((recon - x).abs() * object_weights(torch, x)).mean()
        kl = post.kl().mean() / x[0].numel()
        loss = rec + args.kl_weight * kl if not decoder_only else rec
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"step": first + step, "l1": rec.item(), "kl_per_pixel": kl.item()})
        bar.set_postfix(l1=f"{history[-1]['l1']:.4f}", refresh=False)
    vae.eval()


class Stream:
    """Consecutive indices of the endless training stream, offset by the seed."""

    def __init__(self, seed):
        self.next = seed * 10_000_000

    def take(self, n):
        first = self.next
        self.next += n
        return first


def reconstruction_adherence(torch, vae, n_one=200, n_two=50):
    """The adherence reader on VAE reconstructions of held-out scenes: the ceiling any generated image can reach."""
    from eval.adherence import summarize
    from eval.shapes_data import heldout_prompts, render

    scenes = heldout_prompts(n_one, n_two)
    with torch.no_grad():
        x = _images_to_tensor(torch, np.stack([render(s) for s in scenes]))
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
    images = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return summarize(scenes, images)


def latent_statistics(torch, vae, stream, n=2048):
    """shift = mean, scale = 1 / std of the latents (posterior means), as FLUX's were derived."""
    chunks = []
    with torch.no_grad():
        for _ in range(n // 256):
            images, _ = training_batch(stream.take(256), 256)
            chunks.append(vae.encode(_images_to_tensor(torch, images)).latent_dist.mean)
    z = torch.cat(chunks)
    return float(z.mean()), float(1.0 / z.std())


def flow_weights(torch, x, latent_grid):
    """Per-element weights of the flow loss on packed latents [B, tokens, 4 * 16]: 1 + OBJECT_WEIGHT on every
    latent pixel that touches an object (its outline decides the shape), 1 elsewhere. Unweighted, the flat
    background dominates the loss and the model learns colours long before shapes and positions."""
    mask = (object_weights(torch, x) > 1).float()
    mask = torch.nn.functional.adaptive_max_pool2d(mask, latent_grid)
    return pack((1.0 + OBJECT_WEIGHT * mask).expand(-1, 16, -1, -1))


def pack(latents):
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


class TextEncoder:
    """The frozen CLIP (pooled) and T5 (per token) features of captions, as FluxPipeline encodes them."""

    def __init__(self, torch, folder):
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        self.torch = torch
        self.clip_tok = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
        self.t5_tok = T5TokenizerFast.from_pretrained(os.path.join(folder, "tokenizer_2"))
        self.clip = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).float().eval()
        self.t5 = T5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder_2")).float().eval()

    def __call__(self, captions):
        torch = self.torch
        with torch.no_grad():
            ids = self.clip_tok(captions, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids
            pooled = self.clip(ids, output_hidden_states=False).pooler_output
            ids = self.t5_tok(captions, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                              return_tensors="pt").input_ids
            embeds = self.t5(ids, output_hidden_states=False)[0]
        return embeds, pooled


def zero_init_modulation(torch, model):
    """adaLN-Zero (DiT): every modulation projection and the output projection start at zero, so each block
    starts as the identity and the model's first prediction is 0. diffusers initialises them at random."""
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    layers = [m for b in blocks for m in (getattr(b, "norm1", None), getattr(b, "norm1_context", None),
                                          getattr(b, "norm", None)) if m is not None]
    with torch.no_grad():
        for layer in [n.linear for n in layers] + [model.norm_out.linear, model.proj_out]:
            layer.weight.zero_()
            layer.bias.zero_()


def add_guidance_embedder(torch, model):
    """The same transformer with FLUX.1-dev's guidance embedding added, at zero: it predicts exactly what `model`
    did, whatever the guidance, until distillation trains the embedding."""
    from diffusers import FluxTransformer2DModel

    student = FluxTransformer2DModel.from_config(model.config, guidance_embeds=True)
    missing, unexpected = student.load_state_dict(model.state_dict(), strict=False)
    if unexpected or not all(k.startswith("time_text_embed.guidance_embedder.") for k in missing):
        raise RuntimeError(f"the guidance-embedding copy does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
    with torch.no_grad():
        student.time_text_embed.guidance_embedder.linear_2.weight.zero_()
        student.time_text_embed.guidance_embedder.linear_2.bias.zero_()
    return student


def guided_target(torch, teacher, xs, embeds, pooled, empty, sigma, guidance, img_ids, txt_ids):
    """The teacher's true-CFG velocity v(empty) + g (v(caption) - v(empty)), one forward pass for both branches."""
    batch = len(xs)
    with torch.no_grad():
        both = teacher(hidden_states=torch.cat([xs, xs]), encoder_hidden_states=torch.cat([embeds, empty[0].expand_as(embeds)]),
                       pooled_projections=torch.cat([pooled, empty[1].expand_as(pooled)]),
                       timestep=torch.cat([sigma, sigma]), img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
    cond, uncond = both[:batch], both[batch:]
    return uncond + guidance[:, None, None] * (cond - uncond)


def train_transformer(torch, model, vae, text, args, stream, history, gen, snapshot=None, teacher=None):
    """Rectified flow: x_s = (1 - s) x0 + s noise, target noise - x0, s from FLUX's shifted schedule.
    With a teacher (guidance distillation, as FLUX.1-dev was made): the target is the teacher's true-CFG velocity
    at a guidance g drawn per sample from [1, args.distill_guidance], and the student is told g."""
    from tqdm.auto import tqdm
    from pipelines.scheduling import calculate_shift

    latent_grid = IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)
    tokens = (latent_grid // 2) ** 2
    mu = calculate_shift(tokens)  # the shift the sampler will use at this image size
    img_ids = torch.zeros(latent_grid // 2, latent_grid // 2, 3)
    img_ids[..., 1] = torch.arange(latent_grid // 2)[:, None]
    img_ids[..., 2] = torch.arange(latent_grid // 2)[None, :]
    img_ids = img_ids.reshape(-1, 3)
    txt_ids = torch.zeros(MAX_SEQUENCE_LENGTH, 3)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    empty = text([""]) if teacher is not None else None

    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    model.train()
    forward = torch.compile(model) if args.compile else model
    first = history[-1]["step"] + 1 if history else 0
    shape_weights = parse_shape_weights(args.shape_weight)
    bar = tqdm(range(args.steps), desc="transformer", unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.steps, args.lr, 100)
        images, captions = training_batch(stream.take(args.batch), args.batch,
                                          shape_weights=shape_weights)
        drop = torch.rand(len(captions), generator=gen) < CAPTION_DROPOUT
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            x = _images_to_tensor(torch, images)
            x0 = pack((vae.encode(x).latent_dist.mean - shift) * scale)
            weights = flow_weights(torch, x, latent_grid) if args.object_weighted_flow else torch.ones_like(x0)
        embeds, pooled = text(captions)
        u = torch.sigmoid(torch.randn(len(captions), generator=gen))  # logit-normal, as SD3 / FLUX train
        sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))  # FLUX's time shift at this resolution
        noise = torch.randn(x0.shape, generator=gen)
        xs = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        extra, target = {}, noise - x0
        if teacher is not None:
            guidance = 1 + (args.distill_guidance - 1) * torch.rand(len(captions), generator=gen)
            target = guided_target(torch, teacher, xs, embeds, pooled, empty, sigma, guidance, img_ids, txt_ids)
            extra = dict(guidance=guidance)
        pred = forward(hidden_states=xs, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=sigma,
                       img_ids=img_ids, txt_ids=txt_ids, return_dict=False, **extra)[0]
        err = (pred - target) ** 2
        weighted = (err * weights).sum() / weights.sum()
        opt.zero_grad(set_to_none=True)
        weighted.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        history.append({"step": first + step, "loss": err.mean().item(), "weighted_loss": weighted.item()})
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", refresh=False)
        if snapshot and args.snapshot_every and (step + 1) % args.snapshot_every == 0 and step + 1 < args.steps:
            snapshot(ema, first + step)
    model.load_state_dict(ema)
    model.eval()


def drop_build_paths(folder):
    """save_pretrained records the temporary folder the model was loaded from; it means nothing elsewhere."""
    for sub in ("transformer", "vae"):
        path = os.path.join(folder, sub, "config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        if config.pop("_name_or_path", None) is not None:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True)


def replace_folder(src, dst):
    """Move folder src to dst; an existing dst is moved aside first and removed only after the move."""
    old = None
    if os.path.isdir(dst):
        old = tempfile.mkdtemp(prefix=".replaced-", dir=os.path.dirname(dst) or ".")
        os.rmdir(old)
        os.replace(dst, old)
    os.replace(src, dst)
    if old:
        shutil.rmtree(old)


def plot_losses(log_data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, hist, title in ((axes[0], "l1", log_data["vae_history"], "VAE reconstruction (object-weighted L1)"),
                                 (axes[1], "loss", log_data["transformer_history"], "transformer loss (MSE to the flow target)")):
        y = np.asarray([h[key] for h in hist])
        if len(y) == 0:
            continue
        k = max(1, len(y) // 50)
        ax.plot(y, color="0.75", lw=0.8, label="per step")
        if len(y) >= k:
            ax.plot(np.arange(k - 1, len(y)), np.convolve(y, np.ones(k) / k, "valid"), color="C0", label=f"mean of {k}")
        starts = np.cumsum([ph.get("vae_steps" if key == "l1" else "steps", 0) for ph in log_data.get("phases", [])])
        for boundary in starts[:-1]:  # a continued run (--init-from) starts a new phase here
            ax.axvline(boundary, color="C3", lw=0.8, ls="--")
        if key == "loss":  # a distillation phase has another target: the teacher's true-CFG velocity
            for ph, end in zip(log_data.get("phases", []), starts):
                if ph.get("distill_guidance"):
                    ax.axvspan(end - ph["steps"], end, color="C1", alpha=0.15,
                               label=f"guidance distillation (g <= {ph['distill_guidance']:g})")
        ax.set_yscale("log")
        ax.set_xlabel("step (dashed: a continued run starts)" if len(starts) > 1 else "step")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m eval.train_shapes_model",
        description="Train the embedded tiny FLUX.1 model (VAE and transformer) on the procedural shapes "
                    "data and write it as a diffusers-format folder. The committed model is six runs, each "
                    "continuing the last (README): the defaults with --no-object-weighted-flow --no-adaln-zero (72 "
                    "minutes on 2 CPU cores), --init-from it with --vae-steps 3000 --vae-lr 1e-3 --steps 2800 --lr "
                    "5e-4 --compile (46 minutes), both on the first version of the data (smaller objects, jittered), "
                    "then --init-from that with --vae-steps 1500 --vae-lr 1e-3 --steps 3000 --lr 5e-4 --compile "
                    "(43 minutes) on the data as it is now, then --vae-steps 0 --steps 3000 --lr 4e-4 --compile "
                    "stopped after 1000 steps, from its snapshot --vae-steps 0 --steps 2400 --lr 3e-4 --compile "
                    "(42 minutes), and last --vae-steps 0 --steps 1500 --lr 2e-4 --distill-guidance 6 --compile "
                    "(45 minutes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out_dir", help="folder to write (must be absent or empty unless --force)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the data stream and the noise")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.add_argument("--init-from", metavar="FOLDER",
                   help="continue from a folder this script wrote: its tokenizers, text encoders, VAE encoder and "
                        "transformer are kept and trained on; only the VAE decoder is fine-tuned (the frozen "
                        "encoder keeps the latent space the transformer learned); --vae-steps 0 skips it")
    p.add_argument("--vae-steps", type=int, default=6000, help="VAE optimizer steps")
    p.add_argument("--vae-batch", type=int, default=8, help="images per VAE step")
    p.add_argument("--vae-lr", type=float, default=2e-3, help="VAE peak learning rate")
    p.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the per-pixel KL term")
    p.add_argument("--steps", type=int, default=2300, help="transformer optimizer steps")
    p.add_argument("--batch", type=int, default=48, help="images per transformer step")
    p.add_argument("--lr", type=float, default=8e-4, help="transformer peak learning rate (warm-up, cosine)")
    p.add_argument("--object-weighted-flow", action=argparse.BooleanOptionalAction, default=True,
                   help=f"weight the flow loss {1 + OBJECT_WEIGHT:g}x on latent pixels that touch an object")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer (about 80 s to compile, then ~20%% faster steps)")
    p.add_argument("--adaln-zero", action=argparse.BooleanOptionalAction, default=True,
                   help="start a new transformer with its modulation and output projections at zero (DiT's "
                        "adaLN-Zero); the committed model's first run predates this and started from diffusers' "
                        "random initialisation")
    p.add_argument("--distill-guidance", type=float, default=0.0, metavar="G",
                   help="guidance distillation, as FLUX.1-dev was made: the --init-from model (without a guidance "
                        "embedding) becomes the frozen teacher and a copy of it with FLUX.1-dev's guidance embedding "
                        "learns the teacher's true-CFG velocity at a guidance drawn per sample from [1, G]; the "
                        "result takes a guidance scale like FLUX.1-dev (the pipelines' default 3.5 needs G >= 3.5; "
                        "0: plain training)")
    p.add_argument("--teacher", metavar="FOLDER",
                   help="with --distill-guidance: the frozen teacher is this folder's (undistilled) transformer "
                        "instead of --init-from's, so that --init-from can be a distilled model whose distillation "
                        "continues (same VAE and text encoders required)")
    p.add_argument("--shape-weight", action="append", default=[], metavar="SHAPE=W",
                   help=f"draw SHAPE W times as often as the others in the transformer's batches (repeatable; "
                        f"shapes: {', '.join(SHAPES)})")
    p.add_argument("--snapshot-every", type=int, default=500, metavar="N",
                   help="every N transformer steps, write the EMA weights so far as a complete folder OUT.partial "
                        "(load it, score it, or continue from it with --init-from if the run is stopped); 0: never")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved transformer weights")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--tiny", action="store_true", help="a much smaller model (tests)")
    return p


def parse_shape_weights(items):
    """["star=3", ...] -> {"star": 3.0}; None when empty (the uniform stream)."""
    weights = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"--shape-weight {item!r}: expected SHAPE=W with a number W") from None
        if name not in SHAPES:
            raise ValueError(f"--shape-weight {item!r}: unknown shape {name!r} (shapes: {', '.join(SHAPES)})")
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"--shape-weight {item!r}: the weight must be a finite number above 0")
        weights[name] = w
    return weights or None


def _is_distilled(folder):
    with open(os.path.join(folder, "transformer", "config.json"), encoding="utf-8") as f:
        return bool(json.load(f).get("guidance_embeds"))


def _same_conditioning(a, b):
    """True when two folders share the VAE latent space and the text encoders (the teacher's inputs)."""
    def vae_key(folder):
        with open(os.path.join(folder, "vae", "config.json"), encoding="utf-8") as f:
            c = json.load(f)
        return c.get("shift_factor"), c.get("scaling_factor")

    def weights(folder, sub):
        with open(os.path.join(folder, sub, "model.safetensors"), "rb") as f:
            return f.read()

    return vae_key(a) == vae_key(b) and all(weights(a, s) == weights(b, s) for s in ("text_encoder", "text_encoder_2"))


def check_args(args):
    if args.snapshot_every < 0:
        raise ValueError(f"--snapshot-every must be at least 0, got {args.snapshot_every}")
    for name in ("vae_steps", "vae_batch", "steps", "batch", "threads"):
        least = 0 if name == "vae_steps" and args.init_from else 1
        if getattr(args, name) < least:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if args.init_from:
        log_file = os.path.join(args.init_from, "training_log.json")
        if not os.path.isfile(log_file):
            raise ValueError(f"--init-from {args.init_from!r}: no training_log.json there (not a folder this "
                             "script wrote)")
    for name in ("vae_lr", "lr", "kl_weight"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if args.distill_guidance and not (math.isfinite(args.distill_guidance) and args.distill_guidance > 1):
        raise ValueError(f"--distill-guidance must be above 1 (the largest guidance taught), got {args.distill_guidance}")
    if args.distill_guidance and not args.init_from:
        raise ValueError("--distill-guidance needs --init-from: the model to distil is the teacher")
    parse_shape_weights(args.shape_weight)
    if args.teacher and not args.distill_guidance:
        raise ValueError("--teacher needs --distill-guidance")
    for flag, folder in (("--init-from", args.init_from), ("--teacher", args.teacher)):
        if folder and not os.path.isfile(os.path.join(folder, "transformer", "config.json")):
            raise ValueError(f"{flag} {folder!r}: no transformer/config.json there")
    if args.teacher:
        if _is_distilled(args.teacher):
            raise ValueError(f"--teacher {args.teacher!r} is guidance-distilled: the teacher must be a base model")
        if not _same_conditioning(args.teacher, args.init_from):
            raise ValueError(f"--teacher {args.teacher!r} and --init-from {args.init_from!r} do not share the VAE "
                             "latent space and text encoders")
    elif args.init_from and _is_distilled(args.init_from):
        raise ValueError(f"--init-from {args.init_from!r} is guidance-distilled: continue it with --distill-guidance "
                         "and --teacher (its base model)")
    if not 0 <= args.ema < 1:
        raise ValueError(f"--ema must be in [0, 1), got {args.ema}")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise ValueError(f"{args.out_dir!r} exists and is not a folder")
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir) and not args.force:
        raise ValueError(f"{args.out_dir!r} is not empty: pass --force to replace it")


TINY_SIZES = dict(MODEL_SIZES, num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
                  axes_dims_rope=(4, 6, 6), vae_block_out_channels=(8, 8, 16))


def train(args):
    """Write the trained folder to args.out_dir (built in a temporary folder, then moved into place)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from eval.make_tiny_checkpoint import make_tiny_checkpoint

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    parent = os.path.dirname(os.path.abspath(args.out_dir))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".training-", dir=parent)
    partial = os.path.abspath(args.out_dir).rstrip(os.sep) + ".partial"
    start = time.perf_counter()
    try:
        settings = {k: v for k, v in vars(args).items() if k != "out_dir"}
        if args.init_from:
            with open(os.path.join(args.init_from, "training_log.json"), encoding="utf-8") as f:
                previous = json.load(f)
            shutil.copytree(args.init_from, work, dirs_exist_ok=True)
            sizes = previous["sizes"]
            record = dict(previous, settings=settings, phases=previous.get("phases", [previous["settings"]]) + [settings])
            record.pop("vae_reconstruction_adherence", None)
            record.pop("snapshot_step", None)  # continuing from a snapshot (OUT.partial)
        else:
            sizes = TINY_SIZES if args.tiny else MODEL_SIZES
            # float16 storage keeps the folder small; the models are trained in float32 from the stored values
            make_tiny_checkpoint(work, variant="dev", seed=args.seed, force=True, guidance_embeds=False,
                                 dtype="float16", t5_corpus=tokenizer_corpus(),
                                 t5_model_max_length=MAX_SEQUENCE_LENGTH, **sizes)
            record = {"settings": settings, "phases": [settings], "sizes": sizes, "vae_history": [],
                      "transformer_history": [], "vae_seconds": 0.0, "transformer_seconds": 0.0,
                      "total_seconds": 0.0}
        record["trainer"] = f"torch {torch.__version__}, {args.threads} threads"
        # a continued run draws fresh data and noise: phase k uses seed + 1000 k
        phase_seed = args.seed + 1000 * (len(record["phases"]) - 1)
        stream = Stream(phase_seed)
        gen = torch.Generator().manual_seed(phase_seed)

        vae = AutoencoderKL.from_pretrained(os.path.join(work, "vae")).float()
        t0 = time.perf_counter()
        if args.vae_steps:
            train_vae(torch, vae, args, stream, record["vae_history"], decoder_only=bool(args.init_from))
        if not args.init_from:  # a frozen encoder keeps its latent statistics
            shift, scale = latent_statistics(torch, vae, stream)
            vae.register_to_config(shift_factor=shift, scaling_factor=scale, sample_size=IMAGE_SIZE)
            record["latent_shift_factor"], record["latent_scaling_factor"] = shift, scale
        vae.save_pretrained(os.path.join(work, "vae"), safe_serialization=True)  # float32: small, and exact
        record["vae_seconds"] += time.perf_counter() - t0
        record["vae_reconstruction_adherence"] = reconstruction_adherence(torch, vae)
        log(f"VAE: {record['vae_seconds']:.0f} s in all, shift_factor {vae.config.shift_factor:.4f}, "
            f"scaling_factor {vae.config.scaling_factor:.4f}; adherence of its reconstructions: "
            f"{json.dumps(record['vae_reconstruction_adherence'])}")

        text = TextEncoder(torch, work)
        model = FluxTransformer2DModel.from_pretrained(os.path.join(work, "transformer")).float()
        if args.adaln_zero and not args.init_from:
            zero_init_modulation(torch, model)
        teacher = None
        if args.teacher:
            teacher = FluxTransformer2DModel.from_pretrained(os.path.join(args.teacher, "transformer")).float()
            teacher.eval().requires_grad_(False)
        elif args.distill_guidance:
            teacher = model.eval().requires_grad_(False)
        if teacher is not None and not model.config.guidance_embeds:
            model = add_guidance_embedder(torch, model)
        t0 = time.perf_counter()

        def snapshot(ema, step):
            """A complete, loadable folder of the EMA weights so far at OUT.partial (replaced atomically)."""
            tmp = tempfile.mkdtemp(prefix=".snapshot-", dir=parent)
            shutil.copytree(work, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("transformer"))
            copy = FluxTransformer2DModel.from_config(model.config)
            copy.load_state_dict(ema)
            copy.to(torch.float16).save_pretrained(os.path.join(tmp, "transformer"), safe_serialization=True)
            # this phase as far as it went, so that a run continued from the snapshot logs the steps it had
            done = len(record["transformer_history"]) - sum(p.get("steps", 0) for p in record["phases"][:-1])
            phases = record["phases"][:-1] + [dict(settings, steps=done)]
            with open(os.path.join(tmp, "training_log.json"), "w", encoding="utf-8") as f:
                json.dump(dict(record, phases=phases, snapshot_step=step, transformer_seconds=
                               record["transformer_seconds"] + time.perf_counter() - t0), f, indent=1)
            drop_build_paths(tmp)
            replace_folder(tmp, partial)

        train_transformer(torch, model, vae, text, args, stream, record["transformer_history"], gen, snapshot, teacher)
        record["transformer_seconds"] += time.perf_counter() - t0
        model.to(torch.float16).save_pretrained(os.path.join(work, "transformer"), safe_serialization=True)
        last = record["transformer_history"][-100:]
        log(f"transformer: {record['transformer_seconds']:.0f} s, mean loss of the last {len(last)} steps "
            f"{np.mean([h['loss'] for h in last]):.4f}")

        settings["seconds"] = time.perf_counter() - start
        record["total_seconds"] += settings["seconds"]
        with open(os.path.join(work, "training_log.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        plot_losses(record, os.path.join(work, "training_loss.png"))
        drop_build_paths(work)
        replace_folder(work, args.out_dir)
        if os.path.isdir(partial):
            shutil.rmtree(partial)
    finally:
        if os.path.isdir(work):
            shutil.rmtree(work)
    log(f"wrote {args.out_dir} in {time.perf_counter() - start:.0f} s")
    return record


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
