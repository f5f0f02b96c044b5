"""Crop-window decoding (data/decode.py, data/jpeg.py): the same pixels and the same augmentation
distribution as decoding whole images with Pillow, for less work; damaged files still reported."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from jaxvision.data import decode, jpeg, pipeline, sources, transforms


def photos(count: int, seed: int = 0) -> list[bytes]:
    """ImageNet-like JPEGs from scikit-learn's two sample photos: crops and scales to a long side
    of 350-500 px, aspect 3:4 to 4:3, quality 75-95."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = load_sample_images().images[i % 2]
        h, w = photo.shape[:2]
        ch = int(h * rng.uniform(0.7, 1.0))
        cw = min(w, int(ch * rng.uniform(3 / 4, 4 / 3)))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        image = Image.fromarray(photo[top:top + ch, left:left + cw])
        scale = rng.uniform(350, 500) / max(ch, cw)
        image = image.resize((round(cw * scale), round(ch * scale)), Image.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
        out.append(buf.getvalue())
    return out


def pil_crop_resize(data: bytes, box, size: int, interpolation: str) -> np.ndarray:
    """The reference: Pillow decodes all of it, then resizes the box (torchvision's way)."""
    top, left, h, w = box
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    full = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(full.resize((size, size), resample, box=(left, top, left + w, top + h)))


def corners(box) -> np.ndarray:
    top, left, h, w = box
    return np.array([top, left, top + h, left + w])


def test_the_crop_window_decoder_builds_here():
    """CI has a C compiler and libjpeg-turbo's headers, so the fast path must not silently
    degrade to Pillow there."""
    assert not isinstance(jpeg.library(), str), jpeg.library()


def test_without_the_decoder_a_run_says_why_once_and_uses_pillow(monkeypatch, caplog):
    monkeypatch.setattr(jpeg, "_load", lambda: "no C compiler (cc, gcc or $CC)")
    jpeg.library.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            image = decode.EncodedImage(photos(1)[0], "photo")
            assert decode.crop_resize(image, (0, 0, 100, 100), 32, 32, "bilinear").shape == (32, 32, 3)
            jpeg.library()
        assert [r.getMessage() for r in caplog.records].count(
            "jaxvision: no crop-window JPEG decoding, so whole images are decoded with Pillow "
            "(0.6x the host throughput): no C compiler (cc, gcc or $CC). Install a C compiler "
            "and libjpeg-turbo's headers (Debian/Ubuntu: apt install gcc libjpeg-dev).") == 1
    finally:
        jpeg.library.cache_clear()


@pytest.mark.parametrize("fast", [True, False], ids=["libjpeg-turbo", "pillow-draft"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_a_box_matches_pillow_on_the_full_decode(fast, interpolation, monkeypatch):
    """Random crops and the evaluation view: the box decoded is the box asked for, its corners
    moved by less than half a pixel of the reduced size, and its pixels differ from Pillow's
    resize of the full decode by a mean absolute difference below 2 grey levels (of 255), 5 for
    the worst crop, while decoding far fewer pixels than the images hold. Measured: 1.2 / 3.7
    bilinear, 1.5 / 3.3 bicubic (OpenCV's cubic is sharper than Pillow's); Pillow's own bilinear
    and bicubic differ by 1.3 / 2.8 on these crops."""
    if not fast:
        monkeypatch.setattr(jpeg, "library", lambda: "disabled for this test")
    rng = np.random.default_rng(1)
    errors, decoded, stored = [], 0, 0
    for data in photos(12):
        image = decode.EncodedImage(data, "photo")
        for box in [transforms.random_box(*image.shape, rng) for _ in range(4)] + \
                [transforms.center_box(*image.shape, 224, 0.875)]:
            pixels, used = decode.window(image, box, 224, 224)
            factor = pixels.shape[0] / used[2]
            assert factor <= 1 and np.abs(corners(used) - corners(box)).max() <= 0.5 / factor + 1e-9
            assert pixels.shape[0] >= min(224, box[2]) * factor - 1
            got = decode.crop_resize(image, box, 224, 224, interpolation)
            want = pil_crop_resize(data, used, 224, interpolation)
            assert got.shape == want.shape == (224, 224, 3) and got.dtype == np.uint8
            errors.append(np.abs(got.astype(np.int16) - want).mean())
            decoded += math.prod(pixels.shape[:2])
            stored += math.prod(image.shape)
    assert np.mean(errors) < 2 and max(errors) < 5, (np.mean(errors), max(errors))
    if fast:
        assert decoded < 0.5 * stored, decoded / stored


def test_the_evaluation_box_is_what_resize_then_centre_crop_reads():
    """center_box: the part of the stored image that resizing the short side to size / crop_pct
    and keeping the central size x size shows; for pixels in memory, Pillow's resize of it is
    that view. (An encoded image's view is one of the boxes of the test above.)"""
    for h, w in ((375, 500), (500, 333), (224, 224), (80, 640)):
        short = math.floor(224 / 0.875)
        nh, nw = (short, max(short, round(w * short / h))) if h < w else (max(short, round(h * short / w)), short)
        top, left = (nh - 224) // 2, (nw - 224) // 2
        want = np.array([top * h / nh, left * w / nw, 224 * h / nh, 224 * w / nw])
        np.testing.assert_allclose(transforms.center_box(h, w, 224, 0.875), want, atol=1e-9)
    for data in photos(4, seed=2):
        full = Image.open(io.BytesIO(data)).convert("RGB")
        short = math.floor(224 / 0.875)
        nh, nw = (short, round(full.width * short / full.height)) if full.height < full.width else \
            (round(full.height * short / full.width), short)
        top, left = (nh - 224) // 2, (nw - 224) // 2
        want = np.asarray(full.resize((nw, nh), Image.BICUBIC))[top:top + 224, left:left + 224]
        got = transforms.center_crop(np.asarray(full), 224, 0.875, "bicubic")
        assert np.abs(got.astype(np.int16) - want).mean() < 0.01


@pytest.mark.parity
def test_crop_statistics_and_pixel_means_match_torchvision():
    """Boxes: scale and log-aspect histograms (20 bins) within 0.015 of torchvision's
    RandomResizedCrop.get_params over 20,000 draws each. Pixels: per-channel means of the
    training transform (crop-window decoding, flip) within 2 grey levels of torchvision's
    RandomResizedCrop + RandomHorizontalFlip on the full decode, 2,400 crops each."""
    import torch
    import torchvision.transforms.v2 as T

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    h, w = 375, 500
    ours = np.array([transforms.random_box(h, w, rng) for _ in range(20000)], float)
    canvas = torch.zeros(3, h, w)
    theirs = np.array([T.RandomResizedCrop.get_params(canvas, [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(20000)], float)
    for stat, bins in ((lambda b: b[:, 2] * b[:, 3] / (h * w), np.linspace(0, 1, 21)),
                       (lambda b: np.log(b[:, 3] / b[:, 2]), np.linspace(-0.6, 0.6, 21))):
        a, _ = np.histogram(stat(ours), bins)
        b, _ = np.histogram(stat(theirs), bins)
        assert np.abs(a - b).max() / 20000 < 0.015

    data = photos(8, seed=3)
    train = transforms.TrainTransform(64, "rrc_flip", interpolation="bilinear")
    reference = T.Compose([T.RandomResizedCrop(64, antialias=True), T.RandomHorizontalFlip(), T.PILToTensor()])
    mine, theirs = [], []
    for i, raw in enumerate(data):
        image = decode.EncodedImage(raw, "photo")
        pil = Image.open(io.BytesIO(raw)).convert("RGB")
        for j in range(300):
            mine.append(train({"image": image, "label": 0}, np.random.default_rng([i, j]))["image"].mean((0, 1)))
            theirs.append(reference(pil).numpy().mean((1, 2)))
    assert np.abs(np.mean(mine, 0) - np.mean(theirs, 0)).max() < 2.0, (np.mean(mine, 0), np.mean(theirs, 0))


def test_a_truncated_jpeg_is_named_and_skipped_even_when_the_crop_ends_above_the_cut(tmp_path, caplog):
    """libjpeg stops reading below the crop, so it would not notice the cut: a file without its
    end-of-image marker goes to Pillow, which reads it all and fails."""
    data = photos(1)[0]
    cut = data[:len(data) * 2 // 3]
    image = decode.EncodedImage(cut, "cut.jpg")
    with pytest.raises(decode.Unreadable, match="cut.jpg"):
        decode.crop_resize(image, (0, 0, 40, 40), 32, 32, "bilinear")

    root = tmp_path / "data"
    for name, payload in (("a/good.jpg", data), ("a/cut.jpg", cut), ("b/good.jpg", data)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(payload)
    src = sources.FolderSource(str(root), "all")
    with caplog.at_level("WARNING"):
        batch = next(iter(pipeline.train_batches(src, transforms.TrainTransform(32), batch_size=6, seed=0)))
        evaluated = list(pipeline.eval_batches(src, transforms.EvalTransform(32), batch_size=3))
    assert batch["image"].shape == (6, 32, 32, 3) and str(root / "a" / "cut.jpg") in caplog.text
    cut_index = src.files.index("a/cut.jpg")
    assert evaluated[0]["mask"].tolist() == [float(i != cut_index) for i in range(3)]


def test_evaluation_with_worker_processes_gives_the_batches_of_one_process(tmp_path):
    from tests.images import image_folder

    src = sources.FolderSource(str(image_folder(tmp_path / "data", per_class=5, size=(40, 52))), "all")
    t = transforms.EvalTransform(24, 0.875)
    alone = list(pipeline.eval_batches(src, t, batch_size=4))
    workers = list(pipeline.eval_batches(src, t, batch_size=4, threads=1, workers=2))
    assert len(alone) == len(workers) == 4
    for a, b in zip(alone, workers):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
