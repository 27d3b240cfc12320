"""The report: builds on the tiny profile, contains every section, inlines every image, and its
claim verdicts follow the numbers."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.evaluation import evaluate as E
from pipeline.records import BDRate, ClassifierMetrics, EvaluationSummary, Measurement
from pipeline.report import build as R
from pipeline.report import claims as RC
from pipeline.report.inputs import Inputs
from pipeline.utils import file_digest
from tests.test_evaluation_codecs import FakeRNNCodec, make_image
from tests.test_evaluation_stage import tiny_params
from tests.test_report_longrun import standin_long_run

SECTIONS = ("summary", "classifier", "compression", "settings", "rates", "pairwise", "bdrate", "visual", "claims",
            "provenance")


def standin_classifier(root: Path, acc: float = 0.9123) -> None:
    """Minimal stand-ins for train_classifier's outputs (used only where that stage cannot run)."""
    d = root / "data" / "classifier"
    (d / "figures").mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps({"test_acc": acc, "test_acc_no_tta": 0.9051, "test_loss": 0.31,
                                                "train_time_s": 12.5, "epochs": 6, "tta": 1, "test_size": 10000,
                                                "per_class_acc": {"airplane": 0.934, "cat": 0.812}}))
    for i, (name, _) in enumerate(R.CLASSIFIER_FIGURES):
        Image.new("RGB", (40, 30), (60 * i, 100, 200)).save(d / "figures" / name)


def check_html(html: str, n_codecs: int) -> None:
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in html, sid
    srcs = re.findall(r'<img src="([^"]*)"', html)
    # 3 classifier figures + 3 of the coursework run + 6 evaluation figures + original + one crop per codec
    assert len(srcs) == 3 + 3 + len(R.EVAL_FIGURES) + 1 + n_codecs
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from the network
    assert "missing:" not in html
    assert "Figure 1.1" in html and "Figure 1.2" in html and "Confusion matrix" in html
    assert "Figure 1.7 analogue" in html and "PSNR" in html and "MS-SSIM in dB" in html
    assert "per-image" in html and "Secondary convention" in html  # both conventions, labelled
    assert "9/7 irreversible" in html and "MCT on" in html  # the codec settings are documented


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    kodak = tmp_path / "data" / "raw" / "kodak"
    kodak.mkdir(parents=True)
    Image.fromarray(make_image(200, 264, seed=5)).save(kodak / "kodim01.png")
    (tmp_path / "data" / "compressor").mkdir(parents=True)
    (tmp_path / "data" / "compressor" / "model.pt").write_bytes(b"stand-in")
    standin_classifier(tmp_path)
    standin_long_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_report_contains_every_section(workspace):
    params = tiny_params()
    params = params.model_copy(update={"report": params.report.model_copy(update={"mlflow_runs": False})})
    E.evaluate(params, rnn_loader=lambda model, device: FakeRNNCodec())
    ctx = R.build(params)
    html = (workspace / "data/report/report.html").read_text()
    md = (workspace / "data/report/report.md").read_text()
    check_html(html, n_codecs=len(params.evaluate.codecs))
    assert "91.23%" in html and "91.23%" in md
    for heading in ("## Claims of the coursework, checked", "## Classifier", "## Compression on Kodak", "## Provenance"):
        assert heading in md
    # the classifier's section says as much in report.md as in report.html: recipe, length, interval, per class, figures
    for text in ("| recipe | fast (profile tiny) |", "| epochs, batch size | 6, ", "95% CI [90.66%, 91.77%], 10000 test "
                 "images; TTA: horizontal flip", "| test accuracy without TTA | 90.51% |", "| airplane | cat |",
                 "| 93.4% | 81.2% |", "Figure 1.2: test images", "`data/classifier/figures/confusion_matrix.png`"):
        assert text in md, text
        assert text.split("|")[-2].strip() in html if text.startswith("|") else True
    claims = ctx["claims"]
    assert [c.claim for c in claims][0].startswith("The CNN reaches 90%")
    assert claims[0].verdict == "confirmed"  # 91.23% >= 90%
    assert "coursework's own recipe" in claims[1].claim and claims[1].verdict == "confirmed"  # 95.00% of 1000
    assert "95.00%" in claims[1].evidence and "models/coursework-run.json" in claims[1].evidence
    assert len(claims) == 2 + 2 + len(params.report.claim_behind)
    assert R.LONG_RUN_TITLE in md and "| test accuracy without TTA | 94.00% |" in md
    # how the codec was trained (tiny: from scratch, L1) is said beside its figures
    assert "(GRU cells, 2 iterations) was trained with the loss L1 (mean absolute error)" in md
    assert "The RNN codec.</b> The RNN codec (GRU cells" in html
    assert 'id="coursework-run"' in html and "Figure 1.1 (the coursework&#39;s recipe)" in html
    assert all(c.verdict in ("confirmed", "refuted", "not shown", "not checked") for c in claims)
    assert "primary: per-image interpolation" in md and "Secondary: averaged per setting" in md
    assert "### Codec settings" in md and "| JPEG XL |" in md
    hashes = {h["path"]: h for h in ctx["prov"]["hashes"]}
    assert hashes["data/raw/kodak"]["files"] == "1"
    assert hashes["data/evaluation/curves.csv"]["md5"] == file_digest(workspace / "data/evaluation/curves.csv", "md5")
    # bd table rows match the evaluation's bd.csv
    assert len(ctx["bd_rows"]) == len(E.read_csv(workspace / "data/evaluation/bd.csv"))


def test_missing_evaluation_is_a_clear_error(workspace):

    with pytest.raises(PipelineError, match="evaluate"):
        R.build(tiny_params())


def per_image(n_images: int = 6, **codecs):
    """Per-image rows: codec -> (rates, quality, per-image offsets)."""
    out = []
    for name, (rates, quality, offsets) in codecs.items():
        for i in range(n_images):
            for j, (r, q) in enumerate(zip(rates, quality)):
                v = q + offsets[i]
                out.append(Measurement(codec=name, image=f"kodim{i + 1:02d}", setting_name="s", setting=float(j),
                                       bytes=0, height=1, width=1, bpp=r, ms_ssim=v, ssim=v, ms_ssim_db=v, psnr=v,
                                       encode_s=0.0, decode_s=0.0))
    return out


RATES = [0.1, 0.2, 0.3, 0.5, 0.8, 1.2]
BOOT = {"n_boot": 500, "seed": 0, "min_images": 3}


def test_claim_verdicts_follow_the_intervals():
    base = np.array([0.80, 0.86, 0.90, 0.94, 0.96, 0.98])
    spread = np.linspace(-0.003, 0.003, 6)
    noisy = np.array([0.02, -0.02, 0.015, -0.015, 0.01, -0.012])
    above = per_image(rnn=(RATES, base + 0.01, spread), jpeg=(RATES, base, spread[::-1]))
    below = per_image(rnn=(RATES, base - 0.01, spread), jpeg=(RATES, base, spread[::-1]))
    mixed = per_image(rnn=(RATES, base, noisy), jpeg=(RATES, base, np.zeros(6)))
    text, verdict = RC.compare_below(above, "rnn", "jpeg", "ms_ssim", 0.4, 32, BOOT)
    assert verdict == "confirmed" and "6 image(s), rnn ahead on 6" in text
    assert RC.compare_below(below, "rnn", "jpeg", "ms_ssim", 0.4, 32, BOOT)[1] == "refuted"
    text, verdict = RC.compare_below(mixed, "rnn", "jpeg", "ms_ssim", 0.4, 32, BOOT)
    assert verdict == "not shown" and "rnn ahead on 3" in text  # three images each way: interval spans zero
    two = per_image(2, rnn=(RATES, base + 0.01, spread), jpeg=(RATES, base, spread))
    assert RC.compare_below(two, "rnn", "jpeg", "ms_ssim", 0.4, 32, BOOT)[1] == "not shown"  # too few images
    apart = per_image(rnn=([1.0, 2.0], [0.9, 0.95], spread), jpeg=(RATES, base, spread))
    assert RC.compare_below(apart, "rnn", "jpeg", "ms_ssim", 0.4, 32, BOOT)[1] == "not checked"


def summary_of(labels: dict[str, str], **changes) -> EvaluationSummary:
    """An evaluation summary of codecs ``labels`` (no codec details: the claims do not read them)."""
    fields = {"profile": "tiny", "images": ["kodim01"], "crop": None, "all_kodak": False, "codecs": {},
              "labels": labels, "order": list(labels), "skipped": {}, "anchor": "jpeg", "bd_method": "pchip",
              "rates": [0.25], "rate_slack": 0.0, "bootstrap": 500, "seed": 0, "min_images": 3,
              "convention": "per-image", "visual_image": "kodim01", "device": "cpu", "torch": "-", "platform": "-",
              "duration_s": 1.0, "encodes": 1}
    return EvaluationSummary(**{**fields, **changes})


def bd_row(anchor, median, lo, hi, n=10):
    return BDRate(anchor=anchor, test="rnn", metric="ms_ssim_db", method="pchip", bd_rate_pct=median, bd_rate_lo=lo,
                  bd_rate_hi=hi, images=n, of_images=n, test_saves=0, bd_quality_db=-1.0,
                  bd_rate_avg_curve_pct=median, bd_quality_avg_curve_db=-1.0)


def test_behind_claim_uses_the_per_image_bd_rate_interval():
    params = tiny_params()
    summary = summary_of({"webp": "WebP", "jpeg2000": "JPEG 2000", "rnn": "RNN", "jpeg": "JPEG"})
    bd = [bd_row("webp", 35.0, 20.0, 50.0), bd_row("jpeg2000", -12.0, -20.0, -3.0)]
    inputs = Inputs(classifier=ClassifierMetrics(test_acc=0.85), compressor=None, summary=summary,
                      curves=[], at_rates=[], bd=bd, visual=None, per_image=[])
    claims = RC.check_claims(inputs, params.report)
    assert claims[0].verdict == "refuted" and "85.00%" in claims[0].evidence
    behind = {c.claim: c.verdict for c in claims[3:]}
    assert behind == {"The RNN codec is behind WebP": "confirmed", "The RNN codec is behind JPEG 2000": "refuted"}
    inputs.bd = [bd_row("webp", 5.0, -10.0, 20.0), bd_row("jpeg2000", -12.0, -20.0, -3.0)]
    assert RC.check_claims(inputs, params.report)[3].verdict == "not shown"  # the interval contains zero


def test_accuracy_claim_uses_a_wilson_interval():
    # 90.5% on 10,000 images, by hand: centre (p + z^2/2n)/(1 + z^2/n) = 0.90485, half-width
    # z sqrt(p(1-p)/n + z^2/4n^2)/(1 + z^2/n) = 0.00575: [0.8991, 0.9106], which still contains 90%
    lo, hi = R.wilson(0.905, 10000)
    assert lo == pytest.approx(0.8991, abs=1e-4) and hi == pytest.approx(0.9106, abs=1e-4)
    params = tiny_params()
    summary = summary_of({})
    for acc, verdict in ((0.91, "confirmed"), (0.905, "not shown"), (0.8995, "not shown"), (0.89, "refuted")):
        inputs = Inputs(classifier=ClassifierMetrics(test_acc=acc), compressor=None, summary=summary, curves=[], at_rates=[],
                          bd=[], visual=None)
        assert RC.check_claims(inputs, params.report)[0].verdict == verdict


def test_accuracy_interval_counts_the_recorded_test_images():
    """A classifier measured on 256 test images (the tiny profile) gets a 256-image interval, not 10,000."""
    params = tiny_params()
    summary = summary_of({})
    inputs = Inputs(classifier=ClassifierMetrics(test_acc=0.93, test_size=256), compressor=None, summary=summary,
                      curves=[], at_rates=[], bd=[], visual=None)
    claim = RC.check_claims(inputs, params.report)[0]
    lo, hi = R.wilson(0.93, 256)
    assert claim.verdict == "not shown" and lo < 0.90 < hi and "on 256 images" in claim.evidence


def test_classifier_metrics_record_reads_what_train_classifier_writes(tmp_path):
    path = tmp_path / "metrics.json"
    written = {"test_acc": 0.9312, "test_acc_no_tta": 0.925, "test_loss": 0.25, "test_loss_no_tta": 0.27,
               "train_loss": 0.1, "train_acc": 0.97, "per_class_acc": {"cat": 0.85, "dog": 0.9},
               "train_time_s": 600.5, "train_cpu_time_s": 1200.0, "images_per_s": 4000.0, "epochs": 30, "tta": 2,
               "parameters": 1000}
    path.write_text(json.dumps(written))
    m = ClassifierMetrics.read(path)
    assert m.test_acc == 0.9312 and m.tta == 2 and m.test_size is None
    scalars = m.scalars()
    assert scalars["per_class_acc.cat"] == 0.85 and scalars["train_time_s"] == 600.5
    for bad, key in (({"test_accuracy": 0.9}, "test_acc"), ({"test_acc": 93.1}, "test_acc"), ("[1, 2]", "")):
        path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
        with pytest.raises(PipelineError, match=f"metrics.json: not the classifier's metrics.*{key}"):
            ClassifierMetrics.read(path)
    with pytest.raises(PipelineError, match="missing"):
        ClassifierMetrics.read(tmp_path / "nope.json")


# ----------------------------------------------------------------------------- end to end (tiny)

def _has_main(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None and hasattr(importlib.import_module(module), "main")
    except ImportError:
        return False


@pytest.mark.slow
def test_report_stage_on_tiny_workspace(tiny_workspace, monkeypatch):
    """evaluate + report through ``python -m pipeline``, on the real upstream stages where they exist."""
    from tests.conftest import run_stage

    ws = tiny_workspace
    if not (ws / "data/classifier/metrics.json").exists():
        if _has_main("pipeline.classifier.train"):
            run_stage(ws, "train_classifier")
        else:
            standin_classifier(ws)
    if not (ws / "data/compressor/model.pt").exists():
        if _has_main("pipeline.compression.train"):
            run_stage(ws, "train_compressor")
        else:
            (ws / "data/compressor").mkdir(parents=True, exist_ok=True)
            (ws / "data/compressor/model.pt").write_bytes(b"stand-in")
            monkeypatch.setattr("pipeline.evaluation.evaluate.load_rnn", lambda m, device: FakeRNNCodec())
    run_stage(ws, "evaluate")
    run_stage(ws, "report")
    for out in ("per_image.csv", "curves.csv", "at_rates.csv", "bd.csv", "summary.json", "metrics.json",
                "visual", "curves", "figures"):
        assert (ws / "data/evaluation" / out).exists(), out
    html = (ws / "data/report/report.html").read_text()
    summary = json.loads((ws / "data/evaluation/summary.json").read_text())
    check_html(html, n_codecs=len(summary["codecs"]))
    assert "rnn" in summary["codecs"]
    assert re.search(r"<td>evaluate</td><td><code>[0-9a-f]{32}</code>", html)  # MLflow run ids in provenance
    assert (ws / "data/report/report.md").read_text().startswith("# ")


def test_claim_behind_names_registered_codecs():
    from pipeline.report.params import ReportParams

    assert ReportParams(claim_behind=["avif", "jpegxl"]).claim_behind == ["avif", "jpegxl"]
    with pytest.raises(ValueError, match="claim_behind: webpp is not a codec"):
        ReportParams(claim_behind=["webpp"])


def test_bd_max_bpp_cuts_every_curve_and_the_report_says_so(workspace):
    params = tiny_params(bd_max_bpp=0.5)
    params = params.model_copy(update={"report": params.report.model_copy(update={"mlflow_runs": False})})
    E.evaluate(params, rnn_loader=lambda model, device: FakeRNNCodec())
    summary = EvaluationSummary.read(workspace / "data/evaluation/summary.json")
    assert summary.bd_max_bpp == 0.5
    cut = {(r["anchor"], r["test"], r["metric"]): r["bd_rate_pct"] for r in E.read_csv(workspace / "data/evaluation/bd.csv")}
    R.build(params)
    assert "rates up to 0.5 bpp" in (workspace / "data/report/report.md").read_text()
    assert "<code>evaluate.bd_max_bpp</code>" in (workspace / "data/report/report.html").read_text()
    E.evaluate(tiny_params(), rnn_loader=lambda model, device: FakeRNNCodec())
    whole = {(r["anchor"], r["test"], r["metric"]): r["bd_rate_pct"] for r in E.read_csv(workspace / "data/evaluation/bd.csv")}
    assert cut.keys() == whole.keys() and cut != whole  # the same pairs, over other rates


def test_the_codec_trained_for_ms_ssim_is_said_to_trade_psnr():
    p = tiny_params().train_compressor
    plain = R.codec_training(p)
    assert "L1 (mean absolute error)" in plain and "trades" not in plain
    ms = R.codec_training(p.model_copy(update={"loss": "l1_msssim", "ssim_weight": 0.84, "init": "models/rnnc-cpu.pt"}))
    assert "0.84 (1 - MS-SSIM) + 0.16 L1" in ms and "trades some PSNR for MS-SSIM" in ms
    assert "warm-started from models/rnnc-cpu.pt" in ms
