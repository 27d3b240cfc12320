"""One prepared check for a lent GPU (the device tool's few minutes): CUDA path, throughput, quality.

    python bench/bench_gpu.py --tarball cifar-10-python.tar.gz --sums SHA256SUMS --out OUT
                              [--codec-seconds 200] [--gpu-profile-seconds 80] [--classifier-seeds 3]

In this order, each part with its own wall-clock budget, results appended to ``OUT/results.json`` as
each part ends (so a run cut short still returns what it measured), the device named first:

1. data: the CIFAR-10 tarball checked against ``SHA256SUMS`` and unpacked (``download``'s own
   extractor), then ``augment.prepare`` (the stage's function) writes ``cifar10.npz`` and the codec's
   patches with the long CPU run's settings (CIFAR ×4 bicubic crops, ``--patches`` of them);
2. codec, continued: the shipped ``models/rnnc-cpu.pt`` (cpu widths, 8 iterations) trained on with
   the stage's own ``train`` on CUDA (bf16 autocast, EMA, cosine decay sized to the budget from a short
   throughput probe); the published weights (EMA) come back as a compact checkpoint that
   ``python -m tools.release`` and ``load_model`` read, with snapshots along the way,
   so Kodak quality against GPU time is measured back on the CPU machine;
3. classifier: ``bench/bench_classifier.py --profile gpu`` (the airbench-style fast recipe), its
   time-to-94 % over ``--classifier-seeds`` seeds;
4. codec, gpu profile: the published widths, 16 iterations, batch 256, bf16, from scratch: patches/s,
   achieved TFLOP/s and the validation curve within the budget (the model itself stays there).

Imports only what the lent machine's Python lacks beside torch/numpy/pillow/yaml: pydantic and
pytorch-msssim (carried as wheels); no MLflow, DVC or Airflow: nothing is tracked from there.

With the device tool (64 MiB of working tree a call; the machine stays warm about 30 s between calls,
and /tmp with it), prepared before the first call:

    split -b 60000000 -d ../shared/datasets/cifar-10-python.tar.gz .gpu/cifar.part   # .gpu/, .whl/ ignored
    cp ../shared/datasets/SHA256SUMS .gpu/
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl pydantic pydantic_core annotated-types typing-inspection \
        typing_extensions pytorch-msssim    # the versions of constraints.txt
    run 1, carry [.gpu/cifar.part00]: mkdir -p /tmp/cifar && cp .gpu/cifar.part00 /tmp/cifar/
    run 2, carry [.gpu/cifar.part01]: cp .gpu/cifar.part01 /tmp/cifar/
    run 3, carry [.gpu/cifar.part02, .gpu/SHA256SUMS, .whl], timeout 620 s:
        cat .gpu/cifar.part02 >> ... (cat /tmp/cifar/* .gpu/cifar.part02 > /tmp/cifar.tgz); pip install --target
        /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site python3 bench/bench_gpu.py --tarball /tmp/cifar.tgz
        --sums .gpu/SHA256SUMS --out $OUT --work /tmp/work | tee $OUT/gpu.log

The default budgets (data ~1 min, 200 + 150 + 80 s of parts) fit one 10-minute call. ``--device cpu``
runs the same code path with tiny budgets where there is no GPU (a dry run: slow, minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEVICE = "cuda"  # --device cpu: a dry run of the whole script with tiny budgets, where there is no GPU

import torch  # noqa: E402

from pipeline.config import deep_merge, read_raw, resolve  # noqa: E402
from pipeline.utils import atomic_write_text  # noqa: E402

#: the long CPU run's recipe (scripts/train_codec_long.sh) over the cpu profile
LONG_RUN = {"augment": {"patches": 100000, "val_patches": 1000, "patch_scale": 4},
            "train_compressor": {"batch_size": 32, "binarizer": "deterministic", "ema_decay": 0.999, "amp": True,
                                 "val_patches": 512, "lr_schedule": "cosine"}}


def params_for(profile: str, overrides: dict) -> object:
    raw = read_raw(ROOT / "params.yaml")
    raw["profile"] = profile
    for section, values in overrides.items():  # over the profile's own values (they win over the base)
        profiles = raw[section].setdefault("profiles", {}) or {}
        profiles[profile] = deep_merge(profiles.get(profile) or {}, values)
        raw[section]["profiles"] = profiles
    return resolve(raw, "params.yaml")


class Results:
    def __init__(self, out: Path):
        self.path, self.data = out / "results.json", {}

    def add(self, key: str, value) -> None:
        self.data[key] = value
        atomic_write_text(self.path, json.dumps(self.data, indent=1, default=str) + "\n")
        print(f"== {key}: {json.dumps(value, default=str)[:600]}", flush=True)


def device_info() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": sys.version.split()[0],
            "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = list(torch.cuda.get_device_capability(0))
        info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def prepare_data(tarball: Path, sums: Path, work: Path, patches: int) -> dict:
    from pipeline.data import augment
    from pipeline.data.download import CIFAR_DIR, read_sums, safe_extract_cifar
    from pipeline.utils import file_digest

    t0 = time.perf_counter()
    params = params_for("cpu", {"augment": {**LONG_RUN["augment"], "patches": patches}})
    want = read_sums(str(sums.parent), params.data)["cifar-10-python.tar.gz"]  # the mirror's own SHA256SUMS format
    got = file_digest(tarball)
    if got != want:
        raise SystemExit(f"{tarball}: sha256 {got} != {want}")
    safe_extract_cifar(tarball, work / "raw")
    stats = augment.prepare(params.augment, params.train_classifier.augmentation, params.seed, work / "raw" / CIFAR_DIR,
                            work / "cifar10.npz", work / "patches.npz", work / "preview.png")
    return {"seconds": round(time.perf_counter() - t0, 1), "augment": stats}


def codec_params(profile: str, section: dict, patches: int):
    over = {"augment": {**LONG_RUN["augment"], "patches": patches}, "train_compressor": section}
    return params_for(profile, over)


def train_codec(p, train_u8, val_u8, seed: int, ckpt: Path | None = None) -> dict:
    from pipeline.compression import train as ctrain

    t0 = time.perf_counter()
    res = ctrain.train(p, train_u8, val_u8, seed=seed, device=torch.device(DEVICE), ckpt_path=ckpt,
                       key="bench_gpu")
    res["wall_s"] = time.perf_counter() - t0
    res["metrics"] = ctrain.summarize(p, res)
    return res


def sized(probe_patches_per_s: float, seconds: float, batch: int, epoch_s: float) -> tuple[int, int]:
    """(epochs, patches_per_epoch) filling ``seconds`` at the probed speed, epochs of about ``epoch_s``."""
    total = probe_patches_per_s * seconds
    epochs = max(1, round(seconds / epoch_s))
    per_epoch = max(batch, int(total / epochs) // batch * batch)
    return epochs, per_epoch


def codec_continued(work: Path, out: Path, seconds: float, batch: int, lr: float, seed: int) -> dict:
    """The shipped cpu model, trained on on CUDA within ``seconds`` (probe first, then a sized cosine run)."""
    from pipeline.compression import train as ctrain

    train_u8, val_u8 = ctrain.load_patches(work / "patches.npz")
    base = {**LONG_RUN["train_compressor"], "batch_size": batch, "lr": lr, "lr_warmup": 0.02,
            "init": str(ROOT / "models" / "rnnc-cpu.pt"), "device": DEVICE}
    probe_p = codec_params("cpu", {**base, "epochs": 1, "patches_per_epoch": batch * (60 if DEVICE == "cuda" else 3)},
                           len(train_u8))
    train_codec(probe_p.train_compressor, train_u8, val_u8, seed)  # warm-up: cuDNN autotuning, allocator
    probe = train_codec(probe_p.train_compressor, train_u8, val_u8, seed)
    speed = probe["metrics"]["train_patches_per_s"]
    epochs, per_epoch = sized(speed, seconds, batch, epoch_s=seconds / 12)
    every = max(1, epochs // 3)  # snapshots at 1/3 and 2/3 come back (the end is the compact checkpoint)
    params = codec_params("cpu", {**base, "epochs": epochs, "patches_per_epoch": per_epoch, "snapshot_every": every},
                          len(train_u8))
    p = params.train_compressor
    print(f"codec continued: probe {speed:.0f} patches/s at batch {batch}; {epochs} epochs x {per_epoch} patches, "
          f"lr {lr} cosine", flush=True)
    ckpt = work / "ckpt" / "last.pt"
    res = train_codec(p, train_u8, val_u8, seed, ckpt)
    # a compact checkpoint for `release` and `load_model`: the published (EMA) weights, no optimiser state
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = res["model"].cpu()
    compact = {"format": state["format"], "config": state["config"], "epoch": state["epoch"],
               "history": state["history"], "train_seconds": state["train_seconds"],
               "model": {k: v.detach().clone() for k, v in model.state_dict().items()}, "ema": None}
    (out / "codec").mkdir(exist_ok=True)
    torch.save(compact, out / "codec" / "last_compact.pt")
    for snap in sorted((ckpt.parent / "snapshots").glob("epoch_*.pt"))[:2]:  # $OUT brings back 8 files at most
        if int(snap.stem.split("_")[1]) < epochs:
            (out / "codec" / snap.name).write_bytes(snap.read_bytes())
    (out / "codec" / "params.json").write_text(json.dumps(
        {"profile": "cpu", "seed": seed, "augment": params.augment.model_dump(mode="json"),
         "train_compressor": p.model_dump(mode="json")}, indent=1) + "\n")
    return {"probe_patches_per_s": speed, "batch": batch, "lr": lr, "epochs": epochs, "patches_per_epoch": per_epoch,
            "wall_s": round(res["wall_s"], 1), "metrics": res["metrics"],
            "history": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                        for r in res["history"]]}


def codec_gpu_profile(work: Path, seconds: float, seed: int) -> dict:
    """The gpu profile's codec (published widths, 16 iterations, batch 256, bf16) from scratch, sized to ``seconds``."""
    from pipeline.compression import train as ctrain

    train_u8, val_u8 = ctrain.load_patches(work / "patches.npz")
    base = {"device": DEVICE, "val_patches": 1000} if DEVICE == "cuda" else \
        {"device": DEVICE, "val_patches": 4, "batch_size": 2, "eval_batch_size": 4}
    probe_p = codec_params("gpu", {**base, "epochs": 1, "patches_per_epoch": 256 * 20 if DEVICE == "cuda" else 2},
                           len(train_u8))
    batch = probe_p.train_compressor.batch_size
    train_codec(probe_p.train_compressor, train_u8, val_u8, seed)
    probe = train_codec(probe_p.train_compressor, train_u8, val_u8, seed)
    speed = probe["metrics"]["train_patches_per_s"]
    epochs, per_epoch = sized(speed, seconds, batch, epoch_s=seconds / 6)
    p = codec_params("gpu", {**base, "epochs": epochs, "patches_per_epoch": per_epoch}, len(train_u8)).train_compressor
    print(f"codec gpu profile: probe {speed:.0f} patches/s; {epochs} epochs x {per_epoch} patches", flush=True)
    res = train_codec(p, train_u8, val_u8, seed)
    full = codec_params("gpu", {}, len(train_u8)).train_compressor  # the profile as written
    full_patches = full.epochs * (full.patches_per_epoch or 200000)
    return {"probe_patches_per_s": speed, "epochs": epochs, "patches_per_epoch": per_epoch,
            "wall_s": round(res["wall_s"], 1), "metrics": res["metrics"],
            "history": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                        for r in res["history"]],
            "profile_as_written_patches": full_patches,
            "profile_as_written_minutes_at_this_speed": round(full_patches / res["metrics"]["train_patches_per_s"] / 60, 1)}


def classifier(work: Path, out: Path, seeds: int, timeout: float) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_classifier.py"), "--profile", "gpu", "--seeds", str(seeds),
           "--data", str(work / "cifar10.npz"), "--device", DEVICE, "--json", str(out / "classifier.json")]
    if DEVICE == "cpu":  # dry run
        cmd += ["--epochs", "0.05"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        text, rc = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or ""), "timeout"
    print(text, flush=True)
    summary = json.loads((out / "classifier.json").read_text()) if (out / "classifier.json").is_file() else None
    return {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "summary": summary,
            "output_tail": text[-3000:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tarball", type=Path, required=True)
    ap.add_argument("--sums", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--patches", type=int, default=300000, help="codec training patches to prepare")
    ap.add_argument("--codec-seconds", type=float, default=200.0)
    ap.add_argument("--codec-batch", type=int, default=256)
    ap.add_argument("--codec-lr", type=float, default=0.0005)
    ap.add_argument("--classifier-seeds", type=int, default=3)
    ap.add_argument("--classifier-timeout", type=float, default=150.0)
    ap.add_argument("--gpu-profile-seconds", type=float, default=80.0)
    ap.add_argument("--parts", default="data,continued,classifier,gpu_profile")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script's code path (tiny budgets)")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    os.environ.setdefault("PIPELINE_NO_PROGRESS", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    parts = args.parts.split(",")
    results = Results(args.out)
    t_all = time.perf_counter()
    results.add("device", device_info())
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", flush=True)
        return 1
    if "data" in parts:
        results.add("data", prepare_data(args.tarball, args.sums, work, args.patches))
    steps = [("continued", lambda: codec_continued(work, args.out, args.codec_seconds, args.codec_batch,
                                                    args.codec_lr, seed=0)),
             ("classifier", lambda: classifier(work, args.out, args.classifier_seeds, args.classifier_timeout)),
             ("gpu_profile", lambda: codec_gpu_profile(work, args.gpu_profile_seconds, seed=0))]
    for name, fn in steps:
        if name not in parts:
            continue
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - one part failing must not lose the others' figures
            import traceback

            traceback.print_exc()
            value = {"error": f"{type(err).__name__}: {err}"}
        value["part_seconds"] = round(time.perf_counter() - t0, 1)
        results.add(name, value)
        torch.cuda.empty_cache()
    results.add("total_seconds", round(time.perf_counter() - t_all, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
