"""The evaluate stage on a tiny synthetic Kodak (one image, tiny profile, fake RNN codec)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import deep_merge, read_raw, resolve
from pipeline.errors import PipelineError
from pipeline.evaluation import evaluate as E
from tests.test_evaluation_codecs import FakeRNNCodec, make_image

REPO = Path(__file__).resolve().parents[1]


def tiny_params(**evaluate):
    raw = read_raw(REPO / "params.yaml")
    raw["profile"] = "tiny"
    raw["evaluate"] = deep_merge(raw["evaluate"], {"profiles": {"tiny": evaluate}})
    return resolve(raw)


def fake_loader(model, device):
    return FakeRNNCodec()


@pytest.fixture
def kodak(tmp_path) -> Path:
    d = tmp_path / "kodak"
    d.mkdir()
    Image.fromarray(make_image(200, 264, seed=3)).save(d / "kodim01.png")
    return d


def run(tmp_path, kodak, **overrides):
    params = tiny_params(rnn_model=str(tmp_path / "model.pt"), **overrides)
    (tmp_path / "model.pt").write_bytes(b"stand-in")
    out = tmp_path / "evaluation"
    metrics = E.evaluate(params, out_dir=out, kodak_dir=kodak, rnn_loader=fake_loader)
    return params, out, metrics


def test_evaluate_writes_every_output(tmp_path, kodak):
    params, out, metrics = run(tmp_path, kodak)
    p = params.evaluate
    for name in ("per_image.csv", "curves.csv", "at_rates.csv", "bd.csv", "summary.json", "metrics.json",
                 "visual/visual.json", "visual/original.png", *(f"figures/{f}" for f in E.FIGURES.values())):
        assert (out / name).is_file(), name
    codecs = [c for c in p.codecs]  # tiny: jpeg, jpeg2000, webp, avif, rnn
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    n_settings = {"jpeg": len(p.jpeg_quality), "jpeg2000": len(p.jpeg2000_ratio), "webp": len(p.webp_quality),
                  "avif": len(p.avif_quality), "rnn": len(p.rnn_iterations)}
    assert len(rows) == sum(n_settings[c] for c in codecs)
    for r in rows:  # bpp is the real file size over the (cropped) image
        assert int(r["height"]) == int(r["width"]) == p.crop
        assert float(r["bpp"]) == pytest.approx(8 * int(r["bytes"]) / (p.crop * p.crop), rel=1e-5)
        assert 0 < float(r["ms_ssim"]) <= 1 and float(r["psnr"]) > 10
    # dvc metrics show: MS-SSIM at the four rates for every codec
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["ms_ssim"]) == set(codecs)
    for c in codecs:
        assert set(m["ms_ssim"][c]) == {E.rate_key(r) for r in p.rates}
    assert set(m["bd_rate_vs_jpeg"]) == set(codecs) - {"jpeg"}
    assert set(m["bd_rate_rnn_vs"]) == set(codecs) - {"rnn"}
    for c in codecs:
        assert (out / "curves" / f"{c}.csv").is_file()
        assert (out / "visual" / f"{c}.png").is_file()
    assert metrics == m


def test_curves_average_images_and_rates_interpolate(tmp_path, kodak):
    Image.fromarray(make_image(200, 264, seed=4)).save(kodak / "kodim02.png")
    params, out, _ = run(tmp_path, kodak, images=[1, 2], codecs=["jpeg", "webp"])
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    curves = E.read_csv(out / "curves.csv")
    for pt in curves:
        mine = [float(r["ms_ssim"]) for r in rows if r["codec"] == pt["codec"] and float(r["setting"]) == pt["setting"]]
        assert len(mine) == 2 and pt["ms_ssim"] == pytest.approx(np.mean(mine), abs=1e-5)
        assert pt["images"] == 2
    at = E.read_csv(out / "at_rates.csv")
    jpeg = [pt for pt in curves if pt["codec"] == "jpeg"]
    lo, hi = min(p["bpp"] for p in jpeg), max(p["bpp"] for p in jpeg)
    for r in at:
        if r["codec"] == "jpeg":
            assert np.isnan(r["ms_ssim"]) == (not lo <= r["bpp"] <= hi)


def test_bd_pairs_cover_anchor_and_rnn():
    pairs = E.bd_pairs(["jpeg", "webp", "rnn", "avif"], "jpeg")
    assert ("jpeg", "webp") in pairs and ("jpeg", "avif") in pairs and ("jpeg", "rnn") in pairs
    assert ("webp", "rnn") in pairs and ("avif", "rnn") in pairs
    assert len(pairs) == len(set(pairs)) == 5


def test_missing_inputs_are_clear_errors(tmp_path, kodak):
    params = tiny_params(rnn_model=str(tmp_path / "absent.pt"))
    with pytest.raises(PipelineError, match="absent.pt"):
        E.evaluate(params, out_dir=tmp_path / "out", kodak_dir=kodak, rnn_loader=fake_loader)
    with pytest.raises(PipelineError, match="kodim01.png"):
        E.evaluate(params, out_dir=tmp_path / "out", kodak_dir=tmp_path / "nowhere", rnn_loader=fake_loader)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_params_validation():
    from pipeline.errors import ParamsError

    with pytest.raises(ParamsError):
        tiny_params(crop=100)  # MS-SSIM needs > 160 px
    with pytest.raises(ParamsError):
        tiny_params(images=[2], visual_image=1)
    with pytest.raises(ParamsError):
        tiny_params(codecs=["jpeg", "png"])
