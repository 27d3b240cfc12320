"""Codec training patches from a folder of the user's own photos (``augment.patch_source``).

Random ``size``×``size`` crops of the images under a folder (PNG, JPEG, WebP, TIFF, BMP; EXIF
orientation applied), optionally only crops whose pixel standard deviation reaches ``min_std`` (the
high-variance patches Toderici et al. 2017 train on). Every 10th file (sorted by path) is held out
for the validation patches. Kodak is the codec's test set and is refused as a source: any file whose
pixels equal a Kodak image's (by SHA-256 of the decoded RGB pixels, so a re-encoded PNG is caught too)
ends the stage with an error. Images are read one at a time and every crop is copied out, so memory
is the patches plus one photo.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.utils import log, progress

SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
HOLDOUT_EVERY = 10  # every 10th photo gives the validation patches


def photo_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise PipelineError(f"augment.patch_source: {folder} is not a folder (or use 'cifar10')")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    if len(files) < 2:
        raise PipelineError(f"augment.patch_source: {folder} holds {len(files)} images; at least 2 are needed "
                            f"(one in {HOLDOUT_EVERY} is held out for validation)")
    return files


def read_photo(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise PipelineError(f"{path}: not a readable image ({err})") from None


def pixel_digest(img: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(img).tobytes() + str(img.shape).encode()).hexdigest()


def kodak_digests(kodak: Path) -> set[str]:
    """Pixel digests of the Kodak images in ``kodak`` (the test set), if that folder exists."""
    return {pixel_digest(read_photo(p)) for p in sorted(kodak.glob("kodim*.png"))} if kodak.is_dir() else set()


def crops(img: np.ndarray, count: int, size: int, min_std: float, flip: bool, rng: np.random.Generator,
          tries: int = 20) -> np.ndarray:
    """``count`` random crops of one image; each crop is re-drawn up to ``tries`` times to reach ``min_std``."""
    h, w = img.shape[:2]
    if h < size or w < size:
        return np.empty((0, size, size, 3), np.uint8)
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        for _ in range(tries):
            y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
            patch = img[y:y + size, x:x + size]
            if patch.std() >= min_std:
                break
        out[i] = patch[:, ::-1] if flip and rng.random() < 0.5 else patch
    return out


def photo_patches(folder: Path, count: int, val_count: int, size: int, min_std: float, flip: bool,
                  rng: np.random.Generator, kodak: Path) -> dict[str, np.ndarray]:
    """{'train', 'val'} uint8 patch arrays from a folder of photos, spread evenly over the images."""
    files = photo_files(folder)
    forbidden = kodak_digests(kodak)
    val_files = files[::HOLDOUT_EVERY]
    held_out = set(val_files)
    train_files = [f for f in files if f not in held_out]
    out = {}
    for name, group, n in (("train", train_files, count), ("val", val_files, val_count)):
        per = np.full(len(group), n // len(group))
        per[: n % len(group)] += 1
        parts = []
        for path, k in progress(list(zip(group, per)), desc=f"{name} patches from {folder}", unit="photo"):
            img = read_photo(path)
            if forbidden and pixel_digest(img) in forbidden:
                raise PipelineError(f"{path}: is a Kodak image; Kodak is the codec's test set, never a training source")
            if k:
                parts.append(crops(img, int(k), size, min_std, flip and name == "train", rng))
        patches = np.concatenate(parts) if parts else np.empty((0, size, size, 3), np.uint8)
        if len(patches) == 0:
            raise PipelineError(f"augment.patch_source: no {name} image in {folder} is at least {size}x{size} px")
        out[name] = patches
    log(f"[augment] {len(out['train'])} + {len(out['val'])} patches from {len(train_files)} + {len(val_files)} "
        f"photos in {folder}")
    return out
