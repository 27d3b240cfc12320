"""The evaluate stage on a tiny synthetic Kodak (tiny profile): with the fake RNN codec, and with the
real RNN codec (a tiny randomly initialised model in the project's model format). Numbers are checked
against values computed here independently (files re-encoded, MS-SSIM recomputed)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import deep_merge, read_raw, resolve
from pipeline.errors import PipelineError
from pipeline.evaluation import evaluate as E
from pipeline.evaluation import summarise
from tests.test_evaluation_codecs import FakeRNNCodec, make_image, tiny_real_model

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


def centre_crop(path: Path, crop: int) -> np.ndarray:
    img = np.asarray(Image.open(path).convert("RGB"))
    h, w = img.shape[:2]
    return np.ascontiguousarray(img[(h - crop) // 2:(h - crop) // 2 + crop, (w - crop) // 2:(w - crop) // 2 + crop])


def independent_ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    import torch
    from pytorch_msssim import ms_ssim

    def t(x):
        return torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None]

    return float(ms_ssim(t(a), t(b), data_range=255))


def test_evaluate_writes_every_output(tmp_path, kodak):
    from pipeline.evaluation import codecs as C

    params, out, metrics = run(tmp_path, kodak)
    p = params.evaluate
    for name in ("per_image.csv", "per_image_at.csv", "curves.csv", "at_rates.csv", "at_rates_avg.csv",
                 "pairwise.csv", "bd.csv", "bd_per_image.csv", "summary.json", "metrics.json",
                 "visual/visual.json", "visual/original.png", *(f"figures/{f}" for f in E.FIGURES.values()),
                 *(f"figures/{f}" for f in E.AT_RATE_FIGURES.values())):
        assert (out / name).is_file(), name
    codecs = list(p.codecs)  # tiny: jpeg, jpeg2000, webp, avif, jpegxl, rnn
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    n_settings = {"jpeg": len(p.jpeg_quality), "jpeg2000": len(p.jpeg2000_ratio), "webp": len(p.webp_quality),
                  "avif": len(p.avif_quality), "jpegxl": len(p.jpegxl_distance), "rnn": len(p.rnn_iterations)}
    assert len(rows) == sum(n_settings[c] for c in codecs)
    # each row's file size and quality, recomputed here: the image re-encoded by the codec at that setting
    img = centre_crop(kodak / "kodim01.png", p.crop)
    makers = {"jpeg": C.JPEG([]), "jpeg2000": C.JPEG2000([]), "webp": C.WebP([], method=p.webp_method),
              "avif": C.AVIF([], speed=p.avif_speed), "jpegxl": C.JPEGXL([], effort=p.jpegxl_effort)}
    fake = FakeRNNCodec()
    for r in rows:
        setting = float(r["setting"])
        if r["codec"] == "rnn":
            data = fake.compress(img, int(setting))
            decoded = fake.decompress(data)
        else:
            codec = makers[r["codec"]]
            data = codec.encode(img, int(setting) if r["codec"] in ("jpeg", "webp", "avif") else setting)
            decoded = codec.decode(data)
        assert int(r["bytes"]) == len(data), r
        assert float(r["bpp"]) == pytest.approx(8 * len(data) / (192 * 192), rel=1e-5)
        assert float(r["ms_ssim"]) == pytest.approx(independent_ms_ssim(decoded, img), abs=2e-5)
    # dvc metrics show: MS-SSIM at the four rates for every codec, and how many images each averages
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["ms_ssim"]) == set(codecs)
    for c in codecs:
        assert set(m["ms_ssim"][c]) == {summarise.rate_key(r) for r in p.rates}
        assert set(m["images_at_rate"][c].values()) <= {0, 1}
    assert set(m["bd_rate_vs_jpeg"]) == set(codecs) - {"jpeg"}
    assert set(m["bd_rate_rnn_vs"]) == set(codecs) - {"rnn"}
    for c in codecs:
        assert (out / "curves" / f"{c}.csv").is_file()
        assert (out / "visual" / f"{c}.png").is_file()
    assert metrics == m
    summary = json.loads((out / "summary.json").read_text())
    assert summary["codecs"]["jpeg2000"]["config"]["colour transform"].startswith("MCT on")
    from pipeline.records import EvaluationSummary

    assert EvaluationSummary.read(out / "summary.json").model_dump() == summary  # the record is the file
    assert summary["codecs"]["rnn"]["shared_timing"] is True


def test_evaluate_runs_the_real_rnn_codec(tmp_path, kodak, one_thread):
    """The real RNN codec through the stage: one encode per image, lower counts by truncation; every
    row's file equals a separate encode with that many iterations."""
    from pipeline.compression.codec import load_codec

    model = tiny_real_model(tmp_path / "real.pt", iterations=3)
    params = tiny_params(rnn_model=str(model), codecs=["jpeg", "rnn"], rnn_iterations=None, jpeg_quality=[5, 50])
    out = tmp_path / "evaluation"
    E.evaluate(params, out_dir=out, kodak_dir=kodak)  # the default loader: pipeline.compression.codec
    rows = [r for r in csv.DictReader(open(out / "per_image.csv")) if r["codec"] == "rnn"]
    assert [int(float(r["setting"])) for r in rows] == [1, 2, 3]
    real = load_codec(model, device="cpu")
    img = centre_crop(kodak / "kodim01.png", params.evaluate.crop)
    for r in rows:
        data = real.compress(img, int(float(r["setting"])))
        assert int(r["bytes"]) == len(data)
        assert float(r["bpp"]) == pytest.approx(8 * len(data) / (192 * 192), rel=1e-5)
        assert float(r["ms_ssim"]) == pytest.approx(independent_ms_ssim(real.decompress(data), img), abs=2e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["codecs"]["rnn"]["settings"] == [1.0, 2.0, 3.0]


def test_two_conventions_and_the_rnn_subset(tmp_path, kodak):
    from scipy.interpolate import PchipInterpolator

    for i, seed in ((2, 4), (3, 5), (4, 6)):
        Image.fromarray(make_image(200, 264, seed=seed)).save(kodak / f"kodim{i:02d}.png")
    params, out, _ = run(tmp_path, kodak, images=[1, 2, 3, 4], rnn_images=[1, 3], codecs=["jpeg", "webp", "rnn"],
                         jpeg_quality=[1, 5, 20, 60, 90], min_images=2)
    rows = E.read_csv(out / "per_image.csv")
    assert sorted({r["image"] for r in rows if r["codec"] == "rnn"}) == ["kodim01", "kodim03"]
    assert len({r["image"] for r in rows if r["codec"] == "jpeg"}) == 4
    # secondary: one point per setting, the mean over images
    curves = E.read_csv(out / "curves.csv")
    for pt in curves:
        mine = [r["ms_ssim"] for r in rows if r["codec"] == pt["codec"] and r["setting"] == pt["setting"]]
        assert pt["ms_ssim"] == pytest.approx(np.mean(mine), abs=1e-5) and pt["images"] == len(mine)
    # primary: each image's curve interpolated (PCHIP in log10 bpp, recomputed here with scipy), then averaged
    at = {(r["codec"], r["bpp"]): r for r in E.read_csv(out / "at_rates.csv")}
    for codec in ("jpeg", "webp", "rnn"):
        for rate in params.evaluate.rates:
            vals = []
            for image in sorted({r["image"] for r in rows if r["codec"] == codec}):
                pts = sorted((r["bpp"], r["ms_ssim"]) for r in rows if r["codec"] == codec and r["image"] == image)
                x = np.log10([b for b, _ in pts])
                if x[0] <= math.log10(rate) <= x[-1]:
                    vals.append(float(PchipInterpolator(x, [q for _, q in pts])(math.log10(rate))))
            cell = at[(codec, rate)]
            assert cell["images"] == len(vals)
            assert cell["missing"] == (2 if codec == "rnn" else 4) - len(vals)
            if vals:
                assert cell["ms_ssim"] == pytest.approx(np.mean(vals), abs=2e-5)
            else:
                assert math.isnan(cell["ms_ssim"])
    avg = E.read_csv(out / "at_rates_avg.csv")
    assert {(r["codec"], r["bpp"]) for r in avg} == set(at)
    pairs = E.read_csv(out / "pairwise.csv")
    assert {(r["a"], r["b"]) for r in pairs} == {("jpeg", "webp"), ("jpeg", "rnn"), ("webp", "rnn")}
    for r in pairs:
        if r["b"] == "rnn":
            assert r["images"] <= 2  # only images both codecs were run on
        assert r["a_wins"] + r["b_wins"] <= r["images"]
    bd = E.read_csv(out / "bd.csv")
    for r in bd:
        assert r["of_images"] == (2 if "rnn" in (r["anchor"], r["test"]) else 4)
        assert r["images"] <= r["of_images"]


def test_bd_pairs_cover_anchor_and_rnn():
    pairs = summarise.bd_pairs(["jpeg", "webp", "rnn", "avif"], "jpeg")
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
    with pytest.raises(ParamsError):
        tiny_params(images=[1, 2], rnn_images=[3])  # not among the evaluated images
    with pytest.raises(ParamsError):
        tiny_params(rnn_images=[2])  # the visual comparison's image (1) must have an RNN crop
    with pytest.raises(ParamsError):
        tiny_params(jpegxl_effort=10)
