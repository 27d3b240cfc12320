"""MLflow opens on what this project is: the experiment is marked as model training, and each stage run
lists the data it read as dataset inputs whose digests are DVC's hashes (issue 22, item 5)."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline import tracking
from pipeline.config import load_params
from tests.conftest import REPO


def test_stage_run_logs_its_data_with_dvc_hashes_and_the_experiment_kind(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/raw/kodak").mkdir(parents=True)
    (tmp_path / "data/prepared/cifar10.npz").write_bytes(b"arrays")
    (tmp_path / "data/raw/kodak/kodim01.png").write_bytes(b"png")
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "augment": {"outs": [{"path": "data/prepared/cifar10.npz", "md5": "0123456789abcdef0123456789abcdef"}]},
        "download": {"outs": [{"path": "data/raw/kodak", "md5": "fedcba9876543210fedcba9876543210.dir"}]}}}))
    (tmp_path / "data/raw/loose.bin").write_bytes(b"not in dvc.lock")
    params = load_params(REPO / "params.yaml")
    datasets = {"CIFAR-10 (arrays)": Path("data/prepared/cifar10.npz"), "Kodak": Path("data/raw/kodak"),
                "loose": Path("data/raw/loose.bin"), "absent": Path("data/raw/none")}
    with tracking.stage_run("train_classifier", params, ("train_classifier",), datasets) as run:
        run_id = run.info.run_id

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(params.tracking.experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on runs, not GenAI traces
    inputs = {d.dataset.name: d for d in client.get_run(run_id).inputs.dataset_inputs}
    assert set(inputs) == {"CIFAR-10 (arrays)", "Kodak", "loose"}  # an absent path is not logged
    assert inputs["CIFAR-10 (arrays)"].dataset.digest == "0123456789abcdef0123456789abcdef"  # DVC's, from dvc.lock
    assert inputs["Kodak"].dataset.digest == "fedcba9876543210fedcba9876543210"
    assert inputs["loose"].dataset.digest == "75c191acc0304dbc01a73da33240c55e"  # its own md5, as DVC would hash it
    assert str(tmp_path / "data/raw/kodak") in inputs["Kodak"].dataset.source
    assert [t.value for t in inputs["Kodak"].tags if t.key == "mlflow.data.context"] == ["data/raw/kodak"]


def test_an_existing_experiment_gets_the_kind(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    client.create_experiment("older")  # as an earlier version of the project made it: no kind
    exp_id = tracking.experiment_id("older")
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
