"""The classifier's figures (matplotlib, Agg): Figure 1.1, Figure 1.2 and the confusion matrix."""

from __future__ import annotations

import math
import os

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_curves(history: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Figure 1.1: training accuracy (left) and test accuracy (right) per epoch."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, name, color in ((axes[0], "train_acc", "training (augmented batches)", "tab:blue"),
                                 (axes[1], "test_acc", "test (no TTA)", "tab:orange")):
        pts = [(e, r[key]) for e, r in zip(epochs, history) if not math.isnan(r[key])]
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-" if len(pts) < 30 else "-", color=color)
        ax.set_title(f"{name} accuracy")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if pts:
            ax.annotate(f"{100 * pts[-1][1]:.2f}%", (pts[-1][0], 100 * pts[-1][1]),
                        textcoords="offset points", xytext=(-10, -15), ha="right")
    axes[0].set_ylabel("accuracy (%)")
    fig.suptitle(title or "Figure 1.1: accuracy per epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prediction_grid(images: np.ndarray, probs: np.ndarray, labels: np.ndarray, names: list[str],
                    path: str | os.PathLike, cols: int = 3) -> None:
    """Figure 1.2: each test image beside a bar chart of its class probabilities.

    ``images`` uint8 (N, 32, 32, 3); the true class's bar is blue, a wrong top guess red.
    """
    plt = _plt()
    n = len(images)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(4.2 * cols, 1.9 * rows),
                             gridspec_kw={"width_ratios": [1, 1.6] * cols}, squeeze=False)
    ticks = np.arange(len(names))
    for i in range(rows * cols):
        ax_img, ax_bar = axes[i // cols, 2 * (i % cols)], axes[i // cols, 2 * (i % cols) + 1]
        if i >= n:
            ax_img.axis("off")
            ax_bar.axis("off")
            continue
        guess, true = int(probs[i].argmax()), int(labels[i])
        ax_img.imshow(images[i], interpolation="nearest")
        ax_img.set_xticks([])
        ax_img.set_yticks([])
        ax_img.set_xlabel(f"{names[guess]} {100 * probs[i, guess]:.0f}% ({names[true]})", fontsize=7,
                          color="tab:blue" if guess == true else "tab:red")
        colors = ["0.7"] * len(names)
        if guess != true:
            colors[guess] = "tab:red"
        colors[true] = "tab:blue"
        ax_bar.barh(ticks, probs[i], color=colors)
        ax_bar.set_xlim(0, 1)
        ax_bar.set_yticks(ticks, names, fontsize=6)
        ax_bar.invert_yaxis()
        ax_bar.tick_params(axis="x", labelsize=6)
    fig.suptitle("Figure 1.2: test images and predicted probabilities (true class blue, wrong guess red)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def confusion_plot(cm: np.ndarray, names: list[str], path: str | os.PathLike, title: str = "") -> None:
    """Row-normalised confusion matrix (true class per row), counts annotated."""
    plt = _plt()
    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names, rotation=45, ha="right")
    ax.set_yticks(ticks, names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for r in range(len(names)):
        for c in range(len(names)):
            ax.text(c, r, str(cm[r, c]), ha="center", va="center", fontsize=7,
                    color="white" if frac[r, c] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_title(title or "Confusion matrix (test set)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pick_examples(labels: np.ndarray, preds: np.ndarray, count: int = 12, wrong: int = 4) -> np.ndarray:
    """Deterministic showcase: the first ``wrong`` misclassified and first correct test images."""
    bad = np.flatnonzero(preds != labels)[:wrong]
    good = np.flatnonzero(preds == labels)[: count - len(bad)]
    return np.sort(np.concatenate([good, bad]))[:count]
