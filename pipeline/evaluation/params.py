"""params.yaml section ``evaluate``: which Kodak images, which codecs, which settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.schema import Section

CodecName = Literal["jpeg", "jpeg2000", "webp", "avif", "jpegxl", "rnn"]


class EvaluateParams(Section):
    images: list[int] | None = None  # Kodak indices (kodimNN) to evaluate; None: every kodim*.png present
    crop: int | None = Field(None, ge=161)  # centre crop to crop x crop px (None: full image); MS-SSIM needs > 160
    codecs: list[CodecName] = ["jpeg", "jpeg2000", "webp", "avif", "jpegxl", "rnn"]  # jpegxl skipped if imagecodecs is absent
    jpeg_quality: list[int] = Field([1, 3, 5, 10, 20, 30, 50, 70, 90], min_length=1)  # libjpeg quality 1..95
    jpeg2000_ratio: list[float] = Field([240, 160, 96, 64, 40, 24, 12], min_length=1)  # compression ratio R (24/R bpp)
    webp_quality: list[int] = Field([0, 5, 10, 20, 40, 70, 90], min_length=1)  # libwebp quality 0..100
    webp_method: int = Field(4, ge=0, le=6)  # libwebp effort: 0 fast .. 6 slow/best
    avif_quality: list[int] = Field([0, 10, 20, 30, 45, 60, 80], min_length=1)  # libavif quality 0..100
    avif_speed: int = Field(6, ge=0, le=10)  # libavif encoder speed: 0 slow/best .. 10 fast
    jpegxl_distance: list[float] = Field([12, 8, 5, 3, 2, 1], min_length=1)  # butteraugli distance (lower: better)
    jpegxl_effort: int = Field(7, ge=1, le=9)  # libjxl effort: 1 fast .. 9 slow/best (7: libjxl's default)
    rnn_model: str = "data/compressor/model.pt"  # checkpoint path or MLflow model URI of the RNN codec
    rnn_iterations: list[int] | None = None  # iteration counts; None: 1..max_iterations (one encode, truncated)
    rnn_images: list[int] | None = None  # Kodak indices the RNN codec is run on; None: the same as images
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where the RNN codec and the metrics run
    cpu_threads: int = Field(0, ge=0)  # torch threads on CPU (0: all cores; 1 avoids contention on busy hosts)
    rates: list[float] = Field([0.125, 0.25, 0.5, 1.0], min_length=1)  # bpp at which curves are interpolated
    rate_slack: float = Field(0.0, ge=0, le=0.1)  # a rate this much (relative) past a curve's end reads its end point
    bootstrap: int = Field(2000, ge=100)  # bootstrap resamples (over images) of every 95% interval
    min_images: int = Field(3, ge=2)  # fewer images than this: no interval, no verdict ("not shown")
    anchor: CodecName = "jpeg"  # BD-rates of every codec are taken against this one
    bd_method: Literal["pchip", "polyfit"] = "pchip"  # Bjontegaard fit: piecewise cubic or cubic polyfit
    visual_image: int = Field(23, ge=1, le=24)  # Kodak image of the visual comparison (must be evaluated)
    visual_bpp: float = Field(0.25, gt=0)  # the visual comparison picks each codec's setting nearest this bpp
    visual_crop: list[int] = Field([390, 90, 256, 256], min_length=4, max_length=4)  # left, top, width, height px
    plot_max_bpp: float = Field(2.0, gt=0)  # x-axis limit of the rate-distortion figures

    @model_validator(mode="after")
    def _check(self):
        if self.images is not None:
            if not self.images or any(not 1 <= i <= 24 for i in self.images):
                raise ValueError("images: Kodak indices are 1..24")
            if self.visual_image not in self.images:
                raise ValueError(f"visual_image {self.visual_image} is not in images {self.images}")
        if self.rnn_images is not None:
            if not self.rnn_images or any(not 1 <= i <= 24 for i in self.rnn_images):
                raise ValueError("rnn_images: Kodak indices are 1..24")
            if self.images is not None and not set(self.rnn_images) <= set(self.images):
                raise ValueError(f"rnn_images {self.rnn_images} are not all in images {self.images}")
            if "rnn" in self.codecs and self.visual_image not in self.rnn_images:
                raise ValueError(f"visual_image {self.visual_image} is not in rnn_images {self.rnn_images}")
        if self.rnn_iterations is not None and any(k < 1 for k in self.rnn_iterations):
            raise ValueError("rnn_iterations: counts are >= 1")
        if any(not 1 <= q <= 100 for q in self.jpeg_quality):
            raise ValueError("jpeg_quality: 1..100")
        if any(not 0 <= q <= 100 for q in self.webp_quality + self.avif_quality):
            raise ValueError("webp_quality/avif_quality: 0..100")
        if any(r <= 1 for r in self.jpeg2000_ratio):
            raise ValueError("jpeg2000_ratio: compression ratios are > 1")
        if any(d <= 0 for d in self.jpegxl_distance):
            raise ValueError("jpegxl_distance: distances are > 0")
        if any(r <= 0 for r in self.rates):
            raise ValueError("rates: bpp values are > 0")
        if len(set(self.codecs)) != len(self.codecs) or not self.codecs:
            raise ValueError("codecs: a non-empty list without repeats")
        if self.visual_crop[2] < 8 or self.visual_crop[3] < 8 or min(self.visual_crop) < 0:
            raise ValueError("visual_crop: left, top >= 0 and width, height >= 8")
        return self
