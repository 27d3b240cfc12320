"""The gpu profile's codec path (full-size recipe: 16 iterations, bf16, EMA) run on CPU with tiny widths."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import SESSION_TMP, make_workspace, run_stage


@pytest.mark.slow
def test_gpu_profile_codec_runs_on_cpu_with_a_tiny_override(tiny_workspace, monkeypatch):
    from pipeline.config import load_params, set_params

    ws = make_workspace(SESSION_TMP / "gpu_ws", profile="gpu")
    full = load_params(ws / "params.yaml").train_compressor
    assert full.encoder_widths == (64, 256, 512, 512) and full.iterations == 16 and full.init is None
    set_params(ws / "params.yaml", None, [
        "train_compressor.encoder_widths=[8, 16, 16, 16]", "train_compressor.decoder_widths=[16, 16, 16, 16]",
        "train_compressor.epochs=1", "train_compressor.patches_per_epoch=32", "train_compressor.batch_size=16",
        "train_compressor.val_patches=16", "train_compressor.eval_batch_size=16",
        "train_compressor.device=cpu"])
    p = load_params(ws / "params.yaml").train_compressor
    assert p.iterations == 16 and p.ema_decay == full.ema_decay and p.binarizer == full.binarizer  # rest unchanged
    (ws / "data" / "prepared").mkdir(parents=True)
    shutil.copy2(tiny_workspace / "data" / "prepared" / "patches.npz", ws / "data" / "prepared")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    run_stage(ws, "train_compressor")
    model = torch.load(ws / "data" / "compressor" / "model.pt", weights_only=True)
    assert model["config"]["iterations"] == 16
    metrics = json.loads((ws / "data" / "compressor" / "metrics.json").read_text())
    assert {f"val_psnr_k{k}" for k in p.val_iterations} <= set(metrics)


@pytest.mark.slow
def test_cpu_profile_warm_starts_from_the_shipped_model(tiny_workspace, monkeypatch):
    from pipeline.compression.modelfile import load_model
    from pipeline.config import load_params, set_params

    ws = make_workspace(SESSION_TMP / "cpu_ws", profile="cpu")
    p = load_params(ws / "params.yaml").train_compressor
    shipped = load_model(ws / p.init)  # the committed model file travels with the project
    set_params(ws / "params.yaml", None, ["train_compressor.epochs=1", "train_compressor.patches_per_epoch=32",
                                          "train_compressor.val_patches=16", "train_compressor.lr=1e-12"])
    (ws / "data" / "prepared").mkdir(parents=True)
    shutil.copy2(tiny_workspace / "data" / "prepared" / "patches.npz", ws / "data" / "prepared")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    run_stage(ws, "train_compressor")
    tuned = load_model(ws / "data" / "compressor" / "model.pt")
    for (name, a), b in zip(tuned.named_parameters(), shipped.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name  # fine-tuning started from the shipped weights
    assert tuned.context.any()  # and its entropy model was fitted again to the tuned codec's codes
