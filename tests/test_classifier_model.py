"""Classifier networks: shapes, whitening init, save/load round trip, bad model files."""

from __future__ import annotations

import pytest
import torch

from pipeline.classifier.model import (CourseworkCNN, FastNet, build_classifier, load_classifier,
                                       save_classifier)
from pipeline.errors import PipelineError


def _default_net(recipe: str):
    """The net of params' default architecture for ``recipe`` (what the params classes give)."""
    from pipeline.classifier.model import build_net
    from pipeline.classifier.params import TrainClassifierParams
    from pipeline.classifier.recipes import make_recipe

    return build_net(make_recipe(TrainClassifierParams(recipe=recipe)).model_config())


@pytest.mark.parametrize("net", [CourseworkCNN(widths=(8, 16, 32), dense=32, dropout=0.3, batchnorm=True),
                                 _default_net("coursework"),
                                 FastNet(widths=(8, 16, 16), bn_momentum=0.6, scale=1 / 9),
                                 _default_net("fast")])
def test_logit_shapes(net):
    for n in (1, 5):
        assert net(torch.rand(n, 3, 32, 32)).shape == (n, 10)


def test_fastnet_takes_other_resolutions():  # global pooling: TTA shifts/any crop size work
    assert FastNet(widths=(8, 16, 16), bn_momentum=0.6, scale=1 / 9)(torch.rand(2, 3, 40, 40)).shape == (2, 10)


def test_whitening_init_decorrelates_patches():
    torch.manual_seed(0)
    net = FastNet(widths=(8, 16, 16), bn_momentum=0.6, scale=1 / 9)
    base = torch.rand(64, 1, 32, 32)
    images = torch.cat([base, 0.8 * base + 0.2 * torch.rand(64, 1, 32, 32), torch.rand(64, 1, 32, 32)], 1)
    net.init_whitening(images)
    w = net.whiten.weight
    assert w.shape == (24, 3, 2, 2) and not w.requires_grad
    assert torch.allclose(w[:12], -w[12:])  # +/- pairs
    out = torch.nn.functional.conv2d(images, w[:12]).permute(0, 2, 3, 1).reshape(-1, 12)
    cov = out.T @ out / len(out)
    # whitened: (nearly) unit variance along the well-conditioned directions, no correlations
    assert torch.allclose(cov.diag()[:6], torch.ones(6), atol=0.05)
    off = cov - torch.diag(cov.diag())
    assert off.abs().max() < 0.05


def test_frozen_scale_batchnorm_and_dirac_init():
    net = FastNet(widths=(8, 16, 16), bn_momentum=0.6, scale=1 / 9)
    g = net.groups[1]
    assert not g.norm1.weight.requires_grad and g.norm1.bias.requires_grad
    w = g.conv2.weight  # 16 -> 16: identity on every channel
    assert torch.equal(w[:, :, 1, 1], torch.eye(16))


def test_save_load_round_trip(tmp_path):
    config = {"arch": "fast", "widths": [8, 16, 16], "bn_momentum": 0.6, "scale": 1 / 9}
    model = build_classifier(config, [f"c{i}" for i in range(10)]).eval()
    save_classifier(tmp_path / "m.pt", model, config)
    loaded = load_classifier(tmp_path / "m.pt")
    x = torch.rand(3, 3, 32, 32)
    assert loaded.label_names == model.label_names
    assert torch.equal(loaded(x), model(x))


def test_bad_model_files(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_classifier(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(PipelineError, match="not a readable"):
        load_classifier(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"hello": torch.zeros(1)}, foreign)
    with pytest.raises(PipelineError, match="not a classifier"):
        load_classifier(foreign)


def test_fast_recipe_precision_on_cpu(monkeypatch):
    """bf16 autocast on a CPU only where bf16 is native (and asked for); channels_last on any device."""
    from pipeline.classifier import recipes
    from pipeline.classifier.params import TrainClassifierParams

    cpu = torch.device("cpu")
    for native, asked, expected in ((True, "bf16", torch.bfloat16), (False, "bf16", None), (True, "off", None),
                                    (True, "fp16", None)):
        monkeypatch.setattr(recipes, "cpu_has_bf16", lambda native=native: native)
        cfg = TrainClassifierParams(recipe="fast", fast={"autocast": asked})
        recipe = recipes.make_recipe(cfg, total_steps=4, n_epochs=1)
        with recipe.autocast(cpu):
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        assert dtype == expected, (native, asked)
        assert recipe.channels_last(cpu) is True
    cfg = TrainClassifierParams(recipe="fast", fast={"channels_last": False})
    assert recipes.make_recipe(cfg, total_steps=4, n_epochs=1).channels_last(cpu) is False
