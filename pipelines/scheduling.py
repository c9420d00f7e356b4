"""FLUX.1's sampling schedule on mindone's FlowMatchEulerDiscreteScheduler.

Reproduces diffusers 0.36 `FluxPipeline.__call__` step 5 ("Prepare timesteps"):

    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    mu = calculate_shift(image_seq_len, base_image_seq_len, max_image_seq_len, base_shift, max_shift)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)

where image_seq_len is the number of packed latent tokens, (H // 16) * (W // 16) for FLUX's VAE
(scale factor 8) and 2x2 patch packing. With `use_dynamic_shifting` (FLUX.1-dev) the sigmas are
shifted by exp(mu) / (exp(mu) + (1 / sigma - 1)); without it (FLUX.1-schnell, shift 1.0) they
stay linear. The scheduler then holds `timesteps` (n values, sigma * 1000) and `sigmas`
(n + 1 values, the last one 0).

The Euler update of step i is x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i, computed in float32 and
cast back to the model dtype. It can go through mindone's `scheduler.step(v, t, x)` (PyNative,
host-side state: it looks the step index up with `nonzero().item()` on the first call and keeps a
Python counter) or be done directly with the numpy sigmas returned by `flux_timesteps`;
`euler_step` below does the latter (bit-equal to diffusers' step in float32 and float16; mindone's
step differs by one ulp in a few elements in float16), and is what the graph-mode pipeline should use.
"""
import os

import mindspore as ms
import numpy as np


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """mu of FLUX's resolution-dependent shift: linear in the token count through (256, 0.5) and (4096, 1.15)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def image_seq_len(height, width, vae_scale_factor=8):
    """Packed latent tokens for an image of height x width pixels, as FluxPipeline computes them.

    The pipeline rounds each side down to a multiple of vae_scale_factor * 2, the VAE divides it by
    vae_scale_factor, and 2x2 packing halves it again.
    """
    lat_h = 2 * (int(height) // (vae_scale_factor * 2))
    lat_w = 2 * (int(width) // (vae_scale_factor * 2))
    return (lat_h // 2) * (lat_w // 2)


def load_scheduler(folder):
    """mindone's FlowMatchEulerDiscreteScheduler from a `scheduler/` folder or a checkpoint root holding one."""
    from mindone.diffusers import FlowMatchEulerDiscreteScheduler

    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, "scheduler_config.json")) and \
            os.path.isfile(os.path.join(folder, "scheduler", "scheduler_config.json")):
        folder = os.path.join(folder, "scheduler")
    if not os.path.isfile(os.path.join(folder, "scheduler_config.json")):
        raise FileNotFoundError(f"no scheduler_config.json in {folder!r} or its scheduler/ sub-folder")
    return FlowMatchEulerDiscreteScheduler.from_pretrained(folder)


def flux_timesteps(scheduler, num_inference_steps, image_seq_len, sigmas=None):
    """Set FLUX's schedule on `scheduler` and return (timesteps, sigmas) as float32 numpy arrays.

    timesteps has num_inference_steps values on the 0..1000 scale (the transformer gets t / 1000);
    sigmas has num_inference_steps + 1 values, ending with 0, so step i goes from sigmas[i] to
    sigmas[i + 1]. `sigmas` overrides the default linear spacing, like FluxPipeline's argument.
    The scheduler is left set (step index reset), ready for `scheduler.step`.
    """
    num_inference_steps = int(num_inference_steps)
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    config = scheduler.config
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    if getattr(config, "use_flow_sigmas", False):   # as diffusers does; FlowMatchEuler has no such option
        sigmas = None
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    if sigmas is None:
        scheduler.set_timesteps(num_inference_steps, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    return _to_numpy(scheduler.timesteps), _to_numpy(scheduler.sigmas)


def euler_step(sample, velocity, sigma, sigma_next):
    """x + (sigma_next - sigma) * v on MindSpore tensors, exactly as the scheduler's step computes it.

    The sum is taken in float32 and cast back to the velocity's dtype; the product keeps the
    velocity's dtype (a float32 scalar times a float16 tensor stays float16 in torch and MindSpore
    alike), which makes the result bit-equal to diffusers' step in float32 and float16.
    Graph-safe (usable inside ms.jit / a Cell's construct): there pass sigma and sigma_next as 0-d
    float32 tensors, since Python floats are compile-time constants and would recompile every step.
    In PyNative they may also be the float32 numpy values returned by `flux_timesteps` or Python floats.
    """
    dt = sigma_next - sigma
    if isinstance(dt, ms.Tensor):
        # torch rounds the float32 scalar to the tensor's dtype before multiplying; MindSpore does not
        dt = dt.astype(velocity.dtype)
    return (sample.astype(ms.float32) + velocity * dt).astype(velocity.dtype)


def euler_step_numpy(sample, velocity, sigma, sigma_next):
    """The same update on numpy arrays (reference and tests)."""
    velocity = np.asarray(velocity)
    dt = np.float32(sigma_next) - np.float32(sigma)
    return (np.asarray(sample).astype(np.float32) + velocity * velocity.dtype.type(dt)).astype(velocity.dtype)


def _to_numpy(x):
    if hasattr(x, "asnumpy"):
        return x.asnumpy()
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)
