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
