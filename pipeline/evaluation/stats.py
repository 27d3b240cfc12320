"""Quality at a rate measured per image, and bootstrap intervals over images.

Conventions (the report states them):

- **Per-image rate interpolation** (primary): each image's own (bpp, quality) points of one codec
  are interpolated at a rate with a monotone piecewise-cubic (PCHIP) in log10(bpp); no
  extrapolation: an image whose curve does not reach the rate is *missing* for that cell, and every
  cell says how many images it averages. This is "every image coded at 0.25 bpp".
- **Average per setting** (secondary, CompressAI's plots): mean bpp and mean quality over images for
  each codec setting, that averaged curve interpolated the same way.
- **Intervals**: percentile bootstrap over images (resampling images with replacement), 95 %,
  with a fixed seed. A comparison of two codecs is paired: only images where both are measured.
- **Verdicts**: "confirmed" when the interval of (claimed better - other) lies above zero,
  "refuted" when it lies below zero, "not shown" otherwise or with fewer than ``min_images`` images.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from pipeline.evaluation import bdrate

CONFIRMED, REFUTED, NOT_SHOWN = "confirmed", "refuted", "not shown"


def bootstrap_ci(values: Sequence[float], stat: Callable = np.mean, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over ``values`` (NaNs dropped); (nan, nan) if empty."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    stats = stat(x[idx], axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def verdict(lo: float, hi: float, n: int, min_images: int) -> str:
    """Direction of an interval of (claimed better - other)."""
    if n < min_images or not (np.isfinite(lo) and np.isfinite(hi)):
        return NOT_SHOWN
    if lo > 0:
        return CONFIRMED
    if hi < 0:
        return REFUTED
    return NOT_SHOWN


def summarise(values: Sequence[float], *, n_boot: int, seed: int, min_images: int,
              stat: Callable = np.mean) -> dict[str, Any]:
    """n, the statistic, its interval (only with at least ``min_images`` values), wins (> 0) and losses."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = int(x.size)
    value = float(stat(x)) if n else float("nan")
    lo, hi = bootstrap_ci(x, stat, n_boot, seed=seed) if n >= min_images else (float("nan"), float("nan"))
    return {"n": n, "value": value, "lo": lo, "hi": hi, "wins": int((x > 0).sum()), "losses": int((x < 0).sum()),
            "verdict": verdict(lo, hi, n, min_images)}


# ----------------------------------------------------------------------------- per-image curves

def image_curves(rows: Iterable[Any]) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """{(codec, image): {"bpp": [...], quality: [...]}} from per-image rows (objects or dicts)."""
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in rows:
        get = r.get if isinstance(r, dict) else (lambda k, _r=r: getattr(_r, k))
        key = (get("codec"), get("image"))
        d = out.setdefault(key, {})
        for f in ("bpp", "ms_ssim", "ms_ssim_db", "psnr", "ssim"):
            d.setdefault(f, []).append(float(get(f)))
    return {k: {f: np.asarray(v) for f, v in d.items()} for k, d in out.items()}


def per_image_at(curves: dict[tuple[str, str], dict[str, np.ndarray]], rates: Sequence[float],
                 qualities: Sequence[str], slack: float = 0.0) -> list[dict[str, Any]]:
    """Each image's curve of each codec interpolated at ``rates`` (NaN where it does not reach)."""
    out = []
    for (codec, image), c in curves.items():
        vals = {q: bdrate.interpolate(c["bpp"], c[q], rates, slack) for q in qualities}
        for i, rate in enumerate(rates):
            out.append({"codec": codec, "image": image, "bpp": float(rate), **{q: float(vals[q][i]) for q in qualities}})
    return out


def _index(points: list[dict[str, Any]]) -> dict[tuple[str, float], dict[str, dict[str, Any]]]:
    idx: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for p in points:
        idx.setdefault((p["codec"], float(p["bpp"])), {})[p["image"]] = p
    return idx


def at_rates_per_image(points: list[dict[str, Any]], codecs: Sequence[str], rates: Sequence[float],
                       qualities: Sequence[str], images_of: dict[str, int], *, n_boot: int, seed: int,
                       min_images: int) -> list[dict[str, Any]]:
    """The primary table: per codec and rate, the mean over the images that reach the rate, its
    95 % interval, how many images it averages and how many are missing."""
    idx = _index(points)
    out = []
    for codec in codecs:
        for rate in rates:
            cell = idx.get((codec, float(rate)), {})
            row: dict[str, Any] = {"codec": codec, "bpp": float(rate)}
            n = 0
            for q in qualities:
                s = summarise([p[q] for p in cell.values()], n_boot=n_boot, seed=seed, min_images=min_images)
                n = s["n"]
                row[q], row[f"{q}_lo"], row[f"{q}_hi"] = s["value"], s["lo"], s["hi"]
            row["images"] = n
            row["missing"] = images_of.get(codec, 0) - n
            out.append(row)
    return out


def pairwise(points: list[dict[str, Any]], codecs: Sequence[str], rates: Sequence[float],
             qualities: Sequence[str], *, n_boot: int, seed: int, min_images: int) -> list[dict[str, Any]]:
    """Every pair (a, b) of codecs at every rate: paired per-image differences a - b over the images
    where both reach the rate; wins of each, the mean difference and its interval, and which is better
    (only when the interval excludes zero)."""
    idx = _index(points)
    out = []
    for i, a in enumerate(codecs):
        for b in codecs[i + 1:]:
            for rate in rates:
                ca, cb = idx.get((a, float(rate)), {}), idx.get((b, float(rate)), {})
                for q in qualities:
                    common = sorted(im for im in set(ca) & set(cb)
                                    if np.isfinite(ca[im][q]) and np.isfinite(cb[im][q]))
                    d = [ca[im][q] - cb[im][q] for im in common]
                    s = summarise(d, n_boot=n_boot, seed=seed, min_images=min_images)
                    better = {CONFIRMED: a, REFUTED: b}.get(s["verdict"], NOT_SHOWN)
                    out.append({"a": a, "b": b, "bpp": float(rate), "metric": q, "images": s["n"],
                                "a_wins": s["wins"], "b_wins": s["losses"], "mean_diff": s["value"],
                                "lo": s["lo"], "hi": s["hi"], "better": better})
    return out


def range_difference(curves: dict[tuple[str, str], dict[str, np.ndarray]], a: str, b: str, quality: str,
                     lo: float, hi: float, n_grid: int) -> dict[str, float]:
    """Per image: the mean of (a - b) in ``quality`` over a log-spaced bpp grid on [lo, hi], using the
    grid points both of that image's curves reach ({image: mean difference}; images where they share
    no grid point are left out)."""
    grid = np.exp(np.linspace(np.log(lo), np.log(hi), n_grid))
    out = {}
    images = sorted({im for c, im in curves if c == a} & {im for c, im in curves if c == b})
    for im in images:
        ca, cb = curves[(a, im)], curves[(b, im)]
        d = (bdrate.interpolate(ca["bpp"], ca[quality], grid) - bdrate.interpolate(cb["bpp"], cb[quality], grid))
        d = d[np.isfinite(d)]
        if d.size:
            out[im] = float(d.mean())
    return out


def bd_per_image(curves: dict[tuple[str, str], dict[str, np.ndarray]], anchor: str, test: str, metric: str,
                 method: str, max_rate: float | None = None) -> dict[str, tuple[float, float]]:
    """{image: (BD-rate %, BD-quality)} of ``test`` against ``anchor`` on each image's own curves, over rates up
    to ``max_rate`` when given (NaN where the two curves of that image do not overlap there)."""
    out = {}
    images = sorted({im for c, im in curves if c == anchor} & {im for c, im in curves if c == test})
    for im in images:
        ca, ct = curves[(anchor, im)], curves[(test, im)]
        out[im] = (bdrate.bd_rate(ca["bpp"], ca[metric], ct["bpp"], ct[metric], method, max_rate),
                   bdrate.bd_quality(ca["bpp"], ca[metric], ct["bpp"], ct[metric], method, max_rate))
    return out


def wilson(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion ``p`` measured on ``n`` trials."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half
