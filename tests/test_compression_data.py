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
