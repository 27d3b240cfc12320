"""params.yaml section ``evaluate``: which image set (Kodak, your own photos, a downloaded public set),
which codecs, which settings.

The codecs' own keys (``<codec>_<setting>``: the sweep; ``<codec>_<knob>``: a fixed encoder setting)
come from the codec specifications (``pipeline.evaluation.specs.SPECS``), not from this file.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, create_model, model_validator

from pipeline.evaluation.specs import SPECS
from pipeline.schema import Section, Source

CodecName = Literal[tuple(SPECS)]  # type: ignore[valid-type]
#: an image set's name: ``kodak`` (data/raw/kodak), ``images`` (data/images: your own photos) or the name of
#: ``data.test_photos`` (a public set the download stage unpacks into data/raw/test_photos). A name, never a
#: path: the stage maps it to one of those fixed folders, so a DAG run's conf may choose the set.
DATASET_NAME = r"^[a-z0-9][a-z0-9_.-]*$"


def _codec_fields() -> dict[str, Any]:
    """Every specified codec's sweep and knobs, as pydantic fields."""
    fields: dict[str, Any] = {}
    for spec in SPECS.values():
        sweep = list[spec.setting_type]
        if spec.default_sweep is None:
            fields[spec.sweep_key] = (sweep | None, Field(None, description=spec.sweep_doc))
        else:
            fields[spec.sweep_key] = (sweep, Field(list(spec.default_sweep), min_length=1, description=spec.sweep_doc))
        for knob in spec.knobs:
            fields[knob.key] = (Source if knob.source else knob.kind,
                                Field(knob.default, ge=knob.ge, le=knob.le, description=knob.doc))
    return fields


CodecParams = create_model("CodecParams", __base__=Section, **_codec_fields())


class EvaluateParams(CodecParams):
    dataset: str = Field("kodak", pattern=DATASET_NAME)  # the set every table, claim and BD-rate is about
    extra_datasets: list[str] = []  # further sets, coded the same way; each gets its own headline tables
    limit: int | None = Field(None, ge=1)  # the first N images of each set (by file name; None: all)
    images: list[int] | None = None  # Kodak indices (kodimNN) to evaluate; None: every kodim*.png present
    crop: int | None = Field(None, ge=161)  # centre crop to crop x crop px (None: full image); MS-SSIM needs > 160
    codecs: list[CodecName] = list(SPECS)  # jpegxl skipped if imagecodecs is absent
    rnn_images: list[int] | None = None  # Kodak indices the RNN codec is run on; None: the same as images
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where the RNN codec and the metrics run
    cpu_threads: int = Field(0, ge=0)  # torch threads on CPU (0: all cores; 1 avoids contention on busy hosts)
    rates: list[float] = Field([0.125, 0.25, 0.5, 1.0], min_length=1)  # bpp at which curves are interpolated
    rate_slack: float = Field(0.0, ge=0, le=0.1)  # a rate this much (relative) past a curve's end reads its end point
    bootstrap: int = Field(2000, ge=100)  # bootstrap resamples (over images) of every 95% interval
    min_images: int = Field(3, ge=2)  # fewer images than this: no interval, no verdict ("not shown")
    anchor: CodecName = "jpeg"  # BD-rates of every codec are taken against this one
    bd_method: Literal["pchip", "polyfit"] = "pchip"  # Bjontegaard fit: piecewise cubic or cubic polyfit
    # BD deltas over rates up to this bpp only (every curve cut there), so curves of different lengths compare over
    # the same rates; null: the whole overlap of the two curves
    bd_max_bpp: float | None = Field(None, gt=0)
    # image of the visual comparison: Kodak's kodimNN; another set's N-th image by file name (must be evaluated)
    visual_image: int = Field(23, ge=1)
    visual_bpp: float = Field(0.25, gt=0)  # the visual comparison picks each codec's setting nearest this bpp
    visual_crop: list[int] = Field([390, 90, 256, 256], min_length=4, max_length=4)  # left, top, width, height px
    plot_max_bpp: float = Field(2.0, gt=0)  # x-axis limit of the rate-distortion figures

    @model_validator(mode="after")
    def _check(self):
        import re

        for name in self.extra_datasets:
            if not re.match(DATASET_NAME, name):
                raise ValueError(f"extra_datasets: {name!r} is not a set's name (kodak, images or data.test_photos')")
        if self.dataset in self.extra_datasets or len(set(self.extra_datasets)) != len(self.extra_datasets):
            raise ValueError("extra_datasets: names without repeats, other than dataset")
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
        for spec in SPECS.values():
            if any(not spec.valid(v) for v in getattr(self, spec.sweep_key) or ()):
                raise ValueError(f"{spec.sweep_key}: {spec.valid_doc}")
        if any(r <= 0 for r in self.rates):
            raise ValueError("rates: bpp values are > 0")
        if len(set(self.codecs)) != len(self.codecs) or not self.codecs:
            raise ValueError("codecs: a non-empty list without repeats")
        if self.visual_crop[2] < 8 or self.visual_crop[3] < 8 or min(self.visual_crop) < 0:
            raise ValueError("visual_crop: left, top >= 0 and width, height >= 8")
        return self


#: the params.yaml sections this module defines: name -> schema (pipeline.config finds it: pipeline/stage.py)
PARAMS_SECTIONS = {"evaluate": EvaluateParams}
