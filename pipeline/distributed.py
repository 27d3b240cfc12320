"""Multi-process (DistributedDataParallel) support shared by the training stages.

A stage whose params say ``nproc > 1`` re-launches itself under ``torchrun`` (one process per GPU, or
per CPU slot with the gloo backend). Every rank trains on its own shard of each global batch; DDP
averages the gradients, so a step equals the single-process step on the whole batch (up to
batch-norm statistics, which stay per rank). Rank 0 alone logs to MLflow (into the launcher's run, see
pipeline/stage.py) and writes checkpoints and outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from typing import TYPE_CHECKING

from pipeline.errors import PipelineError

if TYPE_CHECKING:  # torch is imported where it is used: a stage that never trains (download, report) skips it
    import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> slice:
        """This rank's part of a global batch of ``n`` items (contiguous, as equal as possible)."""
        per = -(-n // self.world_size)
        return slice(min(self.rank * per, n), min((self.rank + 1) * per, n))

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(stage: str, nproc: int, argv: list[str] | tuple[str, ...] = ()) -> bool:
    """Run ``python -m pipeline <stage> <argv>`` under torchrun with ``nproc`` processes.

    ``argv``: the stage's path options (``StagePaths.argv()``), so every rank reads and writes what
    the launcher was told to. The launcher's active MLflow run, if any, is handed to the ranks in the
    environment (``tracking.handoff_env``): rank 0 logs into it, the launcher keeps owning it.
    Returns False when there is nothing to do (nproc == 1, or already a torchrun worker); otherwise
    waits for the workers and returns True, raising PipelineError if any failed.
    """
    if nproc <= 1 or under_torchrun():
        return False
    from pipeline.tracking import handoff_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "pipeline", stage, *argv]
    print(f"[distributed] {stage}: {nproc} processes under torchrun", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env={**os.environ, **handoff_env()})
    if proc.returncode != 0:
        raise PipelineError(f"{stage}: distributed run failed (exit {proc.returncode}); see the rank logs above")
    return True


def setup(device: torch.device) -> Dist:
    """Join the process group when running under torchrun (NCCL on CUDA, gloo on CPU)."""
    import torch
    import torch.distributed as dist

    if not under_torchrun():
        return Dist()
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    elif not dist.is_initialized():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
        dist.init_process_group("gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def wrap(model: torch.nn.Module, d: Dist, device: torch.device, **ddp_kwargs) -> torch.nn.Module:
    """``model`` itself in one process, else a DDP wrapper (``ddp_kwargs``: e.g. find_unused_parameters)."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None, **ddp_kwargs)


def teardown(d: Dist) -> None:
    import torch.distributed as dist

    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
