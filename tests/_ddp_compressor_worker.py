"""Train the compressor on a tiny config, in one process or as one rank of torchrun; save what rank 0 saw.

Used by tests/test_distributed_training.py. ``python -m tests._ddp_compressor_worker OUT [CKPT]``:

- ``det``: the stochastic binarizer is replaced by sign(z) with the same straight-through gradient,
  so a step is a deterministic function of the weights and the batch: 1 and 2 processes must agree
  up to floating-point summation order.
- ``resumed`` (2 processes, CKPT given): resume from a checkpoint written by the one-process ``det``
  run after its first epoch (every rank loads it) and finish the run.
- ``stoch``: the real stochastic binarizer (its noise differs between 1 and 2 processes).
- one process only, CKPT given: also write that epoch-1 checkpoint.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed
from pipeline.compression import model as cm
from pipeline.compression import train as tc
from pipeline.compression.params import TrainCompressorParams

# 15 patches in global batches of 7: 7, 7, 1 -> shards 4+3, 4+3 and 1+0 (the empty-shard path)
CFG = dict(encoder_widths=(8, 16, 16, 16), decoder_widths=(16, 16, 16, 16), iterations=2, epochs=3,
           patches_per_epoch=15, batch_size=7, lr=0.005, lr_warmup=0.0, val_patches=8, val_iterations=(1, 2),
           eval_batch_size=8, nproc=1, amp=False,  # float32: bf16 sums differ between 1 and 2 ranks
           binarizer="stochastic", init=None)  # from scratch, with the stochastic binarizer ("stoch")
SEED = 5


def patches(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    base = rng.integers(0, 256, (n, 1, 1, 3)) + rng.normal(0, 3, (n, 1, 1, 3)) * (xx + yy)[None, :, :, None]
    return np.clip(base, 0, 255).astype(np.uint8)


def deterministic_binarize(z: torch.Tensor, stochastic: bool) -> torch.Tensor:
    b = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    return b + (z - z.detach()) if stochastic else b


class Killed(Exception):
    pass


def kill_after_first(row):
    if row["epoch"] == 1:
        raise Killed


def snapshot(result) -> dict:
    return {"state": {k: v.detach().clone() for k, v in result["model"].state_dict().items()},
            "history": result["history"]}


def ranks_in_sync(model: torch.nn.Module, d: distributed.Dist) -> float:
    """Largest difference between this rank's parameters and rank 0's, maximised over ranks.

    Parameters only: batch-norm running statistics (buffers) follow each rank's own shard after the
    last step (DDP broadcasts rank 0's at every forward; rank 0's are the ones saved).
    """
    flat = torch.cat([v.detach().float().flatten() for v in model.parameters()])
    ref = flat.clone()
    if d.enabled:
        torch.distributed.broadcast(ref, src=0)
    diff = (flat - ref).abs().max().reshape(1)
    if d.enabled:
        torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    return float(diff)


def main(out: str, ckpt: str | None) -> None:
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    d = distributed.setup(cpu)
    torch.set_num_threads(1)
    p = TrainCompressorParams(**CFG)
    data, val = patches(48, 0), patches(16, 1)
    saved: dict = {"world_size": d.world_size}

    stochastic = cm.binarize
    cm.binarize = deterministic_binarize
    det = tc.train(p, data, val, seed=SEED, device=cpu, dist=d)
    saved["det"] = snapshot(det)
    saved["det_sync"] = ranks_in_sync(det["model"], d)
    if ckpt and not d.enabled:  # the checkpoint the 2-process run resumes from
        try:
            tc.train(p, data, val, seed=SEED, device=cpu, ckpt_path=Path(ckpt), key="k", on_epoch=kill_after_first)
        except Killed:
            pass
    if ckpt and d.enabled:
        work = Path(out).with_suffix(".ckpt.pt")
        if d.is_main:
            shutil.copy(ckpt, work)
        d.barrier()
        resumed = tc.train(p, data, val, seed=SEED, device=cpu, ckpt_path=work, key="k", dist=d)
        saved["resumed"] = snapshot(resumed)
    cm.binarize = stochastic
    stoch = tc.train(p, data, val, seed=SEED, device=cpu, dist=d)
    saved["stoch"] = snapshot(stoch)
    saved["stoch_sync"] = ranks_in_sync(stoch["model"], d)
    if d.is_main:
        torch.save(saved, out)
    distributed.teardown(d)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
