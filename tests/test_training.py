"""The training frame (pipeline/training.py): checkpoint keys and the checkpoint file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import training
from pipeline.classifier.params import TrainClassifierParams
from pipeline.classifier.train import fingerprint
from pipeline.compression.params import TrainCompressorParams
from pipeline.compression.train import run_key


class _Data:  # what fingerprint reads of CifarData
    digest = "0123456789abcdef"
    x_train = np.zeros(10)


#: the section classes' defaults when the values below were computed (they are params.yaml's now)
COMPRESSOR_THEN = dict(epochs=8, lr=0.002, lr_warmup=0.02, binarizer="stochastic", init=None, cell="lstm",
                       iterations=8, val_iterations=(1, 2, 4, 8))  # then: cell until cb74632, iterations until cc5a55f
CLASSIFIER_THEN = dict(epochs=2.0, batch_size=1024, tta=2, fast={"widths": [64, 256, 256]})


def test_keys_match_those_written_before_the_frame():
    """Values computed by the code before pipeline/training.py (commit 4ba897a), for the same inputs:
    a checkpoint written then is still resumed."""
    assert run_key(TrainCompressorParams(**COMPRESSOR_THEN), 0, "abc") == "c70a1f4ec63b020a"
    assert run_key(TrainCompressorParams(**{**COMPRESSOR_THEN, "lr": 0.001, "epochs": 5}), 7, "def",
                   "ffff") == "6be485188c9e1d4f"
    assert fingerprint(TrainClassifierParams(**CLASSIFIER_THEN), 0, _Data, torch.device("cpu")) == "06b585a29c7bd717"
    assert fingerprint(TrainClassifierParams(**{**CLASSIFIER_THEN, "recipe": "coursework", "epochs": 3}), 5, _Data,
                       torch.device("cuda")) == "47cf25d33d967128"


def test_a_new_knob_away_from_its_old_value_changes_the_key():
    base = run_key(TrainCompressorParams(), 0, "abc")
    assert run_key(TrainCompressorParams(lr_floor=0.05), 0, "abc") != base
    assert run_key(TrainCompressorParams(nproc=4, cpu_threads=1), 0, "abc") == base  # may change on resume
    cfg = TrainClassifierParams(**CLASSIFIER_THEN)
    assert fingerprint(cfg.model_copy(update={"fast": cfg.fast.model_copy(update={"whiten_samples": 100})}), 0,
                       _Data, torch.device("cpu")) != "06b585a29c7bd717"


def test_checkpoint_round_trip_and_mismatch(tmp_path, capsys):
    path = tmp_path / "ckpt" / "last.pt"
    training.Checkpoint(path, "k1", "stage", "fingerprint").save({"epoch": 2, "w": torch.ones(3)})
    state = training.Checkpoint(path, "k1", "stage", "fingerprint").load()
    assert state["fingerprint"] == "k1" and state["epoch"] == 2 and torch.equal(state["w"], torch.ones(3))
    assert training.Checkpoint(path, "k2", "stage", "fingerprint").load() is None  # other params: fresh start
    assert training.Checkpoint(path, "k1", "stage", "key").load() is None  # the key under another name
    path.write_bytes(b"garbage")
    assert training.Checkpoint(path, "k1", "stage").load() is None
    assert "unreadable" in capsys.readouterr().err
    training.Checkpoint(path, "k1", "stage").remove()
    assert not path.exists()
    assert training.Checkpoint(None, "k1", "stage").load() is None


def test_history_csv_columns():
    rows = [{"epoch": 1, "a": 0.5, "b": float("nan")}, {"epoch": 2, "a": 0.25, "b": 1.0}]
    assert training.history_csv(rows) == "epoch,a,b\n1,0.5,nan\n2,0.25,1.0\n"
    assert training.history_csv(rows, ("epoch", "a")) == "epoch,a\n1,0.5\n2,0.25\n"


@pytest.mark.parametrize("device", ["cuda"])
def test_cuda_requested_without_cuda_is_one_clear_error(device, monkeypatch):
    from pipeline.errors import PipelineError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PipelineError, match="train_x.device is cuda but no CUDA device"):
        training.launch("train_x", 1, device, [], lambda dev, d: None)
