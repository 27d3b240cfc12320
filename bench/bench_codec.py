"""Benchmark the RNN codec: encode and decode seconds per megapixel, and peak memory.

    python bench/bench_codec.py                          # cpu-profile-sized model, 768x512, all iterations
    python bench/bench_codec.py --size 4000x3000         # a large photo: time and peak RSS
    python bench/bench_codec.py --model data/compressor/model.pt --iterations 8 --json out.json

Without --model the network is built untrained with the widths of the active params.yaml profile
(speed does not depend on the weights). Runs on the CPU and, when CUDA is present, on the GPU too
(its name is printed). Peak RSS is the whole process's (resource.getrusage), so run one large size
per invocation to read the memory of that size.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.compression.codec import DEFAULT_TILE, RNNCodec, bits_per_pixel, load_model  # noqa: E402
from pipeline.compression.model import ModelConfig, RNNCompressor, count_parameters  # noqa: E402


def synthetic_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(xx / 37.0), 128 + 100 * np.cos(yy / 23.0), (xx + yy) % 256], axis=2)
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def build_model(source: str | None, params: str) -> RNNCompressor:
    if source:
        return load_model(source)
    from pipeline.config import load_params

    torch.manual_seed(0)
    return RNNCompressor(ModelConfig.from_params(load_params(params).train_compressor)).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(codec: RNNCodec, img: np.ndarray, iterations: int, repeat: int) -> dict:
    mp = img.shape[0] * img.shape[1] / 1e6
    codec.compress(img[:64, :64], 1)  # warm-up
    enc, dec = [], []
    for _ in range(repeat):
        sync(codec.device)
        t0 = time.perf_counter()
        data = codec.compress(img, iterations)
        sync(codec.device)
        t1 = time.perf_counter()
        codec.decompress(data)
        sync(codec.device)
        enc.append(t1 - t0)
        dec.append(time.perf_counter() - t1)
    return {"encode_s": min(enc), "decode_s": min(dec), "encode_s_per_mp": min(enc) / mp,
            "decode_s_per_mp": min(dec) / mp, "bytes": len(data),
            "bpp": bits_per_pixel(len(data), *img.shape[:2])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint or MLflow URI (default: untrained, widths from params.yaml)")
    ap.add_argument("--params", default="params.yaml", help="params file for the untrained model's widths")
    ap.add_argument("--size", default="768x512", help="WxH of the synthetic test image")
    ap.add_argument("--iterations", type=int, help="iterations (default: the model's maximum)")
    ap.add_argument("--tile", type=int, default=DEFAULT_TILE)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--devices", default="auto", help="cpu, cuda or auto (cpu, plus cuda when present)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    w, h = (int(v) for v in args.size.lower().split("x"))
    img = synthetic_image(h, w)
    model = build_model(args.model, args.params)
    k = args.iterations or model.config.iterations
    devices = ["cpu", "cuda"] if args.devices == "auto" else [args.devices]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    print(f"model: {count_parameters(model):,} parameters, widths {model.config.encoder_widths} / "
          f"{model.config.decoder_widths}, {k} iterations; image {w}x{h} ({w * h / 1e6:.2f} MP), tile {args.tile}")
    results = []
    for dev in devices:
        name = torch.cuda.get_device_name() if dev == "cuda" else \
            f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
        codec = RNNCodec(model, device=dev, tile=args.tile)
        r = {"device": dev, "device_name": name, "size": args.size, "iterations": k, "tile": args.tile,
             "torch": torch.__version__, **bench(codec, img, k, args.repeat)}
        results.append(r)
        print(f"{dev:4s} [{name}]: encode {r['encode_s']:.2f} s ({r['encode_s_per_mp']:.2f} s/MP), "
              f"decode {r['decode_s']:.2f} s ({r['decode_s_per_mp']:.2f} s/MP), {r['bpp']:.4f} bpp")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(f"peak RSS of this process: {peak:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "peak_rss_mib": peak}, indent=2) + "\n")


if __name__ == "__main__":
    main()
