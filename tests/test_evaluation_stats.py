"""Per-image rate interpolation, bootstrap intervals, verdicts and per-image BD-rates, against values
worked out by hand (or by an independent implementation)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation import stats
from pipeline.evaluation.bdrate import bd_rate, interpolate


def hermite(t: float, y0: float, y1: float, d0: float, d1: float, h: float) -> float:
    """The cubic Hermite segment, written out: what PCHIP evaluates between two knots."""
    return ((2 * t**3 - 3 * t**2 + 1) * y0 + (t**3 - 2 * t**2 + t) * h * d0
            + (-2 * t**3 + 3 * t**2) * y1 + (t**3 - t**2) * h * d1)


# Image A: three points at log10(bpp) = -1, -0.5, 0 (bpp 0.1, 0.3162, 1.0), MS-SSIM 0.80, 0.92, 0.98.
# Secant slopes 0.24 and 0.12 per decade/2 -> PCHIP (Fritsch-Carlson, as scipy) slopes by hand:
#   interior: harmonic mean (equal spacing) 2 / (1/0.24 + 1/0.12) = 0.16
#   ends (three-point, shape-preserving): ((2h+h)0.24 - h 0.12) / 2h = 0.30 and ((2h+h)0.12 - h 0.24) / 2h = 0.06
# Image B: two points (0.2, 0.85), (0.8, 0.95): straight in log-bpp; it does not reach 0.125 nor 1.0 bpp.
A = {"bpp": [0.1, 10 ** -0.5, 1.0], "q": [0.80, 0.92, 0.98]}
B = {"bpp": [0.2, 0.8], "q": [0.85, 0.95]}
RATES = [0.125, 0.25, 0.5, 1.0]


def by_hand_a(rate: float) -> float:
    x = math.log10(rate)
    if x <= -0.5:
        return hermite((x + 1) / 0.5, 0.80, 0.92, 0.30, 0.16, 0.5)
    return hermite((x + 0.5) / 0.5, 0.92, 0.98, 0.16, 0.06, 0.5)


def by_hand_b(rate: float) -> float:
    if not 0.2 <= rate <= 0.8:
        return float("nan")
    return 0.85 + 0.10 * math.log(rate / 0.2) / math.log(4)


def test_hand_values_are_what_we_think():
    # anchors of the hand computation (t = 0.19382, 0.79588, 0.39794 on their segments)
    assert by_hand_a(0.125) == pytest.approx(0.8282, abs=1e-4)
    assert by_hand_a(0.25) == pytest.approx(0.9017, abs=1e-4)
    assert by_hand_a(0.5) == pytest.approx(0.9496, abs=1e-4)
    assert by_hand_a(1.0) == 0.98 and by_hand_b(0.25) == pytest.approx(0.866096, abs=1e-6)


def rows():
    out = []
    for image, curve in (("kodimA", A), ("kodimB", B)):
        for i, (r, q) in enumerate(zip(curve["bpp"], curve["q"])):
            out.append({"codec": "x", "image": image, "bpp": r, "ms_ssim": q, "ms_ssim_db": q, "psnr": 30 + q,
                        "ssim": q})
    return out


def test_per_image_interpolation_matches_hand_values_and_counts_missing():
    curves = stats.image_curves(rows())
    each = stats.per_image_at(curves, RATES, ["ms_ssim"])
    got = {(p["image"], p["bpp"]): p["ms_ssim"] for p in each}
    for rate in RATES:
        assert got[("kodimA", rate)] == pytest.approx(by_hand_a(rate), abs=1e-12)
        if math.isnan(by_hand_b(rate)):
            assert math.isnan(got[("kodimB", rate)])  # no extrapolation
        else:
            assert got[("kodimB", rate)] == pytest.approx(by_hand_b(rate), abs=1e-12)
    table = stats.at_rates_per_image(each, ["x"], RATES, ["ms_ssim"], {"x": 2}, n_boot=200, seed=0, min_images=2)
    cells = {r["bpp"]: r for r in table}
    assert (cells[0.125]["images"], cells[0.125]["missing"]) == (1, 1)
    assert cells[0.125]["ms_ssim"] == pytest.approx(by_hand_a(0.125))
    assert math.isnan(cells[0.125]["ms_ssim_lo"])  # one image: no interval
    assert (cells[0.25]["images"], cells[0.25]["missing"]) == (2, 0)
    assert cells[0.25]["ms_ssim"] == pytest.approx((by_hand_a(0.25) + by_hand_b(0.25)) / 2)
    lo, hi = cells[0.25]["ms_ssim_lo"], cells[0.25]["ms_ssim_hi"]
    assert min(by_hand_a(0.25), by_hand_b(0.25)) <= lo <= hi <= max(by_hand_a(0.25), by_hand_b(0.25))
    assert (cells[1.0]["images"], cells[1.0]["missing"]) == (1, 1)


def test_interpolation_is_monotone_and_never_overshoots():
    # a curve with a flat stretch: PCHIP stays within the data, a cubic spline would overshoot
    bpp, q = [0.1, 0.2, 0.4, 0.8, 1.6], [0.5, 0.9, 0.9, 0.91, 0.99]
    dense = np.exp(np.linspace(math.log(0.1), math.log(1.6), 400))
    y = interpolate(bpp, q, dense)
    assert np.all(np.diff(y) >= -1e-12) and y.max() <= 0.99 + 1e-12
    assert np.all(y[(dense >= 0.2) & (dense <= 0.4)] == pytest.approx(0.9))


def test_bootstrap_interval_agrees_with_scipy():
    from scipy.stats import bootstrap

    x = np.random.default_rng(1).normal(0.3, 1.0, 40)
    lo, hi = stats.bootstrap_ci(x, n_boot=20000, seed=2)
    ref = bootstrap((x,), np.mean, n_resamples=20000, method="percentile", random_state=3).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.03) and hi == pytest.approx(ref.high, abs=0.03)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)  # normal theory, for scale
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert stats.bootstrap_ci([0.5] * 7) == (0.5, 0.5)


def test_verdicts_follow_the_interval():
    assert stats.verdict(0.01, 0.2, 10, 3) == "confirmed"
    assert stats.verdict(-0.2, -0.01, 10, 3) == "refuted"
    assert stats.verdict(-0.01, 0.2, 10, 3) == "not shown"
    assert stats.verdict(0.01, 0.2, 2, 3) == "not shown"  # too few images


def test_pairwise_counts_wins_and_pairs_only_shared_images():
    pts = []
    for i in range(6):
        pts.append({"codec": "a", "image": f"i{i}", "bpp": 0.25, "ms_ssim": 0.9 + 0.001 * i})
        pts.append({"codec": "b", "image": f"i{i}", "bpp": 0.25, "ms_ssim": 0.85 + 0.002 * i})
    pts.append({"codec": "a", "image": "only_a", "bpp": 0.25, "ms_ssim": 0.1})  # b has no such image
    pts.append({"codec": "b", "image": "i9", "bpp": 0.25, "ms_ssim": float("nan")})
    (row,) = stats.pairwise(pts, ["a", "b"], [0.25], ["ms_ssim"], n_boot=500, seed=0, min_images=3)
    diffs = [0.05 - 0.001 * i for i in range(6)]
    assert row["images"] == 6 and (row["a_wins"], row["b_wins"]) == (6, 0)
    assert row["mean_diff"] == pytest.approx(np.mean(diffs))
    assert min(diffs) <= row["lo"] <= row["hi"] <= max(diffs)
    assert row["better"] == "a"


def test_bd_rate_per_image_and_its_median():
    anchor_r, q = np.array([0.1, 0.2, 0.4, 0.8]), np.array([30.0, 33.0, 36.0, 39.0])
    rows_ = []
    for image, factor in (("i1", 0.8), ("i2", 1.25), ("i3", 1.0)):
        for r, qq in zip(anchor_r, q):
            rows_.append({"codec": "jpeg", "image": image, "bpp": r, "ms_ssim": 0.9, "ms_ssim_db": qq, "psnr": qq,
                          "ssim": 0.9})
            rows_.append({"codec": "new", "image": image, "bpp": r * factor, "ms_ssim": 0.9, "ms_ssim_db": qq,
                          "psnr": qq, "ssim": 0.9})
    curves = stats.image_curves(rows_)
    per = stats.bd_per_image(curves, "jpeg", "new", "psnr", "pchip")
    assert per["i1"][0] == pytest.approx(-20.0) and per["i2"][0] == pytest.approx(25.0)
    assert per["i3"][0] == pytest.approx(0.0, abs=1e-9)
    s = stats.summarise([v[0] for v in per.values()], n_boot=500, seed=0, min_images=3, stat=np.median)
    assert s["value"] == pytest.approx(0.0, abs=1e-9) and (s["wins"], s["losses"]) == (1, 1)
    assert per["i1"][0] == pytest.approx(bd_rate(anchor_r, q, anchor_r * 0.8, q))


def test_range_difference_uses_only_rates_both_reach():
    rows_ = []
    for codec, bpps, qs in (("rnn", [0.1, 0.4], [0.9, 0.95]), ("jpeg", [0.2, 0.8], [0.8, 0.9])):
        for r, q in zip(bpps, qs):
            rows_.append({"codec": codec, "image": "i", "bpp": r, "ms_ssim": q, "ms_ssim_db": q, "psnr": q, "ssim": q})
    diff = stats.range_difference(stats.image_curves(rows_), "rnn", "jpeg", "ms_ssim", 0.05, 0.4, 33)
    grid = np.exp(np.linspace(math.log(0.05), math.log(0.4), 33))
    both = grid[(grid >= 0.2) & (grid <= 0.4 + 1e-12)]
    rnn = 0.9 + 0.05 * np.log(both / 0.1) / math.log(4)
    jpeg = 0.8 + 0.1 * np.log(both / 0.2) / math.log(4)
    assert diff["i"] == pytest.approx(float(np.mean(rnn - jpeg)))
