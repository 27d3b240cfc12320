"""Shipping a trained codec: checkpoint -> compact fp16 model file + JSON record."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.compression import train as tc
from pipeline.compression.codec import load_codec
from pipeline.compression.modelfile import load_model
from pipeline.compression.params import TrainCompressorParams
from pipeline.compression.rnncfile import parse
from pipeline.config import set_params
from tools import release

pytestmark = pytest.mark.usefixtures("one_thread")


def _interrupted_run(tmp_path, overrides: list[str], seed: int):
    """A project folder whose params say what the run used, and a tiny training run stopped after its last
    epoch with the checkpoint kept, as an interrupted long run leaves it: (work, params, data, checkpoint)."""
    from pipeline.config import load_params
    from tests.conftest import REPO

    work = tmp_path / "run"
    work.mkdir()
    (work / "params.yaml").write_text((REPO / "params.yaml").read_text())
    set_params(work / "params.yaml", "tiny", overrides)
    p: TrainCompressorParams = load_params(work / "params.yaml").train_compressor
    data = np.random.default_rng(seed).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    (work / "data" / "prepared").mkdir(parents=True)
    np.savez(work / "data" / "prepared" / "patches.npz", train=data, val=data[:8])  # the entropy model's fit reads it
    ckpt = work / "ckpt" / "last.pt"

    class Stop(Exception):
        pass

    def stop_at_end(row):
        if row["epoch"] == p.epochs:
            raise Stop

    with pytest.raises(Stop):
        tc.train(p, data, data[:8], seed=0, device=torch.device("cpu"), ckpt_path=ckpt, key="k", on_epoch=stop_at_end)
    return work, p, data, ckpt


def test_release_writes_a_small_fp16_model_that_loads_and_codes(tmp_path):
    work, p, data, ckpt = _interrupted_run(
        tmp_path, ["train_compressor.ema_decay=0.5", "train_compressor.snapshot_every=1"], seed=0)
    state = torch.load(ckpt, weights_only=True)
    out = tmp_path / "models" / "rnnc-test.pt"
    record = release.release(ckpt, work, out, kodak=None, curve_iterations=1)

    saved = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float16 for v in saved["state_dict"].values())
    model = load_model(out)  # checks the fingerprint against the rounded weights
    ema = release.published_weights(state)
    for prm, e in zip(model.parameters(), ema.parameters()):
        assert torch.equal(prm, e.half().float())  # the EMA weights, rounded to fp16
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta == json.loads(json.dumps(record))
    assert meta["epochs"] == p.epochs and meta["patches_seen"] == p.epochs * p.patches_per_epoch
    assert meta["fingerprint"] == saved["fingerprint"]
    assert meta["config"]["train_compressor"]["ema_decay"] == 0.5
    assert len(meta["validation_curve"]) == p.epochs
    assert len(list((ckpt.parent / "snapshots").glob("epoch_*.pt"))) == p.epochs
    codec = load_codec(out)
    img = data[0]
    np.testing.assert_array_equal(codec.decompress(codec.compress(img, 1)), codec.reconstruct(img, 1))
    # the entropy model was fitted on the run's training patches: the file writes .rnnc v5
    assert meta["context_model"]["patches"] == len(data) and len(meta["context_model"]["fit_bits_per_bit"]) == p.iterations
    assert codec.context_table is not None and parse(codec.compress(img, 1))[0].version == 5


def test_the_kodak_curve_ends_at_the_published_weights(tmp_path):
    """Snapshots every 2 epochs of a 3-epoch run: the curve has epoch 2's snapshot and then the published
    (EMA, fp16-rounded) weights of epoch 3, scored on the given images; a second release reuses the cache."""
    from PIL import Image

    work, p, data, ckpt = _interrupted_run(tmp_path, ["train_compressor.ema_decay=0.5",
                                                      "train_compressor.snapshot_every=2",
                                                      "train_compressor.epochs=3"], seed=1)
    rng = np.random.default_rng(1)
    kodak = tmp_path / "kodak"
    kodak.mkdir()
    for i in (1, 2):  # 5-scale MS-SSIM needs >= 161 px
        Image.fromarray(rng.integers(0, 256, (176, 192, 3), dtype=np.uint8)).save(kodak / f"kodim{i:02d}.png")
    out = tmp_path / "models" / "rnnc-test.pt"
    record = release.release(ckpt, work, out, kodak=kodak, curve_iterations=1)
    assert [pt["epoch"] for pt in record["kodak_curve"]] == [2, 3]
    final = record["kodak_curve"][-1]
    expected = release.kodak_quality(load_model(out).eval(), kodak, 1)
    assert final["ms_ssim"] == pytest.approx(expected["ms_ssim"], abs=1e-6) and final["images"] == 2
    assert final["train_hours"] == record["train_hours_total"]
    cache = json.loads((ckpt.parent / "snapshots" / "kodak_k1.json").read_text())
    assert set(cache) == {"epoch_00002.pt", "published_epoch_00003"}
    assert release.release(ckpt, work, out, kodak=kodak, curve_iterations=1)["kodak_curve"] == record["kodak_curve"]
    # a copy of the checkpoint taken elsewhere still finds the run's snapshots (and their cache)
    shutil.copytree(ckpt.parent, work / "data" / "checkpoints" / "train_compressor")
    copy = tmp_path / "elsewhere" / "last.pt"
    copy.parent.mkdir()
    shutil.copy(ckpt, copy)
    assert release.release(copy, work, out, kodak=kodak, curve_iterations=1)["kodak_curve"] == record["kodak_curve"]
