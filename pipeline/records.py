"""Typed records of what one stage writes and another reads: the contracts between stages.

- ``ClassifierMetrics``: ``data/classifier/metrics.json`` (train_classifier -> report).
- ``ClassifierRun``: ``models/coursework-run.json`` (tools.release_classifier -> report): a run too long for
  ``make run``.
- ``EvaluationSummary``: ``data/evaluation/summary.json`` (evaluate -> report): what was evaluated, how.
- The evaluation's tables (evaluate -> report), one dataclass per CSV row: ``Measurement``
  (per_image.csv), ``CurvePoint`` (curves.csv), ``AtRate`` (at_rates.csv), ``AtRateAvg``
  (at_rates_avg.csv), ``Pairwise`` (pairwise.csv), ``BDRate`` (bd.csv).

A table is written by ``write_table`` (floats as ``%.6g``, the columns in field order) and read by
``read_table`` (each cell back to its field's type), so the writer and the reader cannot disagree on
a column's name or type. A missing file or column is one clear error naming it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import PipelineError

QUALITIES = ("ms_ssim", "ms_ssim_db", "psnr", "ssim")
MAX_EPOCHS = 10_000  # bounds of a classifier run record (ClassifierRun)
MAX_TEST_IMAGES = 100_000
MAX_CLASSES = 10  # one digit per prediction
MAX_RUN_RECORD_BYTES = 4 * 2**20


# ----------------------------------------------------------------------------- classifier

def _read_json(cls: type[BaseModel], path: str | Path, what: str, stage: str):
    """A JSON record, or one error line naming the file (and the first bad key)."""
    try:
        return cls.model_validate(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing (run the {stage} stage)") from None
    except (OSError, ValueError) as err:  # ValidationError is a ValueError
        if isinstance(err, ValidationError):
            e = err.errors()[0]
            err = f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
        raise PipelineError(f"{path}: not {what} ({err})") from None


class ClassifierMetrics(BaseModel):
    """The classifier's final test metrics (accuracies are fractions in 0..1)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    test_acc: float = Field(ge=0, le=1)  # with the TTA of ``tta`` (0: none): "the" test accuracy
    test_acc_no_tta: float | None = None
    test_loss: float | None = None
    test_loss_no_tta: float | None = None
    train_loss: float | None = None
    train_acc: float | None = None
    per_class_acc: dict[str, float] = {}
    train_time_s: float | None = None  # wall-clock training time
    train_cpu_time_s: float | None = None  # process CPU time (all threads)
    images_per_s: float | None = None
    epochs: int | None = None
    tta: int | None = None
    parameters: int | None = None
    test_size: int | None = None  # test images the accuracy is measured on (None: not recorded)

    @classmethod
    def read(cls, path: str | Path) -> "ClassifierMetrics":
        return _read_json(cls, path, "the classifier's metrics", "train_classifier")

    def scalars(self) -> dict[str, float]:
        """Every finite number, per-class accuracies as ``per_class_acc.<class>``."""
        out = {}
        for k, v in self.model_dump().items():
            items = ((f"{k}.{c}", a) for c, a in v.items()) if isinstance(v, dict) else ((k, v),)
            out.update({name: float(x) for name, x in items
                        if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)})
        return out


class RunEpoch(BaseModel):
    """One epoch of a training run's history (accuracies are fractions; None where it was not measured)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    epoch: int = Field(ge=1)
    lr: float | None = None
    train_loss: float | None = None
    train_acc: float | None = Field(None, ge=0, le=1)
    test_loss: float | None = None
    test_acc: float | None = Field(None, ge=0, le=1)  # without TTA


class RunExample(BaseModel):
    """One test image of Figure 1.2: its index in the CIFAR-10 test set and the predicted class probabilities."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0, lt=MAX_TEST_IMAGES)
    probs: list[float] = Field(min_length=2, max_length=MAX_CLASSES)


class ClassifierRun(BaseModel):
    """The record of a classifier run too long for ``make run`` (``models/coursework-run.json``: the coursework
    recipe's 300 epochs), written by ``python -m tools.release_classifier`` and read by the report: the per-epoch
    history, the test set's predicted classes (one digit each, with and without TTA: the report scores them
    against the real labels) and the probabilities of Figure 1.2's examples. Bounded: a file of another shape or
    size is refused with the first bad key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["classifier-run"]
    version: Literal[1]
    profile: str = Field(max_length=64)
    recipe: str = Field(max_length=64)
    epochs: int = Field(ge=1, le=MAX_EPOCHS)  # what the run's schedule spans
    batch_size: int = Field(ge=1)
    tta: int = Field(ge=0, le=2)  # the TTA level of ``predictions``
    label_names: list[str] = Field(min_length=2, max_length=10)
    history: list[RunEpoch] = Field(min_length=1, max_length=MAX_EPOCHS)
    predictions: str = Field(min_length=1, max_length=MAX_TEST_IMAGES, pattern=r"^[0-9]+$")  # with TTA ``tta``
    predictions_no_tta: str = Field(min_length=1, max_length=MAX_TEST_IMAGES, pattern=r"^[0-9]+$")
    examples: list[RunExample] = Field(max_length=48)
    train_time_s: float = Field(ge=0)  # wall clock, summed over the sessions it ran in
    train_cpu_s: float = Field(ge=0)  # process CPU time (all threads)
    hardware: str = Field("", max_length=200)
    training_code_commit: str | None = Field(None, max_length=64)
    released: str = Field("", max_length=64)  # date of the release
    how: str = Field("", max_length=500)

    @model_validator(mode="after")
    def _check(self) -> "ClassifierRun":
        n = len(self.label_names)
        if len(self.predictions) != len(self.predictions_no_tta):
            raise ValueError("predictions and predictions_no_tta differ in length")
        if int(max(self.predictions + self.predictions_no_tta)) >= n:
            raise ValueError(f"predictions: a class index >= {n} (label_names has {n})")
        epochs = [r.epoch for r in self.history]
        if epochs != sorted(set(epochs)) or epochs[-1] > self.epochs:
            raise ValueError(f"history: epochs must rise from 1 to at most {self.epochs}")
        for e in self.examples:
            if len(e.probs) != n or e.index >= len(self.predictions):
                raise ValueError(f"examples: image {e.index} has {len(e.probs)} probabilities for {n} classes "
                                 f"(or lies past the {len(self.predictions)} predictions)")
        return self

    @property
    def epochs_done(self) -> int:
        return self.history[-1].epoch

    @property
    def finished(self) -> bool:
        return self.epochs_done >= self.epochs

    @classmethod
    def read(cls, path: str | Path) -> "ClassifierRun":
        path = Path(path)
        if path.is_file() and path.stat().st_size > MAX_RUN_RECORD_BYTES:
            raise PipelineError(f"{path}: not a classifier run record (over {MAX_RUN_RECORD_BYTES // 2**20} MiB)")
        return _read_json(cls, path, "a classifier run record", "tools.release_classifier")


# ----------------------------------------------------------------------------- evaluation

class CodecSummary(BaseModel):
    """One evaluated codec: what it is, its fixed settings and sweep, and what it cost."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str
    description: str  # implementation and library version
    setting: str  # what the sweep varies
    settings: list[float]
    config: dict[str, str]  # the fixed encoder settings
    images: int  # images it was run on
    seconds: float  # wall time of its coding and metrics
    shared_timing: bool  # encode_s/decode_s are one per image, shared by its settings
    subset: list[str] | None  # the images it was restricted to (None: all evaluated)


class EvaluationSummary(BaseModel):
    """What the evaluate stage measured and how (summary.json)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str
    images: list[str]  # the images' names (Kodak: kodimNN; another set: the file's path without suffix)
    crop: int | None
    all_kodak: bool  # all 24 Kodak images at full size
    codecs: dict[str, CodecSummary]
    labels: dict[str, str]
    order: list[str]  # the codecs, in the order of the tables
    skipped: dict[str, str]  # codec -> why it was not usable here
    anchor: str  # BD-rates are taken against this codec
    bd_method: str
    bd_max_bpp: float | None = None  # BD deltas over rates up to this only (None: whole curves)
    rates: list[float]  # bpp of the at-rate tables
    rate_slack: float
    bootstrap: int
    min_images: int
    seed: int
    convention: str
    visual_image: str
    device: str
    torch: str
    platform: str
    duration_s: float
    encodes: int  # coded files
    dataset: str = "kodak"  # the image set (evaluate.dataset): kodak, images or data.test_photos' name
    dataset_folder: str = "data/raw/kodak"
    sizes: list[list[int]] = []  # [width, height] of each image as evaluated (upright, cropped), as ``images``
    megapixels: float = 0.0  # all the images' pixels, in millions
    limit: int | None = None  # evaluate.limit
    extra_datasets: list[str] = []  # the sets also evaluated (sets/<name>/ of the evaluation)

    @classmethod
    def read(cls, path: str | Path) -> "EvaluationSummary":
        return _read_json(cls, path, "an evaluation summary", "evaluate")

    def boot(self) -> dict[str, int]:
        """The bootstrap settings every interval of the evaluation used."""
        return {"n_boot": self.bootstrap, "seed": self.seed, "min_images": self.min_images}


@dataclass(frozen=True)
class Measurement:
    """One image coded at one setting: the real file's size and the decoded image's quality."""

    image: str
    codec: str
    setting_name: str
    setting: float
    bytes: int
    height: int
    width: int
    bpp: float
    ms_ssim: float
    ms_ssim_db: float
    psnr: float
    ssim: float
    encode_s: float
    decode_s: float


@dataclass(frozen=True)
class CurvePoint:
    """Secondary convention: one codec setting, bpp, qualities and times averaged over ``images``."""

    codec: str
    setting_name: str
    setting: float
    images: int
    bpp: float
    ms_ssim: float
    ms_ssim_db: float
    psnr: float
    ssim: float
    encode_s: float
    decode_s: float


@dataclass(frozen=True)
class AtRate:
    """Primary convention: at one rate, the mean over the images that reach it, with 95 % intervals."""

    codec: str
    bpp: float
    ms_ssim: float
    ms_ssim_lo: float
    ms_ssim_hi: float
    ms_ssim_db: float
    ms_ssim_db_lo: float
    ms_ssim_db_hi: float
    psnr: float
    psnr_lo: float
    psnr_hi: float
    ssim: float
    ssim_lo: float
    ssim_hi: float
    images: int
    missing: int


@dataclass(frozen=True)
class AtRateAvg:
    """Secondary convention: the image-averaged curve interpolated at one rate."""

    codec: str
    bpp: float
    ms_ssim: float
    ms_ssim_db: float
    psnr: float
    ssim: float


@dataclass(frozen=True)
class Pairwise:
    """Codecs ``a`` and ``b`` at one rate, paired per image: a - b."""

    a: str
    b: str
    bpp: float
    metric: str
    images: int
    a_wins: int
    b_wins: int
    mean_diff: float
    lo: float
    hi: float
    better: str  # a codec's name, or "not shown"


@dataclass(frozen=True)
class BDRate:
    """Bjontegaard deltas of ``test`` against ``anchor``: the median of the per-image values (primary)
    and the value on the image-averaged curves (secondary)."""

    anchor: str
    test: str
    metric: str
    method: str
    images: int
    of_images: int
    bd_rate_pct: float
    bd_rate_lo: float
    bd_rate_hi: float
    test_saves: int
    bd_quality_db: float
    bd_rate_avg_curve_pct: float
    bd_quality_avg_curve_db: float


R = TypeVar("R")


def by_codec(records: Iterable[R]) -> dict[str, list[R]]:
    """Records grouped by their ``codec``, in order of first appearance."""
    out: dict[str, list[R]] = {}
    for r in records:
        out.setdefault(r.codec, []).append(r)
    return out


# ----------------------------------------------------------------------------- CSV

def _cell(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows (dicts with the same keys) as CSV, floats as ``%.6g``; an empty list: an empty file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(v) for k, v in r.items()})


def write_table(path: Path, records: Iterable[Any]) -> None:
    """Records of one dataclass as CSV, the columns in field order."""
    write_csv(path, [dataclasses.asdict(r) for r in records])


def _number(v: str) -> float | str:
    try:
        return float(v) if v != "" else float("nan")
    except ValueError:
        return v


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Any of our CSVs back as dicts, numbers as floats (empty/nan cells -> NaN)."""
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]


_PARSE = {"str": str, "float": lambda v: float(v) if v != "" else float("nan"), "int": lambda v: int(float(v))}


def read_table(path: Path, cls: type[R]) -> list[R]:
    """A table written by ``write_table`` back as records of ``cls``."""
    fields = [(f.name, _PARSE[f.type]) for f in dataclasses.fields(cls)]
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:  # an empty table (e.g. no BD pair with a single codec)
                return []
            missing = [name for name, _ in fields if name not in (reader.fieldnames or ())]
            if missing:
                raise PipelineError(f"{path}: no column {', '.join(missing)} (not a {cls.__name__} table; "
                                    "rerun the evaluate stage)")
            return [cls(**{name: parse(row[name]) for name, parse in fields}) for row in reader]
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing (run the evaluate stage)") from None
    except ValueError as err:
        raise PipelineError(f"{path}: a cell is not a number ({err})") from None
