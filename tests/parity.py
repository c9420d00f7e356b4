"""Parity measures shared by the tests (imported as `from parity import rel_err`)."""
import numpy as np
import torch


def rel_err(ours, ref):
    """max |ours - ref| / max |ref|: the parity measure used throughout the tests."""
    ours = ours.asnumpy() if hasattr(ours, "asnumpy") else np.asarray(ours)
    ref = ref.detach().float().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours.astype(np.float64) - ref).max() / (np.abs(ref).max() + 1e-12))
