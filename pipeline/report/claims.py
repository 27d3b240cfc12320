"""The coursework's claims, each checked against our numbers: a verdict from a 95 % interval (bootstrap over
images for the codec claims, Wilson for the test accuracy): "confirmed" when the interval lies on the claimed
side, "refuted" when it lies on the other side, "not shown" otherwise (see ``pipeline.evaluation.stats``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.evaluation import stats
from pipeline.evaluation.stats import wilson
from pipeline.records import Measurement
from pipeline.report.formatting import finite, fmt
from pipeline.report.inputs import Inputs

CIFAR10_TEST_SIZE = 10000  # the test set the accuracy is measured on, when metrics.json does not say


@dataclass
class Claim:
    claim: str  # the coursework's statement
    metric: str  # what we compare
    evidence: str  # our numbers
    verdict: str  # confirmed / refuted / not shown / not checked


def _interval(s: dict[str, Any], digits: int = 4, pct: bool = False) -> str:
    if not finite(s["lo"]):
        return "no interval (too few images)"
    return f"95% CI [{fmt(s['lo'], digits, pct, True)}, {fmt(s['hi'], digits, pct, True)}]"


def compare_below(per_image: list[Measurement], ours: str, other: str, quality: str, below: float, n: int,
                  boot: dict[str, int], lowest: float = 0.03) -> tuple[str, str]:
    """Is ``ours`` above ``other`` in ``quality`` below ``below`` bpp? Per image: the mean difference over
    a log-spaced grid of ``n`` rates in [lowest, below] that both of its curves reach; then the mean over
    images with a bootstrap interval and the number of images where ``ours`` is ahead."""
    curves = stats.image_curves(per_image)
    have = {c for c, _ in curves}
    if ours not in have or other not in have:
        return f"no {ours if ours not in have else other} curve", "not checked"
    hi = below if math.isfinite(below) else max(r.bpp for r in per_image)
    diffs = stats.range_difference(curves, ours, other, quality, lowest, hi, n)
    if not diffs:
        return f"no image where both curves reach a rate in {lowest:g}-{hi:g} bpp", "not checked"
    s = stats.summarise(list(diffs.values()), **boot)
    span = f"below {below:g} bpp" if math.isfinite(below) else "over the rates both reach"
    text = (f"per image, mean {quality} difference {ours} - {other} {span} (on the rates both of its curves reach): "
            f"{s['n']} image(s), {ours} ahead on {s['wins']}; mean {fmt(s['value'], 4, signed=True)}, {_interval(s)}")
    return text, s["verdict"]


def check_claims(inputs: Inputs, rp) -> list[Claim]:
    claims = []
    boot = inputs.summary.boot()
    claim_acc = f"The CNN reaches {rp.claim_accuracy:.0%} test accuracy on CIFAR-10"
    if inputs.classifier is None:
        claims.append(Claim(claim_acc, "test accuracy", "no classifier metrics", "not checked"))
    else:
        value = inputs.classifier.test_acc
        n = inputs.classifier.test_size or CIFAR10_TEST_SIZE
        lo, hi = wilson(value, n)
        verdict = "confirmed" if lo >= rp.claim_accuracy else ("refuted" if hi < rp.claim_accuracy else "not shown")
        claims.append(Claim(claim_acc, "test accuracy (Wilson 95% interval over the test images)",
                            f"{value:.2%} (test_acc in data/classifier/metrics.json, profile "
                            f"{inputs.summary.profile}); 95% CI [{lo:.2%}, {hi:.2%}] on {n} images"
                            + ("" if inputs.classifier.test_size else " (assumed: metrics.json has no test_size)"),
                            verdict))
    if inputs.long_run is not None or inputs.long_run_missing:
        from pipeline.report.longrun import claim_text

        claims.append(Claim(f"{claim_acc}, on the coursework's own recipe (plain CNN, 300 epochs)",
                            *claim_text(inputs.long_run, inputs.long_run_missing, rp.claim_accuracy)))
    for quality, name in (("ms_ssim", "MS-SSIM (5-scale), per image"),
                          ("ssim", "single-scale SSIM (what the coursework called MS-SSIM), per image")):
        text, verdict = compare_below(inputs.per_image, "rnn", "jpeg", quality, rp.claim_jpeg_below_bpp,
                                      rp.claim_grid, boot)
        claims.append(Claim(f"The RNN codec is better than JPEG below {rp.claim_jpeg_below_bpp:g} bpp", name,
                            text, verdict))
    bd = {(r.anchor, r.test, r.metric): r for r in inputs.bd}
    labels = inputs.summary.labels
    for other in rp.claim_behind:
        label = labels.get(other, other)
        row = bd.get((other, "rnn", "ms_ssim_db"))
        if row is not None and finite(row.bd_rate_pct) and row.images >= boot["min_images"]:
            lo, hi = row.bd_rate_lo, row.bd_rate_hi
            verdict = stats.verdict(lo, hi, row.images, boot["min_images"])
            text = (f"per-image BD-rate of the RNN against {label} on MS-SSIM dB: median "
                    f"{fmt(row.bd_rate_pct, 1, True, True)}, 95% CI [{fmt(lo, 1, True, True)}, "
                    f"{fmt(hi, 1, True, True)}] over {row.images} of {row.of_images} images "
                    f"(the others: curves do not overlap); the RNN saves bits on {row.test_saves}; "
                    f"on the image-averaged curves {fmt(row.bd_rate_avg_curve_pct, 1, True, True)}")
            claims.append(Claim(f"The RNN codec is behind {label}", "BD-rate per image, MS-SSIM dB", text, verdict))
            continue
        text, verdict = compare_below(inputs.per_image, other, "rnn", "ms_ssim", float("inf"), rp.claim_grid, boot)
        if verdict != "not checked":
            text = f"too few per-image BD-rates (curves barely overlap); instead, {text}"
        claims.append(Claim(f"The RNN codec is behind {label}", "MS-SSIM on the rates both reach, per image",
                            text, verdict))
    return claims
