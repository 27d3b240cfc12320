"""Record a classifier run too long for ``make run`` (the coursework recipe's 300 epochs) for the report.

    python -m tools.release_classifier --workdir RUN [--out models/coursework-run.json]

RUN is the run's project folder (``scripts/train_classifier_long.sh``'s worktree). While the run trains, its
checkpoint (``data/checkpoints/train_classifier/last.pt``) is recorded; once it has ended, its published model
(``data/classifier/model.pt`` with ``history.csv`` and ``metrics.json`` beside it). The record holds no weights:
the per-epoch history (Figure 1.1), the predicted class of every CIFAR-10 test image with and without the run's
TTA (the report scores them against the real labels, with their interval), the class probabilities of Figure
1.2's twelve examples, the training time and the commit of the training code. About 40 KB; replaced in place.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import PipelineError, run_cli
from pipeline.utils import atomic_write_text, git_commit, log

DEFAULT_OUT = Path("models/coursework-run.json")
CHECKPOINT = Path("data/checkpoints/train_classifier/last.pt")
PUBLISHED = Path("data/classifier")
HISTORY_KEYS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc")


def _load(path: Path) -> dict[str, Any]:
    from pipeline.training import read_state

    state = read_state(path)
    if not isinstance(state, dict):
        raise PipelineError(f"{path}: not a train_classifier checkpoint")
    return state


def _number(v: Any) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return round(v, 6) if math.isfinite(v) else None


def run_state(workdir: Path) -> dict[str, Any]:
    """The run's weights, history and times: from its checkpoint while it trains, else from its outputs."""
    ckpt = workdir / CHECKPOINT
    if ckpt.is_file():
        state = _load(ckpt)
        if not {"model", "history", "train_time_s"} <= state.keys():
            raise PipelineError(f"{ckpt}: not a train_classifier checkpoint (no model/history)")
        return {"weights": state["model"], "history": state["history"], "train_time_s": state["train_time_s"],
                "train_cpu_s": state.get("train_cpu_s", 0.0), "source": ckpt}
    model_file = workdir / PUBLISHED / "model.pt"
    if not model_file.is_file():
        raise PipelineError(f"{workdir}: neither {CHECKPOINT} (a run in progress) nor {PUBLISHED / 'model.pt'} "
                            "(a finished run)")
    import csv

    blob = _load(model_file)
    try:
        rows = list(csv.DictReader((workdir / PUBLISHED / "history.csv").open()))
        metrics = json.loads((workdir / PUBLISHED / "metrics.json").read_text())
        weights = blob["state_dict"]
    except (OSError, ValueError, KeyError) as err:
        raise PipelineError(f"{workdir / PUBLISHED}: a finished run's outputs are incomplete ({err})") from None
    return {"weights": weights, "history": rows, "train_time_s": metrics.get("train_time_s", 0.0),
            "train_cpu_s": metrics.get("train_cpu_time_s", 0.0), "source": model_file}


def release(workdir: Path, out: Path) -> dict[str, Any]:
    from pipeline.classifier.figures import pick_examples
    from pipeline.classifier.inference import predict_logits
    from pipeline.classifier.model import build_classifier
    from pipeline.classifier.recipes import make_recipe
    from pipeline.config import load_params
    from pipeline.data.cifar import label_names, load_batch
    from pipeline.records import ClassifierRun

    params = load_params(workdir / "params.yaml")
    cfg = params.train_classifier
    s = run_state(workdir)
    raw = workdir / "data/raw/cifar-10-batches-py"
    x_test, y_test = load_batch(raw / "test_batch")
    names = [str(n) for n in label_names(raw)]
    recipe = make_recipe(cfg)
    model = build_classifier(recipe.model_config(), names)
    try:
        model.load_state_dict(s["weights"])
    except (RuntimeError, TypeError) as err:
        raise PipelineError(f"{s['source']}: does not match the {cfg.recipe} recipe of {workdir / 'params.yaml'} "
                            f"({str(err).splitlines()[0]})") from None
    threads = torch.get_num_threads()
    log(f"[release_classifier] {s['source']}: epoch {len(s['history'])} of {math.ceil(cfg.epochs)}; predicting the "
        f"{len(x_test)} test images ({threads} thread(s))")
    images = torch.from_numpy(np.ascontiguousarray(x_test)).permute(0, 3, 1, 2).contiguous()
    device = torch.device("cpu")
    levels = predict_logits(model, images, cfg.eval_batch_size, cfg.tta, recipe.autocast(device),
                            recipe.channels_last(device))  # as the stage's own final evaluation
    plain, best = levels[0], levels[-1]
    probs = best.softmax(1).numpy()
    preds, preds_plain = probs.argmax(1), plain.argmax(1).numpy()
    pick = pick_examples(y_test, preds)
    history = [{k: _number(r.get(k)) for k in HISTORY_KEYS} for r in s["history"]]
    for row in history:
        row["epoch"] = int(row["epoch"])
    record = {
        "kind": "classifier-run", "version": 1, "profile": params.profile, "recipe": cfg.recipe,
        "epochs": math.ceil(cfg.epochs), "batch_size": cfg.batch_size, "tta": cfg.tta, "label_names": names,
        "history": history,
        "predictions": "".join(map(str, preds.tolist())),
        "predictions_no_tta": "".join(map(str, preds_plain.tolist())),
        "examples": [{"index": int(i), "probs": [round(float(p), 4) for p in probs[i]]} for i in pick],
        "train_time_s": round(float(s["train_time_s"]), 1), "train_cpu_s": round(float(s["train_cpu_s"]), 1),
        "hardware": f"{platform.machine()}, torch {torch.__version__}",
        "training_code_commit": git_commit(workdir),
        "released": time.strftime("%Y-%m-%d"),
        "how": "scripts/train_classifier_long.sh (python -m pipeline train_classifier on PROFILE=coursework), "
               "then python -m tools.release_classifier --workdir <the run's folder>",
    }
    checked = ClassifierRun.model_validate(record)  # what the report will accept
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(record, separators=(",", ":")) + "\n")
    acc = float((preds == y_test).mean())
    log(f"[release_classifier] wrote {out} ({out.stat().st_size / 1024:.0f} KiB): epoch {checked.epochs_done} of "
        f"{checked.epochs}, test accuracy {acc:.2%} (TTA {cfg.tta}), {float((preds_plain == y_test).mean()):.2%} "
        "without")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.release_classifier", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True, help="the training run's project folder")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    return run_cli(lambda: release(args.workdir, args.out))


if __name__ == "__main__":
    sys.exit(main())
