"""The image sets the evaluation codes: Kodak, a folder of your own photos, a downloaded public set.

``evaluate.dataset`` (and each of ``evaluate.extra_datasets``) is a *name*, mapped to a fixed folder
(``FOLDERS``): ``kodak`` -> data/raw/kodak (the download stage's 24 PNGs), ``images`` -> data/images
(your own photos, or a link to them: dvc.yaml declares the folder a dependency of ``evaluate``, so a
changed folder re-runs it), and the name of ``data.test_photos`` -> data/raw/test_photos (a public set
the download stage fetches by its official URL and checksum). Never a path: a DAG run's conf may pick
a set, not point a stage at an arbitrary folder.

A folder set is every image file in the folder and its subfolders (``SUFFIXES``; other files, such as
a README, are left alone), sorted by path, the first ``limit`` of them. Every image is decoded once
before any coding starts (``open_set``), so an unreadable file, an image too small for 5-scale
MS-SSIM (shorter side < 161 px, or smaller than the centre crop) or an empty folder ends the stage
with one line naming it, before anything is written. Images are read as ``pipeline.images.read_image``
reads them (EXIF orientation applied; grey, palette, 16-bit and RGBA converted to 8-bit RGB, alpha
dropped); sizes may differ from image to image.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.evaluation.metrics import MIN_SIDE

KODAK, IMAGES = "kodak", "images"
#: a set's name -> its folder (stage path option): see the module's docstring
FOLDERS = {KODAK: "kodak", IMAGES: "images"}  # any other name: ``test_photos``
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class ImageSet:
    """The images of one set, checked: each one's name in the tables, file and size as evaluated."""

    name: str  # kodak | images | data.test_photos' name
    folder: Path
    paths: list[Path]
    names: list[str]  # the images' names in every table: the file's path below the folder, without suffix
    sizes: list[tuple[int, int]]  # (width, height) as evaluated: upright (EXIF), centre-cropped
    crop: int | None = None
    ignored: list[str] = field(default_factory=list)  # other files in the folder (not images by their suffix)

    @property
    def kodak(self) -> bool:
        return self.name == KODAK

    def describe(self) -> str:
        return f"{self.name} ({self.folder}: {describe_sizes(self.sizes)})"


def describe_sizes(sizes: list[tuple[int, int]]) -> str:
    """``24 images, 0.39 MP: 768x512 (18), 512x768 (6)``; up to 8 sizes listed, more summarised."""
    if not sizes:
        return "no images"
    counts = Counter(sizes).most_common()
    n = len(sizes)
    head = f"{n} image{'s' * (n != 1)}"
    mp = sorted(w * h / 1e6 for w, h in sizes)
    span = f"{mp[0]:.2f} MP" if mp[0] == mp[-1] else f"{mp[0]:.2f}-{mp[-1]:.2f} MP"
    if len(counts) <= 8:
        return f"{head}, {span}: " + ", ".join(f"{w}x{h}" + (f" ({c})" if c > 1 else "") for (w, h), c in counts)
    common = [f"{w}x{h} ({c})" for (w, h), c in counts[:3] if c > 1]
    return (f"{head} of {len(counts)} sizes, {span} (median {float(np.median(mp)):.2f} MP)"
            + (f"; most common {', '.join(common)}" if common else ""))


def folder_of(name: str, folders: dict[str, Path], test_photos: str | None) -> Path:
    """The folder of the set ``name`` (``folders``: the stage's kodak, images and test_photos paths)."""
    if name in FOLDERS:
        return Path(folders[FOLDERS[name]])
    if test_photos is not None and name == test_photos:
        return Path(folders["test_photos"])
    known = ", ".join([*FOLDERS, *([test_photos] if test_photos else [])])
    raise PipelineError(f"evaluate.dataset: no image set named {name!r} (known: {known}; a set of your own photos "
                        "is 'images', the folder data/images; a public set is named by data.test_photos)")


def kodak_paths(root: Path, indices: list[int] | None) -> list[Path]:
    if indices is None:
        paths = sorted(p for p in root.glob("kodim*.png") if re.fullmatch(r"kodim\d\d\.png", p.name))
    else:
        paths = [root / f"kodim{i:02d}.png" for i in indices]
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            raise PipelineError(f"{root}: missing {', '.join(missing)} (run the download stage)")
    if not paths:
        raise PipelineError(f"{root}: no kodimNN.png images (run the download stage)")
    return paths


def image_files(folder: Path, what: str = "evaluate.dataset") -> tuple[list[Path], list[str]]:
    """The image files under ``folder`` (by suffix, hidden files and folders skipped), sorted by path, and the
    names of the other files."""
    if not folder.exists():
        raise PipelineError(f"{what}: {folder}: no such folder")
    if not folder.is_dir():
        raise PipelineError(f"{what}: {folder}: not a folder")
    files, ignored = [], []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        (files if p.suffix.lower() in SUFFIXES else ignored).append(p)
    if not files:
        raise PipelineError(f"{what}: {folder}: no image in it (PNG or JPEG files: {', '.join(SUFFIXES)})")
    return files, [p.relative_to(folder).as_posix() for p in ignored]


def crop_box(h: int, w: int, crop: int | None) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the centre crop (the whole image when ``crop`` is None)."""
    if crop is None:
        return 0, 0, h, w
    return (h - crop) // 2, (w - crop) // 2, crop, crop


def load(path: Path, crop: int | None = None) -> np.ndarray:
    """The image as the evaluation codes it: ``read_image`` (upright, 8-bit RGB), centre-cropped to ``crop`` px,
    checked to be large enough for 5-scale MS-SSIM."""
    from pipeline.images import read_image

    img = read_image(path)
    h, w = img.shape[:2]
    if crop is not None and crop > min(h, w):
        raise PipelineError(f"{path}: {w}x{h} px is smaller than evaluate.crop={crop}")
    if crop is None and min(h, w) < MIN_SIDE:
        raise PipelineError(f"{path}: {w}x{h} px is too small for 5-scale MS-SSIM (the shorter side needs "
                            f">= {MIN_SIDE} px); remove it from the set")
    top, left, ch, cw = crop_box(h, w, crop)
    return np.ascontiguousarray(img[top:top + ch, left:left + cw])


def _names(paths: list[Path], folder: Path) -> list[str]:
    names = [p.relative_to(folder).with_suffix("").as_posix() for p in paths]
    if len(set(names)) != len(names):  # photo.png and photo.jpg: keep the suffixes
        names = [p.relative_to(folder).as_posix() for p in paths]
    return names


def open_set(name: str, folder: Path, *, kodak_indices: list[int] | None = None, limit: int | None = None,
             crop: int | None = None, progress: bool = True) -> ImageSet:
    """The set ``name`` in ``folder``, every image decoded and checked once (one error naming the first bad file).

    Kodak: ``kodak_indices`` picks kodimNN files (None: all); another set: every image file. Then the first
    ``limit`` (None: all).
    """
    folder = Path(folder)
    if name == KODAK:
        paths, ignored = kodak_paths(folder, kodak_indices), []
    else:
        paths, ignored = image_files(folder)
    paths = paths[:limit] if limit else paths
    sizes = []
    if progress:
        from pipeline.utils import progress as bar

        paths_iter = bar(paths, desc=f"checking {name}", unit="image", leave=False)
    else:
        paths_iter = paths
    for p in paths_iter:
        img = load(p, crop)
        sizes.append((img.shape[1], img.shape[0]))
    return ImageSet(name=name, folder=folder, paths=list(paths), names=_names(paths, folder), sizes=sizes, crop=crop,
                    ignored=ignored)
