"""``python -m pipeline.classifier.predict``: top-5 output and clear errors for bad files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.classifier.model import build_classifier, save_classifier
from pipeline.classifier.predict import CIFAR10, main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    config = {"arch": "fast", "widths": [8, 16, 16], "bn_momentum": 0.6, "scale": 1 / 9}
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_classifier(path, build_classifier(config, CIFAR10).eval(), config)
    return path


def parse(out: str) -> dict[str, list[tuple[str, float]]]:
    result, current = {}, None
    for line in out.splitlines():
        if line.startswith("  "):
            name, pct = line.split()
            result[current].append((name, float(pct.rstrip("%"))))
        else:
            current = line
            result[current] = []
    return result


def test_top5_for_images_of_any_size_and_mode(tmp_path, model_file, capsys):
    rng = np.random.default_rng(0)
    rgb = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)).save(rgb)
    gray = tmp_path / "gray.png"
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), mode="L").save(gray)
    rgba = tmp_path / "alpha.png"
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), mode="RGBA").save(rgba)
    assert main([str(rgb), str(gray), str(rgba), "--model", str(model_file)]) == 0
    result = parse(capsys.readouterr().out)
    assert list(result) == [str(rgb), str(gray), str(rgba)]
    for top in result.values():
        names, pcts = [n for n, _ in top], [p for _, p in top]
        assert len(top) == 5 and len(set(names)) == 5 and set(names) <= set(CIFAR10)
        assert pcts == sorted(pcts, reverse=True) and 0 < sum(pcts) <= 100.01


@pytest.mark.parametrize("kind, message", [("missing", "no such file"), ("text", "not an image"),
                                           ("truncated", "corrupt"), ("dir", "not a file")])
def test_bad_input_gives_one_error_line(tmp_path, model_file, capsys, kind, message):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good)
    bad = tmp_path / f"bad_{kind}.png"
    if kind == "text":
        bad.write_text("hello, not a picture\n")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:300])
    elif kind == "dir":
        bad.mkdir()
    assert main([str(good), str(bad), "--model", str(model_file)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing half-reported
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0] and str(bad) in lines[0]


def test_missing_or_bad_model(tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    assert main([str(img), "--model", str(tmp_path / "nope.pt")]) == 1
    assert "model file not found" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_text("junk")
    assert main([str(img), "--model", str(junk)]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_module_entry_point(tmp_path, model_file):
    img = tmp_path / "x.png"
    Image.fromarray(np.full((50, 50, 3), 200, np.uint8)).save(img)
    ok = subprocess.run([sys.executable, "-m", "pipeline.classifier.predict", str(img), "--model", str(model_file)],
                        cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and len(parse(ok.stdout)[str(img)]) == 5
    bad = subprocess.run([sys.executable, "-m", "pipeline.classifier.predict", str(tmp_path / "none.png")],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and bad.stderr.startswith("error: ")


def _exif_rotated_jpeg(path: Path, orientation: int) -> np.ndarray:
    """A 64x32 JPEG whose pixels are stored sideways with an EXIF orientation tag; returns what a viewer
    shows (the stored pixels transposed as the tag says, computed independently with numpy)."""
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = (250, 10, 10)   # left half red
    stored[:, 32:] = (10, 10, 250)   # right half blue
    stored[:4, :] = (10, 250, 10)    # a green top stripe
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, quality=95, exif=exif)
    return {3: np.rot90(stored, 2), 6: np.rot90(stored, -1), 8: np.rot90(stored, 1)}[orientation]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    from pipeline.classifier.predict import load_image

    path = tmp_path / "rotated.jpg"
    upright = _exif_rotated_jpeg(path, orientation)
    got = load_image(path, size=32).astype(int)
    want = np.asarray(Image.fromarray(upright).resize((32, 32), Image.Resampling.BICUBIC, reducing_gap=3.0)).astype(int)
    assert np.abs(got - want).mean() < 8  # JPEG noise only; unrotated it would be off by ~100
    stored = np.asarray(Image.open(path).convert("RGB").resize((32, 32))).astype(int)
    assert np.abs(stored - want).mean() > 40  # the tag really changes the picture


def test_rnnc_reads_exif_orientation(tmp_path):
    from pipeline.compression.cli import read_image

    path = tmp_path / "rotated.jpg"
    upright = _exif_rotated_jpeg(path, 6)
    got = read_image(str(path))
    assert got.shape == upright.shape == (64, 32, 3)
    assert np.abs(got.astype(int) - upright.astype(int)).mean() < 8


def test_output_closed_early_ends_quietly(tmp_path, model_file):
    """`predict ... | head -3`: the reader leaves early; no BrokenPipeError traceback."""
    images = []
    for i in range(400):  # ~100 KB of output: more than a pipe holds, so writes go on after head exits
        images.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.full((32, 32, 3), i % 256, np.uint8)).save(images[-1])
    cmd = f"{sys.executable} -m pipeline.classifier.predict -k 10 --model {model_file} " + " ".join(map(str, images))
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd + " | head -3"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.stdout.count("\n") == 3
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
