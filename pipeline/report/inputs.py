"""What the report reads: the evaluation's tables and summary, the classifier's and the codec's metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.records import (AtRate, AtRateAvg, BDRate, ClassifierMetrics, CurvePoint, EvaluationSummary,
                              Measurement, Pairwise, read_table)
from pipeline.utils import load_json


@dataclass
class Inputs:
    classifier: ClassifierMetrics | None
    compressor: dict[str, Any] | None
    summary: EvaluationSummary
    curves: list[CurvePoint]
    at_rates: list[AtRate]
    bd: list[BDRate]
    visual: dict[str, Any] | None
    missing: list[str] = field(default_factory=list)
    per_image: list[Measurement] = field(default_factory=list)
    at_rates_avg: list[AtRateAvg] = field(default_factory=list)
    pairwise: list[Pairwise] = field(default_factory=list)
    long_run: Any = None  # longrun.LongRun: report.coursework_run's record, scored (None: not configured or missing)
    long_run_missing: str | None = None  # what is missing when report.coursework_run is set but cannot be scored


def read_inputs(classifier_dir: Path, eval_dir: Path, compressor_dir: Path, long_run: Path | None = None,
                cifar: Path | None = None) -> Inputs:
    """The stages' outputs the report is made of (the evaluation's are required; the others, when missing, are
    listed in ``missing`` and their sections say so), and ``long_run`` (report.coursework_run), a classifier run's
    record scored against the CIFAR-10 test labels in ``cifar``."""
    needed = [eval_dir / n for n in ("summary.json", "curves.csv", "at_rates.csv", "bd.csv", "per_image.csv",
                                     "at_rates_avg.csv", "pairwise.csv")]
    absent = [str(p) for p in needed if not p.is_file()]
    if absent:
        raise PipelineError(f"report: missing {', '.join(absent)} (run the evaluate stage first)")
    missing = []
    classifier = None
    if (classifier_dir / "metrics.json").is_file():
        classifier = ClassifierMetrics.read(classifier_dir / "metrics.json")
    else:
        missing.append(str(classifier_dir / "metrics.json"))
    compressor = load_json(compressor_dir / "metrics.json") if (compressor_dir / "metrics.json").is_file() else None
    visual = load_json(eval_dir / "visual" / "visual.json") if (eval_dir / "visual" / "visual.json").is_file() else None
    run, run_missing = None, None
    if long_run is not None:
        from pipeline.report.longrun import read_long_run

        run, run_missing = read_long_run(long_run, cifar or Path("data/raw/cifar-10-batches-py"))
        if run_missing:
            missing.append(run_missing)
    return Inputs(classifier=classifier, compressor=compressor, summary=EvaluationSummary.read(eval_dir / "summary.json"),
                  curves=read_table(eval_dir / "curves.csv", CurvePoint),
                  at_rates=read_table(eval_dir / "at_rates.csv", AtRate), bd=read_table(eval_dir / "bd.csv", BDRate),
                  visual=visual, missing=missing, per_image=read_table(eval_dir / "per_image.csv", Measurement),
                  at_rates_avg=read_table(eval_dir / "at_rates_avg.csv", AtRateAvg),
                  pairwise=read_table(eval_dir / "pairwise.csv", Pairwise), long_run=run, long_run_missing=run_missing)
