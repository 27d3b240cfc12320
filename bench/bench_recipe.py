"""Equal-wall-time comparison of RNN codec training recipes, scored on Kodak.

Each variant trains the project's codec (``CompressorTask``: the train_compressor stage's model, loss,
optimiser, EMA and binarizer) from scratch for exactly ``--minutes`` of wall time on the same patches,
then scores PSNR and MS-SSIM (the evaluate stage's metrics) of its reconstructions of a few Kodak images
(never trained on) at 1/2/4/8 (12/16) iterations = 0.125/0.25/0.5/1 (1.5/2) bpp of raw bits. The learning-rate schedule
(warm-up, then constant / cosine / multistep) runs over the wall-time budget rather than over a step
count, so a slower variant gets the same schedule shape in fewer steps. One JSON line per variant is
appended to ``--out`` with its whole configuration, steps, throughput, machine and git commit.

    python -m pipeline augment     # the patches (or point --patches at any patches.npz)
    python bench/bench_recipe.py --minutes 15 --threads 1 --kodak ../shared/datasets/kodak \\
        --variant base --variant l2:loss=l2 --variant it4:iterations=4 \\
        --variant narrow:encoder_widths=[8,32,64,64],decoder_widths=[64,64,32,16] --out recipes.jsonl

``--base`` (a JSON object) sets the shared recipe; its default is the long run's first phase (batch 32,
bf16 autocast, deterministic binarizer, constant lr 0.001 after a 1 % warm-up, L1; EMA off: a 0.999 average
of ~1,400 steps from scratch still holds a quarter of the random init) with the cpu profile's cell (ConvGRU;
``cell=lstm`` for the coursework's ConvLSTM). Scores are of raw bits: two cells whose codes differ in how well the
entropy coder predicts them spend different bytes on the same iterations, so compare shipped candidates at equal
file size with ``bench/bench_models.py``.
Variants run one after another in this process; for equal conditions run them on an otherwise idle
core each (``--threads``) or one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PIPELINE_NO_PROGRESS", "1")  # a bar per 10-step "epoch" would drown the log

from pipeline import distributed  # noqa: E402
from pipeline.compression.model import count_parameters  # noqa: E402
from pipeline.compression.params import TrainCompressorParams  # noqa: E402
from pipeline.compression.recipe import lr_factor  # noqa: E402
from pipeline.compression.train import CompressorTask, load_patches  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.utils import git_commit  # noqa: E402
from tools.release import kodak_quality  # noqa: E402

BASE = {"batch_size": 32, "amp": True, "binarizer": "deterministic", "ema_decay": None, "lr": 0.001,
        "lr_schedule": "constant", "lr_warmup": 0.01, "loss": "l1", "iterations": 8, "val_patches": 1,
        "context_patches": 0, "device": "cpu", "init": None}  # from scratch
STEPS_PER_CHECK = 10  # the wall clock is checked every this many steps (one "epoch" of the task)
SCORED = (1, 2, 4, 8, 12, 16)  # iteration counts scored on Kodak (those the variant trains)
SCHEDULE_RES = 100_000  # the time-based schedule's resolution (lr_factor's step count)


class TimeSchedule:
    """Stands in for the task's per-step LambdaLR: lr = peak * lr_factor(fraction of the budget elapsed)."""

    def __init__(self, opt: torch.optim.Optimizer, p: TrainCompressorParams, budget_s: float, clock=time.perf_counter):
        self.opt, self.budget_s, self.peak, self.clock = opt, budget_s, p.lr, clock
        self.f = lr_factor(p, SCHEDULE_RES)
        self.t0 = clock()
        self.step()

    def step(self) -> None:
        frac = min(1.0, (self.clock() - self.t0) / self.budget_s)
        for g in self.opt.param_groups:
            g["lr"] = self.peak * self.f(min(SCHEDULE_RES - 1, int(frac * SCHEDULE_RES)))


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:key=value,key=value' (values parsed as YAML; brackets keep their commas) -> (name, dict)."""
    name, _, rest = text.partition(":")
    out, depth, cur = {}, 0, ""
    for ch in rest + ",":
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            if cur.strip():
                key, eq, value = cur.partition("=")
                if not eq:
                    raise SystemExit(f"error: variant {name!r}: {cur!r} is not key=value")
                out[key.strip()] = yaml.safe_load(value)
            cur = ""
        else:
            cur += ch
    return name, out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def train_for(p: TrainCompressorParams, train_u8: np.ndarray, budget_s: float, seed: int, clock: str = "wall") -> dict:
    """Train a fresh model for ``budget_s`` seconds of ``clock`` (wall time, or this process's CPU time: fair
    when other work shares the cores); returns the published (EMA) model and counts."""
    p = p.model_copy(update={"patches_per_epoch": p.batch_size * STEPS_PER_CHECK, "epochs": 1})
    task = CompressorTask(p, train_u8, train_u8[:1], seed, torch.device("cpu"), distributed.Dist(), None)
    now = CLOCKS[clock]
    task.sched = TimeSchedule(task.opt, p, budget_s, now)
    t0, epoch, losses = now(), 0, []
    while now() - t0 < budget_s:
        losses.append(task.train_epoch(epoch).item() / task.steps_per_epoch)
        epoch += 1
        if epoch % 50 == 0:
            print(f"  {now() - t0:6.0f} s  step {epoch * STEPS_PER_CHECK}  loss {np.mean(losses[-50:]):.4f}",
                  flush=True)
    seconds = now() - t0
    task.model.eval()
    task.ema.copy_to_model()
    steps = epoch * STEPS_PER_CHECK
    return {"model": task.model, "seconds": seconds, "steps": steps, "patches_per_s": steps * p.batch_size / seconds,
            "final_loss": float(np.mean(losses[-20:]))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", required=True, help="name[:key=value,...] over --base")
    ap.add_argument("--base", default="{}", help="JSON object over the built-in base recipe")
    ap.add_argument("--minutes", type=float, default=15.0, help="time of each variant's training (see --clock)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: elapsed time; cpu: this process's CPU time (equal compute on shared cores)")
    ap.add_argument("--patches", type=Path, default=Path("data/prepared/patches.npz"))
    ap.add_argument("--kodak", type=Path, required=True, help="folder of kodim*.png")
    ap.add_argument("--images", default="04,07,15,23", help="Kodak image numbers scored ('all': every one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="append one JSON line per variant here")
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    try:
        images = None if a.images == "all" else [f"kodim{int(n):02d}.png" for n in a.images.split(",")]
        extra = json.loads(a.base)
    except ValueError as err:
        raise SystemExit(f"error: --images is a list of numbers or 'all', --base a JSON object ({err})") from None
    missing = [name for name in images or [] if not (a.kodak / name).is_file()]
    if missing:
        raise SystemExit(f"error: {a.kodak}: no {', '.join(missing)}")
    base = {**BASE, **extra, "cpu_threads": a.threads}
    variants = []  # every variant is checked before the first one trains
    for spec in a.variant:
        name, over = parse_variant(spec)
        merged = {**base, **over}
        merged.setdefault("val_iterations", [k for k in SCORED if k <= merged.get("iterations", 8)])
        try:
            variants.append((name, over, TrainCompressorParams(**merged)))
        except ValueError as err:
            raise SystemExit(f"error: variant {name!r}: {err}") from None
    try:
        train_u8, _ = load_patches(a.patches)
    except PipelineError as err:
        raise SystemExit(f"error: {err}") from None
    commit = git_commit(Path(__file__).resolve().parents[1])  # the code this process runs (HEAD may move meanwhile)
    print(f"{len(train_u8)} patches of {train_u8.shape[1]} px; {a.minutes} min ({a.clock}) per variant; {a.threads} thread(s); "
          f"{platform.processor() or platform.machine()}; torch {torch.__version__}")
    for name, over, p in variants:
        print(f"[{name}] {over or 'base recipe'}", flush=True)
        r = train_for(p, train_u8, a.minutes * 60, a.seed, a.clock)
        ks = [k for k in SCORED if k <= p.iterations]
        q = {k: kodak_quality(r["model"], a.kodak, k, images) for k in ks}
        row = {"variant": name, "overrides": over, "recipe": p.model_dump(mode="json"), "minutes": a.minutes, "clock": a.clock,
               "seconds": round(r["seconds"], 1), "steps": r["steps"], "patches_per_s": round(r["patches_per_s"], 1),
               "final_loss": round(r["final_loss"], 5), "parameters": count_parameters(r["model"]),
               "patch_side": int(train_u8.shape[1]), "kodak_images": a.images,
               "kodak_psnr": {k: round(q[k]["psnr"], 2) for k in ks},
               "kodak_ms_ssim": {k: round(q[k]["ms_ssim"], 4) for k in ks},
               "threads": a.threads, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M")}
        print(f"[{name}] {r['steps']} steps, {row['patches_per_s']} patches/s; Kodak PSNR "
              + " / ".join(f"{row['kodak_psnr'][k]:.2f}" for k in ks) + " dB, MS-SSIM "
              + " / ".join(f"{row['kodak_ms_ssim'][k]:.4f}" for k in ks) + f" at {ks} iterations", flush=True)
        if a.out:
            with a.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
