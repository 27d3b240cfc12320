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

from pipeline.evaluation import evaluate as E
from pipeline.report import build as R
from pipeline.utils import file_digest
from tests.test_evaluation_codecs import FakeRNNCodec, make_image
from tests.test_evaluation_stage import tiny_params

SECTIONS = ("summary", "classifier", "compression", "rates", "bdrate", "visual", "claims", "provenance")


def standin_classifier(root: Path, acc: float = 0.9123) -> None:
    """Minimal stand-ins for train_classifier's outputs (used only where that stage cannot run)."""
    d = root / "data" / "classifier"
    (d / "figures").mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps({"test_acc": acc, "test_loss": 0.31, "train_time_s": 12.5}))
    for i, (name, _) in enumerate(R.CLASSIFIER_FIGURES):
        Image.new("RGB", (40, 30), (60 * i, 100, 200)).save(d / "figures" / name)


def check_html(html: str, n_codecs: int) -> None:
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in html, sid
    srcs = re.findall(r'<img src="([^"]*)"', html)
    # 3 classifier figures + 4 evaluation figures + original + one crop per codec
    assert len(srcs) == 3 + 4 + 1 + n_codecs
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from the network
    assert "missing:" not in html
    assert "Figure 1.1" in html and "Figure 1.2" in html and "Confusion matrix" in html
    assert "Figure 1.7 analogue" in html and "PSNR" in html and "MS-SSIM in dB" in html


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    kodak = tmp_path / "data" / "raw" / "kodak"
    kodak.mkdir(parents=True)
    Image.fromarray(make_image(200, 264, seed=5)).save(kodak / "kodim01.png")
    (tmp_path / "data" / "compressor").mkdir(parents=True)
    (tmp_path / "data" / "compressor" / "model.pt").write_bytes(b"stand-in")
    standin_classifier(tmp_path)
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
    claims = ctx["claims"]
    assert [c.claim for c in claims][0].startswith("The CNN reaches 90%")
    assert claims[0].verdict == "confirmed"  # 91.23% >= 90%
    assert len(claims) == 1 + 2 + len(params.report.claim_behind)
    assert all(c.verdict in ("confirmed", "refuted", "partly", "not checked") for c in claims)
    hashes = {h["path"]: h for h in ctx["prov"]["hashes"]}
    assert hashes["data/raw/kodak"]["files"] == "1"
    assert hashes["data/evaluation/curves.csv"]["md5"] == file_digest(workspace / "data/evaluation/curves.csv", "md5")
    # bd table rows match the evaluation's bd.csv
    assert len(ctx["bd_rows"]) == len(E.read_csv(workspace / "data/evaluation/bd.csv"))


def test_missing_evaluation_is_a_clear_error(workspace):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="evaluate"):
        R.build(tiny_params())


def curves(**codecs):
    out = []
    for name, (rates, quality) in codecs.items():
        for i, (r, q) in enumerate(zip(rates, quality)):
            out.append({"codec": name, "setting_name": "s", "setting": float(i), "bpp": r, "ms_ssim": q,
                        "ssim": q, "ms_ssim_db": q, "psnr": q, "encode_s": 0.0, "decode_s": 0.0})
    return out


RATES = [0.1, 0.2, 0.3, 0.5, 0.8, 1.2]


def test_claim_verdicts_follow_the_numbers():
    base = np.array([0.80, 0.86, 0.90, 0.94, 0.96, 0.98])
    above = curves(rnn=(RATES, base + 0.01), jpeg=(RATES, base))
    below = curves(rnn=(RATES, base - 0.01), jpeg=(RATES, base))
    cross = curves(rnn=(RATES, base + np.array([0.02, 0.01, -0.01, -0.02, -0.02, -0.02])), jpeg=(RATES, base))
    assert R.compare_below(above, "rnn", "jpeg", "ms_ssim", 0.4, 32)[1] == "confirmed"
    assert R.compare_below(below, "rnn", "jpeg", "ms_ssim", 0.4, 32)[1] == "refuted"
    text, verdict = R.compare_below(cross, "rnn", "jpeg", "ms_ssim", 0.4, 32)
    assert verdict == "partly" and "0.100-" in text
    apart = curves(rnn=([1.0, 2.0], [0.9, 0.95]), jpeg=(RATES, base))
    assert R.compare_below(apart, "rnn", "jpeg", "ms_ssim", 0.4, 32)[1] == "not checked"


def test_behind_claim_uses_bd_rate_sign():
    params = tiny_params()
    summary = {"labels": {"webp": "WebP", "jpeg2000": "JPEG 2000", "rnn": "RNN", "jpeg": "JPEG"}, "profile": "tiny"}
    bd = [{"anchor": "webp", "test": "rnn", "metric": "ms_ssim_db", "bd_rate_pct": 35.0, "bd_quality_db": -1.0},
          {"anchor": "jpeg2000", "test": "rnn", "metric": "ms_ssim_db", "bd_rate_pct": -12.0, "bd_quality_db": 0.5}]
    inputs = R.Inputs(classifier={"nested": {"test_accuracy": 85.0}}, compressor=None, summary=summary,
                      curves=curves(rnn=(RATES, RATES), jpeg=(RATES, RATES)), at_rates=[], bd=bd, visual=None)
    claims = R.check_claims(inputs, params.report)
    assert claims[0].verdict == "refuted" and "85.00%" in claims[0].evidence  # percent normalised
    behind = {c.claim: c.verdict for c in claims[3:]}
    assert behind == {"The RNN codec is behind WebP": "confirmed", "The RNN codec is behind JPEG 2000": "refuted"}


def test_find_accuracy_prefers_tta():
    assert R.find_accuracy({"test_acc": 0.91, "test_acc_tta": 0.93}) == ("test_acc_tta", 0.93)
    assert R.find_accuracy({"loss": 1.0}) is None


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
