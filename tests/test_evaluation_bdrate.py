"""Bjontegaard deltas on curves whose answer is known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation.bdrate import bd_quality, bd_rate, interpolate, truncate

RATES = np.array([0.1, 0.2, 0.35, 0.6, 1.0, 1.7])
QUALITY = 30 + 6 * np.log2(RATES) - 0.4 * np.log2(RATES) ** 2  # a concave, PSNR-like curve


@pytest.mark.parametrize("method", ["pchip", "polyfit"])
@pytest.mark.parametrize("factor", [0.8, 1.25, 0.5])
def test_constant_rate_factor_gives_that_bd_rate(method, factor):
    # the test codec needs `factor` times the anchor's bits for every quality
    got = bd_rate(RATES, QUALITY, RATES * factor, QUALITY, method)
    assert got == pytest.approx((factor - 1) * 100, abs=1e-9)


@pytest.mark.parametrize("method", ["pchip", "polyfit"])
def test_constant_quality_offset_gives_that_bd_quality(method):
    assert bd_quality(RATES, QUALITY, RATES, QUALITY + 1.5, method) == pytest.approx(1.5, abs=1e-9)
    assert bd_quality(RATES, QUALITY, RATES, QUALITY - 0.7, method) == pytest.approx(-0.7, abs=1e-9)


@pytest.mark.parametrize("method", ["pchip", "polyfit"])
def test_identical_curves_and_antisymmetry(method):
    assert bd_rate(RATES, QUALITY, RATES, QUALITY, method) == pytest.approx(0, abs=1e-12)
    up = bd_rate(RATES, QUALITY, RATES * 0.7, QUALITY, method)
    down = bd_rate(RATES * 0.7, QUALITY, RATES, QUALITY, method)
    assert (1 + up / 100) * (1 + down / 100) == pytest.approx(1.0)


def test_linear_curve_known_bd_quality_with_different_sampling():
    # quality linear in log10(rate): a shift of the rate by x2 is a quality shift of slope*log10(2)
    slope = 8.0
    r1 = np.array([0.1, 0.3, 0.9, 2.0])
    r2 = np.array([0.15, 0.4, 0.7, 1.1, 1.9])
    q1 = slope * np.log10(r1)
    q2 = slope * np.log10(r2 / 2)  # the test codec needs twice the bits
    assert bd_rate(r1, q1, r2, q2, "polyfit") == pytest.approx(100.0, abs=1e-6)
    assert bd_quality(r1, q1, r2, q2, "pchip") == pytest.approx(-slope * math.log10(2), abs=1e-6)


def test_no_overlap_is_nan():
    assert math.isnan(bd_rate([0.1, 0.2], [10, 11], [1, 2], [20, 21]))
    assert math.isnan(bd_quality([0.1, 0.2], [10, 11], [1, 2], [20, 21]))
    assert math.isnan(bd_rate([0.1], [10], [0.1, 0.2], [10, 11]))


def test_unsorted_and_nan_points_are_handled():
    order = np.array([3, 0, 5, 1, 4, 2])
    r = np.append(RATES[order], np.nan)
    q = np.append(QUALITY[order], 1.0)
    assert bd_rate(r, q, RATES * 0.9, QUALITY) == pytest.approx(-10.0, abs=1e-9)


def test_interpolate_in_log_rate_and_nan_outside():
    out = interpolate([0.1, 1.0], [10.0, 20.0], [0.1, math.sqrt(0.1), 1.0, 0.05, 2.0])
    assert out[:3] == pytest.approx([10.0, 15.0, 20.0])  # two points: PCHIP is a straight line
    assert np.isnan(out[3]) and np.isnan(out[4])


def test_interpolate_slack_reads_the_end_point_just_past_it():
    # an RNN curve starts at 0.1255 bpp (0.125 bpp of code plus the header)
    out = interpolate([0.1255, 0.25], [0.9, 0.95], [0.125, 0.12], slack=0.02)
    assert out[0] == pytest.approx(0.9) and np.isnan(out[1])


# ----------------------------------------------------------------------------- against a maintained implementation

# The example of the bjontegaard package's README (HHI / FAU's implementation of VCEG-M33 and of the
# JCT-VC CTC's PCHIP variant): x265 at four presets, rate in kbps and PSNR in dB.
RATE_ANCHOR = [9487.76, 4593.60, 2486.44, 1358.24]
PSNR_ANCHOR = [40.037, 38.615, 36.845, 34.851]
RATE_TEST = [9787.80, 4469.00, 2451.52, 1356.24]
PSNR_TEST = [40.121, 38.651, 36.970, 34.987]


@pytest.mark.parametrize("ours,theirs", [("pchip", "pchip"), ("polyfit", "cubic")])
def test_matches_the_bjontegaard_package_on_its_example(ours, theirs):
    import bjontegaard

    ref_rate = bjontegaard.bd_rate(RATE_ANCHOR, PSNR_ANCHOR, RATE_TEST, PSNR_TEST, method=theirs)
    ref_psnr = bjontegaard.bd_psnr(RATE_ANCHOR, PSNR_ANCHOR, RATE_TEST, PSNR_TEST, method=theirs)
    assert bd_rate(RATE_ANCHOR, PSNR_ANCHOR, RATE_TEST, PSNR_TEST, ours) == pytest.approx(ref_rate, abs=1e-9)
    assert bd_quality(RATE_ANCHOR, PSNR_ANCHOR, RATE_TEST, PSNR_TEST, ours) == pytest.approx(ref_psnr, abs=1e-9)
    # the test encoder is slightly better: a few percent fewer bits, a tenth of a dB more
    assert -5 < ref_rate < 0 and 0 < ref_psnr < 0.2


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_bjontegaard_package_on_random_curves(seed):
    import warnings

    import bjontegaard

    rng = np.random.default_rng(seed)
    r1 = np.sort(rng.uniform(0.05, 2.0, 6))
    r2 = np.sort(rng.uniform(0.05, 2.0, 5))
    q1 = np.sort(rng.uniform(25, 40, 6))
    q2 = np.sort(rng.uniform(25, 40, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package warns when the overlap is small
        ref = bjontegaard.bd_rate(r1, q1, r2, q2, method="pchip", require_matching_points=False, min_overlap=0)
        ref_q = bjontegaard.bd_psnr(r1, q1, r2, q2, method="pchip", require_matching_points=False, min_overlap=0)
    if math.isnan(ref):
        assert math.isnan(bd_rate(r1, q1, r2, q2, "pchip"))
    else:
        assert bd_rate(r1, q1, r2, q2, "pchip") == pytest.approx(ref, rel=1e-9, abs=1e-9)
        assert bd_quality(r1, q1, r2, q2, "pchip") == pytest.approx(ref_q, rel=1e-9, abs=1e-9)


def test_max_rate_compares_curves_over_the_same_rates():
    """A test codec 20 % cheaper below 0.5 bpp and 40 % dearer above: over the whole curves the BD-rate mixes
    both; cut at 0.5 bpp it is the low rates' -20 %, whatever either curve does past the cut."""
    rates = np.geomspace(0.1, 2.0, 12)
    quality = 30 + 6 * np.log2(rates)
    test_rates = np.where(rates < 0.5, rates * 0.8, rates * 1.4)
    whole = bd_rate(rates, quality, test_rates, quality)
    cut = bd_rate(rates, quality, test_rates, quality, max_rate=0.5)
    assert whole > 0 and cut == pytest.approx(-20.0, abs=1.5)
    # points past the cut change nothing; the curves end on an interpolated point at the cut itself
    assert bd_rate(rates[:9], quality[:9], test_rates[:9], quality[:9], max_rate=0.5) == pytest.approx(cut)
    r, q = truncate(rates, quality, 0.5)
    assert r[-1] == 0.5 and r[-2] < 0.5 and q[-1] == pytest.approx(30 + 6 * np.log2(0.5))
    assert bd_quality(rates, quality, rates, quality + 1, max_rate=0.5) == pytest.approx(1.0)
    # None: the whole curves, exactly as before; a cut below every point: no overlap
    assert bd_rate(rates, quality, test_rates, quality, max_rate=None) == whole
    assert math.isnan(bd_rate(rates, quality, test_rates, quality, max_rate=0.05))
