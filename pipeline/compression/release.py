"""Ship a trained codec: a training checkpoint -> ``models/rnnc-cpu.pt`` (fp16 weights) + a JSON record.

    python -m pipeline.compression.release CHECKPOINT [--workdir DIR] [--out models/rnnc-cpu.pt]
                                           [--kodak data/raw/kodak] [--curve-iterations 2]

CHECKPOINT is a ``train_compressor`` checkpoint (``data/checkpoints/train_compressor/last.pt``); its
published weights (the EMA when the run keeps one) are rounded to float16 and written with their
fingerprint, so the file is small (about 4.5 MB for the cpu-size model) and loads with
``load_model`` like any model file. The JSON beside it records the configuration (the run's resolved
``augment`` and ``train_compressor`` params), steps, patches seen, training wall time (including the
sessions it was warm-started from), the git commit of the training code, the validation curve and,
when ``--kodak`` is given, Kodak MS-SSIM/PSNR at ``--curve-iterations`` iterations for every snapshot
the run kept (quality against training hours). Both files are replaced in place (temp file + rename).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.compression.model import ModelConfig, RNNCompressor
from pipeline.errors import PipelineError, run_cli
from pipeline.utils import atomic_path, atomic_write_text, log

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
    """Write a model file with float16 weights; returns its fingerprint (of the rounded weights)."""
    from pipeline.compression.codec import MODEL_FORMAT, model_fingerprint

    fp = model_fingerprint(model).hex()
    state = {k: v.detach().to("cpu", torch.float16).clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"format": MODEL_FORMAT, "version": 1, "config": model.config.to_dict(), "state_dict": state,
                    "fingerprint": fp, "meta": meta}, tmp)
    return fp


def kodak_quality(model: RNNCompressor, kodak: Path, iterations: int) -> dict[str, float]:
    """Mean MS-SSIM (RGB, 5 scales) and PSNR of the model's reconstructions of every Kodak image."""
    from PIL import Image
    from pytorch_msssim import ms_ssim

    from pipeline.compression.codec import RNNCodec

    codec = RNNCodec(model)
    scores, psnrs = [], []
    for path in sorted(kodak.glob("kodim*.png")):
        img = np.asarray(Image.open(path).convert("RGB"))
        rec = codec.reconstruct(img, iterations)
        a = torch.from_numpy(img).permute(2, 0, 1)[None].double()
        b = torch.from_numpy(rec).permute(2, 0, 1)[None].double()
        scores.append(float(ms_ssim(a, b, data_range=255)))
        psnrs.append(float(10 * torch.log10(255.0 ** 2 / (a - b).square().mean())))
    if not scores:
        raise PipelineError(f"{kodak}: no kodim*.png images")
    return {"ms_ssim": float(np.mean(scores)), "psnr": float(np.mean(psnrs)), "images": len(scores)}


def _git_commit(workdir: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(workdir), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=30)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def release(checkpoint: Path, workdir: Path, out: Path, kodak: Path | None, curve_iterations: int) -> dict[str, Any]:
    from pipeline.config import load_params

    if not checkpoint.is_file():
        raise PipelineError(f"{checkpoint}: no such checkpoint")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
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

    curve = list(prior.get("kodak_curve", []))
    snaps = sorted((checkpoint.parent / "snapshots").glob("epoch_*.pt"))
    if kodak is not None:
        for snap in snaps:
            s = torch.load(snap, map_location="cpu", weights_only=True)
            m = RNNCompressor(ModelConfig.from_dict(dict(s["config"])))
            m.load_state_dict(s["state_dict"])
            point = {"train_hours": round(prior_hours + s["train_seconds"] / 3600, 4), "epoch": s["epoch"],
                     "iterations": curve_iterations, **kodak_quality(m.eval(), kodak, curve_iterations)}
            log(f"[release] {snap.name}: {point['train_hours']:.2f} h, Kodak MS-SSIM@{curve_iterations} "
                f"{point['ms_ssim']:.4f}, PSNR {point['psnr']:.2f} dB")
            curve.append(point)
    record = {
        "file": out.name,
        "how": "python -m pipeline train_compressor (scripts/train_codec_long.sh), then "
               "python -m pipeline.compression.release; weights are the run's EMA rounded to float16",
        "training_code_commit": _git_commit(workdir),
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
    }
    fp = save_half(model, out, {"release": out.stem, "epochs": epochs, "train_hours_total": record["train_hours_total"]})
    record["fingerprint"] = fp
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    log(f"[release] wrote {out} ({out.stat().st_size / 1e6:.2f} MB, fingerprint {fp}) and {out.with_suffix('.json')}")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.compression.release", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("."), help="the training run's project folder")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--kodak", type=Path, default=None, help="Kodak folder: score every snapshot on it")
    ap.add_argument("--curve-iterations", type=int, default=2, help="iterations of the Kodak curve (2: 0.25 bpp)")
    args = ap.parse_args(argv)
    return run_cli(lambda: release(args.checkpoint, args.workdir, args.out, args.kodak, args.curve_iterations))


if __name__ == "__main__":
    sys.exit(main())
