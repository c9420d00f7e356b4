"""Fourier-compressed cache storage: a cached image-token tensor [B, h*w, D] is kept as the low-frequency block
of its 2-D real FFT over the image-token grid (h x w), real and imaginary parts in the model's dtype, and
restored by the inverse real FFT with the other frequencies zero.

Kept frequencies: |u| <= floor(ratio * h / 2) along the rows (both signs) and v <= floor(ratio * w / 2) along
the rfft columns; the DC term is always kept, ratio 1 keeps every frequency. The transform restricted to a
static block is linear, so it is one matmul each way with matrices built once from numpy's rfft2 / irfft2:
the same numbers as rFFT2 -> keep block -> irFFT2 (a test checks it against numpy), with ops that have CPU and
Ascend kernels. Linearity also lets TaylorSeer's factors live in the compressed domain: a forecast is a linear
combination of stored factors, restored once.

Storage per cached tensor: 2 x (kept rows) x (kept columns) coefficient rows instead of h x w token rows (the
imaginary parts of DC and Nyquist terms are always zero but kept for a static shape, and counted).
"""
import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from fbcache_ms.state import CacheState, Feature, TaylorFeature


def kept_frequencies(h, w, ratio):
    """(rows u of the full FFT axis, columns v of the rfft axis) kept at this ratio."""
    if not 0 < ratio <= 1:
        raise ValueError(f"Fourier ratio must be in (0, 1], got {ratio}")
    ku, kv = math.floor(ratio * h / 2), math.floor(ratio * w / 2)
    rows = [u for u in range(h) if min(u, h - u) <= ku]
    return rows, list(range(min(kv, w // 2) + 1))


def fourier_matrices(h, w, ratio):
    """(encoder [M, h*w], decoder [h*w, M]) float64: coefficients = encoder @ tokens, tokens ~ decoder @ coefficients,
    M = 2 x kept rows x kept columns (real parts, then imaginary parts)."""
    rows, cols = kept_frequencies(h, w, ratio)
    n = h * w
    impulses = np.eye(n).reshape(n, h, w)
    spectra = np.fft.rfft2(impulses)[:, rows][:, :, cols].reshape(n, -1)  # [token, kept]
    encoder = np.concatenate([spectra.real, spectra.imag], axis=1).T
    m = len(rows) * len(cols)
    decoder = np.empty((n, 2 * m))
    for k in range(2 * m):
        spectrum = np.zeros((h, w // 2 + 1), np.complex128)
        r, c = divmod(k % m, len(cols))
        spectrum[rows[r], cols[c]] = 1.0 if k < m else 1.0j
        decoder[:, k] = np.fft.irfft2(spectrum, s=(h, w)).reshape(n)
    return encoder, decoder


class FourierCodec(nn.Cell):
    """compress: [B, h*w, D] -> [B, M, D] coefficients; restore: back, in the input's dtype (math in float32)."""

    def __init__(self, grid, ratio):
        super().__init__()
        encoder, decoder = fourier_matrices(grid[0], grid[1], ratio)
        self.encoder = ms.Tensor(encoder.astype(np.float32))
        self.decoder = ms.Tensor(decoder.astype(np.float32))
        self.coefficients = encoder.shape[0]

    def compress(self, x):
        return ops.matmul(self.encoder, x.astype(ms.float32)).astype(x.dtype)

    def restore(self, c):
        return ops.matmul(self.decoder, c.astype(ms.float32)).astype(c.dtype)

    def low_band(self, x):
        """The kept frequencies of x [B, h*w, D] only, back on the token grid."""
        return self.restore(self.compress(x))


def check_grid(grid, tokens):
    if grid[0] * grid[1] != tokens:
        raise ValueError(f"a {grid[0]}x{grid[1]} token grid does not hold {tokens} image tokens")


class FourierFeature(CacheState):
    """A cached image-token tensor stored as its kept Fourier coefficients (Feature's interface)."""

    def __init__(self, shape, dtype, grid, ratio, name="fourier"):
        super().__init__()
        batch, tokens, dim = shape
        check_grid(grid, tokens)
        self.codec = FourierCodec(grid, ratio)
        self.stored = Feature((batch, self.codec.coefficients, dim), dtype, name)

    @property
    def value(self):
        return self.codec.restore(self.stored.value)

    def store(self, x):
        self.stored.store(self.codec.compress(x))
        return x


class FourierTaylorFeature(CacheState):
    """TaylorSeer's factors of an image-token tensor kept in the compressed domain (the forecast is linear in
    them), restored once per forecast (TaylorFeature's interface)."""

    def __init__(self, shape, dtype, order, grid, ratio, name="fourier_taylor"):
        super().__init__()
        batch, tokens, dim = shape
        check_grid(grid, tokens)
        self.codec = FourierCodec(grid, ratio)
        self.factors = TaylorFeature((batch, self.codec.coefficients, dim), dtype, order, name)

    def update(self, x, scales):
        self.factors.update(self.codec.compress(x), scales)
        return x

    def forecast(self, weights):
        return self.codec.restore(self.factors.forecast(weights))
