"""Fourier-compressed cache storage: the transform against numpy's rFFT2, bytes held, and FBCache / DBCache /
FBCache+TaylorSeer / TaylorSeer-residual with compressed storage against the torch reference."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from fbcache_ms.config import CacheConfig
from fbcache_ms.fourier import FourierCodec, FourierFeature, kept_frequencies
from fbcache_ms.policies import make_policy
from parity import rel_err
from test_cache import CALL, _latents, _ours, reference_run


def numpy_lowpass(x, grid, ratio):
    h, w = grid
    rows, cols = kept_frequencies(h, w, ratio)
    spectrum = np.fft.rfft2(x.reshape(x.shape[0], h, w, -1), axes=(1, 2))
    keep = np.zeros(spectrum.shape[1:3], bool)
    keep[np.ix_(rows, cols)] = True
    return np.fft.irfft2(spectrum * keep[None, :, :, None], s=(h, w), axes=(1, 2)).reshape(x.shape)


@pytest.mark.parametrize("grid,ratio", [((8, 8), 0.5), ((8, 8), 0.25), ((4, 6), 0.7), ((5, 3), 1.0)])
def test_codec_is_truncated_rfft2(grid, ratio):
    x = np.random.default_rng(0).standard_normal((2, grid[0] * grid[1], 5)).astype(np.float32)
    codec = FourierCodec(grid, ratio)
    restored = codec.restore(codec.compress(ms.Tensor(x))).asnumpy()
    np.testing.assert_allclose(restored, numpy_lowpass(x.astype(np.float64), grid, ratio), atol=2e-5)
    if ratio == 1.0:
        np.testing.assert_allclose(restored, x, atol=2e-5)
    # a residual band-limited to the kept block comes back whole
    band = numpy_lowpass(x.astype(np.float64), grid, ratio).astype(np.float32)
    np.testing.assert_allclose(codec.restore(codec.compress(ms.Tensor(band))).asnumpy(), band, atol=2e-5)


def test_kept_block_and_dc():
    assert kept_frequencies(8, 8, 0.5) == ([0, 1, 2, 6, 7], [0, 1, 2])
    assert kept_frequencies(8, 8, 0.01) == ([0], [0])  # the DC term is always kept
    rows, cols = kept_frequencies(8, 8, 1.0)
    assert len(rows) == 8 and cols == [0, 1, 2, 3, 4]


class _Store(nn.Cell):
    def __init__(self):
        super().__init__()
        self.feature = FourierFeature((1, 64, 4), ms.float32, (8, 8), 0.5)

    def construct(self, x):
        self.feature.store(x)
        return self.feature.value


def test_feature_in_graph_mode_and_stored_bytes(dev_pipeline):
    x = np.random.default_rng(1).standard_normal((1, 64, 4)).astype(np.float32)
    probe = _Store()
    out = ms.jit(probe.construct)(ms.Tensor(x)).asnumpy()
    np.testing.assert_allclose(out, numpy_lowpass(x.astype(np.float64), (8, 8), 0.5), atol=2e-5)
    assert probe.feature.stored.value.shape == (1, 30, 4)  # 2 x 5 rows x 3 columns of coefficients, not 64 tokens

    t = dev_pipeline.transformer
    dim, itemsize = t.config.dim, 4
    plain = make_policy(CacheConfig("fbcache"), t, 2, 16, 8)
    small = make_policy(CacheConfig("fbcache", fourier_ratio=0.5), t, 2, 16, 8, grid=(4, 4))
    assert small.res_h.stored.value.shape == (2, 2 * 3 * 2, dim)  # rows {0, 1, 3} x columns {0, 1}, real + imag
    assert plain.state_bytes() - small.state_bytes() == 2 * (16 - 12) * dim * itemsize


@pytest.mark.parametrize("method,kw", [("fbcache", dict(threshold=0.45)), ("fbcache", dict(threshold=0.45, fn=2, bn=1)),
                                       ("fbcache_taylorseer", dict(threshold=0.45, order=1)),
                                       ("taylorseer", dict(order=1, interval=3, warmup=2, variant="residual"))])
def test_compressed_storage_matches_reference(torch_dev_pipeline, dev_pipeline, method, kw):
    """The same decisions as the uncompressed cache; what is reused is the low-passed residual (the reference
    low-passes with torch.fft)."""
    latents = _latents(seed=4)
    expected, ref_pattern = reference_run(torch_dev_pipeline, latents, "a cat", method=method, fourier_ratio=0.5,
                                          grid=(4, 4), **kw)
    ours, pattern = _ours(dev_pipeline, latents, "a cat", CacheConfig(method, fourier_ratio=0.5, **kw))
    plain, plain_pattern = _ours(dev_pipeline, latents, "a cat", CacheConfig(method, **kw))
    assert pattern == ref_pattern == plain_pattern and "." in pattern["cond"]
    assert rel_err(ours, expected) < 1e-4
    assert np.abs(ours - plain).max() > 1e-4  # compression changed what was reused


def test_true_cfg_and_no_leak_with_compressed_storage(dev_pipeline):
    cache = CacheConfig("fbcache", threshold=0.45, fourier_ratio=0.5)
    kw = dict(negative_prompt="blurry", true_cfg_scale=2.0)
    first = dev_pipeline("a cat", latents=_latents(seed=5), cache=cache, **CALL, **kw)
    dev_pipeline("a dog", latents=_latents(seed=6), cache=cache, **CALL, **kw)
    again = dev_pipeline("a cat", latents=_latents(seed=5), cache=cache, **CALL, **kw)
    np.testing.assert_array_equal(first.images, again.images)
    assert set(first.cache_stats.computed) == {"cond", "uncond"} and first.cache_stats.state_bytes > 0


@pytest.mark.parametrize("kwargs,match", [(dict(method="teacache", fourier_ratio=0.5), "not teacache"),
                                          (dict(method="taylorseer", fourier_ratio=0.5), "per_module"),
                                          (dict(method="fbcache", fourier_ratio=0.0), "fourier_ratio must be in"),
                                          (dict(method="fbcache", fourier_ratio=1.5), "fourier_ratio must be in")])
def test_fourier_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig(**kwargs)


def test_frequency_analysis_command(tiny_dev_checkpoint, tmp_path, capsys):
    from eval import fourier_analysis

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "fa"
    assert fourier_analysis.main(["--checkpoint", tiny_dev_checkpoint, "--prompt-file", str(prompts), "--height", "64",
                                  "--steps", "3", "--ratios", "0.3,0.6,1", "--out", str(out)]) == 0
    import json
    result = json.loads((out / "fourier_analysis.json").read_text())
    assert result["grid"] == [4, 4] and result["prompts"] == 2 and (out / "fourier_analysis.png").stat().st_size
    low, mid, full = result["rows"]
    assert low["bytes_fraction"] < mid["bytes_fraction"] < full["bytes_fraction"]
    assert all(a <= b + 1e-9 for a, b in zip(low["energy_kept"], mid["energy_kept"]))
    assert full["energy_kept"] == pytest.approx([1.0] * 3) and min(full["psnr_db"]) > 100
    assert len(set(low["psnr_db"])) == 3  # one figure per step, from that step's residual
    assert "| 0.3 |" in capsys.readouterr().out
    assert fourier_analysis.main(["--ratios", "0,1", "--out", str(out)]) == 2


@pytest.mark.parametrize("grid", [(4, 4), (4, 5), (3, 6)])
def test_spectrum_energy_sums_to_the_residuals_energy(grid):
    """The analysis' half-plane spectrum counts each mirrored column twice: its total is the full spectrum's,
    h w times the residuals' own energy (Parseval), and a constant residual has all of it at DC."""
    from eval.fourier_analysis import residual_energy
    h, w = grid
    x = np.random.default_rng(0).standard_normal((3, h * w, 5))
    energy = residual_energy(x, grid)
    np.testing.assert_allclose(energy.sum(), h * w * (x ** 2).sum(axis=1).mean(), rtol=1e-10)
    constant = residual_energy(np.ones((1, h * w, 2)), grid)
    assert constant[0, 0] == pytest.approx(constant.sum())
