"""Issue 29: no code from data. A model from MLflow loads as weights, never as a pickle; a DAG run's conf
names knobs, never a path, a URI or a model.

The attack is real here: a PyTorch module whose unpickling writes a sentinel file, logged with
``mlflow.pytorch`` (as earlier versions of this project logged every model) and registered. Every loader
a user, a run conf or the registry can reach must refuse it in one line, and the sentinel never appear.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.errors import ParamsError, PipelineError
from tests.conftest import REPO
from tests.test_codec_format import CFG, make_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CLASSIFIER = {"arch": "fast", "widths": [8, 16, 16], "bn_momentum": 0.6, "scale": 1 / 9}


class Payload:
    """Unpickling it runs ``open(path, "w")``: any code could stand there."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class EvilModule(torch.nn.Module):
    """A module as ``mlflow.pytorch.log_model`` takes it, pickled as the payload."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = str(path)

    def __reduce_ex__(self, protocol):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A local MLflow store (sqlite + folder) holding good and evil models, registered; yields a namespace."""
    import mlflow
    import mlflow.pytorch

    from pipeline import tracking, tracking_models
    from pipeline.classifier.model import build_classifier, save_classifier
    from pipeline.compression.modelfile import save_model

    root = tmp_path_factory.mktemp("mlflow")
    ns = type("Store", (), {})()
    ns.root, ns.sentinel = root, root / "PWNED"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("PIPELINE_HOME", str(root))
        mlflow.set_tracking_uri(tracking.tracking_uri())
        exp = mlflow.create_experiment("issue-29", artifact_location=(root / "artifacts").as_uri())
        ns.codec, ns.codec_file = make_model(), root / "rnnc.pt"
        save_model(ns.codec, ns.codec_file)
        torch.manual_seed(0)
        ns.classifier, ns.classifier_file = build_classifier(CLASSIFIER).eval(), root / "classifier.pt"
        save_classifier(ns.classifier_file, ns.classifier, CLASSIFIER)
        ns.disguised = root / "disguised.pt"  # this project's file name and flavour, a payload inside
        torch.save(Payload(ns.sentinel), ns.disguised)
        with mlflow.start_run(experiment_id=exp) as run:
            tracking_models.log_model_checkpoint(ns.codec_file, "rnn-compressor", "good-codec")
            ns.codec_run = run.info.run_id
        with mlflow.start_run(experiment_id=exp) as run:
            tracking_models.log_model_checkpoint(ns.classifier_file, "cifar10-classifier", "good-classifier")
            ns.classifier_run = run.info.run_id
        with mlflow.start_run(experiment_id=exp) as run:  # what earlier versions logged: a pickled module
            mlflow.pytorch.log_model(EvilModule(ns.sentinel), name="model", serialization_format="pickle",
                                     registered_model_name="evil", pip_requirements=["torch"])
            ns.evil_run = run.info.run_id
        for kind in ("rnn-compressor", "cifar10-classifier"):
            with mlflow.start_run(experiment_id=exp):
                tracking_models.log_model_checkpoint(ns.disguised, kind, f"disguised-{kind}")
        assert not ns.sentinel.exists()
        ns.evil = ["models:/evil/1", f"runs:/{ns.evil_run}/model"]
        yield ns


@pytest.fixture
def png(tmp_path) -> Path:
    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def one_error_line(capsys, *parts: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and all(p in lines[0] for p in parts), err
    return lines[0]


def attack_everywhere(uri: str, tmp_path: Path, png: Path, capsys, *parts: str) -> None:
    """rnnc decompress, predict and train_compressor's warm start, all pointed at ``uri``: each one line."""
    from pipeline.classifier.predict import main as predict
    from pipeline.compression.cli import main as rnnc
    from pipeline.compression.model import RNNCompressor
    from pipeline.compression.train import load_init

    coded = tmp_path / "in.rnnc"
    coded.write_bytes(b"RNNC")
    assert rnnc(["decompress", str(coded), str(tmp_path / "out.png"), "--model", uri]) != 0
    one_error_line(capsys, uri, *parts)
    assert predict([str(png), "--model", uri]) != 0
    one_error_line(capsys, uri, *parts)
    with pytest.raises(PipelineError) as info:  # train_compressor.init
        load_init(RNNCompressor(CFG), uri)
    assert "\n" not in str(info.value) and uri in str(info.value) and all(p in str(info.value) for p in parts)


def test_a_pickled_model_in_the_registry_never_runs(store, tmp_path, png, capsys):
    import mlflow

    from pipeline.classifier.predict import main as predict
    from pipeline.compression.modelfile import load_model

    for uri in store.evil:
        attack_everywhere(uri, tmp_path, png, capsys, "pickled", "python -m pipeline log-model")
        assert not store.sentinel.exists(), uri
    assert "--register evil`" in str(pytest.raises(PipelineError, load_model, "models:/evil/1").value)
    # the checkpoint format itself, with a payload inside: torch.load(weights_only=True) refuses it
    for kind in ("rnn-compressor", "cifar10-classifier"):
        uri = f"models:/disguised-{kind}/1"
        if kind == "rnn-compressor":
            with pytest.raises(PipelineError, match="not a readable checkpoint"):
                load_model(uri)
        else:
            assert predict([str(png), "--model", uri]) != 0
            one_error_line(capsys, uri, "not a readable classifier checkpoint")
        assert not store.sentinel.exists(), uri
    # the control: both payloads are live, so the refusals above were what kept them from running
    local = Path(mlflow.artifacts.download_artifacts("models:/evil/1", dst_path=str(tmp_path / "evil")))
    for pickled in (next(local.rglob("model.pth")), store.disguised):
        torch.load(pickled, weights_only=False)  # what mlflow.pytorch.load_model does
        assert store.sentinel.exists(), pickled
        store.sentinel.unlink()


def test_rnnc_with_a_pickled_model_exits_with_one_line(store, tmp_path):
    coded = tmp_path / "in.rnnc"
    coded.write_bytes(b"RNNC")
    proc = subprocess.run([sys.executable, "-m", "pipeline.compression.cli", "decompress", str(coded),
                           str(tmp_path / "out.png"), "--model", "models:/evil/1"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PIPELINE_HOME": str(store.root)})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model models:/evil/1: logged by an earlier version"), \
        proc.stderr
    assert not store.sentinel.exists()


def test_logged_weights_round_trip_through_models_and_runs_uris(store, tmp_path, png, capsys):
    import mlflow

    from pipeline import tracking_models
    from pipeline.classifier.predict import load_model as load_classifier_uri
    from pipeline.compression.cli import main as rnnc
    from pipeline.compression.modelfile import load_model, model_fingerprint

    want = model_fingerprint(store.codec)
    for uri in ("models:/good-codec/1", f"runs:/{store.codec_run}/model"):
        assert model_fingerprint(load_model(uri)) == want, uri
    assert rnnc(["compress", str(png), str(tmp_path / "x.rnnc"), "--iterations", "1",
                 "--model", "models:/good-codec/1"]) == 0
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = store.classifier(x)
        for uri in ("models:/good-classifier/1", f"runs:/{store.classifier_run}/model"):
            torch.testing.assert_close(load_classifier_uri(uri)(x), expected)
    # the registry says what each version is; the run and its logged model too
    client = mlflow.MlflowClient()
    version = client.get_model_version("good-codec", "1")
    assert version.tags[tracking_models.MODEL_FORMAT_TAG] == tracking_models.CHECKPOINT_FORMAT
    assert version.tags["pipeline.model_kind"] == "rnn-compressor" and version.run_id == store.codec_run
    run_tags = client.get_run(store.codec_run).data.tags
    assert run_tags[tracking_models.MODEL_FORMAT_TAG] == tracking_models.CHECKPOINT_FORMAT
    # a model of the other kind, or a file that is not the one logged, is refused in one line
    capsys.readouterr()
    assert rnnc(["compress", str(png), str(tmp_path / "y.rnnc"), "--iterations", "1",
                 "--model", "models:/good-classifier/1"]) != 0
    one_error_line(capsys, "is a 'cifar10-classifier' model, not an RNN codec")
    stored = next((store.root / "artifacts").rglob(tracking_models.CHECKPOINT_FILE))
    mlmodel = yaml.safe_load((stored.parent / "MLmodel").read_text())
    assert mlmodel["flavors"][tracking_models.CHECKPOINT_FLAVOR]["sha256"] == tracking_models._sha256(stored)


def test_log_model_command_relogs_a_model_file_as_weights(store, tmp_path, monkeypatch, capsys):
    import mlflow

    from pipeline.__main__ import main
    from pipeline.compression.modelfile import load_model, model_fingerprint

    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tracking"]["experiment"] = "issue-29"
    params.write_text(yaml.safe_dump(raw))
    assert main(["log-model", str(store.codec_file), "--register", "relogged", "--params", str(params)]) == 0
    assert "logged as a rnn-compressor checkpoint" in capsys.readouterr().out
    latest = max(int(v.version) for v in mlflow.MlflowClient().search_model_versions("name='relogged'"))
    assert model_fingerprint(load_model(f"models:/relogged/{latest}")) == model_fingerprint(store.codec)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    assert main(["log-model", str(junk), "--params", str(params)]) != 0
    one_error_line(capsys, "not a readable model file")


@pytest.mark.parametrize("uri", ["s3://bucket/model", "http://127.0.0.1:9/model", "file:///etc/passwd",
                                 "models://attacker.example/evil/1", "runs://attacker.example/x/model",
                                 "mlflow-artifacts:/x/model"])
def test_other_uri_schemes_are_refused_before_any_request(uri, monkeypatch):
    import socket

    from pipeline.classifier.predict import load_model as load_classifier_uri
    from pipeline.compression.errors import ModelError
    from pipeline.compression.modelfile import load_model

    def no_request(*args, **kwargs):
        raise AssertionError(f"a connection was attempted for {uri}")

    monkeypatch.setattr(socket.socket, "connect", no_request)
    monkeypatch.setattr(socket, "create_connection", no_request)
    with pytest.raises(ModelError, match="no other URI is loaded"):
        load_model(uri)
    with pytest.raises(PipelineError, match="no other URI is loaded"):
        load_classifier_uri(uri)


# ----------------------------------------------------------------------------------------- run conf


@pytest.mark.parametrize("item", ["train_compressor.init=models:/evil/1", "train_compressor.init=s3://bucket/x",
                                  "train_compressor.profiles.tiny.init=/tmp/model.pt", "augment.patch_source=/etc",
                                  "evaluate.rnn_model=runs:/0123/model", "evaluate.profiles.cpu.rnn_model=x.pt",
                                  "data.photos_url=http://x/y.zip", "data.retries=9", "tracking.experiment=x",
                                  "train_compressor={init: models:/evil/1}", "train_compressor.profiles.tiny={}",
                                  "evaluate={}", "data={}", "no_such_section.key=1"])
def test_run_conf_refuses_paths_uris_and_models_by_type(item):
    from pipeline.config import check_run_overrides

    key = item.split("=")[0]
    with pytest.raises(ParamsError) as info:
        check_run_overrides(["train_classifier.epochs=1", item])
    message = str(info.value)
    assert message.startswith(f"run conf may not set {key}:") and "edit params.yaml" in message
    assert "\n" not in message


def test_every_path_or_uri_in_params_yaml_is_a_source():
    """No list to forget: a key whose value in params.yaml (any profile) looks like a path or a URI is
    refused to a run conf, so a new key must be typed ``Source`` (pipeline.schema) to pass this test."""
    from pipeline.config import check_run_overrides, source_keys

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    pathlike = []

    def walk(node, keys):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, [*keys, str(k)])
        elif isinstance(node, str) and ("/" in node or re.match(r"^[A-Za-z][\w+.-]*:", node)):
            pathlike.append(".".join(keys))

    walk(raw, [])
    assert {"train_compressor.init", "evaluate.rnn_model", "data.cifar_url"} <= set(pathlike)
    for key in pathlike:
        with pytest.raises(ParamsError, match="run conf may not set"):
            check_run_overrides([f"{key}=x"])
    assert {"augment.patch_source", "train_compressor.init", "evaluate.rnn_model", "data.*",
            "tracking.*"} <= set(source_keys())
    check_run_overrides(["profile=tiny", "seed=1", "train_classifier.epochs=3", "train_compressor.lr=0.001",
                         "train_classifier.augmentation.flip=false", "train_classifier.profiles.tiny.epochs=1",
                         "evaluate.images=[1, 2]", "augment.patches=64", "report.claim_grid=32"])


def test_a_remote_worker_refuses_the_run_conf_before_any_pull_or_stage(tmp_path, monkeypatch, capsys):
    """PIPELINE_EXECUTION=remote: each worker applies the run conf itself; a source key ends the task in one
    line before DVC (pull, repro) or anything else runs."""
    import pipeline.orchestration.remote_exec as remote_exec

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"ran {args[0] if args else kwargs}")

    monkeypatch.setattr(remote_exec.subprocess, "run", no_subprocess)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIPELINE_OVERRIDES", '["train_compressor.epochs=1", "train_compressor.init=models:/evil/1"]')
    monkeypatch.setenv("PIPELINE_UPSTREAM_LOCKS", "[]")
    assert remote_exec.main(["train_compressor"]) == 2
    one_error_line(capsys, "run conf may not set train_compressor.init", "edit params.yaml")
