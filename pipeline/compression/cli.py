"""``rnnc``: compress images to .rnnc files with the trained RNN codec, and back.

    rnnc compress IN.png OUT.rnnc (--iterations K | --bpp B) [--model M] [--tile T] [--precision P]
    rnnc decompress IN.rnnc OUT.png [--iterations K] [--model M] [--max-pixels N] [--precision P]
    rnnc info IN.rnnc
    rnnc compare PHOTO --bpp B [--out DIR] [--codecs jpeg,webp,...] [--model M] [--overwrite]

--model is a checkpoint (default data/compressor/model.pt) or an MLflow model URI such as
models:/rnn-compressor/1. --precision auto|fp32|bf16 is the network's arithmetic (auto: bf16 where the
device has it natively, else fp32); files do not depend on it. Errors end with one line on stderr and a
non-zero exit. Outputs are written whole or not at all; an output that is an existing folder, or the input
itself, is refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError, run_cli

# OpenMP threads that wait at the end of each parallel region sleep instead of spinning (read when torch is
# first imported, below this line; an OMP_WAIT_POLICY of your own wins). Spinning gains nothing here (each
# convolution takes milliseconds) and on a busy machine it costs dearly: 2 threads coded kodim01 2x slower
# in wall time than with this, and burned twice the CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr, flush=True)


def read_image(path: str) -> np.ndarray:
    """Any image Pillow reads -> uint8 HxWx3 (``pipeline.images.read_image``; conversions noted on stderr)."""
    from pipeline.compression.errors import InputError
    from pipeline.images import read_image as read

    return read(path, error=InputError, note=note)


def write_image(path: str, img: np.ndarray) -> None:
    from PIL import Image

    from pipeline.utils import atomic_path

    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise PipelineError(f"{path}: unknown image extension {ext or '(none)'!r} (use .png)")
    try:
        with atomic_path(path) as tmp:
            Image.fromarray(img).save(tmp, format=fmt)
    except OSError as err:
        raise PipelineError(f"{path}: cannot write ({err.strerror or err})") from None


def read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such file") from None
    except OSError as err:
        raise PipelineError(f"{path}: cannot read ({err.strerror or err})") from None


def write_bytes(path: str, data: bytes) -> None:
    from pipeline.utils import atomic_write_bytes

    try:
        atomic_write_bytes(path, data)
    except OSError as err:
        raise PipelineError(f"{path}: cannot write ({err.strerror or err})") from None


def check_output(output: str, input_: str) -> None:
    """Refuse an output path that is a folder or the input file, before any work is done."""
    out = Path(output)
    if out.is_dir():
        raise PipelineError(f"{output}: is a folder; give the output file's name (e.g. {out / Path(input_).stem}"
                            f"{'.rnnc' if not input_.endswith('.rnnc') else '.png'})")
    try:
        same = out.exists() and Path(input_).exists() and os.path.samefile(out, input_)
    except OSError:
        same = False
    if same or out.resolve() == Path(input_).resolve():
        raise PipelineError(f"{output}: is the input file; give another output name")


def _check_precision(precision: str) -> None:
    """--precision is auto, fp32 or bf16 (one error line otherwise, before any work)."""
    from pipeline.compression.inference import check_precision

    try:
        check_precision(precision)
    except ValueError as err:
        raise PipelineError(f"--{err}") from None


def _compress(args: argparse.Namespace) -> None:
    from pipeline.compression.codec import load_codec
    from pipeline.images import bits_per_pixel

    check_output(args.output, args.input)
    _check_precision(args.precision)
    img = read_image(args.input)
    codec = load_codec(args.model, device=args.device, tile=args.tile, show_progress=True, precision=args.precision)
    h, w = img.shape[:2]
    t0 = time.perf_counter()
    if args.iterations is not None:
        k = args.iterations
        data = codec.compress(img, k)
    else:
        data, k = codec.compress_to_bpp(img, args.bpp)
    seconds = time.perf_counter() - t0
    write_bytes(args.output, data)
    print(f"{args.output}: {w}x{h}, {k} iteration(s), {len(data)} bytes, "
          f"{bits_per_pixel(len(data), h, w):.4f} bpp ({seconds:.2f} s, {codec.precision})")


def _decompress(args: argparse.Namespace) -> None:
    from pipeline.compression.codec import load_codec

    check_output(args.output, args.input)
    _check_precision(args.precision)
    data = read_bytes(args.input)
    codec = load_codec(args.model, device=args.device, show_progress=True, max_pixels=args.max_pixels,
                       precision=args.precision)
    header, present = codec.read_header(data)
    if present < header.iterations:
        note(f"{args.input}: holds {present} of {header.iterations} iterations (a progressive prefix); "
             f"decoding {args.iterations or present}")
    t0 = time.perf_counter()
    img = codec.decompress(data, args.iterations)
    seconds = time.perf_counter() - t0
    write_image(args.output, img)
    k = args.iterations or present
    print(f"{args.output}: {header.width}x{header.height} from {k} iteration(s) ({seconds:.2f} s, {codec.precision})")


def _info(args: argparse.Namespace) -> None:
    from pipeline.compression.rnncfile import parse
    from pipeline.images import bits_per_pixel

    data = read_bytes(args.input)
    header, chunks = parse(data)
    raw = header.iteration_bytes
    model = {2: "adaptive context model", 3: "the model's learned context model",
             4: "the model's learned context model, adapted to the image",
             5: "the model's learned context model over the neighbours' channels, adapted to the image"
             }.get(header.version)
    coding = "raw bits" if header.version == 1 else \
        f"entropy-coded with {model}, {sum(len(c) < raw for c in chunks)}/{len(chunks)} iterations coded"
    print(f"{args.input}: .rnnc v{header.version} ({coding}), {header.width}x{header.height}, "
          f"{len(chunks)}/{header.iterations} iterations, {header.bits} bits per {header.block}x{header.block} "
          f"block, tile {header.tile or 'whole image'}, model {header.fingerprint.hex()}, {len(data)} bytes, "
          f"{bits_per_pixel(len(data), header.height, header.width):.4f} bpp")
    print("iteration bytes (raw " + str(raw) + "): " + " ".join(str(len(c)) for c in chunks))


def _compare(args: argparse.Namespace) -> None:
    """Every codec on one photo at the setting nearest --bpp: a table, a side-by-side PNG and an HTML page
    (``pipeline.evaluation.compare``)."""
    from pipeline.evaluation import compare as cmp

    out = Path(args.out if args.out is not None else f"{Path(args.input).stem}-compare")
    files = cmp.check_outputs(out, args.input, args.overwrite)  # before any work
    img = read_image(args.input)
    names = [n.strip() for n in args.codecs.split(",") if n.strip()] if args.codecs else None
    codecs, skipped = cmp.build_codecs(names, args.model, device=args.device)
    for name, why in skipped.items():
        note(f"{name} skipped: {why}")
    h, w = img.shape[:2]
    print(f"{args.input}: {w}x{h} ({w * h / 1e6:.1f} MP), every codec at the setting nearest {args.bpp:g} bpp",
          flush=True)
    results, decoded = cmp.compare(img, codecs, args.bpp, device=args.device)
    print(cmp.table(results))
    cmp.write(files, args.input, img, args.bpp, results, decoded, skipped)
    print("wrote " + ", ".join(str(p) for p in files.values()))


def _int_at_least(minimum: int, wanted: str):
    """An argparse type: an integer >= ``minimum``, refused with ``expected <wanted>``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value

    return parse


_positive = _int_at_least(1, "a positive integer")
_count = _int_at_least(0, "a whole number, 0 or more")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from pipeline.compression.modelfile import DEFAULT_MODEL
    from pipeline.compression.rnncfile import DEFAULT_TILE, MAX_TILE

    parser = argparse.ArgumentParser(prog="rnnc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None,
                       help=f"checkpoint path or MLflow model URI (default: {DEFAULT_MODEL})")
        p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
        p.add_argument("--threads", type=_positive, help="CPU threads for torch (default: torch's choice)")

    def precision(p: argparse.ArgumentParser) -> None:
        p.add_argument("--precision", default="auto",
                       help="the network's arithmetic: auto (bf16 where native: CUDA, CPUs with AVX512-BF16 or AMX; "
                            "else fp32), fp32 or bf16. Files do not depend on it: any precision decodes any file "
                            "(bit-exactly the encoder's image at the encoder's precision)")

    c = sub.add_parser("compress", help="image -> .rnnc")
    c.add_argument("input", help="image file (PNG, JPEG, ...; any size and mode)")
    c.add_argument("output", help=".rnnc file to write")
    rate = c.add_mutually_exclusive_group(required=True)
    rate.add_argument("--iterations", "-k", type=_positive,
                      help="iterations to code (at most 0.125 bpp each at 32 bits; less once entropy-coded)")
    rate.add_argument("--bpp", type=_positive_float,
                      help="most bits per pixel, header included (the most iterations that fit)")
    c.add_argument("--tile", type=int, default=DEFAULT_TILE,
                   help=f"coding tile side in px, a multiple of 16 up to {MAX_TILE}; 0 = whole image (up to "
                        f"{MAX_TILE} px a side) (default {DEFAULT_TILE})")
    common(c)
    precision(c)

    d = sub.add_parser("decompress", help=".rnnc -> image")
    d.add_argument("input", help=".rnnc file (or a prefix of whole iterations)")
    d.add_argument("output", help="image file to write (.png)")
    d.add_argument("--iterations", "-k", type=_positive, help="decode only the first K iterations")
    d.add_argument("--max-pixels", type=_count, default=None,
                   help="refuse files of larger images (default: Pillow's limit, 2 x PIL.Image.MAX_IMAGE_PIXELS; "
                        "0: no limit)")
    common(d)
    precision(d)

    i = sub.add_parser("info", help="print a .rnnc file's header")
    i.add_argument("input")

    m = sub.add_parser("compare", help="one photo, every codec at about the same bpp: table, PNG, HTML page")
    m.add_argument("input", help="image file (PNG, JPEG, ...; any size of at least 161 px a side, any mode)")
    m.add_argument("--bpp", type=_positive_float, required=True, help="target bits per pixel, headers included")
    m.add_argument("--out", help="output folder (default: <photo name>-compare); writes <photo name>.compare.png, "
                                 ".html and .json there, nothing else")
    m.add_argument("--codecs", help="comma-separated subset (default: jpeg,jpeg2000,webp,avif,jpegxl,rnn)")
    m.add_argument("--overwrite", action="store_true", help="replace this photo's outputs from an earlier run")
    common(m)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    command = {"compress": _compress, "decompress": _decompress, "info": _info, "compare": _compare}[args.command]
    return run_cli(lambda: command(args), {MemoryError: "out of memory (try a smaller --tile)"})


if __name__ == "__main__":
    sys.exit(main())
