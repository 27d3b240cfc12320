"""Ship a trained codec: a training checkpoint -> ``models/rnnc-cpu.pt`` (fp16 weights) + a JSON record.

    python -m tools.release CHECKPOINT [--workdir DIR] [--out models/rnnc-cpu.pt]
                                           [--kodak data/raw/kodak] [--curve-iterations 2]

CHECKPOINT is a ``train_compressor`` checkpoint (``data/checkpoints/train_compressor/last.pt``); its
published weights (the EMA when the run keeps one) are rounded to float16 and written with their
fingerprint, so the file is small (about 4.5 MB for the cpu-size model) and loads with
``load_model`` like any model file. The JSON beside it records the configuration (the run's resolved
``augment`` and ``train_compressor`` params), steps, patches seen, training wall time (including the
sessions it was warm-started from), the git commit of the training code, the validation curve and,
when ``--kodak`` is given, Kodak MS-SSIM/PSNR at ``--curve-iterations`` iterations for every snapshot
the run kept (quality against training hours). The model's .rnnc v3-v5 entropy model is fitted to its codes
of the run's training patches (``--context-patches``). Both files are replaced in place (temp file + rename).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.compression.model import ModelConfig, RNNCompressor
from pipeline.errors import PipelineError, run_cli
from pipeline.utils import atomic_path, atomic_write_text, git_commit, log

DEFAULT_OUT = Path("models/rnnc-cpu.pt")


def published_weights(state: dict[str, Any]) -> RNNCompressor:
    """The model a checkpoint publishes: its EMA weights when it has them, else its raw weights."""
    try:
        model = RNNCompressor(ModelConfig.from_dict(dict(state["config"])))
        model.load_state_dict(state["model"] if "model" in state else state["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise PipelineError(f"not a train_compressor checkpoint: {str(err).splitlines()[0]}") from None
    ema = state.get("ema")
    if ema is not None:
        with torch.no_grad():
            params = list(model.parameters())
            if len(ema) != len(params):
                raise PipelineError("checkpoint EMA does not match the model's parameters")
            for p, e in zip(params, ema):
                p.copy_(e)
    return model.eval()


def to_half(model: RNNCompressor) -> RNNCompressor:
    """Round the weights to float16 (what the file stores), keeping the model in float32."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def save_half(model: RNNCompressor, path: Path, meta: dict[str, Any]) -> str:
    """Write a model file with float16 weights (already rounded by ``to_half``); returns its fingerprint."""
    from pipeline.compression.modelfile import model_fingerprint, save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path, meta, dtype=torch.float16)
    return model_fingerprint(model).hex()


def kodak_quality(model: RNNCompressor, kodak: Path, iterations: int,
                  images: Sequence[str] | None = None) -> dict[str, float]:
    """Mean MS-SSIM (RGB, 5 scales) and PSNR of the model's reconstructions of every Kodak image (or of the
    file names in ``images``)."""
    from PIL import Image

    from pipeline.compression.codec import RNNCodec
    from pipeline.evaluation.metrics import Reference

    codec = RNNCodec(model)
    scores, psnrs = [], []
    for path in sorted(kodak.glob("kodim*.png")):
        if images is not None and path.name not in images:
            continue
        img = np.asarray(Image.open(path).convert("RGB"))
        q = Reference(img).compare(codec.reconstruct(img, iterations))  # the evaluate stage's metrics
        scores.append(q.ms_ssim)
        psnrs.append(q.psnr)
    if not scores:
        raise PipelineError(f"{kodak}: no kodim*.png images")
    return {"ms_ssim": float(np.mean(scores)), "psnr": float(np.mean(psnrs)), "images": len(scores)}


def plot_curve(record: dict[str, Any], path: Path, reference: dict[str, float] | None = None) -> None:
    """Kodak MS-SSIM at the curve's iteration count against training hours (how quality grows with compute)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = record["kodak_curve"]
    if not curve:
        raise PipelineError("no Kodak curve to plot (release with --kodak and snapshot_every > 0)")
    k = curve[0]["iterations"]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot([c["train_hours"] for c in curve], [c["ms_ssim"] for c in curve], "o-", label=f"RNN codec, {k} iterations")
    for name, value in (reference or {}).items():
        ax.axhline(value, ls="--", lw=1, color="grey")
        ax.annotate(name, (0, value), xycoords=("axes fraction", "data"), textcoords="offset points", xytext=(4, 3),
                    fontsize=8, color="grey")
    threads = record.get("cpu_threads") or "all"
    ax.set_xlabel(f"training hours ({threads} CPU thread{'' if threads == 1 else 's'}, 2-core machine)")
    ax.set_ylabel(f"Kodak MS-SSIM at {k * 0.125:g} bpp (raw bits)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)


def fit_context(model: RNNCompressor, workdir: Path, n: int) -> dict[str, Any] | None:
    """Fit the model's .rnnc v3-v5 entropy model on the codes of the run's first ``n`` training patches."""
    from pipeline.compression import context
    from pipeline.compression.train import load_patches

    if n <= 0:
        return None
    train_u8, _ = load_patches(workdir / "data" / "prepared" / "patches.npz")
    log(f"[release] fitting the entropy model on the codes of {min(n, len(train_u8))} training patches "
        f"of {train_u8.shape[1]} px")
    fitted = context.fit_model(model, train_u8[:n])
    log("[release] entropy model: bits per code bit on its patches by iteration "
        + " ".join(f"{c:.3f}" for c in fitted["fit_bits_per_bit"]))
    # fitted by this code, which may be newer than the training run's
    return {**fitted, "code_commit": git_commit(Path(__file__).resolve().parent)}


def release(checkpoint: Path, workdir: Path, out: Path, kodak: Path | None, curve_iterations: int,
            context_patches: int | None = None) -> dict[str, Any]:
    from pipeline.config import load_params

    if not checkpoint.is_file():
        raise PipelineError(f"{checkpoint}: no such checkpoint")
    from pipeline.training import read_state

    state = read_state(checkpoint)
    if not isinstance(state, dict) or "history" not in state or "epoch" not in state:
        raise PipelineError(f"{checkpoint}: not a train_compressor checkpoint (no epoch/history)")
    params = load_params(workdir / "params.yaml")
    p = params.train_compressor
    history = state["history"]
    steps_per_epoch = -(-(p.patches_per_epoch or 0) // p.batch_size) if p.patches_per_epoch else None
    epochs = int(state["epoch"])
    prior: dict[str, Any] = {}
    if p.init:  # a warm start continues an earlier release: carry its hours, steps and curve
        prior_json = (workdir / p.init).with_suffix(".json")
        if prior_json.is_file():
            prior = json.loads(prior_json.read_text())
    prior_hours = float(prior.get("train_hours_total", 0.0))
    hours = float(state["train_seconds"]) / 3600
    model = to_half(published_weights(state))
    fitted = fit_context(model, workdir, p.context_patches if context_patches is None else context_patches)

    curve = list(prior.get("kodak_curve", []))
    from pipeline.compression.train import CKPT_DIR

    snap_dir = checkpoint.parent / "snapshots"
    if not snap_dir.is_dir():  # a copy of the checkpoint taken elsewhere: the run's own snapshots
        snap_dir = workdir / CKPT_DIR / "snapshots"
    snaps = sorted(snap_dir.glob("epoch_*.pt"))
    if kodak is not None:
        cache_path = snap_dir / f"kodak_k{curve_iterations}.json"
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        for snap in snaps:
            if snap.name not in cache:  # each snapshot is scored once (about a minute on 2 cores)
                s = torch.load(snap, map_location="cpu", weights_only=True)
                m = RNNCompressor(ModelConfig.from_dict(dict(s["config"])))
                m.load_state_dict(s["state_dict"])
                cache[snap.name] = {"train_hours": round(prior_hours + s["train_seconds"] / 3600, 4),
                                    "epoch": s["epoch"], "iterations": curve_iterations,
                                    **kodak_quality(m.eval(), kodak, curve_iterations)}
                atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
            point = cache[snap.name]
            log(f"[release] {snap.name}: {point['train_hours']:.2f} h, Kodak MS-SSIM@{curve_iterations} "
                f"{point['ms_ssim']:.4f}, PSNR {point['psnr']:.2f} dB")
            curve.append(point)
        if not any(int(cache[snap.name]["epoch"]) == epochs for snap in snaps):  # the published weights themselves
            key = f"published_epoch_{epochs:05d}"
            if key not in cache:
                cache[key] = {"train_hours": round(prior_hours + hours, 4), "epoch": epochs,
                              "iterations": curve_iterations, **kodak_quality(model.eval(), kodak, curve_iterations)}
                atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
            point = cache[key]
            log(f"[release] published weights (epoch {epochs}): {point['train_hours']:.2f} h, Kodak "
                f"MS-SSIM@{curve_iterations} {point['ms_ssim']:.4f}, PSNR {point['psnr']:.2f} dB")
            curve.append(point)
    record = {
        "file": out.name,
        "how": "python -m pipeline train_compressor (scripts/train_codec_long.sh), then "
               "python -m tools.release; weights are the run's EMA rounded to float16",
        "training_code_commit": git_commit(workdir),
        "profile": params.profile, "seed": params.seed,
        "config": {"augment": params.augment.model_dump(mode="json"),
                   "train_compressor": p.model_dump(mode="json")},
        "warm_start": prior.get("file") if p.init else None,
        "epochs": epochs, "steps": epochs * steps_per_epoch if steps_per_epoch else None,
        "patches_seen": epochs * (p.patches_per_epoch or 0),
        "train_hours": round(hours, 4),
        "train_hours_total": round(prior_hours + hours, 4),
        "steps_total": (prior.get("steps_total") or 0) + (epochs * steps_per_epoch if steps_per_epoch else 0),
        "cpu_threads": p.cpu_threads,
        "validation_curve": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}
                             for row in history],
        "kodak_curve": curve,
        "context_model": fitted,  # the .rnnc v3-v5 entropy model's fit (None: none; files are v2)
    }
    fp = save_half(model, out, {"release": out.stem, "epochs": epochs, "train_hours_total": record["train_hours_total"]})
    record["fingerprint"] = fp
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    log(f"[release] wrote {out} ({out.stat().st_size / 1e6:.2f} MB, fingerprint {fp}) and {out.with_suffix('.json')}")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.release", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("."), help="the training run's project folder")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--kodak", type=Path, default=None, help="Kodak folder: score every snapshot on it")
    ap.add_argument("--curve-iterations", type=int, default=2, help="iterations of the Kodak curve (2: 0.25 bpp)")
    ap.add_argument("--figure", type=Path, default=None, help="also plot the Kodak curve to this PNG")
    ap.add_argument("--context-patches", type=int, default=None,
                    help="training patches whose codes fit the .rnnc v3-v5 entropy model (default: the run's "
                         "train_compressor.context_patches; 0: none)")
    ap.add_argument("--reference", action="append", default=[], metavar="NAME=MSSSIM",
                    help="a horizontal reference line (e.g. a codec's Kodak MS-SSIM at the same rate)")
    args = ap.parse_args(argv)

    def act() -> None:
        record = release(args.checkpoint, args.workdir, args.out, args.kodak, args.curve_iterations,
                         args.context_patches)
        if args.figure:
            refs = {}
            for item in args.reference:
                name, _, value = item.partition("=")
                try:
                    refs[name] = float(value)
                except ValueError:
                    raise PipelineError(f"--reference {item!r}: expected NAME=NUMBER") from None
            plot_curve(record, args.figure, refs)

    return run_cli(act)


if __name__ == "__main__":
    sys.exit(main())
