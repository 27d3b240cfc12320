"""Stage train_compressor: schedule, data checks, resume after a kill, the stage on the tiny profile."""

from __future__ import annotations

import csv
import hashlib
import json
import time

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.compression import recipe
from pipeline.compression import train as tc
from pipeline.compression.params import TrainCompressorParams
from pipeline.errors import PipelineError

TINY = dict(encoder_widths=(8, 16, 16, 16), decoder_widths=(16, 16, 16, 16), iterations=2, epochs=3,
            patches_per_epoch=16, batch_size=8, val_patches=8, val_iterations=(1, 2), eval_batch_size=8,
            lr=0.002, lr_warmup=0.02, binarizer="stochastic", init=None)  # from scratch, as these tests were written


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def synthetic_patches(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    base = rng.integers(0, 256, (n, 1, 1, 3)) + rng.normal(0, 3, (n, 1, 1, 3)) * (xx + yy)[None, :, :, None]
    return np.clip(base, 0, 255).astype(np.uint8)


def test_lr_schedule_warms_up_then_decays():
    p = TrainCompressorParams(**{**TINY, "lr_schedule": "cosine", "lr_warmup": 0.1})
    f = recipe.lr_factor(p, 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(99) < 0.05
    assert all(f(i) >= f(i + 1) for i in range(10, 99))
    p = TrainCompressorParams(**{**TINY, "lr_schedule": "multistep", "lr_warmup": 0, "lr_gamma": 0.5})
    m = recipe.lr_factor(p, 100)
    assert (m(49), m(50), m(75)) == (1.0, 0.5, 0.25)


def test_params_are_validated():
    with pytest.raises(ValidationError, match="val_iterations"):
        TrainCompressorParams(**{**TINY, "val_iterations": (1, 3)})
    with pytest.raises(ValidationError, match="multiple of 4"):
        TrainCompressorParams(**{**TINY, "decoder_widths": (16, 16, 16, 18)})


def test_loss_is_mean_residual_over_iterations():
    x = torch.zeros(1, 3, 2, 2)
    recon = torch.stack([torch.full_like(x, 0.5), torch.full_like(x, 0.1)])
    assert recipe.residual_loss(x, recon, "l1").item() == pytest.approx(0.3)
    assert recipe.residual_loss(x, recon, "l2").item() == pytest.approx((0.25 + 0.01) / 2)


def test_iteration_weights_weight_each_iteration_loss():
    x = torch.zeros(1, 3, 2, 2)
    recon = torch.stack([torch.full_like(x, 0.5), torch.full_like(x, 0.1)])
    assert recipe.residual_loss(x, recon, "l1", weights=(1.0, 0.0)).item() == pytest.approx(0.5)
    assert recipe.residual_loss(x, recon, "l1", weights=(1.0, 3.0)).item() == pytest.approx((0.5 + 3 * 0.1) / 4)
    assert recipe.residual_loss(x, recon, "l2", weights=(2.0, 2.0)).item() == pytest.approx((0.25 + 0.01) / 2)
    assert recipe.residual_loss(x, recon, "l1_ssim", ssim_weight=0.0, weights=(0.0, 1.0)).item() == pytest.approx(0.1)
    p = TrainCompressorParams(**{**TINY, "iteration_weights": (1.0, 2.0)})
    assert recipe.task_loss(p, x, recon).item() == pytest.approx((0.5 + 2 * 0.1) / 3)
    for bad in ((1.0,), (1.0, -1.0), (0.0, 0.0)):
        with pytest.raises(ValidationError, match="iteration_weights"):
            TrainCompressorParams(**{**TINY, "iteration_weights": bad})


def test_new_fields_at_their_defaults_keep_run_keys():
    """cell, reconstruction, iteration_weights and priming came after checkpoints were written: at the values
    runs had before them (cell lstm, though the default is now gru) they leave the run key alone (a checkpoint from
    before still resumes); off them they change it."""
    before = {**TINY, "cell": "lstm"}
    p = TrainCompressorParams(**before)
    key = tc.run_key(p, 0, "data")
    dump = p.model_dump(mode="json", exclude={"nproc", "cpu_threads", "context_patches", "cell", "reconstruction",
                                              "iteration_weights", "lr_floor", "ssim_weight", "priming"})
    old = hashlib.sha256(json.dumps({"params": dump, "seed": 0, "data": "data"}, sort_keys=True).encode()).hexdigest()
    assert key == old[:16]
    for change in ({"cell": "gru"}, {"reconstruction": "one-shot"}, {"iteration_weights": (1.0, 1.0)}, {"priming": 1}):
        assert tc.run_key(TrainCompressorParams(**{**before, **change}), 0, "data") != key


def test_l1_ssim_loss_mixes_l1_with_ssim_of_each_iteration():
    # constant images: every SSIM window sees means a, b and no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    x = torch.zeros(2, 3, 16, 16)  # 0.5 in [0, 1]
    recon = torch.stack([torch.full_like(x, 0.5), torch.full_like(x, 0.1)])  # 1.0 and 0.6
    c1 = 0.01 ** 2
    ssims = [(2 * 0.5 * b + c1) / (0.25 + b * b + c1) for b in (1.0, 0.6)]
    want = 0.84 * (1 - sum(ssims) / 2) + 0.16 * 0.3
    assert recipe.residual_loss(x, recon, "l1_ssim").item() == pytest.approx(want, rel=1e-4)  # float32 variances
    assert recipe.residual_loss(x, recon, "l1_ssim", ssim_weight=0.0).item() == pytest.approx(0.3)
    assert recipe.residual_loss(x, x[None].repeat(3, 1, 1, 1, 1), "l1_ssim").item() == pytest.approx(0.0, abs=1e-6)


def test_missing_or_bad_patches_give_clear_errors(tmp_path):
    with pytest.raises(PipelineError, match="augment"):
        tc.load_patches(tmp_path / "patches.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, train=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(PipelineError, match="val"):
        tc.load_patches(bad)
    np.savez(bad, train=np.zeros((4, 30, 30, 3), np.uint8), val=np.zeros((4, 30, 30, 3), np.uint8))
    with pytest.raises(PipelineError, match="multiple of 16"):
        tc.load_patches(bad)


@pytest.mark.slow
def test_training_reduces_the_loss():
    p = TrainCompressorParams(**{**TINY, "epochs": 6, "patches_per_epoch": 64, "batch_size": 8, "lr": 0.01})
    result = tc.train(p, synthetic_patches(64), synthetic_patches(16, 1), seed=0, device=torch.device("cpu"))
    h = result["history"]
    assert h[-1]["train_loss"] < 0.9 * h[0]["train_loss"]
    assert h[-1]["val_loss"] < 0.9 * h[0]["val_loss"]


@pytest.mark.parametrize("recipe", [
    pytest.param({}, id="default"),
    # the shipped model's recipe: sign binarizer, weight EMA, bf16 autocast (on CPUs with native bf16)
    pytest.param({"binarizer": "deterministic", "ema_decay": 0.9, "amp": True}, id="long-run"),
])
def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, recipe):
    p = TrainCompressorParams(**{**TINY, **recipe})
    data, val = synthetic_patches(48), synthetic_patches(16, 1)
    cpu = torch.device("cpu")
    straight = tc.train(p, data, val, seed=3, device=cpu)

    class Killed(Exception):
        pass

    def kill_after_first(row):
        if row["epoch"] == 1:
            raise Killed

    ckpt = tmp_path / "last.pt"
    with pytest.raises(Killed):
        tc.train(p, data, val, seed=3, device=cpu, ckpt_path=ckpt, key="k", on_epoch=kill_after_first)
    seen = []
    resumed = tc.train(p, data, val, seed=3, device=cpu, ckpt_path=ckpt, key="k", on_epoch=seen.append)
    assert [r["epoch"] for r in seen] == [1, 2, 3]  # the earlier epoch is replayed to MLflow, then 2 more
    for name, tensor in straight["model"].state_dict().items():
        assert torch.equal(tensor, resumed["model"].state_dict()[name]), name
    assert [r["val_loss"] for r in straight["history"]] == [r["val_loss"] for r in resumed["history"]]
    # a checkpoint made with other params is not resumed
    fresh = []
    tc.train(p.model_copy(update={"epochs": 1}), data, val, seed=3, device=cpu, ckpt_path=ckpt, key="other",
             on_epoch=fresh.append)
    assert [r["epoch"] for r in fresh] == [1]


@pytest.mark.slow
def test_stage_on_tiny_profile(tiny_workspace, monkeypatch):
    import mlflow

    from pipeline.compression.codec import load_codec
    from pipeline.compression.rnncfile import parse
    from pipeline.config import load_params

    from pipeline.__main__ import main

    monkeypatch.chdir(tiny_workspace)
    started = time.monotonic()
    assert main(["train_compressor"]) == 0
    stage_s = time.monotonic() - started
    out = tiny_workspace / "data" / "compressor"
    for name in ("model.pt", "metrics.json", "history.csv"):
        assert (out / name).is_file(), name
    params = load_params()
    p = params.train_compressor
    metrics = json.loads((out / "metrics.json").read_text())
    for k in p.val_iterations:
        assert metrics[f"val_psnr_k{k}"] > 0 and 0 < metrics[f"val_ssim_k{k}"] <= 1
        assert metrics[f"code_bpp_k{k}"] == k * p.bits / 256
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, p.epochs + 1))
    codec = load_codec(out / "model.pt")
    assert codec.fingerprint.hex() == metrics["fingerprint"] and codec.max_iterations == p.iterations
    img = synthetic_patches(1)[0]
    np.testing.assert_array_equal(codec.decompress(codec.compress(img, p.iterations)),
                                  codec.reconstruct(img, p.iterations))
    # the entropy model was fitted after training (context_patches): files are .rnnc v5
    assert p.context_patches > 0 and 0 <= metrics["context_fit_seconds"] <= stage_s + 0.05  # (rounded to 0.1 s)
    assert codec.context_table is not None and parse(codec.compress(img, 1))[0].version == 5
    # a finished run leaves no resumable checkpoint behind: `dvc repro -f` must train again
    assert not (tiny_workspace / "data" / "checkpoints" / "train_compressor" / "last.pt").exists()
    assert "mlflow_run_id" not in torch.load(out / "model.pt", weights_only=True)["meta"]
    if params.tracking.register_models:
        client = mlflow.MlflowClient()
        latest = max(int(v.version) for v in client.search_model_versions("name='rnn-compressor'"))
        via_registry = load_codec(f"models:/rnn-compressor/{latest}")
        assert via_registry.fingerprint == codec.fingerprint


def test_ema_is_the_exponential_average_and_is_what_gets_published():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = recipe.EMA(model, 0.75)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update()  # 0.75 * 1 + 0.25 * 3
    assert torch.allclose(ema.shadow[0], torch.full((1, 2), 1.5))
    with ema.applied():
        assert torch.allclose(model.weight, torch.full((1, 2), 1.5))
    assert torch.allclose(model.weight, torch.full((1, 2), 3.0))  # restored
    # train() publishes the EMA weights: with decay ~1 they stay at the initial weights
    p = TrainCompressorParams(**{**TINY, "epochs": 1, "ema_decay": 1 - 1e-9, "lr": 0.05})
    torch.manual_seed(0)
    init = tc.RNNCompressor(tc.ModelConfig.from_params(p)).state_dict()
    out = tc.train(p, synthetic_patches(16), synthetic_patches(8, 1), seed=0, device=torch.device("cpu"))
    for name, tensor in out["model"].state_dict().items():
        assert torch.allclose(tensor, init[name], atol=1e-6), name


def test_deterministic_binarizer_passes_gradients_straight_through():
    from pipeline.compression.model import binarize

    z = torch.tensor([-0.7, -0.0, 0.2, 0.9], requires_grad=True)
    b = binarize(z, stochastic=False)
    assert b.tolist() == [-1.0, 1.0, 1.0, 1.0]
    b.sum().backward()
    assert z.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_warm_start_begins_from_the_init_weights(tmp_path):
    from pipeline.compression.modelfile import save_model

    p = TrainCompressorParams(**{**TINY, "epochs": 1, "patches_per_epoch": 8, "lr": 1e-12})
    torch.manual_seed(123)
    source = tc.RNNCompressor(tc.ModelConfig.from_params(p))
    save_model(source, tmp_path / "init.pt")
    out = tc.train(p.model_copy(update={"init": str(tmp_path / "init.pt")}), synthetic_patches(8),
                   synthetic_patches(8, 1), seed=0, device=torch.device("cpu"))
    cold = tc.train(p, synthetic_patches(8), synthetic_patches(8, 1), seed=0, device=torch.device("cpu"))
    name = "encoder.conv.weight"
    assert torch.allclose(out["model"].state_dict()[name], source.state_dict()[name], atol=1e-6)
    assert not torch.allclose(cold["model"].state_dict()[name], source.state_dict()[name], atol=1e-3)
    # another architecture is refused with a clear error
    other = TrainCompressorParams(**{**TINY, "epochs": 1, "bits": 8, "init": str(tmp_path / "init.pt")})
    with pytest.raises(PipelineError, match="another architecture"):
        tc.train(other, synthetic_patches(8), synthetic_patches(8, 1), seed=0, device=torch.device("cpu"))


def test_a_warm_start_may_train_more_iterations_than_its_init(tmp_path):
    """A model trained at 2 iterations starts a run at 4 (the weights are the same at every iteration):
    every weight is copied, and the context table keeps its rows, its last one repeated for the new ones."""
    from pipeline.compression.modelfile import save_model

    torch.manual_seed(7)
    source = tc.RNNCompressor(tc.ModelConfig.from_params(TrainCompressorParams(**TINY)))
    with torch.no_grad():
        source.context.copy_(torch.randn_like(source.context))
    save_model(source, tmp_path / "init.pt")
    more = TrainCompressorParams(**{**TINY, "iterations": 4, "init": str(tmp_path / "init.pt")})
    model = tc.RNNCompressor(tc.ModelConfig.from_params(more))
    tc.load_init(model, more.init)
    for name, tensor in source.state_dict().items():
        if name != "context":
            assert torch.equal(model.state_dict()[name], tensor), name
    assert torch.equal(model.context[:2], source.context)
    assert torch.equal(model.context[2], source.context[1]) and torch.equal(model.context[3], source.context[1])
    fewer = tc.RNNCompressor(tc.ModelConfig.from_params(TrainCompressorParams(**{**TINY, "iterations": 1, "val_iterations": (1,)})))
    tc.load_init(fewer, more.init)
    assert torch.equal(fewer.context, source.context[:1])
