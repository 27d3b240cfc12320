"""MLflow tracking unreachable: a stage fails fast, with one line, before training; and when tracking
fails after training, the trained weights are kept and the re-run retrains nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import copy_workspace, run_stage

pytestmark = pytest.mark.slow


def closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_reachable_is_fast_and_one_line():
    from pipeline.errors import PipelineError
    from pipeline.tracking import check_reachable

    uri = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(PipelineError, match="unreachable") as info:
        check_reachable(uri)
    assert time.monotonic() - t0 < 5 and "\n" not in str(info.value)
    check_reachable("sqlite:///nowhere.db")  # local stores need no server


@pytest.mark.parametrize("stage", ["train_classifier", "train_compressor"])
def test_stage_fails_fast_before_training(tiny_workspace, tmp_path, stage):
    ws = tmp_path / "ws"
    copy_workspace(tiny_workspace, ws, "mlflow.db", "mlartifacts", "checkpoints")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed_port()}", "PIPELINE_HOME": str(ws)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline", stage], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=300)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MLflow tracking server" in errors[0] and "unreachable" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 120, f"took {elapsed:.0f} s"  # start-up (imports) only: MLflow's own retries take minutes
    assert not (ws / "data" / "checkpoints" / stage).exists() or not any((ws / "data" / "checkpoints" / stage).iterdir())
    out = ws / "data" / ("classifier" if stage == "train_classifier" else "compressor")
    assert not out.exists(), "a stage that cannot log must not train"


def test_tracking_failure_after_training_keeps_the_weights(tiny_workspace, tmp_path, monkeypatch, capsys, one_thread):
    """MLflow dies between training and logging: model.pt stays, the checkpoint stays, the error is one
    line; the re-run resumes at the last epoch (retrains nothing) and writes the same weights."""
    from pipeline.__main__ import main
    from pipeline.classifier import train as classifier_train

    ws = tmp_path / "ws"
    copy_workspace(tiny_workspace, ws, "mlflow.db", "mlartifacts", "checkpoints")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    monkeypatch.setenv("PIPELINE_HOME", str(ws))
    monkeypatch.chdir(ws)

    def tracking_down(*args, **kwargs):
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    monkeypatch.setattr(classifier_train, "log_to_mlflow", tracking_down)
    assert main(["train_classifier"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "logging to MLflow failed" in errors[0] and "Traceback" not in err
    model = ws / "data" / "classifier" / "model.pt"
    checkpoint = ws / "data" / "checkpoints" / "train_classifier" / "last.pt"
    assert model.is_file() and checkpoint.is_file()
    first = model.read_bytes()

    monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    monkeypatch.setenv("PIPELINE_HOME", str(ws))
    monkeypatch.chdir(ws)
    run_stage(ws, "train_classifier")
    err = capsys.readouterr().err
    assert "resuming from" in err and "after epoch 2/2" in err  # nothing retrained
    assert model.read_bytes() == first
    assert not checkpoint.exists()  # logged now: nothing left to resume
