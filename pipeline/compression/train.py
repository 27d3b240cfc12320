"""Stage ``train_compressor``: train the RNN codec on 32x32 patches (data/prepared/patches.npz).

Loss: mean absolute (or squared) residual |x - x̂_t| averaged over pixels and iterations t. Adam with
a per-step schedule. The patches live on the training device as uint8 and are batched there; CUDA
runs under bf16 autocast with channels_last. Every epoch: validation on held-out patches (PSNR and
SSIM at several iteration counts), a row of history.csv, MLflow metrics and a resumable checkpoint in
data/checkpoints/train_compressor/ (a killed run resumes from its last epoch when params and data are
unchanged): the loop, checkpoints, DDP launch and model logging are the training frame's
(``pipeline/training.py``); this module brings the model, its recipe (``recipe.py``: schedule, losses, EMA)
and its validation. Outputs:
data/compressor/{model.pt,metrics.json,history.csv}; the model is logged to MLflow and registered as
``rnn-compressor``.

``nproc > 1``: the stage re-runs itself under torchrun with DistributedDataParallel (pipeline.distributed).
``batch_size`` stays the global batch: every rank draws the same permutation and trains on its shard
of each global batch, its loss weighted by its share so that DDP's gradient average equals the
one-process gradient of the whole batch. The binarizer's noise is seeded per rank and epoch (a
resumed run repeats it exactly). Rank 0 alone validates, writes checkpoints and outputs and logs to
MLflow; the epoch loss is summed over ranks first.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import distributed, training
from pipeline.compression.model import BLOCK, ModelConfig, RNNCompressor, count_parameters, forward_flops
from pipeline.compression.modelfile import MODEL_FORMAT, model_fingerprint, save_model
from pipeline.compression.params import TrainCompressorParams
from pipeline.compression.recipe import EMA, autocast, lr_factor, task_loss
from pipeline.errors import PipelineError
from pipeline.utils import atomic_path, atomic_write_text, file_digest, log, progress, save_json, seed_everything

STAGE = "train_compressor"
#: the stage's inputs and output (pipeline/stage.py); dvc.yaml's cmd gives them. ``init`` (the warm
#: start) is params (train_compressor.init), not a path option.
PATHS = ("patches", "out")
DATASETS = {"patches": "codec training patches"}  # logged to MLflow as the run's dataset input (pipeline/stage.py)
SECTIONS = (STAGE,)
CKPT_DIR = Path("data/checkpoints") / STAGE
REGISTERED_NAME = "rnn-compressor"


# ----------------------------------------------------------------------------------------- data


def load_patches(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) uint8 arrays (N, S, S, 3), S a multiple of 16."""
    if not path.is_file():
        raise PipelineError(f"{path}: missing; run `python -m pipeline augment` first")
    try:
        with np.load(path) as z:
            train, val = z["train"], z["val"]
    except KeyError as err:
        raise PipelineError(f"{path}: no array {err} (expected 'train' and 'val')") from None
    except (OSError, ValueError) as err:
        raise PipelineError(f"{path}: not a readable .npz ({err})") from None
    for name, a in (("train", train), ("val", val)):
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[3] != 3 or a.shape[1] % BLOCK or a.shape[2] % BLOCK \
                or len(a) == 0:
            raise PipelineError(f"{path}: '{name}' must be non-empty uint8 (N, S, S, 3) with S a multiple of "
                                f"{BLOCK}, got {a.dtype} {a.shape}")
    return train, val


def to_input(batch: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-0.5, 0.5] on the batch's device."""
    x = batch.permute(0, 3, 1, 2).float().div_(255.0).sub_(0.5)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def shard_indices(idx: torch.Tensor, d: distributed.Dist) -> tuple[torch.Tensor, float]:
    """This rank's part of a global batch of indices and its loss weight ``world * part / batch``.

    A rank whose part is empty (a last batch smaller than the world) trains on the batch's first
    item with weight 0: it still runs forward/backward, as DDP needs every rank to, and adds nothing.
    """
    part = idx[d.shard(len(idx))]
    if len(part) == 0:
        return idx[:1], 0.0
    return part, d.world_size * len(part) / len(idx)


# ----------------------------------------------------------------------------------------- validation


@torch.inference_mode()
def evaluate(model: RNNCompressor, val: torch.Tensor, p: TrainCompressorParams, device: torch.device,
             amp: bool = False) -> dict[str, float]:
    """Held-out metrics: loss at full iterations; PSNR (dB) and SSIM of uint8 reconstructions at each k."""
    from pytorch_msssim import ssim

    was_training = model.training
    model.eval()
    ks = sorted(set(p.val_iterations))
    kmax = p.iterations
    sums = {f"psnr_k{k}": torch.zeros((), device=device) for k in ks}
    sums.update({f"ssim_k{k}": torch.zeros((), device=device) for k in ks})
    loss_sum = torch.zeros((), device=device)
    n = 0
    for i in range(0, len(val), p.eval_batch_size):
        x = to_input(val[i: i + p.eval_batch_size])
        with autocast(device, amp):
            recon = model(x, iterations=kmax)
        recon = recon.float()
        loss_sum += task_loss(p, x, recon) * len(x)
        ref = (x + 0.5) * 255.0
        for k in ks:
            q = ((recon[k - 1] + 0.5) * 255.0).round().clamp(0, 255)
            mse = (q - ref).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
            sums[f"psnr_k{k}"] += (10 * torch.log10(255.0 ** 2 / mse)).sum()
            sums[f"ssim_k{k}"] += ssim(q, ref.round(), data_range=255, size_average=False,
                                       win_size=p.ssim_window).sum()
        n += len(x)
    model.train(was_training)
    out = {"loss": (loss_sum / n).item()}
    out.update({k: (v / n).item() for k, v in sums.items()})
    return out


def load_init(model: RNNCompressor, path: str) -> None:
    """Warm start: copy the weights of a model file (same architecture) into ``model``. The iteration
    count may differ (E, B and D are the same at every iteration: a model trained at 8 can be trained on
    at 16); the context table's rows are then cut, or extended with its last row, until it is refitted."""
    import dataclasses

    from pipeline.compression.modelfile import load_model

    src = load_model(path)
    if dataclasses.replace(src.config, iterations=model.config.iterations) != model.config:
        raise PipelineError(f"{STAGE}: init {path} has another architecture ({src.config.to_dict()}) than "
                            f"train_compressor's params ({model.config.to_dict()})")
    state = src.state_dict()
    table, rows = state["context"], model.config.iterations
    state["context"] = table[:rows] if len(table) >= rows else \
        torch.cat([table, table[-1:].expand(rows - len(table), *table.shape[1:])])
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------- checkpoints


def run_key(p: TrainCompressorParams, seed: int, data_hash: str, init_hash: str = "") -> str:
    """What a checkpoint must match to be resumed: the section, the seed, the patches and the init weights.

    ``nproc`` and ``cpu_threads`` are left out: a run may resume with another number of processes or
    threads (the state is global); so is ``context_patches``, which acts after training.
    """
    return training.params_key(p, exclude={"nproc", "cpu_threads", "context_patches"},
                               left_out_at_default={"lr_floor": 0.02, "ssim_weight": 0.84, "cell": "lstm",
                                                    "reconstruction": "additive", "iteration_weights": None,
                                                    "priming": 0},
                               seed=seed, data=data_hash, **({"init": init_hash} if init_hash else {}))


def save_snapshot(path: Path, model: RNNCompressor, ema: EMA, row: dict[str, float], train_seconds: float,
                  steps: int, patches: int) -> None:
    """The published (averaged) weights at one epoch, fp16, with where training stood: for quality-vs-time curves."""
    with ema.applied():
        weights = {k: v.detach().to("cpu", torch.float16).clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"format": MODEL_FORMAT + "-snapshot", "config": model.config.to_dict(), "state_dict": weights,
                    "epoch": int(row["epoch"]), "steps": steps, "patches_seen": patches,
                    "train_seconds": train_seconds, "val": {k: v for k, v in row.items() if k.startswith("val_")}},
                   tmp)


# ----------------------------------------------------------------------------------------- training


class CompressorTask:
    """The codec's part of the training frame: model, Adam with a per-step schedule, EMA, validation."""

    def __init__(self, p: TrainCompressorParams, train_u8: np.ndarray, val_u8: np.ndarray, seed: int,
                 device: torch.device, d: distributed.Dist, snapshots: Path | None):
        self.p, self.train_u8, self.seed, self.device, self.d, self.snapshots = p, train_u8, seed, device, d, snapshots
        if d.world_size > p.batch_size:
            raise PipelineError(f"{STAGE}: batch_size {p.batch_size} is smaller than nproc {d.world_size}")
        self.cuda = cuda = device.type == "cuda"
        if cuda:  # fixed shapes: let cuDNN pick the fastest kernels; TF32 where autocast leaves fp32
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        seed_everything(seed)
        if device.type == "cpu" and p.cpu_threads:
            torch.set_num_threads(p.cpu_threads)
        self.cfg = ModelConfig.from_params(p)
        model = RNNCompressor(self.cfg)
        if p.init:
            load_init(model, p.init)
        model = model.to(device)
        model.stochastic_binarizer = p.binarizer == "stochastic"
        if cuda and p.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.opt = torch.optim.Adam(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        self.n_epoch = min(p.patches_per_epoch or len(train_u8), len(train_u8))
        self.steps_per_epoch = math.ceil(self.n_epoch / p.batch_size)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(p, self.steps_per_epoch * p.epochs))
        self.ema = EMA(model, p.ema_decay)
        self.train_seconds = 0.0
        self.fwd = self.train_dev = None  # built by the first epoch (after a resume)
        self.val_dev = torch.from_numpy(val_u8[: p.val_patches] if p.val_patches else val_u8) if d.is_main else None

    def state(self) -> dict[str, Any]:
        model = self.model
        return {"format": MODEL_FORMAT + "-train", "config": self.cfg.to_dict(), "model": model.state_dict(),
                "state_dict": model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if self.cuda else None,
                "train_seconds": self.train_seconds, "ema": self.ema.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.ema.load_state_dict(state.get("ema"))
        torch.set_rng_state(state["rng_cpu"])
        if self.cuda and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        self.train_seconds = state["train_seconds"]

    def _start(self) -> None:
        """DDP for the training forward/backward; validation and checkpoints use ``model`` itself.

        With one iteration the ConvLSTMs' hidden convolutions get no gradient: DDP must be told.
        """
        p, d, model = self.p, self.d, self.model
        net = distributed.wrap(model, d, self.device, find_unused_parameters=self.cfg.iterations == 1) \
            if d.enabled else model
        self.fwd = torch.compile(net) if p.compile else net
        self.train_dev = torch.from_numpy(self.train_u8).to(self.device)  # the whole set, uint8, on the device
        if d.is_main:
            self.val_dev = self.val_dev.to(self.device)
            ranks = f" ({d.world_size} processes, DDP)" if d.enabled else ""
            log(f"[{STAGE}] {count_parameters(model):,} parameters, {self.cfg.iterations} iterations, {self.n_epoch} "
                f"of {len(self.train_u8)} patches x {p.epochs} epochs on {self.device}{ranks}")
        model.train()

    def train_epoch(self, epoch: int) -> torch.Tensor:
        if self.fwd is None:
            self._start()
        p, d = self.p, self.d
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train_u8), generator=gen)[:self.n_epoch].to(self.device)
        if d.enabled:  # the binarizer's noise: its own stream per rank, reproducible on resume
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 1_009 + d.rank + 1)
        loss_sum = torch.zeros((), device=self.device)
        bar = progress(range(self.steps_per_epoch), desc=f"epoch {epoch + 1}/{p.epochs}", unit="step", leave=False,
                       **({} if d.is_main else {"disable": True}))
        for step in bar:
            idx = order[step * p.batch_size: (step + 1) * p.batch_size]
            if d.enabled:
                idx, weight = shard_indices(idx, d)
            x = to_input(self.train_dev[idx], self.cuda and p.channels_last)
            with autocast(self.device, p.amp):
                recon = self.fwd(x)
            loss = task_loss(p, x, recon)
            if d.enabled:  # DDP averages gradients over ranks: weight = world * (shard / global batch)
                loss = loss * weight
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if p.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), p.grad_clip)
            self.opt.step()
            self.sched.step()
            self.ema.update()
            loss_sum += loss.detach()
            if step % 25 == 24 and not bar.disable:  # the loop's only host sync, for the progress bar
                bar.set_postfix(loss=f"{loss_sum.item() / (step + 1):.4f}")
        bar.close()
        if d.enabled:  # sum of the ranks' weighted losses = world x the global batch losses
            loss_sum = d.all_reduce_sum(loss_sum) / d.world_size
        return loss_sum

    def end_epoch(self, epoch: int, loss_sum: torch.Tensor, seconds: float, cpu_seconds: float):
        self.train_seconds += seconds
        if not self.d.is_main:
            return None
        p = self.p
        with self.ema.applied():  # validated in float32, as the codec runs
            val = evaluate(self.model, self.val_dev, p, self.device, amp=self.cuda and p.amp)
        row = {"epoch": epoch + 1, "train_loss": loss_sum.item() / self.steps_per_epoch,
               "lr": self.opt.param_groups[0]["lr"], "patches_per_s": self.n_epoch / seconds, "epoch_seconds": seconds,
               **{f"val_{k}": v for k, v in val.items()}}
        kmax = max(p.val_iterations)
        log(f"[{STAGE}] epoch {epoch + 1}/{p.epochs}: loss {row['train_loss']:.4f}, val PSNR@{kmax} "
            f"{row[f'val_psnr_k{kmax}']:.2f} dB, SSIM@{kmax} {row[f'val_ssim_k{kmax}']:.4f}, "
            f"{row['patches_per_s']:.1f} patches/s")
        return row

    def after_checkpoint(self, epoch: int, row: dict[str, float]) -> None:
        every = self.p.snapshot_every
        if every and (epoch + 1) % every == 0 and self.snapshots is not None:
            save_snapshot(self.snapshots / f"epoch_{epoch + 1:05d}.pt", self.model, self.ema, row, self.train_seconds,
                          (epoch + 1) * self.steps_per_epoch, (epoch + 1) * self.n_epoch)


def train(p: TrainCompressorParams, train_u8: np.ndarray, val_u8: np.ndarray, *, seed: int = 0,
          device: torch.device | None = None, ckpt_path: Path | None = None, key: str = "",
          on_epoch=None, dist: distributed.Dist | None = None) -> dict[str, Any]:
    """Train (resuming from ``ckpt_path`` when it matches ``key``). Returns model, history, timings.

    ``on_epoch(row)`` is called after each epoch with that epoch's history row (MLflow logging),
    and first once per row of a resumed run. ``dist``: this process's rank under torchrun
    (``distributed.setup``); every rank loads the checkpoint, only rank 0 validates, saves
    checkpoints and calls ``on_epoch`` (other ranks return an empty history for the epochs they ran).
    """
    from pipeline.utils import select_device

    d = dist or distributed.Dist()
    device = device or select_device(p.device)
    task = CompressorTask(p, train_u8, val_u8, seed, device, d, ckpt_path.parent / "snapshots" if ckpt_path else None)
    history, _ = training.fit(task, p.epochs, d, training.Checkpoint(ckpt_path, key, STAGE), device, log_row=on_epoch)
    task.model.eval()
    task.ema.copy_to_model()  # publish the averaged weights
    return {"model": task.model, "history": history, "train_seconds": task.train_seconds, "device": device,
            "patches_seen": task.n_epoch * p.epochs, "patch_side": int(train_u8.shape[1])}


# ----------------------------------------------------------------------------------------- outputs


def summarize(p: TrainCompressorParams, result: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: final validation PSNR/SSIM and code bpp at each iteration count, speed."""
    last = result["history"][-1]
    model = result["model"]
    fwd = forward_flops(model, result["patch_side"])
    per_s = result["patches_seen"] / max(result["train_seconds"], 1e-9)
    metrics: dict[str, Any] = {
        "epochs": len(result["history"]), "train_loss": last["train_loss"], "val_loss": last["val_loss"],
        "train_seconds": round(result["train_seconds"], 2),
        "train_patches_per_s": per_s,
        "forward_gflop_per_patch": fwd / 1e9,  # all iterations; training costs about 3x
        "train_tflops": per_s * 3 * fwd / 1e12,  # achieved: compare with the device's peak
        "parameters": count_parameters(model), "fingerprint": model_fingerprint(model).hex(),
        "device": str(result["device"]),
    }
    for k in sorted(set(p.val_iterations)):
        metrics[f"val_psnr_k{k}"] = last[f"val_psnr_k{k}"]
        metrics[f"val_ssim_k{k}"] = last[f"val_ssim_k{k}"]
        metrics[f"code_bpp_k{k}"] = k * p.bits / BLOCK**2  # bits only; files add a header
    return metrics


def write_outputs(out_dir: Path, model: RNNCompressor, metrics: dict[str, Any], history: list[dict[str, float]],
                  meta: dict[str, Any]) -> None:
    save_model(model, out_dir / "model.pt", meta)
    atomic_write_text(out_dir / "history.csv", training.history_csv(history))
    save_json(out_dir / "metrics.json", metrics)


def log_to_mlflow(model: RNNCompressor, out_dir: Path, register: bool) -> None:
    import mlflow

    for name in ("metrics.json", "history.csv"):
        mlflow.log_artifact(str(out_dir / name))
    from mlflow.models import infer_signature

    signature = infer_signature(np.zeros((1, 3, 32, 32), dtype=np.float32))  # an image batch in [0, 1]
    training.log_model(STAGE, out_dir / "model.pt", "rnn-compressor", out_dir, REGISTERED_NAME if register else None,
                       signature)


def run(params, paths) -> None:
    """The stage (pipeline/stage.py): ``params`` validated, its MLflow run active (rank 0's, under torchrun)."""
    p = params.train_compressor
    training.launch(STAGE, p.nproc, p.device, paths.argv(),
                    lambda device, d: _train_and_publish(params, p, paths, device, d))


def _train_and_publish(params, p: TrainCompressorParams, paths, device: torch.device, d: distributed.Dist) -> None:
    """Every rank trains; rank 0 (or the only process) also logs and writes the outputs."""
    train_u8, val_u8 = load_patches(paths.patches)
    data_hash = file_digest(paths.patches)
    if p.init and not Path(p.init).is_file():
        raise PipelineError(f"{STAGE}: init {p.init}: no such model file")
    key = run_key(p, params.seed, data_hash, file_digest(Path(p.init)) if p.init else "")
    checkpoint = CKPT_DIR / "last.pt"
    if not d.is_main:  # trains its shards; rank 0 alone logs, checkpoints and writes outputs
        train(p, train_u8, val_u8, seed=params.seed, device=device, ckpt_path=checkpoint, key=key, dist=d)
        return
    import mlflow

    tags = {"model.parameters": count_parameters(RNNCompressor(ModelConfig.from_params(p))),
            "device": str(device), "data.patches_sha256": data_hash}
    if d.enabled:
        tags["ddp.world_size"] = d.world_size
    mlflow.set_tags(tags)
    result = train(p, train_u8, val_u8, seed=params.seed, device=device, ckpt_path=checkpoint, key=key,
                   on_epoch=lambda row: training.log_history_row(row, "epoch"), dist=d)
    if p.context_patches:
        from pipeline.compression import context

        log(f"[{STAGE}] fitting the entropy model (.rnnc v3-v5) on the codes of {min(p.context_patches, len(train_u8))} "
            "training patches")
        fitted = context.fit_model(result["model"], train_u8[:p.context_patches], p.eval_batch_size)
        log(f"[{STAGE}] entropy model: {fitted['seconds']} s, bits per code bit on its patches by iteration "
            + " ".join(f"{c:.3f}" for c in fitted["fit_bits_per_bit"]))
    metrics = summarize(p, result)
    if p.context_patches:
        metrics["context_fit_seconds"] = fitted["seconds"]
        metrics["context_fit_bits_per_bit"] = float(np.mean(fitted["fit_bits_per_bit"]))
    # no run id or time in the model file: the same weights must hash the same (DVC skips downstream)
    meta = {"profile": params.profile, "seed": params.seed, "run_key": key, "init": p.init,
            "epochs": metrics["epochs"], "val_psnr": {k: metrics[f"val_psnr_k{k}"] for k in p.val_iterations}}
    write_outputs(paths.out, result["model"], metrics, result["history"], meta)
    with training.outputs_kept_if_tracking_fails(STAGE, paths.out):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        log_to_mlflow(result["model"], paths.out, params.tracking.register_models)
    checkpoint.unlink(missing_ok=True)  # finished: a forced re-run trains again
    log(f"[{STAGE}] wrote {paths.out}/model.pt (fingerprint {metrics['fingerprint']}), metrics.json, history.csv")
