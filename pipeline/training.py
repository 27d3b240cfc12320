"""The training frame shared by the training stages (train_classifier, train_compressor).

A network brings a *task*: its model, its recipe (optimiser groups, lr per step, loss) and its
evaluation, as the methods of ``Task``. The frame owns what every training stage does alike:

- ``launch``: the device, the DDP relaunch under torchrun and the process group (pipeline.distributed);
- ``params_key`` and ``Checkpoint``: a resumable checkpoint keyed by the run's params, written
  atomically by rank 0 after every epoch and ignored (fresh start) when it is unreadable or its key
  differs;
- ``fit``: the epoch loop: resume, one ``train_epoch`` per epoch (every rank), then on rank 0 the
  evaluation and history row (``end_epoch``), the checkpoint, ``after_checkpoint`` and ``on_epoch``,
  the ranks meeting at a barrier; timing of the training alone;
- ``log_history_row``, ``history_csv`` and ``log_model``: the history sent to MLflow one row per
  epoch (replayed on resume), history.csv, and the model's checkpoint file logged (and registered) in
  MLflow as weights, a failure there ending in one line that says where the trained weights are.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch

from pipeline import distributed
from pipeline.errors import PipelineError
from pipeline.utils import atomic_path, log, select_device


# ----------------------------------------------------------------------------------------- launch


def launch(stage: str, nproc: int, device_name: str, argv: list[str],
           body: Callable[[torch.device, distributed.Dist], None]) -> None:
    """Run ``body(device, dist)`` in this process, or in each of ``nproc`` torchrun ranks.

    ``argv``: the stage's path options, given to every rank. In a rank the device is its own GPU.
    """
    if device_name == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{stage}.device is cuda but no CUDA device is available")
    device = select_device(device_name)
    if nproc > 1 and device.type == "cuda" and nproc > torch.cuda.device_count():
        raise PipelineError(f"{stage}: nproc {nproc} exceeds the {torch.cuda.device_count()} CUDA devices")
    if distributed.relaunch(stage, nproc, argv):  # nproc > 1: torchrun ran the ranks; nothing left here
        return
    d = distributed.setup(device)  # a no-op outside torchrun
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
    try:
        body(device, d)
    finally:
        distributed.teardown(d)


# ----------------------------------------------------------------------------------------- checkpoints


def params_key(section, *, exclude: Iterable[str] = (), left_out_at_default: dict[str, Any] | None = None,
               **extra: Any) -> str:
    """What a checkpoint must match to be resumed: a hash of the params section and ``extra`` (seed, data...).

    ``exclude``: fields that may change across a resume (``nproc``...). ``left_out_at_default``:
    dotted fields added after checkpoints were written, hashed only when they differ from the value
    they replaced, so a checkpoint from before they existed is still recognised.
    """
    dump = section.model_dump(mode="json", exclude=set(exclude))
    for dotted, default in (left_out_at_default or {}).items():
        *parents, leaf = dotted.split(".")
        node = dump
        for key in parents:
            node = node[key]
        if node.get(leaf) == default:
            del node[leaf]
    blob = json.dumps({"params": dump, **extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_state(path: Path) -> Any:
    """A checkpoint file's contents, loaded weights-only (tensors and plain values, nothing else unpickled); an
    unreadable file is one PipelineError naming it. The caller checks the shape of what it reads."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise PipelineError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None


class Checkpoint:
    """One resumable checkpoint file (``path`` None: none), valid for one ``key``, stored under ``key_field``."""

    def __init__(self, path: Path | None, key: str, stage: str, key_field: str = "key"):
        self.path, self.key, self.stage, self.key_field = path, key, stage, key_field

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - an unreadable checkpoint just means starting over
            log(f"[{self.stage}] ignoring unreadable checkpoint {self.path} ({type(err).__name__}); starting afresh")
            return None
        if not isinstance(state, dict) or state.get(self.key_field) != self.key:
            log(f"[{self.stage}] checkpoint {self.path} is from other params or data; starting afresh")
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        if self.path is None:
            return
        with atomic_path(self.path) as tmp:
            torch.save({self.key_field: self.key, **state}, tmp)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def to_cpu(tree):
    """A copy of nested tensors, dicts, lists and tuples with every tensor on the CPU (for a checkpoint)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


# ----------------------------------------------------------------------------------------- the epoch loop


class Task(Protocol):
    """What a network brings to ``fit``."""

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs (weights, optimiser, schedule, RNGs, counters), CPU tensors."""

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore ``state()`` from a checkpoint (every rank)."""

    def train_epoch(self, epoch: int) -> Any:
        """One epoch of training steps on this rank; returns its sums, already reduced over the ranks."""

    def end_epoch(self, epoch: int, sums: Any, seconds: float, cpu_seconds: float) -> dict[str, float] | None:
        """Account the epoch's time; on rank 0 evaluate and return the epoch's history row (None elsewhere)."""

    def after_checkpoint(self, epoch: int, row: dict[str, float]) -> None:
        """Rank 0, after the epoch's checkpoint (snapshots...)."""


def fit(task: Task, epochs: int, dist: distributed.Dist, checkpoint: Checkpoint, device: torch.device,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        log_row: Callable[[dict[str, float]], None] | None = None) -> tuple[list[dict[str, float]], int]:
    """Train ``task`` for ``epochs`` epochs, resuming from ``checkpoint`` when it matches.

    Rank 0 alone evaluates and writes the checkpoint, then calls ``log_row(row)`` and
    ``on_epoch(epoch, row)`` (1-based epoch; after the checkpoint: a kill from there on loses
    nothing); ``log_row`` also once per row a resumed run already had. Returns the history (rank 0;
    elsewhere what was resumed) and the epoch the run resumed from.
    """
    history: list[dict[str, float]] = []
    start = 0
    state = checkpoint.load()
    if state is not None:
        task.load_state(state)
        history, start = state["history"], state["epoch"]
        if dist.is_main:
            log(f"[{checkpoint.stage}] resuming from {checkpoint.path} after epoch {start}/{epochs}")
            for row in history:
                if log_row:
                    log_row(row)
    cuda = device.type == "cuda"
    for epoch in range(start, epochs):
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        sums = task.train_epoch(epoch)
        if cuda:
            torch.cuda.synchronize()
        row = task.end_epoch(epoch, sums, time.perf_counter() - t0, time.process_time() - c0)
        if not dist.is_main:
            dist.barrier()  # rank 0 evaluates and writes the checkpoint meanwhile
            continue
        history.append(row)
        checkpoint.save({"epoch": epoch + 1, "history": history, **task.state()})
        if checkpoint.path is not None:
            task.after_checkpoint(epoch, row)
        dist.barrier()  # the other ranks wait for the evaluation and the checkpoint
        if log_row:
            log_row(row)
        if on_epoch:
            on_epoch(epoch + 1, row)
    return history, start


# ----------------------------------------------------------------------------------------- outputs


def log_history_row(row: dict[str, float], step_field: str) -> None:
    """One history row to the active MLflow run, at step ``row[step_field]`` (NaN values left out)."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in row.items()
                        if k != step_field and isinstance(v, (int, float)) and not math.isnan(v)},
                       step=int(row[step_field]))


def history_csv(history: list[dict[str, float]], fields: Iterable[str] | None = None) -> str:
    """history.csv's text: one row per epoch, the columns ``fields`` (default: the first row's keys)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields or history[0]), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


@contextlib.contextmanager
def outputs_kept_if_tracking_fails(stage: str, out_dir: Path) -> Iterator[None]:
    """Around a stage's MLflow logging, after its outputs are written: a tracking failure ends in one line
    that says so, and the caller keeps its checkpoint (a re-run finds it complete and retrains nothing)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - tracking failed: the trained weights must not be lost
        if isinstance(err, PipelineError):
            raise
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise PipelineError(f"{stage}: logging to MLflow failed ({type(err).__name__}: {first}); the trained model "
                            f"is in {out_dir} and its checkpoint kept: re-run once tracking works (nothing is "
                            "retrained)") from None


def log_model(stage: str, checkpoint: Path, kind: str, out_dir: Path, registered_name: str | None,
              signature: Any = None) -> None:
    """Log the stage's checkpoint file (``kind``: its format) to the active MLflow run as its model, as
    weights, never a pickle (``pipeline.tracking_models.log_model_checkpoint``), registered when named (tracking
    failures as in ``outputs_kept_if_tracking_fails``)."""
    from pipeline import tracking_models

    with outputs_kept_if_tracking_fails(stage, out_dir):
        tracking_models.log_model_checkpoint(checkpoint, kind, registered_name, signature)
