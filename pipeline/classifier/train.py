"""Stage ``train_classifier``: train the CIFAR-10 classifier with the recipe params.yaml selects.

Data and augmentation stay on the training device (uint8 tensors, batched tensor augmentations);
loss and accuracy accumulate on the device and are read once per epoch, so the inner loop never
waits for the host. The frame (``pipeline/training.py``) resumes a killed run from
``data/checkpoints/train_classifier/last.pt`` (losing at most the epoch in flight) when its
fingerprint (params section + seed + data digest + device type) matches, and runs the DDP ranks.

What this module adds: the training step, the same for both recipes, whose differences are the two
objects of ``pipeline/classifier/recipes.py`` (``coursework``, ``fast``); the final evaluation (with
test-time augmentation, ``pipeline/classifier/inference.py``); the outputs.

``nproc > 1``: torchrun ranks (pipeline.distributed). ``batch_size`` stays the global batch: every
rank draws the same permutation and augmentation (one generator, seeded alike), trains on its shard
with its loss scaled so that DDP's gradient average is the one-process gradient, and keeps its own
batch-norm statistics (no SyncBatchNorm: it needs CUDA), so a step equals the one-process step only
for nets without batch norm. Rank 0 alone evaluates, writes checkpoints and outputs and logs to
MLflow; epoch loss and accuracy are summed over ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import distributed, training
from pipeline.classifier.data import CifarData, load_arrays
from pipeline.classifier.inference import predict_logits
from pipeline.classifier.model import Classifier, build_classifier
from pipeline.classifier.params import TrainClassifierParams
from pipeline.classifier.recipes import make_recipe
from pipeline.data.transforms import augment_batch
from pipeline.errors import PipelineError
from pipeline.utils import atomic_path, log, progress

STAGE = "train_classifier"
#: the stage's input and output (pipeline/stage.py); dvc.yaml's cmd gives them
PATHS = ("data", "out")
DATASETS = {"data": "CIFAR-10 (arrays)"}  # logged to MLflow as the run's dataset input (pipeline/stage.py)
SECTIONS = (STAGE,)
CHECKPOINT = Path("data/checkpoints/train_classifier/last.pt")


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


def fingerprint(cfg: TrainClassifierParams, seed: int, data: CifarData, device: torch.device) -> str:
    """What a checkpoint must match to be resumed: params section, seed, data and device type.

    ``nproc`` is left out: a run may resume with another number of processes (the state is global).
    """
    return training.params_key(cfg, exclude={"nproc"},  # layout only (same fp32 maths): keys of earlier checkpoints kept
                               left_out_at_default={"fast.whiten_samples": 5000, "coursework.channels_last": True},
                               seed=seed, data=data.digest, n_train=len(data.x_train), device=device.type)


class ClassifierTask:
    """The classifier's part of the training frame: model, recipe, one epoch of steps, evaluation."""

    def __init__(self, cfg: TrainClassifierParams, data: CifarData, seed: int, device: torch.device,
                 d: distributed.Dist, eval_last: bool):
        self.cfg, self.data, self.seed, self.device, self.d, self.eval_last = cfg, data, seed, device, d, eval_last
        n_train = len(data.x_train)
        self.batch = min(cfg.batch_size, n_train)
        if d.world_size > self.batch:
            raise PipelineError(f"{STAGE}: batch_size {self.batch} is smaller than nproc {d.world_size}")
        self.steps_per_epoch = n_train // self.batch  # the last partial batch is dropped
        self.total_steps = max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.n_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.recipe = make_recipe(cfg, self.total_steps, self.n_epochs)
        self.autocast, self.channels_last = self.recipe.autocast(device), self.recipe.channels_last(device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
        torch.manual_seed(seed)
        self.config = self.recipe.model_config()
        model = build_classifier(self.config, data.label_names).to(device)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.recipe.flip_base = torch.rand(n_train, device=device, generator=self.gen) < 0.5  # alternating flip
        self.recipe.init_model(model, data.x_train, self.gen)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = self.recipe.optimizer(model)
        self.aug = self.recipe.augmentation()
        self.criterion = self.recipe.criterion()
        self.step, self.train_time, self.images_seen, self.cpu_time = 0, 0.0, 0, 0.0
        self.part = d.shard(self.batch)  # this rank's slice of every global batch (all of it in one process)
        self.weight = self.recipe.loss_weight(d.world_size, self.part.stop - self.part.start, self.batch)
        self.net, self.trainable = model, None  # DDP wrapper of ``model`` for the training forward/backward
        self.bar = None

    def state(self) -> dict[str, Any]:
        device = self.device
        return {"step": self.step, "train_time_s": self.train_time, "images_seen": self.images_seen,
                "train_cpu_s": self.cpu_time, "model": training.to_cpu(self.model.state_dict()),
                "optimizer": training.to_cpu(self.optimizer.state_dict()),
                "lookahead": {}, **self.recipe.state(),
                "generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.recipe.load_state(state, self.device)
        self.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step, self.train_time, self.images_seen = state["step"], state["train_time_s"], state["images_seen"]
        self.cpu_time = state.get("train_cpu_s", 0.0)

    def train_epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        d, data, model, recipe = self.d, self.data, self.model, self.recipe
        if self.bar is None:
            self.bar = progress(total=self.total_steps, initial=self.step, unit="step",
                                desc=f"{STAGE} ({self.cfg.recipe}, {self.device.type})",
                                **({} if d.is_main else {"disable": True}))
            model.train()
        epoch_steps = min(self.steps_per_epoch, self.total_steps - self.step)
        recipe.start_epoch(model, self.optimizer, epoch)
        if d.enabled:
            now = tuple(p.requires_grad for p in model.parameters())
            if now != self.trainable:  # DDP fixes its parameter set when built: rebuild after a freeze
                self.net = model  # drop the old wrapper before building the new one
                self.net = distributed.wrap(model, d, self.device)
                self.trainable = now
            torch.manual_seed(self.seed * 1_000_003 + epoch * 1_009 + d.rank + 1)  # dropout: own stream per rank
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        perm = torch.randperm(len(data.x_train), device=self.device, generator=self.gen)
        for i in range(epoch_steps):
            idx = perm[i * self.batch:(i + 1) * self.batch]
            xb, yb = data.x_train[idx].float().div_(255), data.y_train[idx]
            xb = augment_batch(recipe.flip(xb, idx, epoch), self.aug, self.gen)
            if d.enabled:  # the whole batch was drawn and augmented as in one process: keep this rank's part
                xb, yb = xb[self.part], yb[self.part]
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            recipe.before_step(self.optimizer, self.step)
            with self.autocast:
                logits = self.net(xb)
            loss = self.criterion(logits.float(), yb)
            self.optimizer.zero_grad(set_to_none=True)
            (loss * self.weight if d.enabled else loss).backward()
            self.optimizer.step()
            self.step += 1
            recipe.after_step(model, self.step)
            loss_sum += recipe.loss_total(loss, len(yb))
            correct += (logits.argmax(1) == yb).sum()
            self.bar.update(1)
        recipe.end_epoch(model, self.step)
        if d.enabled:  # global sums for rank 0's figures
            loss_sum, correct = d.all_reduce_sum(loss_sum), d.all_reduce_sum(correct)
        return loss_sum, correct, epoch_steps * self.batch

    def end_epoch(self, epoch: int, sums, seconds: float, cpu_seconds: float) -> dict[str, float] | None:
        loss_sum, correct, seen = sums
        self.train_time += seconds
        self.cpu_time += cpu_seconds
        self.images_seen += seen
        if not self.d.is_main:
            return None
        done = self.step / self.steps_per_epoch  # fractional for a cut-short last epoch (epochs: 2.3)
        row = {"epoch": int(done) if done == int(done) else round(done, 3), "step": self.step,
               "lr": self.optimizer.param_groups[-1]["lr"],
               "train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
               "test_loss": float("nan"), "test_acc": float("nan"), "train_time_s": self.train_time}
        last = epoch + 1 == self.n_epochs
        if (not last and (epoch + 1) % self.cfg.eval_every == 0) or (last and self.eval_last):
            (logits,) = predict_logits(self.model, self.data.x_test, self.cfg.eval_batch_size, 0, self.autocast,
                                       self.channels_last)
            row["test_loss"] = F.cross_entropy(logits, self.data.y_test).item()
            row["test_acc"] = (logits.argmax(1) == self.data.y_test).float().mean().item()
        self.bar.set_postfix(train_acc=f"{row['train_acc']:.3f}", test_acc=f"{row['test_acc']:.3f}")
        return row

    def after_checkpoint(self, epoch: int, row: dict[str, float]) -> None:
        pass


def train(cfg: TrainClassifierParams, data: CifarData, seed: int, device: torch.device | str = "cpu",
          checkpoint: Path | None = None, on_epoch: Callable[[int, dict], None] | None = None,
          eval_last: bool = True, dist: distributed.Dist | None = None,
          log_row: Callable[[dict], None] | None = None) -> TrainResult:
    """Train (or resume) one classifier; returns the final model (lookahead weights for ``fast``).

    The test set is scored every ``cfg.eval_every`` epochs (without TTA) for the history; with
    ``eval_last=False`` the last epoch's score is left to the caller (``evaluate``).
    ``dist``: this process's rank under torchrun (``distributed.setup``); every rank loads the
    checkpoint, only rank 0 evaluates, saves checkpoints and calls ``on_epoch(epoch, row)`` (for the
    epochs this session trains) and ``log_row(row)`` (also for the resumed ones); the other ranks'
    history holds only what they resumed from.
    """
    d = dist or distributed.Dist()
    device = torch.device(device)
    fp = fingerprint(cfg, seed, data, device)
    task = ClassifierTask(cfg, data, seed, device, d, eval_last)
    history, start = training.fit(task, task.n_epochs, d, training.Checkpoint(checkpoint, fp, STAGE, "fingerprint"),
                                  device, on_epoch=on_epoch, log_row=log_row)
    if task.bar is not None:
        task.bar.close()
    task.model.eval()
    return TrainResult(task.model, task.config, history, task.train_time, task.images_seen, start, fp,
                       {"train_cpu_s": task.cpu_time})


# --------------------------------------------------------------------------------------------
# stage


HISTORY_FIELDS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "train_time_s")


def evaluate(result: TrainResult, cfg: TrainClassifierParams, data: CifarData,
             device: torch.device) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Final test metrics (with and without TTA); also returns TTA probabilities and labels."""
    recipe = make_recipe(cfg)
    levels = predict_logits(result.model, data.x_test, cfg.eval_batch_size, cfg.tta, recipe.autocast(device),
                            recipe.channels_last(device))
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
        "test_size": int(y.numel()),
    }
    return metrics, probs.cpu().numpy(), y.cpu().numpy()


def write_outputs(out_dir: Path, result: TrainResult, metrics: dict[str, Any], probs: np.ndarray,
                  labels: np.ndarray, test_images: np.ndarray, title: str) -> None:
    """model.pt, metrics.json, history.csv and figures/, all appearing at once (temp dir, rename)."""
    from pipeline.classifier import figures
    from pipeline.classifier.model import save_classifier
    from pipeline.records import ClassifierMetrics
    from pipeline.utils import save_json

    names = result.model.label_names
    preds = probs.argmax(1)
    with atomic_path(out_dir) as tmp:
        (tmp / "figures").mkdir(parents=True)
        save_classifier(tmp / "model.pt", result.model, result.config, fingerprint=result.fingerprint,
                        test_acc=metrics["test_acc"])
        save_json(tmp / "metrics.json", ClassifierMetrics(**metrics).model_dump())  # the report reads this record
        (tmp / "history.csv").write_text(training.history_csv(result.history, HISTORY_FIELDS))
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
    """The final metrics (the history went row by row), the outputs as artifacts, the model (registered)."""
    import mlflow
    from mlflow.models import infer_signature

    last = result.history[-1]  # its test score, set by ``evaluate``
    training.log_history_row({k: last[k] for k in ("step", "test_loss", "test_acc")}, "step")
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
    training.log_model(STAGE, out_dir / "model.pt", "cifar10-classifier", out_dir,
                       "cifar10-classifier" if register else None, signature)


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


def run(params, paths) -> None:
    """The stage (pipeline/stage.py): ``params`` validated, its MLflow run active (rank 0's, under torchrun)."""
    cfg = params.train_classifier
    training.launch(STAGE, cfg.nproc, cfg.device, paths.argv(),
                    lambda device, d: _train_and_publish(params, cfg, paths, device, d))


def _train_and_publish(params, cfg: TrainClassifierParams, paths, device: torch.device, d: distributed.Dist) -> None:
    from pipeline.utils import seed_everything

    arrays = load_arrays(paths.data)
    if device.type == "cpu":
        keep_freed_memory()
    seed_everything(params.seed)
    data = CifarData.from_arrays(arrays, device)
    checkpoint = CHECKPOINT if cfg.checkpoint else None
    if not d.is_main:  # trains its shards; rank 0 alone logs, checkpoints and writes outputs
        train(cfg, data, params.seed, device, checkpoint, eval_last=False, dist=d)
        return
    import mlflow

    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
    ranks = f", {d.world_size} processes (DDP)" if d.enabled else ""
    log(f"[{STAGE}] recipe {cfg.recipe}, {cfg.epochs:g} epochs on {len(data.x_train)} images, "
        f"device {device}{threads}{ranks}")
    if d.enabled:
        mlflow.set_tag("ddp.world_size", d.world_size)
    result = train(cfg, data, params.seed, device, checkpoint, eval_last=False, dist=d,  # evaluate(): TTA, once
                   log_row=lambda row: training.log_history_row(row, "step"))
    metrics, probs, labels = evaluate(result, cfg, data, device)
    log(f"[{STAGE}] test accuracy {100 * metrics['test_acc']:.2f}% (TTA {cfg.tta}), "
        f"{100 * metrics['test_acc_no_tta']:.2f}% without; {metrics['train_time_s']:.1f} s training, "
        f"{metrics['images_per_s']:.0f} images/s")
    write_outputs(paths.out, result, metrics, probs, labels, arrays["x_test"], f"{cfg.recipe}, {params.profile}")
    with training.outputs_kept_if_tracking_fails(STAGE, paths.out):
        log_to_mlflow(paths.out, result, metrics, params.tracking.register_models, device)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # outputs are complete: nothing left to resume
