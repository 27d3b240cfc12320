"""``rnnc compare``: one photo coded by several codecs at the setting nearest a target rate, checked: the search
lands on the nearest setting, the table's numbers are the files' and the evaluate stage's metrics, the side-by-side
picture has the documented layout and shows the original and the zoomed region, earlier outputs are never
overwritten, and bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluation import compare as CMP
from tests.test_evaluation_codecs import make_image, tiny_real_model


def test_search_finds_the_nearest_setting():
    """A monotone bpp(knob) with a known answer: the search lands on the nearest setting in a few probes."""
    def encode(q):
        return CMP.Probe(q, b"", 0.01 * q, 0.0)

    best, n = CMP.search(encode, CMP.Space(1, 100, True, False, True, lambda t: 15), 0.373)
    assert best.setting == 37 and n <= 6
    best, _ = CMP.search(encode, CMP.Space(1, 100, True, False, True, lambda t: 15), 5.0)
    assert best.setting == 100  # out of reach: the end of the knob's range

    def ratio(r):
        return CMP.Probe(r, b"", 24 / r * 1.07, 0.0)  # a rate control 7 % off

    best, n = CMP.search(ratio, CMP.SEARCH["jpeg2000"], 0.25)
    assert abs(best.bpp / 0.25 - 1) < CMP.TOL and n <= 4


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(make_image(240, 320, seed=7)).save(path)
    return path


def test_compare_table_picture_and_page(tmp_path, photo, capsys, one_thread):
    from pipeline.compression.cli import main

    model = tiny_real_model(tmp_path / "tiny.pt", iterations=4)
    out = tmp_path / "out"
    argv = ["compare", str(photo), "--bpp", "0.5", "--out", str(out), "--codecs", "jpeg,jpeg2000,webp,rnn",
            "--model", str(model)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for label in ("JPEG ", "JPEG 2000", "WebP", "RNN (ours)"):
        assert label in printed
    data = json.loads((out / "photo.compare.json").read_text())
    results = {r["codec"]: r for r in data["results"]}
    assert list(results) == ["jpeg", "jpeg2000", "webp", "rnn"]
    for name in ("jpeg", "jpeg2000", "webp"):  # a quality knob reaches the target closely on a 320x240 image
        assert abs(results[name]["bpp"] / 0.5 - 1) < 0.15, results[name]
    rnn = results["rnn"]  # the iteration count whose file is nearest: no other count is nearer
    from pipeline.compression.codec import load_codec

    img = np.asarray(Image.open(photo).convert("RGB"))
    codec = load_codec(model)
    sizes = {k: 8 * len(codec.compress(img, k)) / img[..., 0].size for k in range(1, 5)}
    assert rnn["bytes"] == len(codec.compress(img, int(rnn["setting"])))
    assert all(abs(np.log(rnn["bpp"] / 0.5)) <= abs(np.log(b / 0.5)) + 1e-12 for b in sizes.values())
    for r in results.values():
        assert 0 < r["ms_ssim"] <= 1 and r["psnr"] > 10 and r["encode_s"] > 0 and r["decode_s"] > 0
    # the scores are the evaluate stage's, of the file the table names
    from pipeline.evaluation.codecs import JPEG
    from pipeline.evaluation.metrics import Reference

    jpeg = JPEG([])
    file = jpeg.encode(img, int(results["jpeg"]["setting"]))
    assert len(file) == results["jpeg"]["bytes"]
    assert Reference(img).compare(jpeg.decode(file)).ms_ssim == pytest.approx(results["jpeg"]["ms_ssim"], abs=1e-9)
    # the picture: original + 4 codecs, each the full view and the zoomed crop, at the documented layout
    with Image.open(out / "photo.compare.png") as pic:
        L = CMP.layout(240, 320, 5)
        assert pic.size == (L["width"], L["height"]) == (8 + 4 * (CMP.PANEL + 8), 8 + 2 * (L["cell_h"] + 8))
        rgb = np.asarray(pic.convert("RGB"))
    left, top, side = data["zoom"]
    scale = CMP.PANEL / 320
    x0, y0 = CMP.GAP, CMP.GAP + CMP.CAPTION  # the original's full view, scaled to PANEL px wide, red box drawn on it
    full = np.asarray(Image.fromarray(img).resize((CMP.PANEL, L["full_h"]), Image.Resampling.LANCZOS))
    shown = rgb[y0:y0 + L["full_h"], x0:x0 + CMP.PANEL]
    yy, xx = np.mgrid[0:L["full_h"], 0:CMP.PANEL]
    box = [left * scale, top * scale, (left + side) * scale, (top + side) * scale]
    near_x = (np.abs(xx - box[0]) < 4) | (np.abs(xx - box[2]) < 4)
    near_y = (np.abs(yy - box[1]) < 4) | (np.abs(yy - box[3]) < 4)
    within_x, within_y = (xx > box[0] - 4) & (xx < box[2] + 4), (yy > box[1] - 4) & (yy < box[3] + 4)
    border = (near_x & within_y) | (near_y & within_x)
    assert border.any() and np.array_equal(shown[~border], full[~border])
    assert (shown[border] == [255, 0, 0]).all(axis=1).mean() > 0.3  # the zoomed region outlined in red
    zoom = rgb[y0 + L["full_h"] + CMP.GAP:y0 + L["full_h"] + CMP.GAP + CMP.PANEL, x0:x0 + CMP.PANEL]
    crop = Image.fromarray(np.ascontiguousarray(img[top:top + side, left:left + side]))
    assert np.array_equal(zoom, np.asarray(crop.resize((CMP.PANEL, CMP.PANEL), Image.Resampling.NEAREST)))
    page = (out / "photo.compare.html").read_text()
    assert page.count("<tr><td>") == 4 and 'src="photo.compare.png"' in page
    # a second run refuses to overwrite what the first wrote, before any work
    before = (out / "photo.compare.png").read_bytes()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "photo.compare.png").read_bytes() == before and sorted(p.name for p in out.iterdir()) == [
        "photo.compare.html", "photo.compare.json", "photo.compare.png"]


@pytest.mark.parametrize("case", ["not an image", "too small", "no such file", "unknown codec"])
def test_compare_bad_input_is_one_line(tmp_path, capsys, case):
    from pipeline.compression.cli import main

    path = tmp_path / "in.png"
    codecs = "jpeg"
    if case == "not an image":
        path.write_text("hello")
    elif case == "too small":
        Image.fromarray(make_image(100, 150)).save(path)
    elif case == "unknown codec":
        Image.fromarray(make_image(200, 200)).save(path)
        codecs = "jpeg,png"
    assert main(["compare", str(path), "--bpp", "0.3", "--codecs", codecs, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert not (tmp_path / "o").exists()  # nothing half-written
