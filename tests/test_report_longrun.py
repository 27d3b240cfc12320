"""The coursework recipe's long run in the report: its record (tools.release_classifier) is bounded and checked,
scored against the real test labels (not trusted for a figure), and its claim waits for the run's end."""

from __future__ import annotations

import base64
import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.records import ClassifierRun
from pipeline.report import longrun as L
from pipeline.report.build import wilson

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_test_batch(folder: Path, n: int, seed: int = 0) -> np.ndarray:
    """A CIFAR-10 python batch (``test_batch``) of ``n`` random images, labels ``i % 10``; returns the labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": labels.tolist()}, f)
    return labels


def record(labels: np.ndarray, correct: int, correct_no_tta: int, epochs_done: int = 300, **over) -> dict:
    """A run record whose first ``correct`` predictions are right and the rest wrong (label + 1)."""
    def preds(k: int) -> str:
        p = labels.copy()
        p[k:] = (p[k:] + 1) % 10
        return "".join(map(str, p.tolist()))

    history = [{"epoch": e, "lr": 0.001, "train_loss": 1.0 / e, "train_acc": 0.5 + 0.4 * e / epochs_done,
                "test_loss": 0.5, "test_acc": 0.6 + 0.3 * e / epochs_done} for e in range(1, epochs_done + 1)]
    probs = [0.02] * 10
    probs[0] = 0.82
    return {"kind": "classifier-run", "version": 1, "profile": "coursework", "recipe": "coursework", "epochs": 300,
            "batch_size": 64, "tta": 1, "label_names": NAMES, "history": history,
            "predictions": preds(correct), "predictions_no_tta": preds(correct_no_tta),
            "examples": [{"index": i, "probs": probs} for i in range(12)], "train_time_s": 36000.0,
            "train_cpu_s": 40000.0, "hardware": "x86_64", "training_code_commit": "de104b4", "released": "2026-12-08",
            "how": "test", **over}


def standin_long_run(root: Path, n: int = 1000, correct: int = 950, epochs_done: int = 300) -> Path:
    """models/coursework-run.json and data/raw/cifar-10-batches-py/test_batch under ``root``."""
    labels = write_test_batch(root / "data/raw/cifar-10-batches-py", n)
    path = root / "models" / "coursework-run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record(labels, correct, correct - 10, epochs_done)))
    return path


def test_a_finished_run_is_scored_against_the_labels_and_gets_a_verdict(tmp_path):
    path = standin_long_run(tmp_path, n=1000, correct=950)
    run, missing = L.read_long_run(path, tmp_path / "data/raw/cifar-10-batches-py")
    assert missing is None
    assert run.acc == pytest.approx(0.95) and run.acc_no_tta == pytest.approx(0.94) and run.n == 1000
    metric, evidence, verdict = L.claim_text(run, None, 0.90)
    lo, hi = wilson(0.95, 1000)
    assert verdict == "confirmed" and lo > 0.90  # [0.935, 0.962]
    assert "95.00%" in evidence and "94.00% without" in evidence and f"[{lo:.2%}, {hi:.2%}]" in evidence
    rows = {r["key"]: r["value"] for r in run.rows}
    assert rows["test accuracy"].startswith("95.00% (95% CI") and "finished" in rows["run"]
    assert rows["best epoch (test accuracy without TTA, per epoch)"] == "90.00% at epoch 300"
    captions = [f["caption"] for f in run.figs]
    assert captions[0].startswith("Figure 1.1") and captions[1].startswith("Figure 1.2")
    assert captions[2].startswith("Confusion matrix")
    for f in run.figs:
        assert base64.b64decode(f["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # the same record against other labels is scored on those: the file's own figure is never taken
    (tmp_path / "other").mkdir()
    labels = np.roll(np.arange(1000) % 10, 1)
    with open(tmp_path / "other" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((1000, 3072), np.uint8), b"labels": labels.tolist()}, f)
    run2, _ = L.read_long_run(path, tmp_path / "other")
    assert run2.acc < 0.2
    assert L.claim_text(run2, None, 0.90)[2] == "refuted"


def test_a_run_in_progress_is_shown_but_not_checked(tmp_path):
    path = standin_long_run(tmp_path, n=1000, correct=950, epochs_done=108)
    run, _ = L.read_long_run(path, tmp_path / "data/raw/cifar-10-batches-py")
    metric, evidence, verdict = L.claim_text(run, None, 0.90)
    assert verdict == "not checked" and "108 of 300 epochs" in evidence and "has not ended" in evidence
    assert "in progress: epoch 108 of 300" in {r["key"]: r["value"] for r in run.rows}["run"]


def test_a_missing_record_or_test_set_is_listed_not_fatal(tmp_path):
    run, missing = L.read_long_run(tmp_path / "none.json", tmp_path)
    assert run is None and "none.json" in missing
    assert L.claim_text(None, missing, 0.9)[2] == "not checked"
    path = standin_long_run(tmp_path)
    run, missing = L.read_long_run(path, tmp_path / "elsewhere")
    assert run is None and "test_batch" in missing


@pytest.mark.parametrize("change, message", [
    ({"predictions": "9" * 999 + "x"}, "predictions"),
    ({"examples": [{"index": 0, "probs": [0.1] * 9}]}, "examples"),
    ({"kind": "model"}, "kind"),
    ({"history": []}, "history"),
    ({"history": [{"epoch": 2}, {"epoch": 1}]}, "history"),
    ({"history": [{"epoch": 301}]}, "history"),
    ({"label_names": ["a", "b"]}, "class index"),
    ({"extra": 1}, "extra"),
])
def test_a_record_of_another_shape_is_refused_naming_the_key(tmp_path, change, message):
    labels = write_test_batch(tmp_path / "cifar", 1000)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**record(labels, 950, 940), **change}))
    with pytest.raises(PipelineError, match=message) as err:
        L.read_long_run(path, tmp_path / "cifar")
    assert str(path) in str(err.value)


def test_predictions_for_another_test_set_size_are_refused(tmp_path):
    labels = write_test_batch(tmp_path / "cifar", 1000)
    write_test_batch(tmp_path / "small", 500)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(record(labels, 950, 940)))
    with pytest.raises(PipelineError, match="1000 predictions for a test set of 500"):
        L.read_long_run(path, tmp_path / "small")


def test_an_oversized_record_is_refused_before_parsing(tmp_path, monkeypatch):
    import pipeline.records as records

    monkeypatch.setattr(records, "MAX_RUN_RECORD_BYTES", 100)
    path = tmp_path / "run.json"
    path.write_text(" " * 200)
    with pytest.raises(PipelineError, match="over"):
        ClassifierRun.read(path)


# ----------------------------------------------------------------------------- tools.release_classifier

def run_folder(tmp_path: Path, n: int = 64) -> tuple[Path, object, dict]:
    """A coursework run's folder: params.yaml (profile coursework, tiny widths), the raw test batch and a model."""
    from pipeline.classifier.model import build_classifier
    from pipeline.classifier.recipes import make_recipe
    from pipeline.config import read_raw, resolve
    from tests.test_evaluation_stage import REPO

    raw = read_raw(REPO / "params.yaml")
    raw["profile"] = "coursework"
    work = tmp_path / "run"
    (work / "data/raw/cifar-10-batches-py").mkdir(parents=True)
    text = (REPO / "params.yaml").read_text()
    (work / "params.yaml").write_text(text.replace("profile: cpu", "profile: coursework", 1))
    write_test_batch(work / "data/raw/cifar-10-batches-py", n)
    with open(work / "data/raw/cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in NAMES]}, f)
    config = make_recipe(resolve(raw).train_classifier).model_config()
    torch.manual_seed(0)
    return work, build_classifier(config, NAMES).eval(), config


def predictions_of(model, folder: Path) -> np.ndarray:
    from pipeline.data.cifar import load_batch

    x, _ = load_batch(folder / "data/raw/cifar-10-batches-py" / "test_batch")
    with torch.no_grad():
        logits = model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    return logits.argmax(1).numpy()


def test_release_records_a_run_in_progress_from_its_checkpoint(tmp_path):
    from tools import release_classifier as RC

    work, model, _ = run_folder(tmp_path)
    ckpt = work / RC.CHECKPOINT
    ckpt.parent.mkdir(parents=True)
    history = [{"epoch": e, "step": 781 * e, "lr": 0.001, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.1,
                "test_acc": 0.4, "train_time_s": 100.0 * e} for e in (1, 2, 3)]
    torch.save({"fingerprint": "x", "epoch": 3, "history": history, "model": model.state_dict(),
                "train_time_s": 300.0, "train_cpu_s": 290.0}, ckpt)
    out = tmp_path / "models" / "coursework-run.json"
    rec = ClassifierRun.model_validate(RC.release(work, out))
    assert ClassifierRun.read(out) == rec
    assert rec.epochs_done == 3 and rec.epochs == 300 and not rec.finished and rec.tta == 1
    assert rec.predictions_no_tta == "".join(map(str, predictions_of(model, work).tolist()))  # the model's own
    from pipeline.classifier.figures import pick_examples

    preds = np.array([int(c) for c in rec.predictions])
    labels = np.arange(64) % 10
    assert [e.index for e in rec.examples] == pick_examples(labels, preds).tolist()  # Figure 1.2's choice
    assert all(abs(sum(e.probs) - 1) < 1e-3 and int(np.argmax(e.probs)) == preds[e.index] for e in rec.examples)
    assert rec.label_names == NAMES and rec.train_time_s == 300.0


def test_release_records_a_finished_run_from_its_outputs(tmp_path):
    from pipeline.classifier.model import save_classifier
    from tools import release_classifier as RC

    work, model, config = run_folder(tmp_path)
    out_dir = work / RC.PUBLISHED
    out_dir.mkdir(parents=True)
    save_classifier(out_dir / "model.pt", model, config)
    with open(out_dir / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc"])
        w.writeheader()
        w.writerows({"epoch": e, "step": e, "lr": 0.001, "train_loss": 1, "train_acc": 0.5, "test_loss": 1,
                     "test_acc": 0.4} for e in range(1, 301))
    (out_dir / "metrics.json").write_text(json.dumps({"test_acc": 0.5, "train_time_s": 7200.0,
                                                      "train_cpu_time_s": 7000.0}))
    rec = ClassifierRun.model_validate(RC.release(work, tmp_path / "run.json"))
    assert rec.finished and rec.epochs_done == 300 and rec.train_cpu_s == 7000.0
    assert rec.predictions_no_tta == "".join(map(str, predictions_of(model, work).tolist()))


def test_release_says_what_is_missing(tmp_path):
    from tools import release_classifier as RC

    work, _, _ = run_folder(tmp_path)
    with pytest.raises(PipelineError, match="neither"):
        RC.release(work, tmp_path / "run.json")
    assert not (tmp_path / "run.json").exists()
