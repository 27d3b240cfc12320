"""Benchmark the RNN codec: encode and decode seconds per megapixel, peak memory, and what the
entropy coding of .rnnc v3 (v2 for a model without a fitted context model) saves over the raw bits, iteration by iteration, on Kodak.

    python bench/bench_codec.py                          # cpu-profile-sized model, 768x512, all iterations
    python bench/bench_codec.py --size 4000x3000         # a large photo: time and peak RSS
    python bench/bench_codec.py --model models/rnnc-cpu.pt --kodak ../shared/datasets/kodak --json out.json

With --kodak DIR (the folder of kodim01.png ... kodim24.png) the timed image is kodim01 (768x512)
and the entropy coding is measured on --images of them: per iteration, the raw bytes of the bits
against the coded payload bytes, and per iteration count k the whole v3 (and v2) file against the v1 (raw) file
of the same bits -- the same bits decode to the same image, so this is the saving at equal quality.

Without --model the network is built untrained with the widths of the active params.yaml profile
(speed does not depend on the weights). Runs on the CPU and, when CUDA is present, on the GPU too
(its name is printed). Peak RSS is the whole process's (resource.getrusage), so run one large size
per invocation to read the memory of that size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.compression.codec import (  # noqa: E402
    DEFAULT_TILE, RNNCodec, _pack_coded, _pack_v1, bits_per_pixel, load_model, truncate,
)
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
    """Best of ``repeat``: wall seconds, and the process's CPU seconds (all threads; what a busy
    machine inflates less than wall time)."""
    mp = img.shape[0] * img.shape[1] / 1e6
    codec.compress(img[:64, :64], 1)  # warm-up
    enc, dec, enc_cpu, dec_cpu = [], [], [], []
    for _ in range(repeat):
        sync(codec.device)
        t0, c0 = time.perf_counter(), time.process_time()
        data = codec.compress(img, iterations)
        sync(codec.device)
        t1, c1 = time.perf_counter(), time.process_time()
        codec.decompress(data)
        sync(codec.device)
        enc.append(t1 - t0)
        dec.append(time.perf_counter() - t1)
        enc_cpu.append(c1 - c0)
        dec_cpu.append(time.process_time() - c1)
    return {"encode_s": min(enc), "decode_s": min(dec), "encode_s_per_mp": min(enc) / mp,
            "decode_s_per_mp": min(dec) / mp, "encode_cpu_s_per_mp": min(enc_cpu) / mp,
            "decode_cpu_s_per_mp": min(dec_cpu) / mp, "load_average_1min": os.getloadavg()[0],
            "bytes": len(data), "bpp": bits_per_pixel(len(data), *img.shape[:2])}


def kodak_images(folder: str, n: int) -> list[tuple[str, np.ndarray]]:
    from PIL import Image

    paths = sorted(Path(folder).glob("kodim*.png"))[:n]
    if not paths:
        raise SystemExit(f"no kodim*.png in {folder}")
    return [(p.stem, np.asarray(Image.open(p).convert("RGB"))) for p in paths]


def entropy_saving(codec: RNNCodec, images: list[tuple[str, np.ndarray]], iterations: int) -> dict:
    """Raw vs coded bytes per iteration, and coded vs v1 (raw) file sizes per iteration count, over the
    images, for the version the codec writes (3 with a fitted context model) and, when that is 3, for
    version 2 as well."""
    table = codec.context_table
    versions = [3, 2] if table is not None else [2]
    raw = np.zeros(iterations)
    v1_sizes = np.zeros(iterations)
    coded = {v: np.zeros(iterations) for v in versions}
    sizes_by_k = {v: np.zeros(iterations) for v in versions}
    ratios = {v: [] for v in versions}  # per image and k: coded size / v1 size
    code_s = decode_s = 0.0
    for name, img in images:
        codes = codec.encode(img, iterations)
        header = codec.header_for(img, iterations)
        v1 = _pack_v1(header, codes)
        raw += header.iteration_bytes
        for k in range(1, iterations + 1):
            v1_sizes[k - 1] += len(truncate(v1, k))
        for v in versions:
            t0 = time.perf_counter()
            data, sizes = _pack_coded(header, codes, table if v == 3 else None)
            if v == versions[0]:
                code_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                codec._codes(data, None)  # entropy decoding alone (parse, CRCs, the context model, the range decoder)
                decode_s += time.perf_counter() - t0
            coded[v] += np.array(sizes)
            img_ratios = []
            for k in range(1, iterations + 1):
                b = len(truncate(data, k))
                sizes_by_k[v][k - 1] += b
                img_ratios.append(b / len(truncate(v1, k)))
            ratios[v].append(img_ratios)
            print(f"  {name}: v{v}/v1 file size at k=1..{iterations}: " + " ".join(f"{r:.3f}" for r in img_ratios),
                  flush=True)
    out = {"images": [n for n, _ in images], "iterations": iterations, "version": versions[0],
           "raw_bytes_per_iteration": raw.tolist(), "v1_file_bytes_by_k": v1_sizes.tolist(),
           "entropy_code_s_per_image": code_s / len(images), "entropy_decode_s_per_image": decode_s / len(images)}
    for v in versions:
        out[f"v{v}"] = {
            "coded_bytes_per_iteration": coded[v].tolist(), "saving_per_iteration": (1 - coded[v] / raw).tolist(),
            "file_bytes_by_k": sizes_by_k[v].tolist(), "file_saving_by_k": (1 - sizes_by_k[v] / v1_sizes).tolist(),
            # equal quality at every k (same bits): the BD-rate is the mean log size ratio
            "bd_rate_vs_v1": float(np.exp(np.log(np.array(ratios[v])).mean()) - 1),
        }
    return out


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
    ap.add_argument("--kodak", help="folder of the Kodak PNGs: time kodim01 and measure the entropy coding")
    ap.add_argument("--images", type=int, default=24, help="Kodak images for the entropy measurement")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    images = kodak_images(args.kodak, args.images) if args.kodak else []
    if images:
        img = images[0][1]
        h, w = img.shape[:2]
        args.size = f"{w}x{h}"
    else:
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
        print(f"{dev:4s} [{name}]: encode {r['encode_s']:.2f} s ({r['encode_s_per_mp']:.2f} s/MP, "
              f"{r['encode_cpu_s_per_mp']:.2f} CPU-s/MP), decode {r['decode_s']:.2f} s ({r['decode_s_per_mp']:.2f} s/MP, "
              f"{r['decode_cpu_s_per_mp']:.2f} CPU-s/MP), {r['bpp']:.4f} bpp; load average {r['load_average_1min']:.1f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(f"peak RSS of this process: {peak:.0f} MiB")
    saving = None
    if images:
        saving = entropy_saving(RNNCodec(model, tile=args.tile), images, k)
        for v in (3, 2):
            if f"v{v}" not in saving:
                continue
            e = saving[f"v{v}"]
            print(f"entropy coding (.rnnc v{v} vs raw bits) on {len(images)} Kodak image(s), {k} iterations:")
            print(f"  iteration  raw bytes  coded bytes  saving   | file v1   file v{v}   saving (k iterations)")
            for t in range(k):
                print(f"  {t + 1:9d}  {saving['raw_bytes_per_iteration'][t]:9.0f}  {e['coded_bytes_per_iteration'][t]:11.0f}"
                      f"  {100 * e['saving_per_iteration'][t]:5.1f} %  | {saving['v1_file_bytes_by_k'][t]:8.0f}"
                      f"  {e['file_bytes_by_k'][t]:8.0f}  {100 * e['file_saving_by_k'][t]:5.1f} %")
            print(f"  BD-rate of v{v} against v1 (equal quality at every k): {100 * e['bd_rate_vs_v1']:+.1f} %")
        print(f"entropy coding (v{saving['version']}) {saving['entropy_code_s_per_image']:.3f} s, decoding "
              f"{saving['entropy_decode_s_per_image']:.3f} s per image")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "peak_rss_mib": peak, "entropy": saving},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
