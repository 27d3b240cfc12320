"""The metrics are right: MS-SSIM against an independent implementation of Wang et al. (2003).

No published MS-SSIM golden value could be reproduced here without its reference images and
TensorFlow, so the check is against ``reference_ms_ssim`` below: numpy/scipy, written from the
paper (11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, weights 0.0448, 0.2856, 0.3001,
0.2363, 0.1333, 2x2 average pooling between scales, 'valid' filtering, per channel then mean),
in float64, sharing no code with pytorch-msssim. Agreement within 1e-4 is required.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.signal import convolve2d

from pipeline.evaluation import metrics as M

WEIGHTS = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])
KODAK = Path("/work/shared/datasets/kodak/kodim23.png")


def _gauss(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    return np.outer(g, g)


def _ssim_cs(x: np.ndarray, y: np.ndarray, L: float = 255.0) -> tuple[float, float]:
    w = _gauss()
    f = lambda a: convolve2d(a, w, mode="valid")  # noqa: E731 - symmetric kernel: convolution = correlation
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    return float((lum * cs).mean()), float(cs.mean())


def _pool(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    assert h % 2 == 0 and w % 2 == 0
    return a.reshape(h // 2, 2, w // 2, 2).mean((1, 3))


def reference_ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    values = []
    for c in range(3):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        total = 1.0
        for level, weight in enumerate(WEIGHTS):
            s, cs = _ssim_cs(x, y)
            if level == len(WEIGHTS) - 1:
                total *= max(s, 0.0) ** weight
            else:
                total *= max(cs, 0.0) ** weight
                x, y = _pool(x), _pool(y)
        values.append(total)
    return float(np.mean(values))


def _pair(h: int = 256, w: int = 384) -> tuple[np.ndarray, np.ndarray]:
    """A natural image crop (Kodak when present) and its JPEG-compressed version."""
    if KODAK.exists():
        img = np.asarray(Image.open(KODAK).convert("RGB"))[:h, :w]
    else:
        rng = np.random.default_rng(1)
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([128 + 100 * np.sin(xx / (9 + 3 * c)) * np.cos(yy / 13) for c in range(3)], -1)
        img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=15)
    return np.ascontiguousarray(img), np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def test_ms_ssim_matches_independent_reference():
    a, b = _pair()
    ours = M.Reference(a).compare(b).ms_ssim
    ref = reference_ms_ssim(b, a)
    assert 0.5 < ref < 0.999  # a meaningful, not saturated, pair
    assert abs(ours - ref) < 1e-4, (ours, ref)


def test_ms_ssim_matches_reference_on_noise():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (192, 224, 3), dtype=np.uint8)
    b = np.clip(a.astype(np.int16) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    assert abs(M.Reference(a).compare(b).ms_ssim - reference_ms_ssim(b, a)) < 1e-4


def test_one_pass_equals_the_librarys_ms_ssim_and_ssim():
    from pytorch_msssim import ms_ssim, ssim

    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (171, 197, 3), dtype=np.uint8)  # odd sides: every level pads its pooling
    b = np.clip(a.astype(np.int16) + rng.integers(-60, 61, a.shape), 0, 255).astype(np.uint8)
    x, y = M.to_tensor(b), M.to_tensor(a)
    both = M.ms_ssim_and_ssim(x, y)
    assert both == pytest.approx((float(ms_ssim(x, y, data_range=255)), float(ssim(x, y, data_range=255))), abs=1e-6)
    assert 0.2 < both[1] < both[0] < 0.99  # a pair where the two differ


def test_identical_images():
    a, _ = _pair()
    q = M.Reference(a).compare(a.copy())
    assert q.ms_ssim == pytest.approx(1.0, abs=1e-6)
    assert q.ssim == pytest.approx(1.0, abs=1e-6)
    assert q.psnr == M.MAX_DB


def test_ssim_is_single_scale_and_differs_from_ms_ssim():
    a, b = _pair()
    q = M.Reference(a).compare(b)
    s_ref = np.mean([_ssim_cs(b[..., c].astype(float), a[..., c].astype(float))[0] for c in range(3)])
    assert abs(q.ssim - s_ref) < 1e-4
    assert abs(q.ssim - q.ms_ssim) > 1e-3


def test_db_and_psnr_values():
    assert M.db(0.9) == pytest.approx(10.0)
    assert M.db(0.99) == pytest.approx(20.0)
    assert M.db(1.0) == M.MAX_DB
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # MSE = 255^2 / 48
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(48))


def test_reference_rejects_small_images():
    with pytest.raises(ValueError, match="161"):
        M.Reference(np.zeros((160, 400, 3), np.uint8))
