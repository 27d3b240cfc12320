"""The evaluation's figures: quality against bpp per codec, at equal rate (primary convention: the mean of
each image's interpolated curve, with the rates' intervals) and averaged per setting (secondary)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.evaluation import bdrate
from pipeline.evaluation.codecs import color
from pipeline.records import CurvePoint, by_codec

LABELS = {"ms_ssim": "MS-SSIM", "ms_ssim_db": "MS-SSIM (dB)", "psnr": "PSNR (dB)", "ssim": "SSIM (single-scale)"}
FIGURES = {"ms_ssim": "ms_ssim_vs_bpp.png", "ms_ssim_db": "ms_ssim_db_vs_bpp.png",
           "psnr": "psnr_vs_bpp.png", "ssim": "ssim_vs_bpp.png"}  # secondary: averaged per setting
AT_RATE_FIGURES = {"ms_ssim": "ms_ssim_at_rate.png", "psnr": "psnr_at_rate.png"}  # primary


def _axes(title: str, quality: str, max_bpp: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    ax.set_xlim(0, max_bpp)
    ax.set_xlabel("bits per pixel (bpp, from file size)")
    ax.set_ylabel(LABELS[quality])
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig, ax, plt


def _save(fig, plt, ax, path: Path) -> None:
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_curves(curves: list[CurvePoint], quality: str, path: Path, labels: dict[str, str],
                max_bpp: float, title: str | None = None) -> None:
    """Secondary convention: one point per setting, bpp and quality averaged over images."""
    fig, ax, plt = _axes(title or f"{LABELS[quality]} vs bpp: mean over images per setting (secondary)",
                         quality, max_bpp)
    for codec, pts in by_codec(curves).items():
        ax.plot([p.bpp for p in pts], [getattr(p, quality) for p in pts], marker="o", ms=3.5,
                lw=2.2 if codec == "rnn" else 1.4, color=color(codec), label=labels.get(codec, codec))
    _save(fig, plt, ax, path)


def plot_at_rate(img_curves, points: list[dict[str, Any]], quality: str, path: Path, labels: dict[str, str],
                 images_of: dict[str, int], max_bpp: float, slack: float = 0.0) -> None:
    """Primary convention: at each bpp, the mean over images of each image's interpolated quality, drawn
    where every image of the codec reaches that bpp; the report's rates with their 95 % intervals."""
    fig, ax, plt = _axes(f"{LABELS[quality]} at equal rate: mean of per-image interpolation "
                         "(primary; bars: 95% bootstrap CI)", quality, max_bpp)
    grid = np.exp(np.linspace(math.log(0.03), math.log(max_bpp), 96))
    codecs = list(labels)
    for codec in codecs:
        mine = [c for (name, _), c in img_curves.items() if name == codec]
        if not mine:
            continue
        vals = np.stack([bdrate.interpolate(c["bpp"], c[quality], grid, slack) for c in mine])
        mean = vals.mean(0)  # NaN wherever one of the images does not reach the rate
        colour = color(codec)
        ax.plot(grid, mean, lw=2.2 if codec == "rnn" else 1.4, color=colour,
                label=f"{labels.get(codec, codec)} ({len(mine)} images)")
        at = [p for p in points if p["codec"] == codec and math.isfinite(p[quality])]
        if at:
            y = np.array([p[quality] for p in at])
            err = np.array([[p[quality] - p[f"{quality}_lo"] for p in at], [p[f"{quality}_hi"] - p[quality] for p in at]])
            err = np.where(np.isfinite(err), err, 0)
            ax.errorbar([p["bpp"] for p in at], y, yerr=err, fmt="o", ms=3.5, color=colour, capsize=3)
    _save(fig, plt, ax, path)
