"""The one image reader and the one bpp formula (pipeline/images.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.images import bits_per_pixel, read_image


def test_bpp_is_eight_bits_per_byte_over_the_pixels():
    assert bits_per_pixel(49152, 512, 768) == 1.0  # a 48 KiB file of a Kodak image
    assert bits_per_pixel(3, 2, 3) == 4.0 and bits_per_pixel(0, 10, 10) == 0.0


def test_rgb_is_read_as_stored(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    got = read_image(tmp_path / "a.png")
    assert got.dtype == np.uint8 and np.array_equal(got, img)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    gray = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(gray).save(tmp_path / "g.png")
    notes = []
    got = read_image(tmp_path / "g.png", note=notes.append)
    assert got.shape == (1, 3, 3) and got[0, :, 0].tolist() == [0, 100, 255]  # clipping would give 0, 255, 255
    assert notes and "high bit depth" in notes[0]


def test_alpha_is_dropped_with_a_note(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    notes = []
    got = read_image(tmp_path / "t.png", note=notes.append)
    assert got.shape == (4, 5, 3) and (got[..., 0] == 200).all() and "alpha channel dropped" in notes[0]


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px > 2 x 100: Pillow's bomb limit
    with pytest.raises(PipelineError, match="big.png: .*exceeds"):
        read_image(tmp_path / "big.png")


@pytest.mark.parametrize("kind, message", [("missing", "no such file"), ("dir", "not a file"),
                                           ("text", "not an image file"), ("truncated", "corrupt")])
def test_bad_files_are_one_clear_error(tmp_path, kind, message):
    path = tmp_path / "x.png"
    if kind == "dir":
        path.mkdir()
    elif kind == "text":
        path.write_text("hello")
    elif kind == "truncated":
        Image.fromarray(np.full((64, 64, 3), 99, np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:60])

    class Mine(PipelineError):
        pass

    with pytest.raises(Mine, match=message):
        read_image(path, error=Mine)
