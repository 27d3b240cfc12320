"""Invariants of the on-device batch augmentations the classifier trains with."""

import torch
import torch.nn.functional as F

from pipeline.data.transforms import augment_batch, random_cutout, random_flip, random_translate
from pipeline.data.params import AugmentationParams


def batch(n=16, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g) + 0.1  # strictly positive: zeros come from cutout only


def test_flip_twice_is_identity():
    x = batch()
    once = random_flip(x, torch.Generator().manual_seed(5))
    twice = random_flip(once, torch.Generator().manual_seed(5))  # same coins
    assert torch.equal(twice, x)
    flipped = [not torch.equal(a, b) for a, b in zip(once, x)]
    assert any(flipped) and not all(flipped)  # some images mirrored, some not
    for a, b, f in zip(once, x, flipped):
        assert torch.equal(a, b.flip(-1) if f else b)


def test_translate_keeps_shape_and_only_shifts():
    x, pad = batch(), 2
    out = random_translate(x, pad, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    shifts = set()
    for i in range(len(x)):  # each output is exactly one window of the reflect-padded input
        matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32])]
        assert matches, f"image {i} is not a shift of its input"
        shifts.add(matches[0])
    assert len(shifts) > 1  # shifts are random per image
    assert torch.equal(random_translate(x, 0), x)


def test_translate_uint8():
    x = (batch() * 200).to(torch.uint8)
    out = random_translate(x, 3, torch.Generator().manual_seed(2))
    assert out.dtype == torch.uint8 and out.shape == x.shape


def test_cutout_zeroes_at_most_size_squared_per_channel():
    x, size = batch(n=64), 8
    out = random_cutout(x, size, torch.Generator().manual_seed(3))
    zeros = (out == 0).sum(dim=(2, 3))  # (n, c)
    assert (zeros <= size * size).all() and (zeros > 0).all()
    assert (zeros == zeros[:, :1]).all()  # the same square in every channel
    keep = out != 0
    assert torch.equal(out[keep], x[keep])  # nothing else changes
    assert (zeros == size * size).any()  # squares fully inside the image are whole


def test_augment_batch_is_seeded():
    cfg = AugmentationParams(flip=True, translate=2, cutout=4)
    x = batch()
    a = augment_batch(x, cfg, torch.Generator().manual_seed(9))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(9))
    assert torch.equal(a, b) and a.shape == x.shape
