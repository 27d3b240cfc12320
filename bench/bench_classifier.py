"""Benchmark the ``fast`` classifier recipe: training images/s and time-to-94%.

    python bench/bench_classifier.py --profile gpu --seeds 5       # the airbench-style target run
    python bench/bench_classifier.py --profile cpu --seeds 1       # what the cpu profile trains
    python bench/bench_classifier.py --profile gpu --epochs 0.2 --json out.json   # quick throughput

Reads ``data/prepared/cifar10.npz`` (run the download and augment stages first) and the
``train_classifier`` section of params.yaml at the chosen profile (``--set KEY=VALUE`` overrides,
e.g. ``--set fast.widths=[64,256,256]``). Each seed trains from scratch without checkpoints;
training time excludes evaluation, and CUDA is synchronised only at epoch ends. Time-to-target is
reported two ways: the mean training time of the full recipe when its mean final (TTA) accuracy
reaches the target (airbench's definition), and per seed the training time at the first epoch end
whose plain test accuracy reaches it. The device it ran on is printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.classifier.data import CifarData, load_arrays  # noqa: E402
from pipeline.classifier.inference import predict_logits  # noqa: E402
from pipeline.classifier.recipes import make_recipe  # noqa: E402
from pipeline.classifier import train as stage  # noqa: E402
from pipeline.classifier.train import keep_freed_memory, train  # noqa: E402
from pipeline.config import deep_merge, parse_override, read_raw, resolve  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.stage import defaults  # noqa: E402
from pipeline.utils import select_device  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {torch.get_num_threads()} threads of {os.cpu_count()} cores (torch {torch.__version__})"


def load_cfg(params_file: str, profile: str | None, overrides: list[str]):
    raw = read_raw(params_file)
    if profile:
        raw["profile"] = profile
    section = raw["train_classifier"]
    for item in overrides:
        keys, value = parse_override(item)
        patch = value
        for key in reversed(keys):
            patch = {key: patch}
        section = deep_merge(section, patch)
        active = (section.get("profiles") or {}).get(raw.get("profile", "cpu"))
        if isinstance(active, dict):  # the profile's own value would win over the base one: override it there too
            section["profiles"] = {**section["profiles"], raw.get("profile", "cpu"): deep_merge(active, patch)}
    raw["train_classifier"] = section
    cfg = resolve(raw, params_file).train_classifier
    if cfg.recipe != "fast":
        raise PipelineError("the benchmark measures the fast recipe (train_classifier.recipe: fast)")
    return cfg


def run_seed(cfg, data: CifarData, seed: int, device: torch.device, target: float) -> dict:
    res = train(cfg, data, seed, device, checkpoint=None, eval_last=False)
    recipe = make_recipe(cfg)
    levels = predict_logits(res.model, data.x_test, cfg.eval_batch_size, cfg.tta, recipe.autocast(device),
                            recipe.channels_last(device))
    accs = [(lg.argmax(1) == data.y_test).float().mean().item() for lg in levels]
    res.history[-1]["test_acc"] = accs[0]
    reached = next((r["train_time_s"] for r in res.history if r["test_acc"] >= target), None)
    return {"seed": seed, "test_acc": accs[-1], "test_acc_no_tta": accs[0], "test_acc_by_tta_level": accs,
            "train_time_s": res.train_time_s,
            "images_per_s": res.images_seen / res.train_time_s, "epoch_time_to_target_s": reached,
            "history": [{k: r[k] for k in ("epoch", "train_acc", "test_acc", "train_time_s")} for r in res.history]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", choices=["cpu", "gpu", "coursework", "tiny"], help="default: params.yaml's")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override train_classifier.KEY (e.g. epochs=0.5)")
    ap.add_argument("--epochs", type=float, help="shorthand for --set epochs=E")
    ap.add_argument("--seeds", type=int, default=1, help="how many seeds: FIRST..FIRST+N-1 (default 1)")
    ap.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0, params.yaml's)")
    ap.add_argument("--target", type=float, default=0.94, help="accuracy target (default 0.94)")
    ap.add_argument("--data", help="default: dvc.yaml's train_classifier --data")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda (default: params)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run on CUDA")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("PIPELINE_NO_PROGRESS", "1")
    try:
        args.data = args.data or str(defaults(stage).data)
        overrides = args.set + ([f"epochs={args.epochs}"] if args.epochs else [])
        cfg = load_cfg(args.params, args.profile, overrides)
        device = select_device(args.device or cfg.device)
        print(f"device: {device_name(device)}", flush=True)
        if device.type == "cpu":
            keep_freed_memory()
        data = CifarData.from_arrays(load_arrays(args.data), device)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"recipe fast: {cfg.epochs:g} epochs, batch {cfg.batch_size}, widths {cfg.fast.widths}, TTA {cfg.tta}, "
          f"{len(data.x_train)} train / {len(data.x_test)} test images", flush=True)
    if device.type == "cuda" and not args.no_warmup:  # kernels, cuDNN autotuning, allocator
        t0 = time.perf_counter()
        train(cfg.model_copy(update={"epochs": min(cfg.epochs, 1.0)}), data, 999, device, eval_last=False)
        print(f"warm-up run: {time.perf_counter() - t0:.1f} s (untimed)", flush=True)
    runs = []
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    for seed in seeds:
        r = run_seed(cfg, data, seed, device, args.target)
        runs.append(r)
        ttt = f"{r['epoch_time_to_target_s']:.2f} s" if r["epoch_time_to_target_s"] is not None else "not reached"
        levels = " / ".join(f"{100 * a:.2f}" for a in r["test_acc_by_tta_level"])
        print(f"seed {seed}: test acc {100 * r['test_acc']:.2f}% (TTA {cfg.tta}), {100 * r['test_acc_no_tta']:.2f}% "
              f"plain (TTA levels 0..{cfg.tta}: {levels} %); training {r['train_time_s']:.2f} s, "
              f"{r['images_per_s']:.0f} images/s; "
              f"first epoch >= {100 * args.target:g}% plain: {ttt}", flush=True)
    accs = [r["test_acc"] for r in runs]
    times = [r["train_time_s"] for r in runs]
    summary = {
        "device": device_name(device), "seeds": seeds, "epochs": cfg.epochs, "target": args.target,
        "mean_test_acc": statistics.fmean(accs), "std_test_acc": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "mean_test_acc_no_tta": statistics.fmean(r["test_acc_no_tta"] for r in runs),
        "mean_train_time_s": statistics.fmean(times),
        "mean_images_per_s": statistics.fmean(r["images_per_s"] for r in runs),
    }
    summary["time_to_target_s"] = summary["mean_train_time_s"] if summary["mean_test_acc"] >= args.target else None
    print(f"mean over {args.seeds} seed(s): {100 * summary['mean_test_acc']:.2f}% "
          f"(std {100 * summary['std_test_acc']:.2f}), {summary['mean_train_time_s']:.2f} s training, "
          f"{summary['mean_images_per_s']:.0f} images/s")
    if summary["time_to_target_s"] is not None:
        print(f"time-to-{100 * args.target:g}%: {summary['time_to_target_s']:.2f} s on {summary['device']}")
    else:
        print(f"time-to-{100 * args.target:g}%: not reached (mean {100 * summary['mean_test_acc']:.2f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs, "params": cfg.model_dump(mode="json")},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
