"""Bjontegaard deltas (VCEG-M33, with the piecewise-cubic variant of VCEG-AL22 / JVET-K0054).

A rate-distortion curve is a set of (rate, quality) points. Rates enter as log10(rate).

- BD-rate: the average relative difference in rate at equal quality, in percent: the test codec
  needs ``BD-rate`` % more bits than the anchor (negative: it saves bits).
- BD-quality (BD-PSNR, BD-MS-SSIM-dB): the average quality difference at equal rate, in the
  quality's unit (positive: the test codec is better).

Both integrate over the overlap of the two curves only; without overlap the delta is NaN.
``method="polyfit"`` fits a cubic polynomial (Bjontegaard's original); ``"pchip"`` interpolates a
monotone piecewise cubic through the points (robust with many points or noisy curves).
"""

from __future__ import annotations

import numpy as np


def _prepare(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by x, drop non-finite points, average duplicate x values."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    ux, inv = np.unique(x, return_inverse=True)
    uy = np.bincount(inv, weights=y) / np.bincount(inv)
    return ux, uy


def _integral(x: np.ndarray, y: np.ndarray, lo: float, hi: float, method: str) -> float:
    """Integral over [lo, hi] of the curve y(x) fitted through the points."""
    if method == "polyfit":
        deg = min(3, len(x) - 1)
        poly = np.polyint(np.polyfit(x, y, deg))
        return float(np.polyval(poly, hi) - np.polyval(poly, lo))
    if method == "pchip":
        from scipy.interpolate import PchipInterpolator

        return float(PchipInterpolator(x, y).integrate(lo, hi))
    raise ValueError(f"unknown BD method {method!r} (pchip or polyfit)")


def _delta(x1, y1, x2, y2, method: str) -> float:
    """Mean of (curve 2 - curve 1) over the overlap of x; NaN without overlap."""
    x1, y1 = _prepare(x1, y1)
    x2, y2 = _prepare(x2, y2)
    if len(x1) < 2 or len(x2) < 2:
        return float("nan")
    lo, hi = max(x1.min(), x2.min()), min(x1.max(), x2.max())
    if not hi > lo:
        return float("nan")
    a1 = _integral(x1, y1, lo, hi, method)
    a2 = _integral(x2, y2, lo, hi, method)
    return (a2 - a1) / (hi - lo)


def truncate(rate, quality, max_rate: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The curve's points at rates up to ``max_rate``, ending on a point at ``max_rate`` itself (linear in
    log-rate between its neighbours) when the curve goes past it: curves of different lengths then
    compare over the same rates. ``None``: the whole curve."""
    if max_rate is None:
        return np.asarray(rate, dtype=np.float64), np.asarray(quality, dtype=np.float64)
    r, q = _prepare(np.asarray(rate, dtype=np.float64), quality)
    if len(r) == 0 or r[-1] <= max_rate:
        return r, q
    keep = r <= max_rate
    if not keep.any():
        return r[:0], q[:0]
    end = np.interp(np.log10(max_rate), np.log10(r), q)
    return np.append(r[keep], max_rate), np.append(q[keep], end)


def bd_rate(rate_anchor, quality_anchor, rate_test, quality_test, method: str = "pchip",
            max_rate: float | None = None) -> float:
    """Average rate difference of ``test`` against ``anchor`` at equal quality, in percent (over rates up to
    ``max_rate`` only, when given)."""
    ra, qa = truncate(rate_anchor, quality_anchor, max_rate)
    rt, qt = truncate(rate_test, quality_test, max_rate)
    avg = _delta(qa, np.log10(ra), qt, np.log10(rt), method)
    return float((10.0**avg - 1.0) * 100.0) if np.isfinite(avg) else float("nan")


def bd_quality(rate_anchor, quality_anchor, rate_test, quality_test, method: str = "pchip",
               max_rate: float | None = None) -> float:
    """Average quality difference of ``test`` against ``anchor`` at equal rate (quality's unit; over rates up
    to ``max_rate`` only, when given)."""
    ra, qa = truncate(rate_anchor, quality_anchor, max_rate)
    rt, qt = truncate(rate_test, quality_test, max_rate)
    return float(_delta(np.log10(ra), qa, np.log10(rt), qt, method))


def interpolate(rate, quality, at, slack: float = 0.0, method: str = "pchip") -> np.ndarray:
    """Quality at the rates ``at``, interpolated in log10(rate); NaN outside the curve (no extrapolation).

    ``method="pchip"``: the monotone piecewise cubic (Fritsch-Carlson, scipy's PchipInterpolator): it
    passes through every point, never overshoots them, and keeps a monotone curve monotone;
    ``"linear"``: straight lines in log-rate. Duplicate rates are averaged, non-finite points dropped.
    A rate at most ``slack`` (relative, e.g. 0.02 = 2 %) beyond an end of the curve takes the end's
    value (0 = strictly no extrapolation).
    """
    x, y = _prepare(np.log10(np.asarray(rate, dtype=np.float64)), quality)
    at = np.log10(np.atleast_1d(np.asarray(at, dtype=np.float64)))
    if len(x) == 0:
        return np.full(at.shape, np.nan)
    tol = np.log10(1.0 + slack) + 1e-12
    if len(x) == 1:
        return np.where(np.abs(at - x[0]) <= tol, y[0], np.nan)
    inside = np.clip(at, x[0], x[-1])
    if method == "pchip":
        from scipy.interpolate import PchipInterpolator

        out = PchipInterpolator(x, y, extrapolate=False)(inside)
    elif method == "linear":
        out = np.interp(inside, x, y)
    else:
        raise ValueError(f"unknown interpolation {method!r} (pchip or linear)")
    out = np.asarray(out, dtype=np.float64)
    out[(at < x[0] - tol) | (at > x[-1] + tol)] = np.nan
    return out
