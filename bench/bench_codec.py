"""Benchmark the RNN codec: encode and decode seconds per megapixel and peak memory, per precision; the
quality of each precision against the fp32 codec on Kodak; and what the entropy coding of .rnnc v5, v4, v3 and v2 (v2
alone for a model without a fitted context model) saves over the raw bits, iteration by iteration, on Kodak.

    python bench/bench_codec.py                          # cpu-profile-sized model, 768x512, all iterations
    python bench/bench_codec.py --model models/rnnc-cpu.pt --kodak ../shared/datasets/kodak --iterations 8 \\
        --sizes kodim01,4000x3000 --precisions fp32,bf16,reference --images 0     # speed (issue 23's table)
    python bench/bench_codec.py --model models/rnnc-cpu.pt --kodak ../shared/datasets/kodak --iterations 8 \\
        --quality 24 --sizes none --images 0            # quality of every precision against the fp32 codec
    python bench/bench_codec.py --model models/rnnc-cpu.pt --kodak ../shared/datasets/kodak --json out.json

Speed: each (image, precision) runs in a child process of its own, so its peak RSS (resource.getrusage) is
that case's alone; "codec peak" is that peak less the RSS before the first encode (Python, torch, the model).
``--sizes``: ``kodim01`` (the Kodak image, with --kodak), ``WxH`` (kodim01 resized to that size in memory
-- 4000x3000 is a 12-megapixel photo, 6x4 tiles of 768 px -- or without --kodak a synthetic image), ``none``.
``--precisions``: ``fp32``, ``bf16`` (the codec's engine, pipeline/compression/inference.py), ``auto``, and
``reference``: the fp32 codec as it ran before (the model as written, NCHW, default malloc and OpenMP wait) --
the "before" of a before/after on the same machine and load. Default: fp32, and bf16 where native (without
native bf16 a CPU emulates it many times slower; ask for it by name to time it anyway). Best of --repeat
wall times; CPU seconds of all threads too (what a busy machine inflates less); the 1-minute load average.

Quality (``--quality N``): on the first N Kodak images, every iteration count 1..K: MS-SSIM and PSNR
(the evaluate stage's metrics) of fp32 and bf16 against the fp32 codec before the engine (``reference``), and
cross-precision decoding: a file written at one precision decoded at the other, against the writer's own
reconstruction. Prints the largest differences and whether they are within --msssim-tol and --psnr-tol.

With --kodak and --images > 0 the entropy coding is measured on that many Kodak images: per iteration, the
raw bytes of the bits against the coded payload bytes, and per iteration count k the whole v5 (v4, v3, v2) file
against the v1 (raw) file of the same bits -- the same bits decode to the same image, so this is the saving
at equal quality.

Without --model the network is built untrained with the widths of the active params.yaml profile
(speed does not depend on the weights). Runs on the CPU and, when CUDA is present, on the GPU too
(its name is printed).
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

# as `rnnc` does (pipeline/compression/cli.py), before torch is imported; the "reference" cases run without it,
# as the codec ran before
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
if os.environ.pop("_BENCH_CODEC_AS_BEFORE", None) is None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.compression.codec import RNNCodec  # noqa: E402
from pipeline.compression.modelfile import load_model  # noqa: E402
from pipeline.compression.rnncfile import DEFAULT_TILE, newest_version, pack_coded, pack_v1, truncate  # noqa: E402
from pipeline.images import bits_per_pixel  # noqa: E402
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


class _ModelAsNet:
    """The codec's network as it ran before pipeline/compression/inference.py: the model as written (fp32,
    NCHW). Put in a codec's ``net`` to time or score that codec ("reference")."""

    precision = "reference"

    def __init__(self, model: RNNCompressor):
        self.model = model
        self.init_states = model.init_states
        self.encode_step = model.encode_step
        self.decode_step = model.decode_step
        self.reconstruct_step = model.reconstruct_step

    def codes_to_input(self, bits: torch.Tensor) -> torch.Tensor:
        return (bits.float() * 2 - 1).to(next(self.model.parameters()).device).contiguous()


def make_codec(model: RNNCompressor, device: str, tile: int, precision: str) -> RNNCodec:
    """The codec at ``precision``; ``reference``: the fp32 codec as before the inference engine."""
    if precision != "reference":
        return RNNCodec(model, device=device, tile=tile, precision=precision)
    from pipeline.compression import inference

    inference.keep_freed_memory = lambda: None  # as before: glibc's default malloc (call in a process of its own)
    codec = RNNCodec(model, device=device, tile=tile, precision="fp32")
    codec.net = _ModelAsNet(codec.model)
    codec.precision = "reference"
    return codec


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_mib() -> float:
    """The process's resident memory now (Linux), MiB."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return float("nan")


def bench(codec: RNNCodec, img: np.ndarray, iterations: int, repeat: int) -> dict:
    """Best of ``repeat``: wall seconds, and the process's CPU seconds (all threads; what a busy
    machine inflates less than wall time)."""
    mp = img.shape[0] * img.shape[1] / 1e6
    before = rss_mib()
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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {"encode_s": min(enc), "decode_s": min(dec), "encode_s_per_mp": min(enc) / mp,
            "decode_s_per_mp": min(dec) / mp, "encode_cpu_s_per_mp": min(enc_cpu) / mp,
            "decode_cpu_s_per_mp": min(dec_cpu) / mp, "load_average_1min": os.getloadavg()[0],
            "peak_rss_mib": peak, "rss_before_mib": before, "codec_peak_mib": peak - before,
            "bytes": len(data), "bpp": bits_per_pixel(len(data), *img.shape[:2])}


def cpu_name() -> str:
    """The CPU's model name, and whether it has native bf16."""
    from pipeline.utils import cpu_has_bf16

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{name}, {os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads "
            f"(OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}), "
            f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {'yes' if cpu_has_bf16() else 'no'}")


def bench_image(spec: str, kodak: str | None) -> np.ndarray:
    """``kodim01`` (from ``kodak``) or ``WxH``: kodim01 resized (Lanczos) in memory, or a synthetic image."""
    from PIL import Image

    if spec == "kodim01":
        if not kodak:
            return synthetic_image(512, 768)
        return np.asarray(Image.open(Path(kodak) / "kodim01.png").convert("RGB"))
    w, h = (int(v) for v in spec.lower().split("x"))
    if not kodak:
        return synthetic_image(h, w)
    return np.asarray(Image.open(Path(kodak) / "kodim01.png").convert("RGB").resize((w, h), Image.LANCZOS))


def run_case(args: argparse.Namespace, spec: str, device: str, precision: str) -> dict:
    """One (image, device, precision) timing, in this process."""
    model = build_model(args.model, args.params)
    img = bench_image(spec, args.kodak)
    k = args.iterations or model.config.iterations
    codec = make_codec(model, device, args.tile, precision)
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    return {"image": spec, "size": f"{img.shape[1]}x{img.shape[0]}", "device": device, "device_name": name,
            "precision": precision, "resolved": codec.precision, "iterations": k, "tile": args.tile,
            "torch": torch.__version__, **bench(codec, img, k, args.repeat)}


def run_isolated(args: argparse.Namespace, spec: str, device: str, precision: str) -> dict:
    """:func:`run_case` in a child process (its own peak RSS)."""
    import subprocess

    cmd = [sys.executable, __file__, "--child", f"{spec}:{device}:{precision}", "--params", args.params,
           "--tile", str(args.tile), "--repeat", str(args.repeat)]
    for flag, value in (("--model", args.model), ("--kodak", args.kodak), ("--iterations", args.iterations),
                        ("--threads", args.threads)):
        if value is not None:
            cmd += [flag, str(value)]
    env = dict(os.environ)
    if precision == "reference" and USER_OMP_WAIT_POLICY is None:
        env.pop("OMP_WAIT_POLICY", None)
        env["_BENCH_CODEC_AS_BEFORE"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"case {spec} {device} {precision} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _progressive(codec: RNNCodec, codes: np.ndarray, h: int, w: int) -> list[np.ndarray]:
    return codec.decode(codes, h, w, every=True)


def _encode_every(codec: RNNCodec, img: np.ndarray, k: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Codes (k, Hb, Wb, bits) of a one-tile image and the encoder's own reconstruction after each iteration:
    what decoding its file gives at the same precision (bit for bit: tests/test_codec_precision.py), without
    a second pass through the decoder."""
    h, w = img.shape[:2]
    if h % 16 or w % 16 or (codec.tile and max(h, w) > codec.tile):
        raise SystemExit(f"--quality: images must be one tile with sides multiple of 16 (got {w}x{h})")
    net = codec.net
    codes, every = [], []
    with torch.inference_mode():
        x = codec._to_tensor(img)
        enc, dec = net.init_states()
        recon = torch.zeros_like(x)
        for _ in range(k):
            b, enc = net.encode_step(x - recon, enc)
            codes.append((b[0] > 0).permute(1, 2, 0).cpu().numpy())
            delta, dec = net.decode_step(b, dec)
            recon = net.reconstruct_step(recon, delta)
            every.append(codec._to_uint8(recon))
    return np.stack(codes), every


def quality_check(model: RNNCompressor, images: list[tuple[str, np.ndarray]], iterations: int, tile: int,
                  precisions: list[str]) -> dict:
    """Per image and iteration count: MS-SSIM and PSNR of each precision's codec and of the reference (the fp32
    codec before the engine), and of each file decoded at the other precision against its writer's own."""
    from pipeline.evaluation.metrics import Reference

    codecs = {p: make_codec(model, "cpu", tile, p) for p in precisions}
    ref = RNNCodec(model, tile=tile, precision="fp32")
    ref.net = _ModelAsNet(ref.model)
    rows = []
    for name, img in images:
        t0 = time.perf_counter()
        h, w = img.shape[:2]
        metric = Reference(img)
        score = {}
        codes, own = {}, {}
        for p, c in [("reference", ref), *codecs.items()]:
            codes[p], own[p] = _encode_every(c, img, iterations)
            score[p] = [metric.compare(x) for x in own[p]]
        for p, c in codecs.items():
            for q in precisions:  # the file of p decoded at q
                if q != p:
                    score[f"{p}->{q}"] = [metric.compare(x) for x in _progressive(codecs[q], codes[p], h, w)]
        row = {"image": name, "seconds": time.perf_counter() - t0,
               "bits_differing_from_reference": {p: float((codes[p] != codes["reference"]).mean()) for p in codecs}}
        for key, qs in score.items():
            row[key] = {"ms_ssim": [q.ms_ssim for q in qs], "psnr": [q.psnr for q in qs]}
        rows.append(row)
        worst = {}
        for key in score:
            base = "reference" if "->" not in key else key.split("->")[0]
            if key != "reference":
                worst[key] = (max(abs(a - b) for a, b in zip(row[key]["psnr"], row[base]["psnr"])),
                              max(abs(a - b) for a, b in zip(row[key]["ms_ssim"], row[base]["ms_ssim"])))
        print(f"  {name} ({row['seconds']:.0f} s), largest |difference| over k: " +
              ", ".join(f"{k} vs {'writer' if '->' in k else 'reference'} {p:.4f} dB {m:.5f} MS-SSIM"
                        for k, (p, m) in worst.items()), flush=True)
    return {"images": [r["image"] for r in rows], "iterations": iterations, "rows": rows}


def summarize_quality(result: dict, msssim_tol: float, psnr_tol: float) -> bool:
    """Print, per comparison and iteration count, the largest differences over the images; True when all are
    within the tolerances."""
    rows = result["rows"]
    keys = [k for k in rows[0] if k not in ("image", "seconds", "bits_differing_from_reference", "reference")]
    ok = True
    print(f"quality on {len(rows)} Kodak image(s), largest |difference| over the images "
          f"(tolerance: MS-SSIM {msssim_tol}, PSNR {psnr_tol} dB):")
    for key in keys:
        base = key.split("->")[0] if "->" in key else "reference"
        what = f"{key.replace('->', ' file decoded at ')} vs {'its writer' if '->' in key else 'the fp32 codec before'}"
        dm = np.array([[abs(a - b) for a, b in zip(r[key]["ms_ssim"], r[base]["ms_ssim"])] for r in rows])
        dp = np.array([[abs(a - b) for a, b in zip(r[key]["psnr"], r[base]["psnr"])] for r in rows])
        good = bool((dm <= msssim_tol).all() and (dp <= psnr_tol).all())
        ok &= good
        print(f"  {what}: {'PASS' if good else 'FAIL'}")
        print("    k        " + " ".join(f"{k + 1:>8d}" for k in range(dm.shape[1])))
        print("    MS-SSIM  " + " ".join(f"{v:8.5f}" for v in dm.max(0)))
        print("    PSNR dB  " + " ".join(f"{v:8.4f}" for v in dp.max(0)))
        mean = np.array([[b - a for a, b in zip(r[base]["psnr"], r[key]["psnr"])] for r in rows]).mean(0)
        print("    mean dPSNR " + " ".join(f"{v:+8.4f}" for v in mean))
    for p in rows[0]["bits_differing_from_reference"]:
        share = np.mean([r["bits_differing_from_reference"][p] for r in rows])
        print(f"  {p}: {100 * share:.1f} % of the bits differ from the reference's (equal quality, other decisions)")
    return ok


def kodak_images(folder: str, n: int) -> list[tuple[str, np.ndarray]]:
    from PIL import Image

    paths = sorted(Path(folder).glob("kodim*.png"))[:n]
    if not paths:
        raise SystemExit(f"no kodim*.png in {folder}")
    return [(p.stem, np.asarray(Image.open(p).convert("RGB"))) for p in paths]


def entropy_saving(codec: RNNCodec, images: list[tuple[str, np.ndarray]], iterations: int) -> dict:
    """Raw vs coded bytes per iteration, and coded vs v1 (raw) file sizes per iteration count, over the
    images, for the version the codec writes (5 with a fitted context model, 4 with a table from before 5)
    and the older entropy-coded versions the same weights write (4, 3, 2)."""
    table = codec.context_table
    versions = list(range(newest_version(table, codec.bits), 1, -1))
    raw = np.zeros(iterations)
    v1_sizes = np.zeros(iterations)
    coded = {v: np.zeros(iterations) for v in versions}
    sizes_by_k = {v: np.zeros(iterations) for v in versions}
    ratios = {v: [] for v in versions}  # per image and k: coded size / v1 size
    code_s = decode_s = 0.0
    for name, img in images:
        codes = codec.encode(img, iterations)
        header = codec.header_for(img, iterations)
        v1 = pack_v1(header, codes)
        raw += header.iteration_bytes
        for k in range(1, iterations + 1):
            v1_sizes[k - 1] += len(truncate(v1, k))
        for v in versions:
            t0 = time.perf_counter()
            data, sizes = pack_coded(header, codes, table, v)
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
    ap.add_argument("--size", default=None, help="WxH of the timed image (the same as --sizes WxH)")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated: kodim01, WxH (kodim01 resized, or synthetic without --kodak), none "
                         "(default: kodim01 with --kodak, else 768x512)")
    ap.add_argument("--precisions", default=None,
                    help="comma-separated: fp32, bf16, auto, reference (default: fp32, and bf16 where native)")
    ap.add_argument("--iterations", type=int, help="iterations (default: the model's maximum)")
    ap.add_argument("--tile", type=int, default=DEFAULT_TILE)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--devices", default="auto", help="cpu, cuda or auto (cpu, plus cuda when present)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--kodak", help="folder of the Kodak PNGs: time kodim01 and measure the entropy coding")
    ap.add_argument("--images", type=int, default=24, help="Kodak images for the entropy measurement (0: none)")
    ap.add_argument("--quality", type=int, default=0, metavar="N",
                    help="check every precision's quality against the fp32 codec on the first N Kodak images")
    ap.add_argument("--msssim-tol", type=float, default=0.001)
    ap.add_argument("--psnr-tol", type=float, default=0.02)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # IMAGE:DEVICE:PRECISION, one case, JSON on stdout
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        spec, device, precision = args.child.split(":")
        print(json.dumps(run_case(args, spec, device, precision)))
        return

    from pipeline.compression.inference import native_bf16

    model = build_model(args.model, args.params)
    k = args.iterations or model.config.iterations
    devices = ["cpu", "cuda"] if args.devices == "auto" else [args.devices]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    specs = (args.sizes or args.size or ("kodim01" if args.kodak else "768x512")).split(",")
    specs = [s for s in specs if s != "none"]
    print(f"model: {count_parameters(model):,} parameters, widths {model.config.encoder_widths} / "
          f"{model.config.decoder_widths}, {k} iterations, tile {args.tile}")
    print(f"cpu: {cpu_name()}")
    results = []
    for dev in devices:
        wanted = args.precisions.split(",") if args.precisions else \
            ["fp32"] + (["bf16"] if native_bf16(dev) else [])
        if "bf16" in wanted and not native_bf16(dev):
            print(f"note: {dev} has no native bf16: bf16 is emulated here, many times slower than fp32")
        for spec in specs:
            for precision in wanted:
                r = run_isolated(args, spec, dev, precision)
                results.append(r)
                print(f"{dev:4s} {r['image']:>9s} {r['size']:>9s} {precision:>9s}"
                      f"{'' if r['resolved'] == precision else ' (' + r['resolved'] + ')'}: "
                      f"encode {r['encode_s']:7.2f} s {r['encode_s_per_mp']:6.2f} s/MP "
                      f"({r['encode_cpu_s_per_mp']:6.2f} CPU-s/MP), decode {r['decode_s']:7.2f} s "
                      f"{r['decode_s_per_mp']:6.2f} s/MP ({r['decode_cpu_s_per_mp']:6.2f} CPU-s/MP), "
                      f"{r['bpp']:.4f} bpp, peak RSS {r['peak_rss_mib']:.0f} MiB (codec {r['codec_peak_mib']:.0f}); "
                      f"load {r['load_average_1min']:.1f}", flush=True)
        if results:
            print(f"{dev} device: {results[-1]['device_name']}")
    quality = None
    if args.quality:
        if not args.kodak:
            raise SystemExit("--quality needs --kodak")
        precisions = args.precisions.split(",") if args.precisions else ["fp32", "bf16"]
        precisions = [p for p in precisions if p in ("fp32", "bf16")]
        quality = quality_check(model, kodak_images(args.kodak, args.quality), k, args.tile, precisions)
        quality["pass"] = summarize_quality(quality, args.msssim_tol, args.psnr_tol)
    saving = None
    if args.kodak and args.images:
        images = kodak_images(args.kodak, args.images)
        saving = entropy_saving(RNNCodec(model, tile=args.tile), images, k)
        for v in (4, 3, 2):
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
        Path(args.json).write_text(json.dumps({"results": results, "quality": quality, "entropy": saving},
                                              indent=2) + "\n")
    if quality is not None and not quality["pass"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
