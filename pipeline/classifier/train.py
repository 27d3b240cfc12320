"""Stage ``train_classifier``: train the CIFAR-10 classifier with the recipe params.yaml selects.

Data and augmentation stay on the training device (uint8 tensors, batched tensor augmentations);
loss and accuracy accumulate on the device and are read once per epoch, so the inner loop never
waits for the host. A checkpoint is written after every epoch to
``data/checkpoints/train_classifier/last.pt``; a killed run started again resumes from it (losing at
most the epoch in flight) when its fingerprint (params section + seed + data digest) matches.

Recipes (``train_classifier.recipe``):
- ``coursework``: plain CNN, Adam, per-epoch sawtooth learning rate, cross-entropy.
- ``fast``: airbench-style net and tricks (see ``FastRecipe``), then test-time augmentation.

``nproc > 1``: the stage re-runs itself under torchrun with DistributedDataParallel (pipeline.distributed).
``batch_size`` stays the global batch: every rank draws the same permutation and augmentation (one
generator, seeded alike), trains on its shard with its loss scaled so that DDP's gradient average is
the one-process gradient, and keeps its own batch-norm statistics (no SyncBatchNorm: it needs CUDA),
so a step equals the one-process step only for nets without batch norm. Rank 0 alone evaluates,
writes checkpoints and outputs and logs to MLflow; epoch loss and accuracy are summed over ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import distributed
from pipeline.classifier.model import Classifier, build_classifier
from pipeline.classifier.params import TrainClassifierParams
from pipeline.data.transforms import augment_batch
from pipeline.errors import PipelineError
from pipeline.utils import atomic_path, log, progress

STAGE = "train_classifier"
DATA_FILE = Path("data/prepared/cifar10.npz")
OUT_DIR = Path("data/classifier")
CHECKPOINT = Path("data/checkpoints/train_classifier/last.pt")
ARRAYS = ("x_train", "y_train", "x_test", "y_test", "label_names")


# --------------------------------------------------------------------------------------------
# data


@dataclass
class CifarData:
    """Images as uint8 (N, 3, 32, 32) and labels as int64, already on the training device."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    label_names: list[str]
    digest: str = ""  # of the training arrays: part of the checkpoint fingerprint

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], device: torch.device | str = "cpu") -> "CifarData":
        def images(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous().to(device)

        def labels(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a.astype(np.int64)).to(device)

        digest = hashlib.sha256()
        for key in ("x_train", "y_train"):
            digest.update(np.ascontiguousarray(arrays[key]).tobytes())
        return cls(images(arrays["x_train"]), labels(arrays["y_train"]), images(arrays["x_test"]),
                   labels(arrays["y_test"]), [str(n) for n in arrays["label_names"]], digest.hexdigest()[:16])


def load_arrays(path: str | os.PathLike = DATA_FILE) -> dict[str, np.ndarray]:
    """Read and check ``cifar10.npz`` (the augment stage's output)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: not found (run `python -m pipeline augment` first)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ARRAYS if k not in z.files]
            if missing:
                raise PipelineError(f"{path}: missing arrays {', '.join(missing)}")
            arrays = {k: z[k] for k in ARRAYS}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise PipelineError(f"{path}: unreadable ({err})") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(x) != len(y) or len(x) == 0:
            raise PipelineError(f"{path}: x_{split} must be uint8 (N, 32, 32, 3) matching y_{split}")
        if y.min() < 0 or y.max() >= len(arrays["label_names"]):
            raise PipelineError(f"{path}: y_{split} has labels outside 0..{len(arrays['label_names']) - 1}")
    return arrays


# --------------------------------------------------------------------------------------------
# schedules


def sawtooth(lr_max: float, lr_min: float, epochs: int, teeth: int) -> list[float]:
    """Per-epoch learning rates: ``teeth`` linear decays lr_max -> lr_min, each restarting at lr_max.

    Each tooth spans ceil(epochs / teeth) epochs (the last one may be cut short).
    """
    period = math.ceil(epochs / teeth)
    rates = []
    for epoch in range(epochs):
        t = epoch % period
        frac = t / (period - 1) if period > 1 else 0.0
        rates.append(lr_max + (lr_min - lr_max) * frac)
    return rates


def fast_lr_factor(step: int, total: int, warmup: float, final: float) -> float:
    """airbench's triangle: 0.2x -> 1x over the warm-up fraction, then linear to ``final``x."""
    warm = int(total * warmup)
    if step < warm:
        frac = step / warm
        return 0.2 * (1 - frac) + frac
    frac = (step - warm) / max(total - warm, 1)
    return (1 - frac) + final * frac


# --------------------------------------------------------------------------------------------
# model, optimiser, lookahead


def model_config(cfg: TrainClassifierParams) -> dict[str, Any]:
    """The plain-dict architecture config stored in model.pt (``build_classifier`` rebuilds it)."""
    if cfg.recipe == "coursework":
        c = cfg.coursework
        return {"arch": "coursework", "widths": list(c.widths), "dense": c.dense, "dropout": c.dropout,
                "batchnorm": c.batchnorm}
    f = cfg.fast
    return {"arch": "fast", "widths": list(f.widths), "bn_momentum": f.bn_momentum, "scale": f.scale}


class Lookahead:
    """airbench's lookahead: every few steps the weights move to an EMA of themselves."""

    def __init__(self, model: torch.nn.Module):
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float) -> None:
        for key, value in model.state_dict().items():
            if key in self.ema:
                self.ema[key].lerp_(value, 1 - decay)
                value.copy_(self.ema[key])


def make_optimizer(cfg: TrainClassifierParams, model: Classifier) -> torch.optim.Optimizer:
    if cfg.recipe == "coursework":
        c = cfg.coursework
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=c.lr_max, weight_decay=c.weight_decay)
    else:
        f = cfg.fast
        kilostep = 1024 * (1 + 1 / (1 - f.momentum))  # summed loss: lr per example, momentum-corrected
        lr = f.lr / kilostep
        wd = f.weight_decay * cfg.batch_size / kilostep
        lr_bias = lr * f.bias_scaler
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        norm_biases = [p for k, p in named if "norm" in k]
        others = [p for k, p in named if "norm" not in k]
        opt = torch.optim.SGD([dict(params=norm_biases, lr=lr_bias, weight_decay=wd / lr_bias),
                               dict(params=others, lr=lr, weight_decay=wd / lr)],
                              momentum=f.momentum, nesterov=True)
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]
    return opt


# --------------------------------------------------------------------------------------------
# inference


def device_context(cfg: TrainClassifierParams, device: torch.device):
    """bf16/fp16 autocast on CUDA for the fast recipe; nothing on CPU."""
    if device.type == "cuda" and cfg.recipe == "fast" and cfg.fast.autocast != "off":
        dtype = torch.bfloat16 if cfg.fast.autocast == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def uses_channels_last(cfg: TrainClassifierParams, device: torch.device) -> bool:
    return device.type == "cuda" and cfg.recipe == "fast" and cfg.fast.channels_last


def tta_logits(model: torch.nn.Module, x: torch.Tensor, level: int) -> list[torch.Tensor]:
    """Logits at TTA levels 0..level: [plain, + mirror, + mirror and 1-px shifts] (airbench)."""
    plain = model(x).float()
    out = [plain]
    if level >= 1:
        out.append(0.5 * plain + 0.5 * model(x.flip(-1)).float())
    if level >= 2:
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :-2, :-2], padded[..., 2:, 2:]]
        shift = torch.stack([0.5 * model(s).float() + 0.5 * model(s.flip(-1)).float() for s in shifted]).mean(0)
        out.append(0.5 * out[1] + 0.5 * shift)
    return out


@torch.no_grad()
def predict_logits(model: Classifier, images: torch.Tensor, batch_size: int, tta: int = 0,
                   autocast=None, channels_last: bool = False) -> list[torch.Tensor]:
    """Logits for uint8 (N, 3, 32, 32) images at every TTA level up to ``tta`` (stays on device)."""
    was_training = model.training
    model.eval()
    chunks: list[list[torch.Tensor]] = []
    for i in range(0, len(images), batch_size):
        xb = images[i:i + batch_size].float().div_(255)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast or contextlib.nullcontext():
            chunks.append(tta_logits(model, xb, tta))
    model.train(was_training)
    return [torch.cat([c[level] for c in chunks]) for level in range(tta + 1)]


# --------------------------------------------------------------------------------------------
# training


@dataclass
class TrainResult:
    model: Classifier
    config: dict[str, Any]
    history: list[dict[str, float]]
    train_time_s: float  # pure training time (no eval, no checkpointing), over all sessions
    images_seen: int
    resumed_from: int = 0  # epochs already done when this session started
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class StopTraining(Exception):
    """Raised by an ``on_epoch`` hook to end a run early (tests use it to simulate a kill)."""


def fingerprint(cfg: TrainClassifierParams, seed: int, data: CifarData, device: torch.device) -> str:
    """What a checkpoint must match to be resumed: params section, seed, data and device type.

    ``nproc`` is left out: a run may resume with another number of processes (the state is global).
    """
    blob = json.dumps({"params": cfg.model_dump(mode="json", exclude={"nproc"}), "seed": seed, "data": data.digest,
                       "n_train": len(data.x_train), "device": device.type}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_checkpoint(path: Path | None, fp: str) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - an unreadable checkpoint just means starting over
        log(f"[{STAGE}] ignoring unreadable checkpoint {path} ({type(err).__name__})")
        return None
    if state.get("fingerprint") != fp:
        log(f"[{STAGE}] checkpoint {path} is for other params/data: starting fresh")
        return None
    return state


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _to_cpu(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


def train(cfg: TrainClassifierParams, data: CifarData, seed: int, device: torch.device | str = "cpu",
          checkpoint: Path | None = None, on_epoch: Callable[[int, dict], None] | None = None,
          eval_last: bool = True, dist: distributed.Dist | None = None) -> TrainResult:
    """Train (or resume) one classifier; returns the final model (lookahead weights for ``fast``).

    The test set is scored every ``cfg.eval_every`` epochs (without TTA) for the history; with
    ``eval_last=False`` the last epoch's score is left to the caller (``evaluate``).
    ``dist``: this process's rank under torchrun (``distributed.setup``); every rank loads the
    checkpoint, only rank 0 evaluates, saves checkpoints and calls ``on_epoch`` (the others' history
    holds only what they resumed from).
    """
    d = dist or distributed.Dist()
    device = torch.device(device)
    fp = fingerprint(cfg, seed, data, device)
    n_train = len(data.x_train)
    batch = min(cfg.batch_size, n_train)
    if d.world_size > batch:
        raise PipelineError(f"{STAGE}: batch_size {batch} is smaller than nproc {d.world_size}")
    steps_per_epoch = n_train // batch  # the last partial batch is dropped
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    fast = cfg.recipe == "fast"
    autocast, channels_last = device_context(cfg, device), uses_channels_last(cfg, device)

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    torch.manual_seed(seed)
    config = model_config(cfg)
    model = build_classifier(config, data.label_names).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    flip_base = torch.rand(n_train, device=device, generator=gen) < 0.5  # alternating flip's epoch-0 coin
    if fast:
        with torch.no_grad():
            sample = data.x_train[torch.randperm(n_train, device=device, generator=gen)[:5000]]
            model.net.init_whitening(model.normalize(sample.float() / 255))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    lookahead = Lookahead(model) if fast else None
    aug = cfg.augmentation.model_copy(update={"flip": False}) if fast and cfg.fast.alternating_flip \
        else cfg.augmentation
    lrs = sawtooth(cfg.coursework.lr_max, cfg.coursework.lr_min, n_epochs, cfg.coursework.teeth) if not fast else []
    if fast:
        ramp = torch.arange(total_steps + 1, dtype=torch.float64) / total_steps
        decays = (cfg.fast.lookahead_decay ** cfg.fast.lookahead_every * ramp**3).tolist()

    history: list[dict[str, float]] = []
    step, start_epoch, train_time, images_seen, cpu_time = 0, 0, 0.0, 0, 0.0
    state = _load_checkpoint(checkpoint, fp)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if lookahead is not None:
            lookahead.ema = {k: v.to(device) for k, v in state["lookahead"].items()}
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        history, step, start_epoch = state["history"], state["step"], state["epoch"]
        train_time, images_seen = state["train_time_s"], state["images_seen"]
        cpu_time = state.get("train_cpu_s", 0.0)
        if d.is_main:
            log(f"[{STAGE}] resuming from {checkpoint} after epoch {start_epoch}/{n_epochs}")
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.fast.label_smoothing if fast else 0.0,
                                          reduction="sum" if fast else "mean")

    bar = progress(total=total_steps, initial=step, desc=f"{STAGE} ({cfg.recipe}, {device.type})", unit="step",
                   **({} if d.is_main else {"disable": True}))
    part = d.shard(batch)  # this rank's slice of every global batch (all of it in one process)
    # DDP averages gradients over ranks: scale the shard's loss so the average is the whole batch's
    # (fast: summed loss -> x world; coursework: mean loss -> x world * shard / batch)
    weight = d.world_size * (1 if fast else (part.stop - part.start) / batch)
    net, trainable = model, None  # DDP wrapper of ``model`` for the training forward/backward
    model.train()
    for epoch in range(start_epoch, n_epochs):
        epoch_steps = min(steps_per_epoch, total_steps - step)
        if fast:
            model.net.whiten.bias.requires_grad_(epoch < cfg.fast.whiten_bias_epochs)
        if d.enabled:
            now = tuple(p.requires_grad for p in model.parameters())
            if now != trainable:  # DDP fixes its parameter set when built: rebuild after a freeze
                net = model  # drop the old wrapper before building the new one
                net = distributed.wrap(model, d, device)
                trainable = now
            torch.manual_seed(seed * 1_000_003 + epoch * 1_009 + d.rank + 1)  # dropout: own stream per rank
        if not fast:
            for group in optimizer.param_groups:
                group["lr"] = lrs[epoch]
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        t0, c0 = time.perf_counter(), time.process_time()
        perm = torch.randperm(n_train, device=device, generator=gen)
        for i in range(epoch_steps):
            idx = perm[i * batch:(i + 1) * batch]
            xb, yb = data.x_train[idx].float().div_(255), data.y_train[idx]
            if fast and cfg.fast.alternating_flip and cfg.augmentation.flip:
                flip = flip_base[idx] ^ bool(epoch % 2)
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            xb = augment_batch(xb, aug, gen)
            if d.enabled:  # the whole batch was drawn and augmented as in one process: keep this rank's part
                xb, yb = xb[part], yb[part]
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            if fast:
                factor = fast_lr_factor(step, total_steps, cfg.fast.warmup, cfg.fast.final_lr)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
            with autocast:
                logits = net(xb)
            loss = criterion(logits.float(), yb)
            optimizer.zero_grad(set_to_none=True)
            (loss * weight if d.enabled else loss).backward()
            optimizer.step()
            step += 1
            if lookahead is not None and (step % cfg.fast.lookahead_every == 0 or step == total_steps):
                lookahead.update(model, decays[step])
            loss_sum += loss.detach() * (1 if fast else len(yb))
            correct += (logits.argmax(1) == yb).sum()
            bar.update(1)
        if lookahead is not None and step == total_steps:
            lookahead.update(model, 1.0)  # finish on the lookahead (EMA) weights
        if d.enabled:  # global sums for rank 0's figures
            loss_sum, correct = d.all_reduce_sum(loss_sum), d.all_reduce_sum(correct)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time += time.perf_counter() - t0
        cpu_time += time.process_time() - c0
        seen = epoch_steps * batch
        images_seen += seen
        if not d.is_main:
            d.barrier()  # rank 0 evaluates and writes the checkpoint meanwhile
            continue
        done = step / steps_per_epoch  # fractional for a cut-short last epoch (epochs: 2.3)
        row = {"epoch": int(done) if done == int(done) else round(done, 3), "step": step,
               "lr": optimizer.param_groups[-1]["lr"],
               "train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
               "test_loss": float("nan"), "test_acc": float("nan"), "train_time_s": train_time}
        last = epoch + 1 == n_epochs
        if (not last and (epoch + 1) % cfg.eval_every == 0) or (last and eval_last):
            (logits,) = predict_logits(model, data.x_test, cfg.eval_batch_size, 0, autocast, channels_last)
            row["test_loss"] = F.cross_entropy(logits, data.y_test).item()
            row["test_acc"] = (logits.argmax(1) == data.y_test).float().mean().item()
        history.append(row)
        bar.set_postfix(train_acc=f"{row['train_acc']:.3f}", test_acc=f"{row['test_acc']:.3f}")
        if checkpoint is not None:
            _save_checkpoint(checkpoint, {
                "fingerprint": fp, "epoch": epoch + 1, "step": step, "history": history,
                "train_time_s": train_time, "images_seen": images_seen, "train_cpu_s": cpu_time,
                "model": _to_cpu(model.state_dict()), "optimizer": _to_cpu(optimizer.state_dict()),
                "lookahead": _to_cpu(lookahead.ema) if lookahead is not None else {},
                "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})
        d.barrier()  # the other ranks wait for the evaluation and the checkpoint
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
    bar.close()
    model.eval()
    return TrainResult(model, config, history, train_time, images_seen, start_epoch, fp,
                       {"train_cpu_s": cpu_time})


# --------------------------------------------------------------------------------------------
# stage


HISTORY_FIELDS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "train_time_s")


def evaluate(result: TrainResult, cfg: TrainClassifierParams, data: CifarData,
             device: torch.device) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Final test metrics (with and without TTA); also returns TTA probabilities and labels."""
    levels = predict_logits(result.model, data.x_test, cfg.eval_batch_size, cfg.tta,
                            device_context(cfg, device), uses_channels_last(cfg, device))
    y = data.y_test
    plain, best = levels[0], levels[-1]
    probs = best.softmax(1)
    preds = best.argmax(1)
    per_class = {name: (preds[y == c] == c).float().mean().item() if (y == c).any() else float("nan")
                 for c, name in enumerate(data.label_names)}
    last = result.history[-1]
    last["test_acc"] = (plain.argmax(1) == y).float().mean().item()  # same weights as the TTA eval
    last["test_loss"] = F.cross_entropy(plain, y).item()
    metrics = {
        "test_acc": (preds == y).float().mean().item(),
        "test_acc_no_tta": last["test_acc"],
        "test_loss": F.cross_entropy(best, y).item(),
        "test_loss_no_tta": last["test_loss"],
        "train_loss": last["train_loss"],
        "train_acc": last["train_acc"],
        "per_class_acc": per_class,
        "train_time_s": result.train_time_s,
        "train_cpu_time_s": result.extra.get("train_cpu_s", float("nan")),  # process CPU s (all threads)
        "images_per_s": result.images_seen / max(result.train_time_s, 1e-9),
        "epochs": cfg.epochs,
        "tta": cfg.tta,
        "parameters": sum(p.numel() for p in result.model.parameters()),
    }
    return metrics, probs.cpu().numpy(), y.cpu().numpy()


def write_outputs(out_dir: Path, result: TrainResult, metrics: dict[str, Any], probs: np.ndarray,
                  labels: np.ndarray, test_images: np.ndarray, title: str) -> None:
    """model.pt, metrics.json, history.csv and figures/, all appearing at once (temp dir, rename)."""
    import csv

    from pipeline.classifier import figures
    from pipeline.classifier.model import save_classifier
    from pipeline.utils import save_json

    names = result.model.label_names
    preds = probs.argmax(1)
    with atomic_path(out_dir) as tmp:
        (tmp / "figures").mkdir(parents=True)
        save_classifier(tmp / "model.pt", result.model, result.config, fingerprint=result.fingerprint,
                        test_acc=metrics["test_acc"])
        save_json(tmp / "metrics.json", metrics)
        with open(tmp / "history.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(result.history)
        figures.accuracy_curves(result.history, tmp / "figures" / "fig1_1_accuracy.png",
                                f"Figure 1.1: accuracy per epoch ({title})")
        pick = figures.pick_examples(labels, preds)
        figures.prediction_grid(test_images[pick], probs[pick], labels[pick], names,
                                tmp / "figures" / "fig1_2_predictions.png")
        cm = figures.confusion_matrix(labels, preds, len(names))
        figures.confusion_plot(cm, names, tmp / "figures" / "confusion_matrix.png",
                               f"Confusion matrix, test set ({title}, accuracy {100 * metrics['test_acc']:.2f}%)")


def log_to_mlflow(out_dir: Path, result: TrainResult, metrics: dict[str, Any], register: bool,
                  device: torch.device) -> None:
    import mlflow
    from mlflow.models import infer_signature

    import pipeline

    for row in result.history:
        mlflow.log_metrics({k: row[k] for k in ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc")
                            if not math.isnan(row[k])}, step=int(row["step"]))  # step: optimiser steps
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    flat.update({f"test_acc_{name}": v for name, v in metrics["per_class_acc"].items()})
    mlflow.log_metrics(flat)
    mlflow.set_tags({"device": str(device), "torch": torch.__version__,
                     "resumed_from_epoch": str(result.resumed_from)})
    for name in ("metrics.json", "history.csv"):
        mlflow.log_artifact(str(out_dir / name))
    mlflow.log_artifacts(str(out_dir / "figures"), artifact_path="figures")
    model = result.model.cpu().eval()
    example = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    mlflow.pytorch.log_model(
        model, name="model", serialization_format="pickle", signature=signature, input_example=example,
        code_paths=[str(Path(pipeline.__file__).parent)],  # the pickled classes live in the pipeline package
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
        registered_model_name="cifar10-classifier" if register else None)


def keep_freed_memory() -> None:
    """CPU only: stop glibc returning (and re-faulting) the large per-step activation buffers.

    Without it about 15% of CPU time goes to page faults (85 M minor faults in a cpu-profile run).
    A no-op where glibc's ``mallopt`` is unavailable.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    except (OSError, AttributeError):
        pass


def main() -> None:
    from pipeline.config import load_params
    from pipeline.utils import select_device

    params = load_params()
    cfg = params.train_classifier
    if cfg.nproc > 1 and cfg.device != "cpu" and torch.cuda.is_available() and cfg.nproc > torch.cuda.device_count():
        raise PipelineError(f"{STAGE}: nproc {cfg.nproc} exceeds the {torch.cuda.device_count()} CUDA devices")
    if distributed.relaunch(STAGE, cfg.nproc):  # nproc > 1: torchrun ran the ranks; nothing left here
        return
    arrays = load_arrays(DATA_FILE)
    device = select_device(cfg.device) if cfg.device != "cuda" or torch.cuda.is_available() else None
    if device is None:
        raise PipelineError("train_classifier.device is cuda but no CUDA device is available")
    d = distributed.setup(device)  # a no-op outside torchrun
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
    try:
        _main(params, cfg, arrays, device, d)
    finally:
        distributed.teardown(d)


def _main(params, cfg: TrainClassifierParams, arrays: dict[str, np.ndarray], device: torch.device,
          d: distributed.Dist) -> None:
    from pipeline import tracking
    from pipeline.utils import seed_everything

    if device.type == "cpu":
        keep_freed_memory()
    seed_everything(params.seed)
    data = CifarData.from_arrays(arrays, device)
    checkpoint = CHECKPOINT if cfg.checkpoint else None
    if not d.is_main:  # trains its shards; rank 0 alone logs, checkpoints and writes outputs
        train(cfg, data, params.seed, device, checkpoint, eval_last=False, dist=d)
        return
    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
    ranks = f", {d.world_size} processes (DDP)" if d.enabled else ""
    log(f"[{STAGE}] recipe {cfg.recipe}, {cfg.epochs:g} epochs on {len(data.x_train)} images, "
        f"device {device}{threads}{ranks}")
    with tracking.stage_run(STAGE, params):
        if d.enabled:
            import mlflow

            mlflow.set_tag("ddp.world_size", d.world_size)
        result = train(cfg, data, params.seed, device, checkpoint,
                       eval_last=False, dist=d)  # evaluate() below scores the final weights once, with TTA
        metrics, probs, labels = evaluate(result, cfg, data, device)
        log(f"[{STAGE}] test accuracy {100 * metrics['test_acc']:.2f}% (TTA {cfg.tta}), "
            f"{100 * metrics['test_acc_no_tta']:.2f}% without; {metrics['train_time_s']:.1f} s training, "
            f"{metrics['images_per_s']:.0f} images/s")
        write_outputs(OUT_DIR, result, metrics, probs, labels, arrays["x_test"], f"{cfg.recipe}, {params.profile}")
        try:
            log_to_mlflow(OUT_DIR, result, metrics, params.tracking.register_models, device)
        except Exception as err:  # noqa: BLE001 - tracking failed: the trained weights must not be lost
            if isinstance(err, PipelineError):
                raise
            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise PipelineError(
                f"{STAGE}: logging to MLflow failed ({type(err).__name__}: {first}); the trained model is in "
                f"{OUT_DIR} and its checkpoint kept in {CHECKPOINT}: re-run once tracking works (nothing is "
                "retrained)") from None
    if cfg.checkpoint and CHECKPOINT.exists():
        CHECKPOINT.unlink()  # outputs are complete: nothing left to resume
