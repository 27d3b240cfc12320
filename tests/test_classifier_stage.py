"""The train_classifier stage end to end on the tiny profile: every declared output, MLflow, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_workspace

pytestmark = pytest.mark.slow

FIGURES = ("fig1_1_accuracy.png", "fig1_2_predictions.png", "confusion_matrix.png")


def declared_outputs(workspace: Path) -> list[str]:
    stage = yaml.safe_load((workspace / "dvc.yaml").read_text())["stages"]["train_classifier"]
    paths = []
    for key in ("outs", "metrics", "plots"):
        for entry in stage.get(key, []):
            paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return paths


@pytest.fixture(scope="module")
def trained(tiny_workspace: Path) -> Path:
    import os

    from pipeline.__main__ import main

    old = Path.cwd()
    os.chdir(tiny_workspace)
    try:
        assert main(["train_classifier"]) == 0
    finally:
        os.chdir(old)
    return tiny_workspace


def test_every_declared_output_exists(trained: Path):
    declared = declared_outputs(trained)
    assert "data/classifier/model.pt" in declared and "data/classifier/metrics.json" in declared
    for rel in declared:
        assert (trained / rel).exists(), rel
    for name in FIGURES:
        png = trained / "data/classifier/figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert not (trained / "data/checkpoints/train_classifier/last.pt").exists()  # done: nothing to resume
    assert not [p for p in (trained / "data").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_metrics_and_history(trained: Path):
    from pipeline.config import load_params

    cfg = load_params(trained / "params.yaml").train_classifier
    metrics = json.loads((trained / "data/classifier/metrics.json").read_text())
    for key in ("test_acc", "test_acc_no_tta", "test_loss", "train_loss", "train_time_s", "images_per_s"):
        assert isinstance(metrics[key], float) and metrics[key] >= 0, key
    assert 0 <= metrics["test_acc"] <= 1 and metrics["train_time_s"] > 0
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert list(metrics["per_class_acc"]) == names
    with open(trained / "data/classifier/history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["epoch"]) for r in rows] == [float(e) for e in range(1, int(cfg.epochs) + 1)]
    assert all(r["test_acc"] not in ("", "nan") for r in rows)
    assert float(rows[-1]["test_acc"]) == pytest.approx(metrics["test_acc_no_tta"])


def test_mlflow_run_and_registered_model(trained: Path):
    import mlflow
    import numpy as np

    from pipeline import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("rnn-compression-cifar10")
    runs = client.search_runs([exp.experiment_id], "tags.dvc_stage = 'train_classifier'")
    assert runs
    run = runs[0]
    assert "test_acc" in run.data.metrics and "test_acc_cat" in run.data.metrics
    assert run.data.params["train_classifier.recipe"] in ("fast", "coursework")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {f"figures/{n}" for n in FIGURES} <= artifacts
    versions = client.search_model_versions("name = 'cifar10-classifier'")
    assert versions
    from pipeline.classifier.predict import load_model  # the predict CLI's loader: URI -> Classifier

    model = load_model(f"models:/cifar10-classifier/{max(int(v.version) for v in versions)}")
    assert model.label_names[3] == "cat"
    out = model(__import__("torch").from_numpy(np.zeros((2, 3, 32, 32), np.float32)))
    assert tuple(out.shape) == (2, 10)


def test_predict_cli_uses_the_stage_model(trained: Path, tmp_path, capsys, monkeypatch):
    import numpy as np
    from PIL import Image

    from pipeline.classifier.predict import main

    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(img)
    monkeypatch.chdir(trained)
    assert main([str(img)]) == 0  # default --model data/classifier/model.pt
    assert len(capsys.readouterr().out.strip().splitlines()) == 6


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    from pipeline.__main__ import main

    (tmp_path / "params.yaml").write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert main(["train_classifier"]) == 1


def test_killed_stage_resumes_from_its_checkpoint(tiny_workspace: Path, tmp_path):
    """SIGKILL a real `python -m pipeline train_classifier` after its first checkpoint; rerun it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipeline.config import set_params

    ws = tmp_path / "ws"
    copy_workspace(tiny_workspace, ws, "classifier", "checkpoints", "mlartifacts", "mlflow.db")
    set_params(ws / "params.yaml", None, ["train_classifier.epochs=12", "train_classifier.tta=0"])
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}", "PIPELINE_HOME": str(ws)}
    cmd = [sys.executable, "-m", "pipeline", "train_classifier"]
    ckpt = ws / "data/checkpoints/train_classifier/last.pt"
    proc = subprocess.Popen(cmd, cwd=ws, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and proc.returncode == -signal.SIGKILL, "killed before its first checkpoint?"
    assert not (ws / "data/classifier/metrics.json").exists()  # nothing half-written

    rerun = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from" in rerun.stderr
    with open(ws / "data/classifier/history.csv") as f:
        epochs = [float(r["epoch"]) for r in csv.DictReader(f)]
    assert epochs == [float(e) for e in range(1, 13)]  # continuous: nothing lost, nothing repeated
    assert not ckpt.exists()
