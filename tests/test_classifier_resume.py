"""Checkpoint/resume of the classifier training loop (synthetic data, a few seconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.classifier.params import TrainClassifierParams
from pipeline.classifier.data import CifarData
from pipeline.classifier.train import train


class StopTraining(Exception):
    """Raised by an ``on_epoch`` hook to end a run early: a kill after that epoch's checkpoint."""


def synthetic(n_train: int = 192, n_test: int = 64, seed: int = 0) -> CifarData:
    rng = np.random.default_rng(seed)
    y_train, y_test = rng.integers(0, 10, n_train), rng.integers(0, 10, n_test)

    def images(y):  # class-dependent colour + noise: learnable
        base = (np.arange(10)[:, None] * np.array([25, 12, 7]) % 256)[y]
        x = base[:, None, None, :] + rng.normal(0, 30, (len(y), 32, 32, 3))
        return np.clip(x, 0, 255).astype(np.uint8)

    return CifarData.from_arrays({"x_train": images(y_train), "y_train": y_train, "x_test": images(y_test),
                                  "y_test": y_test, "label_names": np.array([f"c{i}" for i in range(10)])})


def tiny_cfg(recipe: str = "fast", **kw) -> TrainClassifierParams:
    base = {"recipe": recipe, "epochs": 3, "batch_size": 64, "eval_batch_size": 64, "tta": 2,
            "fast": {"widths": [8, 16, 16], "lookahead_every": 2, "whiten_bias_epochs": 1},
            "coursework": {"widths": [8, 16], "dense": 16}}
    base.update(kw)
    return TrainClassifierParams.model_validate(base)


def stop_after(k: int):
    def hook(epoch, row):
        if epoch == k:
            raise StopTraining
    return hook


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("recipe", ["fast", "coursework"])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, recipe):
    data, cfg = synthetic(), tiny_cfg(recipe)
    full = train(cfg, data, seed=1)

    ckpt = tmp_path / "last.pt"
    with pytest.raises(StopTraining):
        train(cfg, data, seed=1, checkpoint=ckpt, on_epoch=stop_after(1))  # "killed" after epoch 1
    assert ckpt.exists()
    epochs_seen = []
    resumed = train(cfg, data, seed=1, checkpoint=ckpt, on_epoch=lambda e, r: epochs_seen.append(e))

    assert resumed.resumed_from == 1
    assert epochs_seen == [2, 3]  # lost nothing, repeated nothing
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert [r["step"] for r in resumed.history] == [r["step"] for r in full.history]
    assert resumed.images_seen == full.images_seen
    assert states_equal(resumed.model, full.model)
    for got, want in zip(resumed.history, full.history):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6)
        assert got["test_acc"] == pytest.approx(want["test_acc"])


def test_changed_config_starts_fresh(tmp_path):
    data = synthetic()
    ckpt = tmp_path / "last.pt"
    with pytest.raises(StopTraining):
        train(tiny_cfg(), data, seed=1, checkpoint=ckpt, on_epoch=stop_after(2))
    seen = []
    res = train(tiny_cfg(epochs=2), data, seed=1, checkpoint=ckpt, on_epoch=lambda e, r: seen.append(e))
    assert res.resumed_from == 0 and seen == [1, 2]
    # and another seed is another config too
    seen.clear()
    res = train(tiny_cfg(epochs=2), data, seed=2, checkpoint=ckpt, on_epoch=lambda e, r: seen.append(e))
    assert res.resumed_from == 0 and seen == [1, 2]


def test_corrupt_checkpoint_is_ignored(tmp_path):
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"not a checkpoint")
    res = train(tiny_cfg(epochs=1), synthetic(), seed=0, checkpoint=ckpt)
    assert res.resumed_from == 0 and len(res.history) == 1


def test_fractional_epochs_and_seeded_runs():
    data = synthetic()
    a = train(tiny_cfg(epochs=1.5), data, seed=3)
    b = train(tiny_cfg(epochs=1.5), data, seed=3)
    c = train(tiny_cfg(epochs=1.5), data, seed=4)
    steps_per_epoch = len(data.x_train) // 64
    assert [r["step"] for r in a.history] == [steps_per_epoch, math.ceil(1.5 * steps_per_epoch)]
    assert [r["epoch"] for r in a.history] == [1, round(math.ceil(1.5 * steps_per_epoch) / steps_per_epoch, 3)]
    assert states_equal(a.model, b.model)  # same seed, same weights
    assert not states_equal(a.model, c.model)


def test_training_learns_something():
    data = synthetic(n_train=1024, n_test=128)
    res = train(tiny_cfg(epochs=4, batch_size=32, tta=0), data, seed=0)  # about 0.5 here
    assert res.history[-1]["test_acc"] > 0.3  # chance is 0.1
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
