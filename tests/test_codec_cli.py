"""The ``rnnc`` command line: compress/decompress/info, image modes, --bpp, clean errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.compression.cli import main
from pipeline.compression.codec import load_codec
from pipeline.compression.modelfile import save_model
from pipeline.compression.rnncfile import HEADER_SIZE, truncate
from pipeline.images import bits_per_pixel
from tests.test_codec_format import make_image, make_model, records_v2

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, one_thread) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(make_model(), path)
    return path


@pytest.fixture
def png(tmp_path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(make_image(45, 61)).save(path)
    return path


def rnnc(*args) -> int:
    return main([str(a) for a in args])


def assert_one_error_line(capsys, match: str) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert "Traceback" not in err


def test_compress_decompress_matches_api(tmp_path, png, model_path, capsys):
    out, back = tmp_path / "x.rnnc", tmp_path / "back.png"
    assert rnnc("compress", png, out, "--iterations", 3, "--model", model_path) == 0
    assert "bpp" in capsys.readouterr().out
    codec = load_codec(model_path)
    assert out.read_bytes() == codec.compress(make_image(45, 61), 3)
    assert rnnc("decompress", out, back, "--model", model_path) == 0
    decoded = np.asarray(Image.open(back))
    np.testing.assert_array_equal(decoded, codec.reconstruct(make_image(45, 61), 3))
    assert rnnc("decompress", out, tmp_path / "one.png", "--iterations", 1, "--model", model_path) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "one.png")),
                                  codec.reconstruct(make_image(45, 61), 1))
    assert rnnc("info", out) == 0
    assert "3/3 iterations" in capsys.readouterr().out


def test_bpp_option_respects_the_budget(tmp_path, png, model_path, capsys):
    out = tmp_path / "x.rnnc"
    full = load_codec(model_path).compress(make_image(45, 61), 4)
    sizes = [len(truncate(full, k)) for k in (1, 2, 3, 4)]
    budget = 8 * (sizes[1] + sizes[2]) / 2 / (45 * 61)  # between 2 and 3 iterations
    assert rnnc("compress", png, out, "--bpp", budget, "--model", model_path) == 0
    assert out.stat().st_size == sizes[1] and "2 iteration(s)" in capsys.readouterr().out
    assert bits_per_pixel(sizes[1], 45, 61) <= budget < bits_per_pixel(sizes[2], 45, 61)
    assert rnnc("compress", png, out, "--bpp", 0.01, "--model", model_path) == 1
    assert_one_error_line(capsys, "too low")


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16"])
def test_other_modes_are_converted_with_a_note(tmp_path, model_path, capsys, mode):
    rgb = Image.fromarray(make_image(20, 30))
    src = tmp_path / f"in_{mode.replace(';', '')}.png"
    if mode == "I;16":
        Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257)).save(src)
    else:
        rgb.convert(mode).save(src)
    out = tmp_path / "x.rnnc"
    assert rnnc("compress", src, out, "-k", 1, "--model", model_path) == 0
    assert "converted" in capsys.readouterr().err
    assert rnnc("decompress", out, tmp_path / "y.png", "--model", model_path) == 0
    assert Image.open(tmp_path / "y.png").size == (30, 20)


def test_truncated_prefix_decodes_with_a_note(tmp_path, png, model_path, capsys):
    out = tmp_path / "x.rnnc"
    assert rnnc("compress", png, out, "-k", 3, "--model", model_path) == 0
    data = out.read_bytes()
    prefix = tmp_path / "p.rnnc"
    prefix.write_bytes(data[: len(truncate(data, 2))])
    assert rnnc("decompress", prefix, tmp_path / "p.png", "--model", model_path) == 0
    assert "2 of 3 iterations" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign", "empty"])
def test_bad_files_fail_with_one_clear_line(tmp_path, png, model_path, capsys, damage):
    out = tmp_path / "x.rnnc"
    assert rnnc("compress", png, out, "-k", 2, "--model", model_path) == 0
    data = bytearray(out.read_bytes())
    if damage == "truncate":
        data = data[:-5]
    elif damage == "flip":
        data[HEADER_SIZE + 4 + len(records_v2(bytes(data))[0]) // 2] ^= 0xFF  # inside iteration 1's payload
    elif damage == "foreign":
        data = bytearray(png.read_bytes())
    else:
        data = bytearray()
    out.write_bytes(bytes(data))
    capsys.readouterr()
    target = tmp_path / "never.png"
    assert rnnc("decompress", out, target, "--model", model_path) != 0
    assert_one_error_line(capsys, {"truncate": "truncated", "flip": "checksum", "foreign": "magic",
                                   "empty": "magic"}[damage])
    assert not target.exists() and not list(tmp_path.glob(".never.png*"))


def test_other_model_and_missing_inputs_fail_cleanly(tmp_path, png, model_path, capsys):
    out = tmp_path / "x.rnnc"
    assert rnnc("compress", png, out, "-k", 1, "--model", model_path) == 0
    other = tmp_path / "other.pt"
    save_model(make_model(seed=7), other)
    capsys.readouterr()
    assert rnnc("decompress", out, tmp_path / "y.png", "--model", other) != 0
    assert_one_error_line(capsys, "another model")
    assert rnnc("compress", tmp_path / "nope.png", out, "-k", 1, "--model", model_path) != 0
    assert_one_error_line(capsys, "no such file")
    not_image = tmp_path / "text.png"
    not_image.write_text("hello")
    assert rnnc("compress", not_image, out, "-k", 1, "--model", model_path) != 0
    assert_one_error_line(capsys, "not an image")
    assert rnnc("compress", png, out, "-k", 1, "--model", tmp_path / "missing.pt") != 0
    assert_one_error_line(capsys, "no such file")
    assert rnnc("compress", png, out, "-k", 99, "--model", model_path) != 0
    assert_one_error_line(capsys, "iterations")


def test_subprocess_corrupt_file_has_no_traceback(tmp_path, model_path):
    bad = tmp_path / "bad.rnnc"
    bad.write_bytes(b"RNNC\x01" + bytes(40))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.compression.cli", "decompress", str(bad),
                           str(tmp_path / "o.png"), "--model", str(model_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ nothing lost


def test_output_that_is_a_folder_is_refused_and_kept(tmp_path, png, model_path, capsys):
    folder = tmp_path / "keep"
    folder.mkdir()
    (folder / "precious.txt").write_text("mine")
    assert rnnc("compress", png, folder, "-k", 1, "--model", model_path) != 0
    assert_one_error_line(capsys, "is a folder")
    assert (folder / "precious.txt").read_text() == "mine"
    # the current folder too (it used to be emptied)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert rnnc("compress", png, ".", "-k", 1, "--model", model_path) != 0
    finally:
        os.chdir(cwd)
    assert_one_error_line(capsys, "is a folder")
    assert sorted(p.name for p in folder.iterdir()) == ["precious.txt"]
    out = tmp_path / "x.rnnc"
    assert rnnc("compress", png, out, "-k", 1, "--model", model_path) == 0
    capsys.readouterr()
    assert rnnc("decompress", out, folder, "--model", model_path) != 0
    assert_one_error_line(capsys, "is a folder")
    assert sorted(p.name for p in folder.iterdir()) == ["precious.txt"]


def test_output_equal_to_input_is_refused(tmp_path, png, model_path, capsys):
    before = png.read_bytes()
    assert rnnc("compress", png, png, "-k", 1, "--model", model_path) != 0
    assert_one_error_line(capsys, "is the input")
    alias = tmp_path / "sub" / ".." / png.name  # the same file by another spelling
    (tmp_path / "sub").mkdir()
    assert rnnc("compress", png, alias, "-k", 1, "--model", model_path) != 0
    assert_one_error_line(capsys, "is the input")
    assert png.read_bytes() == before
    out = tmp_path / "x.rnnc"
    assert rnnc("compress", png, out, "-k", 1, "--model", model_path) == 0
    data = out.read_bytes()
    capsys.readouterr()
    assert rnnc("decompress", out, out, "--model", model_path) != 0
    assert_one_error_line(capsys, "is the input")
    assert out.read_bytes() == data


def test_failed_decode_leaves_an_existing_output_untouched(tmp_path, png, model_path, capsys):
    out = tmp_path / "x.rnnc"
    assert rnnc("compress", png, out, "-k", 2, "--model", model_path) == 0
    target = tmp_path / "old.png"
    target.write_bytes(b"previous contents")
    bad = tmp_path / "bad.rnnc"
    bad.write_bytes(out.read_bytes()[:-3])
    capsys.readouterr()
    assert rnnc("decompress", bad, target, "--model", model_path) != 0
    assert_one_error_line(capsys, "truncated")
    assert target.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.rnnc", "in.png", "old.png", "x.rnnc"]


def test_max_pixels_flag(tmp_path, png, model_path, capsys):
    out = tmp_path / "x.rnnc"
    assert rnnc("compress", png, out, "-k", 1, "--model", model_path) == 0
    capsys.readouterr()
    assert rnnc("decompress", out, tmp_path / "a.png", "--model", model_path, "--max-pixels", 45 * 61 - 1) != 0
    assert_one_error_line(capsys, "--max-pixels 0 lifts it")
    assert not (tmp_path / "a.png").exists()
    assert rnnc("decompress", out, tmp_path / "b.png", "--model", model_path, "--max-pixels", 45 * 61) == 0
    assert rnnc("decompress", out, tmp_path / "c.png", "--model", model_path, "--max-pixels", 0) == 0


def test_info_shows_version_and_iteration_sizes(tmp_path, png, model_path, capsys):
    out = tmp_path / "x.rnnc"
    assert rnnc("compress", png, out, "-k", 2, "--model", model_path) == 0
    capsys.readouterr()
    assert rnnc("info", out) == 0
    text = capsys.readouterr().out
    sizes = [len(p) for p in records_v2(out.read_bytes())]
    assert ".rnnc v2" in text and "2/2 iterations" in text
    assert text.splitlines()[-1].endswith(" ".join(map(str, sizes)))


def test_run_cli_maps_numpy_memory_errors_by_base_class(capsys):
    from pipeline.errors import run_cli

    def allocate():
        np.empty(1 << 50, dtype=np.uint8)  # 1 PiB: numpy's _ArrayMemoryError, a MemoryError subclass

    assert run_cli(allocate, {MemoryError: "out of memory (try a smaller --tile)"}) == 1
    assert_one_error_line(capsys, "out of memory")
