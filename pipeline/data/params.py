"""params.yaml sections ``data`` (download) and ``augment``, and the classifier's augmentation."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated
from urllib.parse import urlparse

from pydantic import Field, model_validator

from pipeline.schema import SOURCE, Section, Source


class DataParams(Section):
    mirror: Source | None = None  # directory or URL holding SHA256SUMS; env DATA_MIRROR overrides
    cifar_url: Source = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    cifar_md5: str = Field("c58f30108f718f92721af3b95e74349a", pattern=r"^[0-9a-f]{32}$")
    kodak_url: Source = "http://r0k.us/graphics/kodak/kodak/kodim{index:02d}.png"
    kodak_images: int = Field(24, ge=1, le=24)  # kodim01 .. kodimNN
    retries: int = Field(4, ge=0)  # network retries, exponential backoff
    backoff_s: float = Field(1.0, ge=0)  # first retry delay, doubled each time
    timeout_s: float = Field(60.0, gt=0)  # socket timeout per request
    # an optional high-resolution photo set (a .zip of PNGs) unpacked into data/raw/photos for augment.patch_source
    photos: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_.-]*$")  # its name (e.g. div2k); None: no photos
    photos_url: Source | None = None  # official URL of the .zip; a mirror serves it as photos/<its file name>
    photos_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    photos_size: int | None = Field(None, ge=1)  # bytes, checked before the checksum and against free disk space
    # an optional public test set (a .zip of PNGs) unpacked into data/raw/test_photos; evaluate.dataset (or
    # evaluate.extra_datasets) names it to evaluate the codecs on it. Kept like photos: a mirror serves it as
    # test_photos/<its file name>
    test_photos: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_.-]*$")  # its name (e.g. div2k-valid)
    test_photos_url: Source | None = None
    test_photos_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    test_photos_size: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check_test_photos(self) -> "DataParams":
        if self.test_photos is None:
            return self
        if self.test_photos in ("kodak", "images"):
            raise ValueError(f"test_photos: {self.test_photos!r} is the name of a built-in set; choose another")
        for key in ("test_photos_url", "test_photos_sha256"):
            if getattr(self, key) is None:
                raise ValueError(f"{key}: required when test_photos is set ({self.test_photos!r})")
        if not self.test_photos_archive.endswith(".zip"):
            raise ValueError(f"test_photos_url: {self.test_photos_url!r} does not name a .zip archive (the only "
                             "kind unpacked)")
        return self

    @property
    def test_photos_archive(self) -> str:
        """The test set archive's file name: ``DIV2K_valid_HR.zip``."""
        return PurePosixPath(urlparse(self.test_photos_url or "").path).name

    @model_validator(mode="after")
    def _check_photos(self) -> "DataParams":
        if self.photos is None:
            return self
        for key in ("photos_url", "photos_sha256"):
            if getattr(self, key) is None:
                raise ValueError(f"{key}: required when photos is set ({self.photos!r})")
        if not self.photos_archive.endswith(".zip"):
            raise ValueError(f"photos_url: {self.photos_url!r} does not name a .zip archive (the only kind unpacked)")
        return self

    @property
    def photos_archive(self) -> str:
        """The archive's file name (the last part of ``photos_url``): ``DIV2K_train_HR.zip``."""
        return PurePosixPath(urlparse(self.photos_url or "").path).name


class AugmentParams(Section):
    train_limit: int | None = Field(None, ge=10)  # keep the first N training images (None: all 50000)
    test_limit: int | None = Field(None, ge=10)  # keep the first N test images (None: all 10000)
    patches: int = Field(20000, ge=1)  # compressor training patches (crops of CIFAR-10 train)
    val_patches: int = Field(1000, ge=1)  # held-out patches, cut from CIFAR-10 test images
    patch_size: int = Field(64, ge=16, le=256, multiple_of=16)  # side in pixels (the codec works in 16-px blocks)
    patch_pad: int = Field(4, ge=0)  # reflect padding before the random crop (translation, px)
    patch_flip: bool = True  # random horizontal flips of patches
    patch_scale: int = Field(2, ge=1, le=8)  # bicubic upsampling of the source images before cropping
    patch_source: Source = "cifar10"  # cifar10, or a folder of your own photos (random crops; never Kodak)
    patch_min_std: float = Field(0.0, ge=0, le=128)  # photos: re-draw crops whose pixel std is below this
    preview_grid: int = Field(8, ge=1, le=32)  # preview PNG shows grid x grid samples

    @model_validator(mode="after")
    def _check(self) -> "AugmentParams":
        if self.patch_source == "cifar10" and self.patch_size > 32 * self.patch_scale:
            raise ValueError(f"patch_size: {self.patch_size} px is larger than a CIFAR-10 image upsampled "
                             f"x{self.patch_scale} ({32 * self.patch_scale} px); raise patch_scale or lower patch_size")
        return self


class AugmentationParams(Section):
    """On-the-fly augmentation of classifier batches (tensor ops, on the training device)."""

    flip: bool = True  # random horizontal flip
    translate: int = Field(2, ge=0)  # random shift of up to N px (reflect padding)
    cutout: int = Field(0, ge=0)  # side of a zeroed random square, 0 disables


#: the params.yaml sections this module defines: name -> schema (pipeline.config finds it: pipeline/stage.py);
#: ``data`` is marked SOURCE whole: it says where the data comes from and what it must hash to
PARAMS_SECTIONS = {"data": Annotated[DataParams, SOURCE], "augment": AugmentParams}
