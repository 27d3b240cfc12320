"""What a finished run got, in a few console lines: each stage's headline and the run's summary block.

``make run`` (``pipeline/orchestration/local_run.py``) prints these from the outputs the stages left in
the workspace (the files dvc.yaml declares), so a stage that DVC found up to date still shows its
figures. Every reader tolerates a missing or partial output (a failed run): it says less, never fails.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.evaluation.stats import wilson
from pipeline.records import BDRate, Pairwise, read_table

#: the codecs the summary compares the RNN with, at ``RATE`` bpp (report's primary convention)
VERSUS = (("jpeg", "JPEG"), ("jpeg2000", "JPEG 2000"), ("webp", "WebP"))
RATE = 0.25


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def duration(seconds: float) -> str:
    """``8m54s``, ``1h02m``, ``12s``, ``0.4s``."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def classifier_line(ws: Path) -> str:
    m = _json(ws / "data/classifier/metrics.json")
    acc, plain, n = _num(m.get("test_acc")), _num(m.get("test_acc_no_tta")), m.get("test_size")
    if acc is None:
        return ""
    ci = ""
    if isinstance(n, int) and n > 0:
        lo, hi = wilson(acc, n)
        ci = f" [{100 * lo:.2f}, {100 * hi:.2f}]"
    text = f"test accuracy {100 * acc:.2f} %{ci}"
    if plain is not None and m.get("tta"):
        text += f" with TTA, {100 * plain:.2f} % without"
    train = _num(m.get("train_time_s"))
    if train is not None:
        text += f"; {duration(train)} of training"
    return text


def compressor_line(ws: Path) -> str:
    m = _json(ws / "data/compressor/metrics.json")
    ks = sorted(int(k.rsplit("k", 1)[1]) for k in m if k.startswith("val_psnr_k") and _num(m[k]) is not None)
    if not ks:
        return ""
    return f"validation PSNR {m[f'val_psnr_k{ks[-1]}']:.2f} dB at {ks[-1]} iterations"


def _pairs(ws: Path) -> list[Pairwise]:
    try:
        return read_table(ws / "data/evaluation/pairwise.csv", Pairwise)
    except Exception:  # noqa: BLE001 - absent or from another version: the summary says less
        return []


def _bd(ws: Path) -> list[BDRate]:
    try:
        return read_table(ws / "data/evaluation/bd.csv", BDRate)
    except Exception:  # noqa: BLE001
        return []


def rnn_versus(ws: Path, anchor: str, metric: str = "ms_ssim", rate: float = RATE) -> str:
    """``+0.026 [+0.022, +0.030], better on 24/24 images`` (RNN minus ``anchor``, per image) or ''."""
    for r in _pairs(ws):
        if r.metric != metric or not math.isclose(r.bpp, rate) or {r.a, r.b} != {"rnn", anchor}:
            continue
        if not math.isfinite(r.mean_diff) or not r.images:
            return f"no image reaches {rate} bpp with both codecs"
        sign = 1 if r.a == "rnn" else -1
        lo, hi = sorted((sign * r.lo, sign * r.hi))
        wins = r.a_wins if r.a == "rnn" else r.b_wins
        ci = f" [{lo:+.3f}, {hi:+.3f}]" if math.isfinite(lo) else ""
        return f"{sign * r.mean_diff:+.3f}{ci}, better on {wins}/{r.images} images"
    return ""


def rnn_bd_rate(ws: Path, anchor: str = "jpeg", metric: str = "ms_ssim_db") -> str:
    for r in _bd(ws):
        if r.anchor == anchor and r.test == "rnn" and r.metric == metric and math.isfinite(r.bd_rate_pct):
            ci = f" [{r.bd_rate_lo:+.1f}, {r.bd_rate_hi:+.1f}]" if math.isfinite(r.bd_rate_lo) else ""
            return f"{r.bd_rate_pct:+.1f} %{ci} (median per image, {r.images} images)"
    return ""


def evaluate_line(ws: Path) -> str:
    jpeg, bd = rnn_versus(ws, "jpeg"), rnn_bd_rate(ws)
    jpeg = "" if jpeg.startswith("no image") else jpeg
    parts = ([f"RNN - JPEG MS-SSIM @{RATE} bpp {jpeg.split(', better')[0]}"] if jpeg else []) + (
        [f"BD-rate vs JPEG {bd.split(' (')[0]}"] if bd else [])
    return "; ".join(parts)


def report_line(ws: Path) -> str:
    html = ws / "data/report/report.html"
    return "data/report/report.html, report.md" if html.is_file() else ""


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The arrays' shapes in an .npz, from their headers alone (no data read)."""
    import zipfile

    import numpy as np

    shapes = {}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            with z.open(name) as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shapes[name.removesuffix(".npy")] = tuple(read(f)[0])
    return shapes


def download_line(ws: Path) -> str:
    cifar, kodak = ws / "data/raw/cifar-10-batches-py", ws / "data/raw/kodak"
    images = len(list(kodak.glob("*.png"))) if kodak.is_dir() else 0
    photos = len(list((ws / "data/raw/photos").rglob("*.png"))) if (ws / "data/raw/photos").is_dir() else 0
    parts = (["CIFAR-10"] if cifar.is_dir() else []) + ([f"{images} Kodak images"] if images else []) + (
        [f"{photos} photos"] if photos else [])
    return " + ".join(parts) + " in data/raw" if parts else ""


def augment_line(ws: Path) -> str:
    cifar = _npz_shapes(ws / "data/prepared/cifar10.npz")
    patches = _npz_shapes(ws / "data/prepared/patches.npz")
    train, val = patches.get("train"), patches.get("val")
    text = f"{cifar['x_train'][0]:,} + {cifar['x_test'][0]:,} CIFAR-10 images" if "x_train" in cifar else ""
    if train:
        text += (", " if text else "") + f"{train[0]:,} codec patches of {train[1]} px" + (
            f" (+{val[0]:,} held out)" if val else "")
    return text


HEADLINES = {"download": download_line, "augment": augment_line, "train_classifier": classifier_line, "train_compressor": compressor_line,
             "evaluate": evaluate_line, "report": report_line}


def headline(stage: str, ws: Path) -> str:
    """The stage's one-line result from its outputs ('' when it has none, or they are missing)."""
    fn = HEADLINES.get(stage)
    try:
        return fn(ws) if fn else ""
    except Exception:  # noqa: BLE001 - the console's view never fails a finished run
        return ""


def codec_lines(ws: Path) -> list[str]:
    """The RNN codec against the classical codecs at ``RATE`` bpp, and its BD-rate against JPEG."""
    lines = []
    for name, label in VERSUS:
        text = rnn_versus(ws, name)
        if text:
            lines.append(f"  vs {label:<10} {text}")
    if lines:
        lines.insert(0, f"RNN codec, MS-SSIM at {RATE} bpp, RNN minus codec per image (mean [95 % CI]):")
    bd = rnn_bd_rate(ws)
    if bd:
        lines.append(f"RNN codec BD-rate vs JPEG (MS-SSIM dB): {bd}")
    return lines
