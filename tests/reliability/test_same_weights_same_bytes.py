"""The same weights give the same ``model.pt`` bytes, so DVC sees an unchanged output and skips what
is downstream (before: torch.save named the zip's folder after the random temporary file, so every
run of ``train_compressor`` made a new hash and ``evaluate``/``report`` always ran again)."""

from __future__ import annotations

import hashlib

import torch

from pipeline.compression.modelfile import load_model, save_model
from pipeline.compression.model import ModelConfig, RNNCompressor


def test_save_model_twice_gives_identical_bytes(tmp_path):
    torch.manual_seed(0)
    model = RNNCompressor(ModelConfig(encoder_widths=(8, 16, 16, 16), decoder_widths=(16, 16, 16, 16), bits=32,
                                      iterations=2))
    digests = []
    for name in ("a", "b"):
        save_model(model, tmp_path / name / "model.pt", {"seed": 0})
        digests.append(hashlib.sha256((tmp_path / name / "model.pt").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert not [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    loaded = load_model(tmp_path / "a" / "model.pt")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
