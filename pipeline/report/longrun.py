"""The report's part on a classifier run too long for ``make run``: ``report.coursework_run`` (the coursework
recipe's 300 epochs, recorded by ``python -m tools.release_classifier``). Its accuracy is scored here against
the real CIFAR-10 test labels (the record holds predictions, not a figure), its claim gets a verdict from the
Wilson interval, and Figures 1.1 and 1.2 and the confusion matrix are drawn from the record."""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.evaluation.stats import wilson
from pipeline.records import ClassifierRun
from pipeline.report.formatting import TTA_NAMES

TEST_BATCH = "test_batch"  # in the raw CIFAR-10 folder (the download stage's output)


@dataclass
class LongRun:
    record: ClassifierRun
    path: str
    acc: float  # with the record's TTA
    acc_no_tta: float
    n: int
    rows: list[dict[str, str]] = field(default_factory=list)
    figs: list[dict[str, str]] = field(default_factory=list)

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.acc, self.n)


def classes(predictions: str) -> np.ndarray:
    """A record's predictions (one digit per test image) as class indices."""
    return np.frombuffer(predictions.encode(), dtype=np.uint8).astype(np.int64) - ord("0")


def _accuracy(predictions: str, labels: np.ndarray) -> float:
    return float((classes(predictions) == labels).mean())


def _png_uri(draw: Callable[[io.BytesIO], None]) -> str:
    buf = io.BytesIO()
    draw(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def read_long_run(path: Path, cifar: Path) -> tuple[LongRun | None, str | None]:
    """The record scored against the test set, or (None, what is missing). A record of another shape, or
    one whose predictions do not cover the test set, is a PipelineError naming the file."""
    from pipeline.data.cifar import load_batch
    from pipeline.errors import PipelineError

    if not path.is_file():
        return None, f"{path} (report.coursework_run: the coursework recipe's run record)"
    if not (cifar / TEST_BATCH).is_file():
        return None, f"{cifar / TEST_BATCH} (the labels {path} is scored against)"
    record = ClassifierRun.read(path)
    images, labels = load_batch(cifar / TEST_BATCH)
    if len(record.predictions) != len(labels):
        raise PipelineError(f"{path}: {len(record.predictions)} predictions for a test set of {len(labels)} images "
                            f"({cifar / TEST_BATCH})")
    run = LongRun(record, path.as_posix(), _accuracy(record.predictions, labels),
                  _accuracy(record.predictions_no_tta, labels), len(labels))
    run.rows = summary_rows(run)
    run.figs = figures(run, images, labels)
    return run, None


def summary_rows(run: LongRun) -> list[dict[str, str]]:
    r = run.record
    lo, hi = run.interval
    tested = [e for e in r.history if e.test_acc is not None]
    best = max(tested, key=lambda e: e.test_acc) if tested else None
    state = "finished" if r.finished else f"in progress: epoch {r.epochs_done} of {r.epochs}"
    rows = [("run", f"profile {r.profile}, recipe {r.recipe}, batch {r.batch_size}, {r.epochs} epochs ({state}); "
                    f"record {run.path} of {r.released or '?'}"),
            ("test accuracy", f"{run.acc:.2%} (95% CI [{lo:.2%}, {hi:.2%}], {run.n} test images; TTA: "
                              f"{TTA_NAMES.get(r.tta, r.tta)}; the record's predictions scored here against the labels)"),
            ("test accuracy without TTA", f"{run.acc_no_tta:.2%}")]
    if best is not None:
        rows.append(("best epoch (test accuracy without TTA, per epoch)", f"{best.test_acc:.2%} at epoch {best.epoch}"))
    rows.append(("training time", f"{r.train_time_s / 3600:.1f} h wall clock, {r.train_cpu_s / 3600:.1f} CPU-hours "
                                  f"({r.hardware})"))
    if r.training_code_commit:
        rows.append(("training code", f"commit {r.training_code_commit[:12]}"))
    return [{"key": k, "value": v} for k, v in rows]


def figures(run: LongRun, images: np.ndarray, labels: np.ndarray) -> list[dict[str, str]]:
    from pipeline.classifier import figures as F

    r = run.record
    history = [{k: (math.nan if v is None else v) for k, v in e.model_dump().items()} for e in r.history]
    preds = classes(r.predictions)
    idx = np.array([e.index for e in r.examples], dtype=np.int64)
    probs = np.array([e.probs for e in r.examples], dtype=np.float64).reshape(len(idx), len(r.label_names))
    title = f"{r.recipe} recipe, {r.epochs_done} of {r.epochs} epochs"
    figs = [("Figure 1.1 (the coursework's recipe): train and test accuracy per epoch",
             lambda f: F.accuracy_curves(history, f, f"Figure 1.1: accuracy per epoch ({title})"))]
    if len(idx):
        figs.append(("Figure 1.2 (the coursework's recipe): test images and the output probabilities",
                     lambda f: F.prediction_grid(images[idx], probs, labels[idx], r.label_names, f)))
    cm = F.confusion_matrix(labels, preds, len(r.label_names))
    figs.append(("Confusion matrix of the coursework's recipe on the CIFAR-10 test set",
                 lambda f: F.confusion_plot(cm, r.label_names, f, f"Confusion matrix ({title}, {run.acc:.2%})")))
    return [{"caption": cap, "src": _png_uri(draw), "path": run.path} for cap, draw in figs]


def claim_text(run: LongRun | None, missing: str | None, threshold: float) -> tuple[str, str, str]:
    """(metric, evidence, verdict) of "the CNN reaches ``threshold``" on the coursework's own recipe."""
    if run is None:
        return "test accuracy", f"no record: {missing}", "not checked"
    r = run.record
    lo, hi = run.interval
    evidence = (f"{run.acc:.2%} ({r.epochs_done} of {r.epochs} epochs, TTA: {TTA_NAMES.get(r.tta, r.tta)}; "
                f"{run.acc_no_tta:.2%} without), 95% CI [{lo:.2%}, {hi:.2%}] on {run.n} images ({run.path})")
    if not r.finished:
        return "test accuracy (Wilson 95% interval)", evidence + ": the run has not ended", "not checked"
    verdict = "confirmed" if lo >= threshold else ("refuted" if hi < threshold else "not shown")
    return "test accuracy (Wilson 95% interval over the test images)", evidence, verdict


def as_dict(run: LongRun | None) -> dict[str, Any] | None:
    return None if run is None else {"rows": run.rows, "figs": run.figs}
