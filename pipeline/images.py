"""Reading an image file as the pipeline sees it, and the one bits-per-pixel formula.

``read_image`` is the one reader of user and dataset images (``rnnc compress``, ``predict``, the
evaluate stage): the file is decoded in full (a truncated file fails here), turned upright as its
EXIF orientation says (as image viewers do), and converted to 8-bit RGB: high-bit-depth grayscale
is scaled to 8 bits, an alpha channel dropped. Pillow's pixel limit applies
(``PIL.Image.MAX_IMAGE_PIXELS``; twice it is refused as a decompression bomb). Every failure is one
clear ``PipelineError`` line naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import PipelineError

_HIGH_DEPTH = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def bits_per_pixel(n_bytes: int, height: int, width: int) -> float:
    """BPP of a file of ``n_bytes`` bytes (header included) for an image of height x width: 8 N / (H W)."""
    return 8 * n_bytes / (height * width)


def read_image(path: str | os.PathLike, *, error: type[PipelineError] = PipelineError,
               note: Callable[[str], None] | None = None) -> np.ndarray:
    """Any image Pillow reads -> uint8 HxWx3, upright (EXIF orientation applied).

    ``error``: the PipelineError subclass raised for an unusable file; ``note(text)`` is told of
    every conversion other than RGB -> RGB (the rnnc CLI prints it; by default nothing is said).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise error(f"{path}: no such file")
    if not path.is_file():
        raise error(f"{path}: not a file" + (" (is a directory)" if path.is_dir() else ""))
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im, path, note)
    except Image.DecompressionBombError as err:
        raise error(f"{path}: {err}") from None
    except UnidentifiedImageError:
        raise error(f"{path}: not an image file (format not recognised)") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise error(f"{path}: corrupt or unreadable image ({err})") from None


def _to_rgb(im, path: Path, note: Callable[[str], None] | None) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode in _HIGH_DEPTH:
        a = np.asarray(im).astype(np.float64)
        if mode != "F" and a.max(initial=0) > 255:
            a = a * (255.0 / 65535.0)
        gray = np.clip(np.round(a), 0, 255).astype(np.uint8)
        if note:
            note(f"{path}: {mode} (high bit depth grayscale) converted to 8-bit RGB")
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = "A" in mode or "transparency" in im.info
    rgb = im.convert("RGBA").convert("RGB") if has_alpha else im.convert("RGB")
    if note:
        note(f"{path}: {mode} image converted to RGB" + (" (alpha channel dropped)" if has_alpha else ""))
    return np.asarray(rgb, dtype=np.uint8).copy()
