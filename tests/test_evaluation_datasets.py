"""Evaluating on any folder of photos (evaluate.dataset).

A small folder of generated images of different sizes and modes (RGB, grey, RGBA, 16-bit grey, an
EXIF-rotated JPEG, one in a subfolder, a text file that is not an image) goes through the checks, the evaluate
stage and the report on the tiny profile; Kodak handed over as a plain folder gives the built-in Kodak's
figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.errors import PipelineError
from pipeline.evaluation import datasets as D
from pipeline.evaluation import evaluate as E
from tests.test_evaluation_codecs import FakeRNNCodec, make_image
from tests.test_evaluation_stage import tiny_params

REPO = Path(__file__).resolve().parents[1]


def fake_loader(model, device):
    return FakeRNNCodec()


def exif_rotated_jpeg(path: Path, upright: np.ndarray) -> None:
    """A JPEG stored on its side with EXIF orientation 6 (rotate 90 clockwise to view): viewers show ``upright``."""
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 90 counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, "JPEG", quality=95, exif=exif)


@pytest.fixture
def photos(tmp_path) -> Path:
    """Images of different sizes and modes, each at least 161 px a side."""
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(make_image(200, 264, seed=1)).save(d / "a_rgb.png")
    Image.fromarray(make_image(180, 240, seed=2)[..., 0]).save(d / "b_grey.png")  # mode L
    rgba = np.dstack([make_image(220, 300, seed=3), np.full((220, 300), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "c_rgba.png")
    exif_rotated_jpeg(d / "d_exif.jpg", make_image(240, 176, seed=4))  # upright: 176 wide, 240 high
    grey16 = (make_image(170, 200, seed=5)[..., 1].astype(np.uint16) * 257)
    Image.fromarray(grey16).save(d / "sub" / "e_grey16.png")  # uint16: mode I;16
    (d / "notes.txt").write_text("not an image")
    return d


# ----------------------------------------------------------------------------- the set and its checks

def test_open_set_reads_every_mode_upright(photos):
    s = D.open_set("images", photos, progress=False)
    assert s.names == ["a_rgb", "b_grey", "c_rgba", "d_exif", "sub/e_grey16"]
    assert s.sizes == [(264, 200), (240, 180), (300, 220), (176, 240), (200, 170)]
    assert s.ignored == ["notes.txt"]
    for path in s.paths:
        img = D.load(path)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    with Image.open(photos / "d_exif.jpg") as im:  # EXIF orientation applied, as viewers show it
        assert im.size == (240, 176)
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert np.array_equal(D.load(photos / "d_exif.jpg"), upright)
    grey = D.load(photos / "b_grey.png")
    assert np.array_equal(grey[..., 0], grey[..., 2])  # grey: three equal channels
    assert D.describe_sizes(s.sizes).startswith("5 images, 0.03-0.07 MP: 264x200, 240x180, 300x220")
    assert D.describe_sizes([(768, 512)] * 18 + [(512, 768)] * 6) == "24 images, 0.39 MP: 768x512 (18), 512x768 (6)"
    limited = D.open_set("images", photos, limit=2, crop=161, progress=False)
    assert limited.names == ["a_rgb", "b_grey"] and limited.sizes == [(161, 161)] * 2


def test_bad_sets_are_one_clear_error(photos, tmp_path):
    (photos / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(PipelineError, match="zz_broken.png"):
        D.open_set("images", photos, progress=False)
    (photos / "zz_broken.png").unlink()
    Image.fromarray(make_image(120, 300, seed=6)).save(photos / "zz_small.png")
    with pytest.raises(PipelineError, match=r"zz_small.png: 300x120 px is too small for 5-scale MS-SSIM.*161"):
        D.open_set("images", photos, progress=False)
    with pytest.raises(PipelineError, match="b_grey.png: 240x180 px is smaller than evaluate.crop=192"):
        D.open_set("images", photos, crop=192, progress=False)
    with pytest.raises(PipelineError, match="no such folder"):
        D.open_set("images", tmp_path / "absent", progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("no images here")
    with pytest.raises(PipelineError, match="no image in it"):
        D.open_set("images", tmp_path / "empty", progress=False)
    folders = {"kodak": Path("k"), "images": Path("i"), "test_photos": Path("t")}
    assert D.folder_of("div2k-valid", folders, "div2k-valid") == Path("t")
    with pytest.raises(PipelineError, match="no image set named 'clic'.*known: kodak, images, div2k-valid"):
        D.folder_of("clic", folders, "div2k-valid")


def test_dataset_is_a_name_never_a_path():
    from pipeline.config import check_run_overrides
    from pipeline.errors import ParamsError

    assert tiny_params(dataset="images", extra_datasets=["kodak"]).evaluate.dataset == "images"
    for bad in ("/etc", "../data", "data/images", "Images"):
        with pytest.raises(ParamsError, match="dataset"):
            tiny_params(dataset=bad)
    with pytest.raises(ParamsError, match="extra_datasets"):
        tiny_params(extra_datasets=["kodak"])  # the dataset itself
    check_run_overrides(["evaluate.dataset=images", "evaluate.limit=3"])  # a DAG run may choose the set by name


# ----------------------------------------------------------------------------- the stage and the report

def run_evaluate(tmp_path, *, kodak=None, images_dir=None, loader=fake_loader, **overrides):
    params = tiny_params(rnn_model=str(tmp_path / "model.pt"), **overrides)
    if not Path(params.evaluate.rnn_model).exists():
        (tmp_path / "model.pt").write_bytes(b"stand-in")
    out = tmp_path / f"evaluation-{len(list(tmp_path.glob('evaluation-*')))}"
    E.evaluate(params, out_dir=out, kodak_dir=kodak or tmp_path / "no-kodak", rnn_loader=loader,
               images_dir=images_dir or tmp_path / "no-images")
    return params, out


def test_evaluate_and_report_on_a_folder_of_photos(photos, tmp_path, monkeypatch):
    """The tiny profile on the generated folder (full size, mixed sizes and modes) and its report."""
    from pipeline.records import EvaluationSummary
    from pipeline.report import build as R
    from tests.test_report_build import standin_classifier

    params, out = run_evaluate(tmp_path, images_dir=photos, dataset="images", crop=None, images=None, visual_image=3,
                               codecs=["jpeg", "webp", "rnn"], jpeg_quality=[5, 30, 80], webp_quality=[5, 60])
    s = EvaluationSummary.read(out / "summary.json")
    assert (s.dataset, s.dataset_folder, s.images) == ("images", photos.as_posix(), D.open_set(
        "images", photos, progress=False).names)
    assert s.sizes == [[264, 200], [240, 180], [300, 220], [176, 240], [200, 170]] and not s.all_kodak
    assert s.visual_image == "c_rgba" and s.megapixels == pytest.approx(sum(w * h for w, h in s.sizes) / 1e6)
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert {r["image"] for r in rows} == set(s.images)
    for r in rows:  # each at its own size
        w, h = dict(zip(s.images, s.sizes))[r["image"]]
        assert (int(r["width"]), int(r["height"])) == (w, h)
        assert float(r["bpp"]) == pytest.approx(8 * int(r["bytes"]) / (w * h), rel=1e-5)
    m = json.loads((out / "metrics.json").read_text())
    assert m["images"] == 5 and set(m["ms_ssim"]) == {"jpeg", "webp", "rnn"}
    assert (out / "sets").is_dir() and not any((out / "sets").iterdir())  # no extra set
    # the report, on this set
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    (out).rename(ws / "data" / "evaluation")
    (ws / "data" / "compressor").mkdir()
    standin_classifier(ws)
    monkeypatch.chdir(ws)
    params = params.model_copy(update={"report": params.report.model_copy(update={"mlflow_runs": False})})
    ctx = R.build(params)
    md = (ws / "data/report/report.md").read_text()
    html = (ws / "data/report/report.html").read_text()
    assert f"## Compression on images ({photos.as_posix()})" in md
    sizes = "5 images, 0.03-0.07 MP: 264x200, 240x180, 300x220, 176x240, 200x170"
    assert "the image set images in" in md and sizes in md
    assert "rate-distortion on images (" in html and sizes in html
    hashes = {h["path"]: h for h in ctx["prov"]["hashes"]}
    assert hashes[photos.as_posix()]["files"] == "6"  # the evaluated folder is hashed for the provenance
    assert any("per megapixel" in d["value"] for d in ctx["durations"])


def test_kodak_as_a_plain_folder_gives_the_kodak_figures(tmp_path, mirror):
    """Two real Kodak images, built in and copied to a folder of one's own: every number the same."""
    import shutil

    kodak = tmp_path / "kodak"
    mine = tmp_path / "mine"
    kodak.mkdir()
    mine.mkdir()
    for i in (1, 2):
        shutil.copy(mirror / "kodak" / f"kodim{i:02d}.png", kodak)
        shutil.copy(mirror / "kodak" / f"kodim{i:02d}.png", mine)
    knobs = {"images": None, "visual_image": 2, "min_images": 2, "codecs": ["jpeg", "webp", "rnn"]}
    _, built_in = run_evaluate(tmp_path, kodak=kodak, **knobs)
    _, folder = run_evaluate(tmp_path, images_dir=mine, dataset="images", **knobs)
    timing = {"encode_s", "decode_s", "seconds", "duration_s"}
    for name in ("per_image.csv", "at_rates.csv", "pairwise.csv", "bd.csv", "bd_per_image.csv", "curves.csv"):
        a = [{k: v for k, v in r.items() if k not in timing} for r in csv.DictReader(open(built_in / name))]
        b = [{k: v for k, v in r.items() if k not in timing} for r in csv.DictReader(open(folder / name))]
        assert a == b and a, name
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (built_in, folder))
    ma.pop("duration_s"), mb.pop("duration_s")
    assert ma == mb
    assert (built_in / "visual" / "jpeg.png").read_bytes() == (folder / "visual" / "jpeg.png").read_bytes()


def test_extra_sets_get_their_own_tables(photos, tmp_path):
    kodak = tmp_path / "kodak"
    kodak.mkdir()
    Image.fromarray(make_image(200, 264, seed=9)).save(kodak / "kodim01.png")
    _, out = run_evaluate(tmp_path, kodak=kodak, images_dir=photos, extra_datasets=["images"], crop=None,
                          codecs=["jpeg", "rnn"], jpeg_quality=[5, 50])
    d = out / "sets" / "images"
    info = json.loads((d / "set.json").read_text())
    assert info["name"] == "images" and len(info["images"]) == 5 and info["encodes"] > 0
    assert {r["image"] for r in csv.DictReader(open(d / "per_image.csv"))} == set(info["images"])
    assert (d / "at_rates.csv").is_file() and (d / "bd.csv").is_file()
    m = json.loads((out / "metrics.json").read_text())
    assert m["images"] == 1 and m["sets"]["images"]["images"] == 5


def test_a_bad_image_stops_evaluate_before_anything_is_written(photos, tmp_path):
    (photos / "c_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(PipelineError, match="c_broken.jpg"):
        run_evaluate(tmp_path, images_dir=photos, dataset="images", crop=None)
    assert not list(tmp_path.glob("evaluation-*"))
