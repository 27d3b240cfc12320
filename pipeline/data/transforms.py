"""Batched augmentations as tensor ops: they run on whatever device holds the batch.

Images are float or uint8 tensors of shape (N, C, H, W). Each function takes a torch.Generator on
the batch's device so runs are reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_flip(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Mirror a random half of the batch left-right."""
    mask = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def random_translate(x: torch.Tensor, pad: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels in each direction (reflect padding, then crop)."""
    if pad <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x.float() if not x.is_floating_point() else x, (pad,) * 4, mode="reflect").to(x.dtype)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # (n, h)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # (n, w)
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    idx_c = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


def random_cutout(x: torch.Tensor, size: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Zero one random ``size``×``size`` square per image (it may be clipped by the border)."""
    if size <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), device=x.device, generator=gen)
    cx = torch.randint(0, w, (n,), device=x.device, generator=gen)
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys - (cy[:, None] - size // 2)).clamp(min=-1).lt(size) & (ys >= cy[:, None] - size // 2)
    in_x = (xs - (cx[:, None] - size // 2)).clamp(min=-1).lt(size) & (xs >= cx[:, None] - size // 2)
    mask = in_y[:, None, :, None] & in_x[:, None, None, :]
    return x.masked_fill(mask, 0)


def augment_batch(x: torch.Tensor, cfg, gen: torch.Generator | None = None) -> torch.Tensor:
    """Apply the classifier augmentation of an ``AugmentationParams`` to a batch."""
    if cfg.flip:
        x = random_flip(x, gen)
    x = random_translate(x, cfg.translate, gen)
    return random_cutout(x, cfg.cutout, gen)
