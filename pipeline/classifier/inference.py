"""Classifier inference: logits for uint8 images in batches, with test-time augmentation (airbench's TTA).

Used by the training stage's evaluation and by bench/bench_classifier.py.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def tta_logits(model: torch.nn.Module, x: torch.Tensor, level: int) -> list[torch.Tensor]:
    """Logits at TTA levels 0..level: [plain, + mirror, + mirror and 1-px shifts] (airbench)."""
    plain = model(x).float()
    out = [plain]
    if level >= 1:
        out.append(0.5 * plain + 0.5 * model(x.flip(-1)).float())
    if level >= 2:
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :-2, :-2], padded[..., 2:, 2:]]
        shift = torch.stack([0.5 * model(s).float() + 0.5 * model(s.flip(-1)).float() for s in shifted]).mean(0)
        out.append(0.5 * out[1] + 0.5 * shift)
    return out


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int, tta: int = 0,
                   autocast=None, channels_last: bool = False) -> list[torch.Tensor]:
    """Logits for uint8 (N, 3, 32, 32) images at every TTA level up to ``tta`` (stays on device)."""
    was_training = model.training
    model.eval()
    chunks: list[list[torch.Tensor]] = []
    for i in range(0, len(images), batch_size):
        xb = images[i:i + batch_size].float().div_(255)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast or contextlib.nullcontext():
            chunks.append(tta_logits(model, xb, tta))
    model.train(was_training)
    return [torch.cat([c[level] for c in chunks]) for level in range(tta + 1)]
