"""Image quality metrics of a decoded image against its original (uint8 RGB, data range 255).

- ``ms_ssim``: the real 5-scale MS-SSIM of Wang, Simoncelli and Bovik (2003), via
  ``pytorch_msssim.ms_ssim`` (11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03, weights
  0.0448/0.2856/0.3001/0.2363/0.1333, 2x average pooling), computed per RGB channel and averaged.
- ``ms_ssim_db``: ``-10 log10(1 - MS-SSIM)``, the scale on which codecs are usually compared.
- ``ssim``: single-scale mean SSIM (what the coursework plotted under the name "MS-SSIM"), as
  ``pytorch_msssim.ssim``: it is MS-SSIM's first level, so both come from one pass (``ms_ssim_and_ssim``).
- ``psnr``: PSNR over all RGB values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: dB values are capped here (identical images would give +inf)
MAX_DB = 100.0
#: MS-SSIM with 5 scales needs every side > (11 - 1) * 2**4 = 160 px
MIN_SIDE = 161
#: Wang et al. 2003's weights of the 5 scales (pytorch_msssim's default)
WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def to_tensor(img: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 HxWx3 -> float32 1x3xHxW in [0, 255]."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {img.dtype} {img.shape}")
    return torch.from_numpy(np.require(img, requirements=["C", "W"])).to(device).permute(2, 0, 1)[None].float()


def db(similarity: float) -> float:
    """``-10 log10(1 - x)``: MS-SSIM (or SSIM) in decibels, capped at MAX_DB."""
    loss = 1.0 - float(similarity)
    if loss <= 10 ** (-MAX_DB / 10):
        return MAX_DB
    return -10.0 * math.log10(loss)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0:
        return MAX_DB
    return min(MAX_DB, 10.0 * math.log10(255.0**2 / mse))


def ms_ssim_and_ssim(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``pytorch_msssim.ms_ssim(x, y)`` and ``pytorch_msssim.ssim(x, y)`` (data range 255, 11x11 Gaussian
    window, sigma 1.5, K 0.01/0.03) in one pass: single-scale SSIM is MS-SSIM's first level, which
    ``ms_ssim`` computes and throws away. The steps are pytorch_msssim 1.0's ``ms_ssim``, over its own
    per-level ``_ssim``; a test holds both values equal to the library's public functions. Saves a
    third of the metric time (the full-resolution level costs three quarters of an MS-SSIM).
    """
    from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

    win = _fspecial_gauss_1d(11, 1.5).repeat(x.shape[1], 1, 1, 1)
    weights = x.new_tensor(WEIGHTS)
    mcs, single = [], None
    for level in range(len(WEIGHTS)):
        ssim_per_channel, cs = _ssim(x, y, data_range=255, win=win, size_average=False, K=(0.01, 0.03))
        if level == 0:
            single = float(ssim_per_channel.mean())
        if level < len(WEIGHTS) - 1:
            mcs.append(torch.relu(cs))
            padding = [n % 2 for n in x.shape[2:]]
            x, y = F.avg_pool2d(x, 2, padding=padding), F.avg_pool2d(y, 2, padding=padding)
    levels = torch.stack(mcs + [torch.relu(ssim_per_channel)])  # (level, batch, channel)
    return float(torch.prod(levels ** weights.view(-1, 1, 1), dim=0).mean()), single


@dataclass(frozen=True)
class Quality:
    ms_ssim: float
    ms_ssim_db: float
    ssim: float
    psnr: float


class Reference:
    """An original image kept on the metric device, compared with many decoded versions of it."""

    def __init__(self, img: np.ndarray, device: torch.device | str = "cpu"):
        if min(img.shape[:2]) < MIN_SIDE:
            raise ValueError(f"MS-SSIM (5 scales) needs both sides >= {MIN_SIDE} px, got {img.shape[1]}x{img.shape[0]}")
        self.img = img
        self.device = torch.device(device)
        self.tensor = to_tensor(img, self.device)

    @torch.no_grad()
    def compare(self, decoded: np.ndarray) -> Quality:
        if decoded.shape != self.img.shape:
            raise ValueError(f"decoded image is {decoded.shape}, original {self.img.shape}")
        m, s = ms_ssim_and_ssim(to_tensor(decoded, self.device), self.tensor)
        return Quality(ms_ssim=m, ms_ssim_db=db(m), ssim=s, psnr=psnr(decoded, self.img))

