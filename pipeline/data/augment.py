"""Stage ``augment``: materialise what training reads.

- ``data/prepared/cifar10.npz``: CIFAR-10 as compact uint8 arrays (N, 32, 32, 3) with int64 labels.
- ``data/prepared/patches.npz``: the compressor's patches, random crops (after reflect padding) and
  flips of CIFAR-10 *training* images, plus held-out ones cut from *test* images. Kodak is never
  used here: it is the codec's test set.
- ``data/prepared/preview.png``: a grid of augmented samples (classifier augmentation and patches).

Everything is reproducible from ``seed``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.data.cifar import load_cifar
from pipeline.data.params import AugmentParams
from pipeline.utils import atomic_path, log

STAGE = "augment"
#: the stage's input and outputs (pipeline/stage.py); dvc.yaml's cmd gives them
PATHS = ("raw", "cifar", "patches", "preview")
DATASETS = {"raw": "CIFAR-10"}  # logged to MLflow as the run's dataset input (pipeline/stage.py)
#: params it reads: its section, and the classifier's augmentation (shown in preview.png)
SECTIONS = ("augment", "train_classifier.augmentation")
KODAK = Path("data/raw/kodak")  # refused as a patch source (it is the codec's test set)


def upscale(images: np.ndarray, scale: int, chunk: int = 1024) -> np.ndarray:
    """Bicubic ×``scale`` upsampling of uint8 (N, H, W, C) images (rounded, clipped to 0..255)."""
    import torch
    import torch.nn.functional as F

    out = np.empty((len(images), images.shape[1] * scale, images.shape[2] * scale, images.shape[3]), np.uint8)
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(images[i:i + chunk]).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
        out[i:i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def random_patches(images: np.ndarray, count: int, size: int, pad: int, flip: bool,
                   rng: np.random.Generator, scale: int = 1, chunk: int = 2048) -> np.ndarray:
    """``count`` random ``size``×``size`` crops of reflect-padded images, randomly mirrored.

    ``scale`` > 1: each source image is first upsampled ×scale (bicubic), which gives smoother,
    photo-like patches (per-block detail closer to Kodak's than native 32×32 thumbnails have).
    Upsampled in chunks, so memory stays bounded whatever ``count`` is.
    """
    if scale > 1:
        out = np.empty((count, size, size, images.shape[3]), np.uint8)
        for i in range(0, count, chunk):
            n = min(chunk, count - i)
            src = images[rng.integers(0, len(images), n)]
            out[i:i + n] = random_patches(upscale(src, scale), n, size, pad, flip, rng)
        return out
    src = rng.integers(0, len(images), count)
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect") if pad else images
    h, w = padded.shape[1:3]
    ys = rng.integers(0, h - size + 1, count)
    xs = rng.integers(0, w - size + 1, count)
    flips = rng.random(count) < 0.5 if flip else np.zeros(count, bool)
    out = np.empty((count, size, size, images.shape[3]), np.uint8)
    for i in range(count):
        patch = padded[src[i], ys[i]:ys[i] + size, xs[i]:xs[i] + size]
        out[i] = patch[:, ::-1] if flips[i] else patch
    return out


def preview_grid(tiles: np.ndarray, grid: int) -> np.ndarray:
    """Tile up to grid×grid HWC uint8 images into one image, 2 px gutters."""
    n, h, w, c = tiles.shape
    canvas = np.full((grid * (h + 2), grid * (w + 2), c), 255, np.uint8)
    for i in range(min(n, grid * grid)):
        r, col = divmod(i, grid)
        canvas[r * (h + 2):r * (h + 2) + h, col * (w + 2):col * (w + 2) + w] = tiles[i]
    return canvas


def prepare(params: AugmentParams, augmentation, seed: int, raw: Path, cifar_out: Path, patches_out: Path,
            preview_out: Path) -> dict[str, float]:
    """Write the three outputs (each appearing complete, or not at all); returns what MLflow logs."""
    import torch
    from PIL import Image

    from pipeline.data.transforms import augment_batch

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    data = load_cifar(raw)
    if params.train_limit:
        data["x_train"], data["y_train"] = data["x_train"][:params.train_limit], data["y_train"][:params.train_limit]
    if params.test_limit:
        data["x_test"], data["y_test"] = data["x_test"][:params.test_limit], data["y_test"][:params.test_limit]
    for out in (cifar_out, patches_out, preview_out):
        out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cifar_out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **data)
    if params.patch_source == "cifar10":
        patches = {
            "train": random_patches(data["x_train"], params.patches, params.patch_size, params.patch_pad,
                                    params.patch_flip, rng, params.patch_scale),
            "val": random_patches(data["x_test"], params.val_patches, params.patch_size, 0, False, rng,
                                  params.patch_scale),
        }
    else:  # the user's own photos (pipeline/data/photos.py); Kodak is refused
        from pipeline.data.photos import photo_patches

        patches = photo_patches(Path(params.patch_source), params.patches, params.val_patches, params.patch_size,
                                params.patch_min_std, params.patch_flip, rng, kodak=KODAK)
    with atomic_path(patches_out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **patches)
    # preview: left half classifier augmentation of training images, right half codec patches
    g = params.preview_grid
    gen = torch.Generator().manual_seed(seed)
    sample = torch.from_numpy(data["x_train"][: g * g]).permute(0, 3, 1, 2)
    augmented = augment_batch(sample, augmentation, gen).permute(0, 2, 3, 1).numpy()
    patch_view = patches["train"][: g * g]
    if params.patch_size > 32:  # shown at the classifier samples' 32 px (area downsampling)
        patch_view = np.stack([np.asarray(Image.fromarray(p).resize((32, 32), Image.BOX)) for p in patch_view])
    elif params.patch_size < 32:
        patch_view = np.pad(patch_view, ((0, 0), (0, 32 - params.patch_size), (0, 32 - params.patch_size), (0, 0)),
                            constant_values=255)
    left, right = preview_grid(augmented, g), preview_grid(patch_view, g)
    canvas = np.concatenate([left, np.full((left.shape[0], 8, 3), 255, np.uint8), right], axis=1)
    img = Image.fromarray(canvas).resize((canvas.shape[1] * 3, canvas.shape[0] * 3), Image.NEAREST)
    with atomic_path(preview_out) as tmp:
        img.save(tmp, format="PNG")
    log(f"[augment] {len(data['x_train'])} train / {len(data['x_test'])} test images, "
        f"{params.patches} + {params.val_patches} patches -> {cifar_out}, {patches_out}")
    return {"train_images": len(data["x_train"]), "test_images": len(data["x_test"]),
            "patches": params.patches, "val_patches": params.val_patches,
            "seconds": time.perf_counter() - start}


def run(params, paths) -> None:
    """The stage (pipeline/stage.py): ``params`` validated, its MLflow run active."""
    import mlflow

    mlflow.log_metrics(prepare(params.augment, params.train_classifier.augmentation, params.seed, paths.raw,
                               paths.cifar, paths.patches, paths.preview))
    mlflow.log_artifact(str(paths.preview))
