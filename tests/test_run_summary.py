"""The console summary of a run (pipeline/report/summary.py) reads the stages' outputs right."""

from __future__ import annotations

import json
import math

import numpy as np

from pipeline.records import BDRate, Pairwise, write_table
from pipeline.report import summary


def _pair(a: str, b: str, bpp: float, diff: float, a_wins: int, b_wins: int, n: int = 24) -> Pairwise:
    return Pairwise(a=a, b=b, bpp=bpp, metric="ms_ssim", images=n, a_wins=a_wins, b_wins=b_wins, mean_diff=diff,
                    lo=diff - 0.004, hi=diff + 0.004, better=a if diff > 0 else b)


def test_codec_lines_orient_every_pair_as_rnn_minus_codec(tmp_path):
    ev = tmp_path / "data/evaluation"
    ev.mkdir(parents=True)
    write_table(ev / "pairwise.csv", [
        _pair("rnn", "jpeg", 0.25, 0.026, 24, 0),
        _pair("jpeg2000", "rnn", 0.25, 0.009, 19, 5),  # written the other way round: the summary flips it
        _pair("rnn", "webp", 0.5, -0.010, 0, 24),  # another rate: not the summary's
        Pairwise("rnn", "webp", 0.25, "ms_ssim", 0, 0, 0, math.nan, math.nan, math.nan, "not shown")])
    write_table(ev / "bd.csv", [BDRate("jpeg", "rnn", "ms_ssim_db", "pchip", 24, 24, -21.1, -24.8, -16.2, 23, 0.5,
                                       -20.0, 0.4)])
    text = "\n".join(summary.codec_lines(tmp_path))
    assert "vs JPEG       +0.026 [+0.022, +0.030], better on 24/24 images" in text
    assert "vs JPEG 2000  -0.009 [-0.013, -0.005], better on 5/24 images" in text
    assert "vs WebP       no image reaches 0.25 bpp" in text
    assert "BD-rate vs JPEG (MS-SSIM dB): -21.1 % [-24.8, -16.2] (median per image, 24 images)" in text
    assert summary.headline("evaluate", tmp_path) == (
        "RNN - JPEG MS-SSIM @0.25 bpp +0.026 [+0.022, +0.030]; BD-rate vs JPEG -21.1 % [-24.8, -16.2]")


def test_headlines_from_outputs_and_nothing_from_missing_ones(tmp_path):
    assert all(summary.headline(stage, tmp_path) == "" for stage in
               ("download", "augment", "train_classifier", "train_compressor", "evaluate", "report"))
    (tmp_path / "data/classifier").mkdir(parents=True)
    (tmp_path / "data/classifier/metrics.json").write_text(json.dumps(
        {"test_acc": 0.9227, "test_acc_no_tta": 0.9188, "tta": 1, "test_size": 10000, "train_time_s": 534.0}))
    assert summary.headline("train_classifier", tmp_path) == (
        "test accuracy 92.27 % [91.73, 92.78] with TTA, 91.88 % without; 8m54s of training")
    prepared = tmp_path / "data/prepared"
    prepared.mkdir(parents=True)
    np.savez(prepared / "cifar10.npz", x_train=np.zeros((5, 2), np.uint8), x_test=np.zeros((3, 2), np.uint8))
    np.savez(prepared / "patches.npz", train=np.zeros((7, 64, 64, 3), np.uint8), val=np.zeros((2, 64, 64, 3), np.uint8))
    assert summary.headline("augment", tmp_path) == "5 + 3 CIFAR-10 images, 7 codec patches of 64 px (+2 held out)"
    assert summary.duration(534) == "8m54s" and summary.duration(4000) == "1h06m" and summary.duration(2.04) == "2.0s"
