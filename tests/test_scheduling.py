"""FLUX timestep schedule on mindone's scheduler against diffusers 0.36's FluxPipeline logic."""
import os

import mindspore as ms
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler as TorchScheduler
from diffusers.pipelines.flux import pipeline_flux

from pipelines.scheduling import (calculate_shift, euler_step, euler_step_numpy, flux_timesteps, image_seq_len,
                                  load_scheduler)

SIZES = [(64, 64), (256, 256), (512, 768), (1024, 1024), (768, 1360), (1440, 1440)]
STEPS = [1, 2, 4, 28, 50]


@pytest.fixture(params=["dev", "schnell"])
def scheduler_folder(request):
    return request.param, os.path.join(request.getfixturevalue(f"tiny_{request.param}_checkpoint"), "scheduler")


def _diffusers_schedule(folder, steps, seq_len):
    """What FluxPipeline.__call__ does, with diffusers' own helpers."""
    sched = TorchScheduler.from_pretrained(folder)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = pipeline_flux.calculate_shift(
        seq_len, sched.config.get("base_image_seq_len", 256), sched.config.get("max_image_seq_len", 4096),
        sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.15))
    timesteps, n = pipeline_flux.retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas, mu=mu)
    assert n == steps
    return timesteps.numpy(), sched.sigmas.numpy(), sched


def test_image_seq_len():
    assert image_seq_len(64, 64) == 16
    assert image_seq_len(1024, 1024) == 4096
    assert image_seq_len(768, 1360) == 48 * 85
    assert image_seq_len(100, 70) == 6 * 4   # rounded down to multiples of 16 pixels
    for n in (16, 256, 1000, 4096, 8000):
        assert calculate_shift(n) == pytest.approx(pipeline_flux.calculate_shift(n), abs=0)


def test_schedule_matches_diffusers(scheduler_folder):
    variant, folder = scheduler_folder
    ours = load_scheduler(folder)
    assert type(ours).__module__.startswith("mindone.")
    for steps in STEPS:
        for h, w in SIZES:
            seq = image_seq_len(h, w)
            timesteps, sigmas = flux_timesteps(ours, steps, seq)
            ref_t, ref_s, _ = _diffusers_schedule(folder, steps, seq)
            assert isinstance(timesteps, np.ndarray) and isinstance(sigmas, np.ndarray)
            assert timesteps.shape == (steps,) and sigmas.shape == (steps + 1,)
            assert sigmas[-1] == 0 and sigmas[0] == pytest.approx(1.0)
            np.testing.assert_allclose(sigmas, ref_s, rtol=0, atol=1e-6, err_msg=f"{variant} {steps} {h}x{w}")
            np.testing.assert_allclose(timesteps / 1000, ref_t / 1000, rtol=0, atol=1e-6,
                                       err_msg=f"{variant} {steps} {h}x{w}")
            linear = np.linspace(1.0, 1 / steps, steps)
            if variant == "schnell":   # shift 1, no dynamic shifting: the linear sigmas themselves
                np.testing.assert_allclose(sigmas[:-1], linear, atol=1e-6)
            elif steps > 1:            # dev: resolution-dependent shift pushes sigmas up
                assert np.all(sigmas[1:-1] > linear[1:] + 1e-3)


def test_dev_shift_grows_with_resolution(tiny_dev_checkpoint):
    sched = load_scheduler(tiny_dev_checkpoint)   # the checkpoint root works as well
    _, small = flux_timesteps(sched, 10, image_seq_len(256, 256))
    _, large = flux_timesteps(sched, 10, image_seq_len(1024, 1024))
    assert np.all(large[1:-1] > small[1:-1])


def test_pipeline_uses_the_same_timesteps(tiny_dev_checkpoint):
    """The timesteps diffusers' FluxPipeline actually runs equal ours, for a non-square size."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_dev_checkpoint)
    seen = []

    def record(p, i, t, kwargs):
        seen.append(float(t))
        return kwargs

    pipe("a cat", height=96, width=128, num_inference_steps=3, max_sequence_length=16, output_type="latent",
         generator=torch.Generator().manual_seed(0), callback_on_step_end=record)
    timesteps, sigmas = flux_timesteps(load_scheduler(tiny_dev_checkpoint), 3, image_seq_len(96, 128))
    np.testing.assert_allclose(np.array(seen) / 1000, timesteps / 1000, rtol=0, atol=1e-6)
    np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), sigmas, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_step_matches_diffusers(scheduler_folder, dtype):
    _, folder = scheduler_folder
    rng = np.random.default_rng(0)
    steps, seq = 4, image_seq_len(512, 512)
    ours = load_scheduler(folder)
    _, sigmas = flux_timesteps(ours, steps, seq)
    _, _, ref = _diffusers_schedule(folder, steps, seq)
    x0 = x = rng.standard_normal((1, seq, 64)).astype(dtype)
    for i in range(steps):   # every implementation starts each step from diffusers' previous result
        v = rng.standard_normal((1, seq, 64)).astype(dtype)
        ref_x = ref.step(torch.from_numpy(v), ref.timesteps[i], torch.from_numpy(x)).prev_sample.numpy()
        ms_x = ours.step(ms.Tensor(v), ours.timesteps[i], ms.Tensor(x))[0]
        assert ms_x.dtype == (ms.float32 if dtype == "float32" else ms.float16)
        # mindone's step: float32 to 1e-6; in float16 it rounds dt * v differently from torch in a few
        # elements, by one half-precision ulp of the operands
        ulp = float(np.spacing(np.float16(np.abs(x).max() + np.abs(v).max())))
        tol = dict(rtol=0, atol=1e-6) if dtype == "float32" else dict(rtol=0, atol=ulp)
        np.testing.assert_allclose(ms_x.asnumpy().astype(np.float64), ref_x.astype(np.float64), **tol)
        # the direct update reproduces diffusers bit for bit in both dtypes
        np.testing.assert_array_equal(euler_step_numpy(x, v, sigmas[i], sigmas[i + 1]), ref_x)
        direct = euler_step(ms.Tensor(x), ms.Tensor(v), sigmas[i], sigmas[i + 1]).asnumpy()
        assert direct.dtype == ref_x.dtype
        np.testing.assert_array_equal(direct, ref_x)
        as_tensors = euler_step(ms.Tensor(x), ms.Tensor(v), ms.Tensor(sigmas[i]), ms.Tensor(sigmas[i + 1]))
        np.testing.assert_array_equal(as_tensors.asnumpy(), ref_x)
        x = ref_x
    assert ours.step_index == steps
    # the updates moved the sample all the way (sigma 1 -> 0): it is not the input
    assert np.abs(x.astype(np.float32) - x0.astype(np.float32)).max() > 0.1


def test_euler_step_on_mindspore_tensors_matches_scheduler(tiny_dev_checkpoint):
    sched = load_scheduler(tiny_dev_checkpoint)
    timesteps, sigmas = flux_timesteps(sched, 3, 16)
    rng = np.random.default_rng(1)
    x0 = x = ms.Tensor(rng.standard_normal((2, 16, 64)).astype(np.float32))
    x_direct = x
    for i in range(3):
        v = ms.Tensor(rng.standard_normal((2, 16, 64)).astype(np.float32))
        x = sched.step(v, sched.timesteps[i], x)[0]
        x_direct = euler_step(x_direct, v, sigmas[i], sigmas[i + 1])
        np.testing.assert_array_equal(x_direct.asnumpy(), x.asnumpy())
    # graph mode, sigmas as 0-d tensors (how the compiled pipeline passes them)
    jitted = ms.jit(euler_step)
    for dtype in (ms.float32, ms.float16):
        v = ms.Tensor(rng.standard_normal((2, 16, 64)).astype(np.float32)).astype(dtype)
        got = jitted(x0.astype(dtype), v, ms.Tensor(sigmas[1]), ms.Tensor(sigmas[2]))
        assert got.dtype == dtype
        np.testing.assert_array_equal(got.asnumpy(), euler_step(x0.astype(dtype), v, sigmas[1], sigmas[2]).asnumpy())
    # a second call resets the scheduler's step counter
    flux_timesteps(sched, 3, 16)
    assert sched.step_index is None
