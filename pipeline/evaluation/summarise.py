"""The evaluation's tables from its measurements: curves averaged over images per setting, quality at the
rates on those curves (the secondary convention), Bjontegaard deltas (per image, the primary table, and on the
averaged curves) and what ``metrics.json`` holds. The per-image statistics themselves are ``stats``."""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from pipeline.evaluation import bdrate, stats
from pipeline.records import QUALITIES, CurvePoint, Measurement, by_codec

BD_METRICS = ("ms_ssim_db", "psnr")  # Bjontegaard deltas are taken on these (dB scales)


def average_curves(rows: Iterable[Measurement]) -> list[CurvePoint]:
    """One point per (codec, setting): the mean over images of bpp, qualities and times."""
    groups: dict[tuple[str, float], list[Measurement]] = {}
    order: list[tuple[str, float]] = []
    for r in rows:
        key = (r.codec, r.setting)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(r)
    curves = []
    for codec, setting in order:
        g = groups[(codec, setting)]
        means = {field: float(np.mean([getattr(r, field) for r in g]))
                 for field in ("bpp", *QUALITIES, "encode_s", "decode_s")}
        curves.append(CurvePoint(codec=codec, setting_name=g[0].setting_name, setting=setting, images=len(g), **means))
    curves.sort(key=lambda p: (p.codec, p.bpp))
    return curves


def at_rates(curves: list[CurvePoint], rates: list[float], slack: float = 0.0) -> list[dict[str, Any]]:
    """Secondary convention: each codec's image-averaged curve interpolated at ``rates`` (PCHIP in
    log-bpp, as the primary table); NaN outside its range."""
    out = []
    for codec, pts in by_codec(curves).items():
        x = [p.bpp for p in pts]
        values = {q: bdrate.interpolate(x, [getattr(p, q) for p in pts], rates, slack) for q in QUALITIES}
        for i, rate in enumerate(rates):
            out.append({"codec": codec, "bpp": rate, **{q: float(values[q][i]) for q in QUALITIES}})
    return out


def bd_pairs(names: list[str], anchor: str, ours: str = "rnn") -> list[tuple[str, str]]:
    """(anchor, test): every codec against ``anchor``, and ``ours`` against every codec."""
    pairs = [(anchor, n) for n in names if n != anchor and anchor in names]
    if ours in names:
        pairs += [(n, ours) for n in names if n != ours and (n, ours) not in pairs]
    return pairs


def bd_table(curves: list[CurvePoint], anchor: str, method: str, max_rate: float | None = None) -> list[dict[str, Any]]:
    """Secondary: BD deltas between the image-averaged curves (over rates up to ``max_rate`` when given)."""
    per = by_codec(curves)
    rows = []
    for a, t in bd_pairs(list(per), anchor):
        for metric in BD_METRICS:
            ra, qa = [p.bpp for p in per[a]], [getattr(p, metric) for p in per[a]]
            rt, qt = [p.bpp for p in per[t]], [getattr(p, metric) for p in per[t]]
            rows.append({"anchor": a, "test": t, "metric": metric, "method": method,
                         "bd_rate_pct": bdrate.bd_rate(ra, qa, rt, qt, method, max_rate),
                         "bd_quality_db": bdrate.bd_quality(ra, qa, rt, qt, method, max_rate)})
    return rows


def bd_per_image_table(img_curves, names: list[str], anchor: str, method: str, averaged: list[dict[str, Any]], *,
                       n_boot: int, seed: int, min_images: int, max_rate: float | None = None
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Primary BD table: per pair and metric, the per-image BD-rates' median with a bootstrap 95 %
    interval of the median, how many images have one (curves overlap), on how many the test codec
    saves bits; beside it the BD-rate of the image-averaged curves. Also every per-image value."""
    avg = {(r["anchor"], r["test"], r["metric"]): r for r in averaged}
    rows, each = [], []
    for a, t in bd_pairs(names, anchor):
        for metric in BD_METRICS:
            per = stats.bd_per_image(img_curves, a, t, metric, method, max_rate)
            for im, (rate, qual) in per.items():
                each.append({"anchor": a, "test": t, "metric": metric, "image": im, "bd_rate_pct": rate,
                             "bd_quality_db": qual})
            r = stats.summarise([v[0] for v in per.values()], n_boot=n_boot, seed=seed, min_images=min_images,
                                stat=np.median)
            qual = [v[1] for v in per.values()]
            qual = [v for v in qual if math.isfinite(v)]
            old = avg.get((a, t, metric), {})
            rows.append({"anchor": a, "test": t, "metric": metric, "method": method, "images": r["n"],
                         "of_images": len(per), "bd_rate_pct": r["value"], "bd_rate_lo": r["lo"],
                         "bd_rate_hi": r["hi"], "test_saves": r["losses"],
                         "bd_quality_db": float(np.median(qual)) if qual else float("nan"),
                         "bd_rate_avg_curve_pct": old.get("bd_rate_pct", float("nan")),
                         "bd_quality_avg_curve_db": old.get("bd_quality_db", float("nan"))})
    return rows, each


def _num(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def rate_key(rate: float) -> str:
    return f"bpp_{rate:g}"


def metrics_json(points: list[dict[str, Any]], bd: list[dict[str, Any]], anchor: str, n_images: int,
                 duration_s: float, averaged: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What ``dvc metrics show`` lists: qualities at the fixed rates per codec (per-image convention,
    with the number of images per cell), the median per-image BD-rates, and the secondary
    (average-per-setting) MS-SSIM at the rates."""
    out: dict[str, Any] = {"images": n_images, "duration_s": round(duration_s, 2)}
    for q in ("ms_ssim", "ms_ssim_db", "psnr"):
        out[q] = {}
        for p in points:
            out[q].setdefault(p["codec"], {})[rate_key(p["bpp"])] = _num(p[q])
    out["images_at_rate"] = {}
    for p in points:
        if "images" in p:
            out["images_at_rate"].setdefault(p["codec"], {})[rate_key(p["bpp"])] = int(p["images"])
    if averaged is not None:
        out["ms_ssim_avg_setting"] = {}
        for p in averaged:
            out["ms_ssim_avg_setting"].setdefault(p["codec"], {})[rate_key(p["bpp"])] = _num(p["ms_ssim"])
    out[f"bd_rate_vs_{anchor}"] = {r["test"]: {} for r in bd if r["anchor"] == anchor}
    out["bd_rate_rnn_vs"] = {r["anchor"]: {} for r in bd if r["test"] == "rnn"}
    for r in bd:
        if r["anchor"] == anchor:
            out[f"bd_rate_vs_{anchor}"][r["test"]][r["metric"]] = _num(r["bd_rate_pct"])
        if r["test"] == "rnn":
            out["bd_rate_rnn_vs"][r["anchor"]][r["metric"]] = _num(r["bd_rate_pct"])
    return out
