"""The codec's training patches: upsampled CIFAR-10 crops (augment.patch_scale)."""

from __future__ import annotations

import numpy as np

from pipeline.data.augment import random_patches, upscale


def _detail(patches: np.ndarray) -> float:
    """Mean absolute difference between horizontal neighbours (a crude per-pixel detail measure)."""
    p = patches.astype(np.float64)
    return float(np.abs(np.diff(p, axis=2)).mean())


def test_upscale_keeps_flat_images_flat_and_scales_the_shape():
    flat = np.full((3, 8, 8, 3), 77, np.uint8)
    up = upscale(flat, 4)
    assert up.shape == (3, 32, 32, 3) and up.dtype == np.uint8
    assert (up == 77).all()


def test_upscaled_patches_are_smoother_and_reproducible():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)  # white noise: maximal detail
    native = random_patches(images, 200, 32, 4, True, np.random.default_rng(1))
    up4 = random_patches(images, 200, 32, 4, True, np.random.default_rng(1), scale=4, chunk=64)
    again = random_patches(images, 200, 32, 4, True, np.random.default_rng(1), scale=4, chunk=64)
    assert up4.shape == native.shape == (200, 32, 32, 3)
    np.testing.assert_array_equal(up4, again)
    # bicubic x4 spreads each source pixel over 4 output pixels: neighbour differences drop ~4x
    assert _detail(up4) < 0.4 * _detail(native)


def _write_photos(folder, n, size=(96, 80), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        img[:, : size[0] // 2] = 128  # a flat half: only the other half passes a std threshold
        Image.fromarray(img).save(folder / f"photo{i:02d}.png")


def test_photo_folder_gives_train_and_held_out_patches(tmp_path):
    from pipeline.data.photos import photo_patches

    _write_photos(tmp_path / "photos", 11)
    out = photo_patches(tmp_path / "photos", 50, 7, 32, 20.0, True, np.random.default_rng(0), tmp_path / "nokodak")
    assert out["train"].shape == (50, 32, 32, 3) and out["val"].shape == (7, 32, 32, 3)
    # min_std: every crop was re-drawn until it reached the threshold (the flat half has std 0)
    assert min(p.std() for p in out["train"]) >= 20.0


def test_kodak_is_refused_as_a_training_source(tmp_path):
    from PIL import Image

    from pipeline.data.photos import photo_patches
    from pipeline.errors import PipelineError

    _write_photos(tmp_path / "photos", 3)
    kodak = tmp_path / "kodak"
    kodak.mkdir()
    # the "Kodak" image is one of the photos, re-encoded as another file: same pixels, other bytes
    img = np.asarray(Image.open(tmp_path / "photos" / "photo01.png"))
    Image.fromarray(img).save(kodak / "kodim01.png", compress_level=1)
    import pytest

    with pytest.raises(PipelineError, match="Kodak"):
        photo_patches(tmp_path / "photos", 10, 2, 32, 0.0, False, np.random.default_rng(0), kodak)
    with pytest.raises(PipelineError, match="not a folder"):
        photo_patches(tmp_path / "missing", 10, 2, 32, 0.0, False, np.random.default_rng(0), kodak)
