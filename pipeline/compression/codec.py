"""The ``.rnnc`` file format and the codec API over a trained :class:`RNNCompressor`.

File layout (little-endian). The header is the same in every version::

    header (30 bytes)
      magic        4s   b"RNNC"
      version      u8   3 when the model has a fitted context model, else 2 (1: raw bits; all still read)
      bits         u8   code bits per 16x16 block per iteration (the model's)
      block        u8   16: pixels per code cell side
      tile         u16  side of the coding tiles in pixels (a multiple of 16, 16..2048; 0: one tile,
                        for images up to 2048 px a side)
      fingerprint  8s   first 8 bytes of the model's SHA-256 (config + weights)
      height       u32  image height in pixels
      width        u32  image width in pixels
      iterations   u8   iterations stored, K
      header_crc   u32  CRC-32 of the 26 bytes above

Versions 2 and 3, then K times, iteration by iteration::

      length       u32  n, the payload's bytes: at most R, the raw size of an iteration (below)
      payload      n    n == R: the raw bits as in version 1; n < R: the bits entropy-coded, n a
                        multiple of 4, by a range coder with -- version 3 -- the model's own learned
                        context model (:class:`pipeline.compression.context.ContextCoder`: each bit
                        predicted from the same block's other bits of this and the two previous
                        iterations and its coded neighbours), or -- version 2 -- an adaptive context
                        model carried over from the iterations before
                        (:class:`pipeline.compression.entropy.PlaneCoder`)
      crc          u32  CRC-32 of length and payload

Version 1, then K times::

      bits         R bytes: for each 16x16 block in raster order, its bits (1 = +1, 0 = -1), MSB first
      crc          u32  CRC-32 of those bytes

where R = ceil(bits * Hb * Wb / 8) and Hb, Wb = ceil(height/16), ceil(width/16). Any prefix of whole
iterations is a valid, coarser image (progressive): iteration t decodes from the header and
iterations 1..t alone, and :func:`truncate` makes the file of the first k iterations, equal byte for
byte to compressing with k iterations. The decoder reads the iterations present and says so when the
header promised more. BPP is ``8 * file size / (H * W)``, header included.

The decoder trusts no field: the CRCs, every header field's range (tile within what the encoder
writes, iterations within the model's), each payload length against the size the header implies,
and the image area against a pixel limit (Pillow's: ``2 * PIL.Image.MAX_IMAGE_PIXELS``, the size at
which Pillow refuses to open an image; ``max_pixels`` lifts it) are checked before anything is
allocated. Errors are :class:`BitstreamError`, :class:`ModelMismatchError` or :class:`OutOfMemory`.

The image is padded to a multiple of 16 (edge replication) and split into ``tile`` x ``tile`` tiles
(row-major; the last row/column smaller); each tile runs through the network independently, so the
network's memory is bounded by the tile (at most 2048 x 2048 px), not the image. The tiling is stored
in the header, so the decoder repeats it exactly. Besides that, a decode holds the output image
(3 bytes per pixel, per iteration for :meth:`RNNCodec.decompress_progressive`) and the bits of every
iteration (K/8 bytes per pixel), both bounded by the pixel limit. (:meth:`RNNCodec.compress_to_bpp` is the
exception: to stop at the first iteration that no longer fits it codes iteration by iteration and holds
every tile's recurrent state meanwhile, when that takes at most :data:`EARLY_STOP_BYTES`.)

The network itself runs in :mod:`pipeline.compression.inference` at a precision (fp32 or bf16) that no
file records: a file decodes at any precision, bit-exactly the encoder's image at the encoder's.
"""

from __future__ import annotations

import binascii
import contextlib
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.compression.model import BLOCK, ModelConfig, RNNCompressor
from pipeline.errors import PipelineError
from pipeline.images import bits_per_pixel  # the one bpp formula (also imported from here by bench, tests)

MAGIC = b"RNNC"
VERSION = 3  # what a model with a fitted context model writes (one without writes 2)
VERSIONS = (1, 2, 3)  # versions this build reads
_FIELDS = struct.Struct("<4sBBBH8sIIB")
_CRC = struct.Struct("<I")
_LENGTH = struct.Struct("<I")
HEADER_SIZE = _FIELDS.size + _CRC.size  # 30 bytes
CRC_SIZE = _CRC.size
LENGTH_SIZE = _LENGTH.size
DEFAULT_TILE = 768  # px: a Kodak image (768x512) is one tile; a 4000x3000 photo is 6x4 tiles
MAX_TILE = 2048  # px: the largest tile the encoder writes and the decoder accepts (bounds its memory)
DEFAULT_MODEL = Path("data/compressor/model.pt")
MODEL_FORMAT = "rnnc-model"
MAX_SIDE = 1 << 20  # px; refuses absurd headers before anything is allocated
EARLY_STOP_BYTES = 2 << 30  # compress_to_bpp codes iteration by iteration when every tile's state fits this


class CodecError(PipelineError):
    """Any error of the codec a user can cause."""


class BitstreamError(CodecError):
    """The bytes are not a (complete, intact, acceptable) .rnnc file."""


class ModelMismatchError(CodecError):
    """The file was made by another model than the one decoding it."""


class ModelError(CodecError):
    """The model could not be loaded."""


class InputError(CodecError):
    """The input image is unusable."""


class OutOfMemory(CodecError):
    """Coding ran out of memory (numpy's or torch's)."""


def default_max_pixels() -> int | None:
    """The decoder's default pixel limit: where Pillow refuses an image (2 x Image.MAX_IMAGE_PIXELS,
    read when called, so setting Pillow's limit sets this one); None when Pillow's is off."""
    from PIL import Image

    return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        m in text for m in ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory"))


@contextlib.contextmanager
def _memory_guard(what: str, tile: int):
    """numpy's MemoryError and torch's out-of-memory RuntimeError -> one clear :class:`OutOfMemory`."""
    try:
        yield
    except (MemoryError, RuntimeError) as err:
        if not _is_out_of_memory(err):
            raise
        raise OutOfMemory(f"out of memory while {what} (tile {tile or 'whole image'} px; "
                          "compress with a smaller --tile, or use a machine with more memory)") from None


# ----------------------------------------------------------------------------------------- header


@dataclass(frozen=True)
class Header:
    bits: int
    tile: int
    fingerprint: bytes
    height: int
    width: int
    iterations: int
    version: int = VERSION
    block: int = BLOCK

    @property
    def blocks(self) -> tuple[int, int]:
        return math.ceil(self.height / self.block), math.ceil(self.width / self.block)

    @property
    def iteration_bytes(self) -> int:
        """R: the raw size of one iteration's bits."""
        hb, wb = self.blocks
        return (self.bits * hb * wb + 7) // 8

    @property
    def pixels(self) -> int:
        return self.height * self.width

    def pack(self) -> bytes:
        head = _FIELDS.pack(MAGIC, self.version, self.bits, self.block, self.tile, self.fingerprint,
                            self.height, self.width, self.iterations)
        return head + _CRC.pack(binascii.crc32(head))

    def replace(self, **changes) -> "Header":
        return Header(**{**self.__dict__, **changes})


def file_size(height: int, width: int, iterations: int, bits: int = 32) -> int:
    """Exact size in bytes of a version-1 (raw bits) file of ``iterations`` iterations of a height x
    width image. A version-2 or -3 file is at most :func:`max_file_size`, usually much less."""
    h = Header(bits=bits, tile=0, fingerprint=b"\0" * 8, height=height, width=width, iterations=iterations)
    return HEADER_SIZE + iterations * (h.iteration_bytes + CRC_SIZE)


def max_file_size(height: int, width: int, iterations: int, bits: int = 32) -> int:
    """Upper bound of the size of a version-2 or -3 file: every iteration stored raw, plus its length."""
    return file_size(height, width, iterations, bits) + iterations * LENGTH_SIZE


def _check_tile(tile: int, height: int | None = None, width: int | None = None) -> str | None:
    """Why ``tile`` is outside what the encoder writes (None when it is fine)."""
    if tile == 0:
        if height is not None and max(_padded(height), _padded(width)) > MAX_TILE:
            return f"tile 0 (one tile) is for images up to {MAX_TILE} px a side"
        return None
    if tile % BLOCK or not BLOCK <= tile <= MAX_TILE:
        return f"tile must be 0 or a multiple of {BLOCK} from {BLOCK} to {MAX_TILE} (got {tile})"
    return None


def parse_header(data: bytes) -> Header:
    """Check and read the 30-byte header: magic, version, checksum, and every field's range."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"expected bytes, got {type(data).__name__}")
    if len(data) < len(MAGIC) or bytes(data[: len(MAGIC)]) != MAGIC:
        raise BitstreamError("not an .rnnc file (bad magic bytes)")
    if len(data) < HEADER_SIZE:
        raise BitstreamError(f"truncated .rnnc file: {len(data)} bytes, the header alone needs {HEADER_SIZE}")
    version = data[len(MAGIC)]
    if version not in VERSIONS:
        raise BitstreamError(f"unsupported .rnnc version {version} (this build reads versions "
                             f"{', '.join(map(str, VERSIONS))})")
    head = bytes(data[: _FIELDS.size])
    (crc,) = _CRC.unpack_from(data, _FIELDS.size)
    if binascii.crc32(head) != crc:
        raise BitstreamError("corrupt .rnnc header (checksum mismatch)")
    _, version, bits, block, tile, fp, height, width, iterations = _FIELDS.unpack(head)
    if block != BLOCK or bits == 0:
        raise BitstreamError(f"invalid .rnnc header (bits={bits}, block={block})")
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE) or iterations == 0:
        raise BitstreamError(f"invalid .rnnc header (size {width}x{height}, {iterations} iterations)")
    why = _check_tile(tile, height, width)
    if why:
        raise BitstreamError(f"invalid .rnnc header ({why})")
    return Header(bits=bits, tile=tile, fingerprint=fp, height=height, width=width, iterations=iterations,
                  version=version, block=block)


def _records(data: bytes, header: Header) -> list[tuple[int, int]]:
    """(start, end) of each whole iteration record present, CRCs checked; payload bytes for v2 and v3 exclude
    the length field. Fewer whole iterations than the header says is a valid progressive prefix."""
    raw = header.iteration_bytes
    k = header.iterations
    size = len(data)
    spans = []
    pos = HEADER_SIZE
    if header.version == 1:
        step = raw + CRC_SIZE
        whole, rest = divmod(size - HEADER_SIZE, step)
        if whole > k or (whole == k and rest):
            raise BitstreamError(f"corrupt .rnnc file: {size - HEADER_SIZE - k * step} bytes after the last iteration")
        if rest:
            raise BitstreamError(f"truncated .rnnc file: iteration {whole + 1} of {k} is incomplete "
                                 f"({rest} of {step} bytes)")
        for t in range(whole):
            start = HEADER_SIZE + t * step
            (crc,) = _CRC.unpack_from(data, start + raw)
            if binascii.crc32(data[start: start + raw]) != crc:
                raise BitstreamError(f"corrupt .rnnc file: iteration {t + 1} fails its checksum")
            spans.append((start, start + raw))
    else:
        for t in range(k):
            if pos == size:
                break
            if size - pos < LENGTH_SIZE:
                raise BitstreamError(f"truncated .rnnc file: iteration {t + 1} of {k} is incomplete "
                                     f"({size - pos} bytes)")
            (n,) = _LENGTH.unpack_from(data, pos)
            if n > raw or (n < raw and n % 4):
                raise BitstreamError(f"corrupt .rnnc file: iteration {t + 1} claims {n} bytes (an iteration of this "
                                     f"image takes {raw} raw, or fewer in 4-byte words coded)")
            end = pos + LENGTH_SIZE + n
            if end + CRC_SIZE > size:
                raise BitstreamError(f"truncated .rnnc file: iteration {t + 1} of {k} is incomplete "
                                     f"({size - pos} of {LENGTH_SIZE + n + CRC_SIZE} bytes)")
            (crc,) = _CRC.unpack_from(data, end)
            if binascii.crc32(data[pos:end]) != crc:
                raise BitstreamError(f"corrupt .rnnc file: iteration {t + 1} fails its checksum")
            spans.append((pos + LENGTH_SIZE, end))
            pos = end + CRC_SIZE
        if pos != size:
            raise BitstreamError(f"corrupt .rnnc file: {size - pos} bytes after the last iteration")
    if not spans:
        raise BitstreamError(f"truncated .rnnc file: no complete iteration (header says {k})")
    return spans


def parse(data: bytes) -> tuple[Header, list[bytes]]:
    """Check a file and split it into its header and the payloads of the iterations present (whole
    ones only; versions 2 and 3: raw when a payload is ``iteration_bytes`` long, else entropy-coded).

    Fewer whole iterations than the header says is a valid progressive prefix; anything else that
    does not add up is a :class:`BitstreamError`.
    """
    header = parse_header(data)
    view = memoryview(bytes(data) if not isinstance(data, bytes) else data)
    return header, [bytes(view[a:b]) for a, b in _records(view, header)]


def _pack_v1(header: Header, codes: np.ndarray) -> bytes:
    """The version-1 file (raw bits) of codes (K, Hb, Wb, bits)."""
    parts = [header.replace(version=1).pack()]
    for t in range(codes.shape[0]):
        chunk = np.packbits(codes[t].reshape(-1)).tobytes()
        parts += [chunk, _CRC.pack(binascii.crc32(chunk))]
    return b"".join(parts)


def _plane_coder(version: int, shape: tuple[int, int, int], table: np.ndarray | None):
    """The entropy coder of one image's planes for a version-2 or version-3 file."""
    if version == 3:
        from pipeline.compression.context import ContextCoder

        if table is None:
            raise BitstreamError("invalid .rnnc file: version 3 needs the model's context model, and this model "
                                 "has none")
        return ContextCoder(*shape, table)
    from pipeline.compression.entropy import PlaneCoder

    return PlaneCoder(*shape)


class _CodedRecords:
    """The iteration records (length, payload, crc) of a version-2 file -- version 3 when given the model's
    context table -- one iteration at a time: the i-th call of :meth:`add` codes iteration i."""

    def __init__(self, header: Header, table: np.ndarray | None = None):
        self.version = 2 if table is None else 3
        self.raw = header.iteration_bytes
        self.coder = _plane_coder(self.version, (*header.blocks, header.bits), table)

    def add(self, plane: np.ndarray) -> tuple[bytes, int]:
        """The record of the next iteration's codes (Hb, Wb, bits), and its payload's size."""
        payload = self.coder.encode(plane)
        if len(payload) >= self.raw:  # incompressible: store it raw (the model learned it all the same)
            payload = np.packbits(plane.reshape(-1)).tobytes()
        record = _LENGTH.pack(len(payload)) + payload
        return record + _CRC.pack(binascii.crc32(record)), len(payload)


def _pack_coded(header: Header, codes: np.ndarray, table: np.ndarray | None = None) -> tuple[bytes, list[int]]:
    """The version-2 file of codes (K, Hb, Wb, bits) -- version 3 when given the model's context table --
    and each iteration's payload size."""
    records = _CodedRecords(header.replace(iterations=codes.shape[0]), table)
    parts = [header.replace(version=records.version).pack()]
    sizes = []
    for t in range(codes.shape[0]):
        record, size = records.add(codes[t])
        parts.append(record)
        sizes.append(size)
    return b"".join(parts), sizes


def _unpack(header: Header, chunks: list[bytes], k: int, table: np.ndarray | None = None) -> np.ndarray:
    """Codes (k, Hb, Wb, bits) bool of the first k payloads (version 3: with the model's context table)."""
    hb, wb = header.blocks
    n = hb * wb * header.bits
    codes = np.empty((k, hb, wb, header.bits), dtype=bool)
    if header.version == 1:
        for t in range(k):
            codes[t] = np.unpackbits(np.frombuffer(chunks[t], dtype=np.uint8), count=n).reshape(hb, wb, header.bits)
        return codes
    from pipeline.compression.entropy import EntropyError

    coder = _plane_coder(header.version, (hb, wb, header.bits), table)
    for t in range(k):
        if len(chunks[t]) == header.iteration_bytes:
            codes[t] = np.unpackbits(np.frombuffer(chunks[t], dtype=np.uint8), count=n).reshape(hb, wb, header.bits)
            if t < k - 1:
                coder.observe(codes[t])
        else:
            try:
                codes[t] = coder.decode(chunks[t])
            except EntropyError as err:
                raise BitstreamError(f"corrupt .rnnc file: iteration {t + 1}: {err}") from None
    return codes


# ----------------------------------------------------------------------------------------- tiling


def tile_grid(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Tiles (y0, y1, x0, x1) covering a height x width canvas (multiples of 16), row-major."""
    th = tile or height
    tw = tile or width
    return [(y, min(y + th, height), x, min(x + tw, width))
            for y in range(0, height, th) for x in range(0, width, tw)]


def _padded(n: int) -> int:
    return math.ceil(n / BLOCK) * BLOCK


# ----------------------------------------------------------------------------------------- model io


def model_fingerprint(model: RNNCompressor) -> bytes:
    """8-byte digest of the model's config and weights: files record it, decoders check it."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name == "context" and not tensor.any():
            continue  # an unfitted entropy model: the fingerprint of the weights alone, as before it existed
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.digest()[:8]


def save_model(model: RNNCompressor, path: str | os.PathLike, meta: dict | None = None,
               dtype: torch.dtype = torch.float32) -> None:
    """Self-contained checkpoint: format tag, config, state_dict (stored as ``dtype``), fingerprint, metadata.

    The fingerprint is of the model's weights as they are: for a ``dtype`` narrower than float32 they
    must already be representable in it (see ``pipeline.compression.release.to_half``), or loading fails.
    """
    from pipeline.utils import atomic_path

    state = {k: v.detach().to("cpu", dtype).clone() for k, v in model.state_dict().items()}
    ckpt = {"format": MODEL_FORMAT, "version": 1, "config": model.config.to_dict(), "state_dict": state,
            "fingerprint": model_fingerprint(model).hex(), "meta": meta or {}}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # to a file object: torch.save names the zip's folder after a file *name* (here the random
        # temporary one), so the same weights would hash differently on every run (and DVC re-run
        # everything downstream); through a file object the folder is always "archive"
        torch.save(ckpt, f)


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> RNNCompressor:
    if isinstance(ckpt, dict) and "state_dict" not in ckpt and isinstance(ckpt.get("model"), dict):
        ckpt = {**ckpt, "state_dict": ckpt["model"]}  # a training checkpoint (train_compressor's last.pt)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise ModelError(f"{source}: not an RNN codec checkpoint (no config/state_dict)")
    try:
        model = RNNCompressor(ModelConfig.from_dict(dict(ckpt["config"])))
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise ModelError(f"{source}: checkpoint does not match the model: {str(err).splitlines()[0]}") from None
    expected = ckpt.get("fingerprint")
    if expected and model_fingerprint(model).hex() != expected:
        raise ModelError(f"{source}: checkpoint is corrupt (weights do not match its fingerprint)")
    return model.float().eval()


def load_model(source: str | os.PathLike | None = None) -> RNNCompressor:
    """A checkpoint path (default data/compressor/model.pt) or an MLflow model URI (``models:/…``,
    ``runs:/…``: the checkpoint logged there, ``pipeline.tracking_models.logged_checkpoint``) -> model on CPU.
    Either way the file is read with ``torch.load(weights_only=True)`` and its fingerprint checked."""
    from pipeline.tracking_models import is_model_uri, logged_checkpoint

    source = str(source if source is not None else DEFAULT_MODEL)
    if is_model_uri(source):
        with logged_checkpoint(source, "rnn-compressor", "an RNN codec", ModelError) as path:
            return _read_model(path, source)
    path = Path(source)
    if not path.is_file():
        raise ModelError(f"model {source}: no such file (train one with `python -m pipeline train_compressor`, "
                         "or pass --model PATH or --model models:/rnn-compressor/VERSION)")
    return _read_model(path, source)


def _read_model(path: Path, source: str) -> RNNCompressor:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ModelError(f"model {source}: not a readable checkpoint ({type(err).__name__})") from None
    return model_from_checkpoint(ckpt, f"model {source}")


# ----------------------------------------------------------------------------------------- codec


class RNNCodec:
    """Compress uint8 HxWx3 images to .rnnc bytes and back, with one trained model.

    The network runs in :mod:`pipeline.compression.inference`'s engine at ``precision`` (``auto``: bf16
    where native -- CUDA, a CPU with AVX512-BF16/AMX -- else fp32; or ``fp32``/``bf16``); :attr:`precision`
    is the one resolved. Files do not record it: a file from either precision decodes at either.
    Encoding and decoding run the same ops on the same tiles in the same order, so the decoder's
    image equals the encoder's own reconstruction bit for bit (at the same precision, on the same device
    and build); at the other precision it differs by rounding (hundredths of a dB at most).
    ``max_pixels``: the decoder's pixel limit (None: :func:`default_max_pixels`; 0: no limit).
    """

    def __init__(self, model: RNNCompressor, device: str | torch.device = "cpu", tile: int = DEFAULT_TILE,
                 show_progress: bool = False, max_pixels: int | None = None, precision: str = "auto"):
        from pipeline.compression.inference import InferenceNet, check_precision

        why = _check_tile(tile) if isinstance(tile, (int, np.integer)) and not isinstance(tile, bool) else "not an int"
        if why:
            raise CodecError(f"tile: {why}")
        try:
            check_precision(precision)
        except ValueError as err:
            raise CodecError(str(err)) from None
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise CodecError(f"device: {device!r} is not a torch device") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise CodecError("device: CUDA is not available here (use --device cpu)")
        self.model = model.to(self.device).float().eval()
        self.net = InferenceNet(self.model, self.device, precision)
        self.precision: str = self.net.precision  # fp32 or bf16: what ``auto`` chose here
        self.config: ModelConfig = model.config
        self.fingerprint = model_fingerprint(model)
        from pipeline.compression.context import to_table

        self.context_table = to_table(model.context)  # None: never fitted (files are version 2)
        self.max_iterations: int = self.config.iterations
        self.bits: int = self.config.bits
        self.tile = int(tile)
        self.max_pixels = max_pixels
        self.show_progress = show_progress  # a progress bar (stderr) over the tiles of multi-tile images

    def _tiles(self, height: int, width: int, tile: int, desc: str):
        tiles = tile_grid(height, width, tile)
        if not self.show_progress or len(tiles) < 2:
            return tiles
        from pipeline.utils import progress

        return progress(tiles, desc=desc, unit="tile", leave=False)

    # -- helpers
    def _check_image(self, img: np.ndarray) -> np.ndarray:
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise InputError("expected a uint8 array of shape (H, W, 3)")
        if img.shape[0] < 1 or img.shape[1] < 1 or max(img.shape[:2]) > MAX_SIDE:
            raise InputError(f"image size {img.shape[1]}x{img.shape[0]} out of range")
        why = _check_tile(self.tile, *img.shape[:2])
        if why:
            raise CodecError(f"tile: {why} (this image is {img.shape[1]}x{img.shape[0]}; use --tile {DEFAULT_TILE})")
        return img

    def _check_iterations(self, iterations: int) -> int:
        if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) \
                or not 1 <= iterations <= self.max_iterations:
            raise CodecError(f"iterations: must be 1..{self.max_iterations} for this model (got {iterations})")
        return int(iterations)

    def header_for(self, img: np.ndarray, iterations: int) -> Header:
        return Header(bits=self.bits, tile=self.tile, fingerprint=self.fingerprint,
                      height=img.shape[0], width=img.shape[1], iterations=iterations)

    def iterations_for_bpp(self, height: int, width: int, bpp: float) -> int:
        """Most iterations whose file surely stays within ``bpp`` (by :func:`max_file_size`, every
        iteration raw); :meth:`compress_to_bpp` finds the real most, from the coded sizes."""
        fits = [k for k in range(1, self.max_iterations + 1)
                if bits_per_pixel(max_file_size(height, width, k, self.bits), height, width) <= bpp]
        if not fits:
            least = bits_per_pixel(max_file_size(height, width, 1, self.bits), height, width)
            raise CodecError(f"--bpp {bpp:g}: too low for a {width}x{height} image; one iteration may need {least:.4f} bpp")
        return fits[-1]

    def _to_tensor(self, tile: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.array(tile, dtype=np.uint8, order="C", copy=True)).to(self.device)
        return (x.permute(2, 0, 1)[None].float() / 255.0 - 0.5).contiguous()

    @staticmethod
    def _to_uint8(recon: torch.Tensor) -> np.ndarray:
        q = ((recon[0] + 0.5) * 255.0).round().clamp(0, 255).to(torch.uint8)
        return q.permute(1, 2, 0).cpu().numpy()

    # -- encoding
    @torch.inference_mode()
    def encode(self, img: np.ndarray, iterations: int, reconstruct: bool = False):
        """Codes (K, Hb, Wb, bits) bool, and the encoder's reconstruction (uint8) when asked."""
        img = self._check_image(img)
        k = self._check_iterations(iterations)
        with _memory_guard("encoding", self.tile):
            return self._encode(img, k, reconstruct)

    def _encode(self, img: np.ndarray, k: int, reconstruct: bool):
        h, w = img.shape[:2]
        hp, wp = _padded(h), _padded(w)
        padded = np.pad(img, ((0, hp - h), (0, wp - w), (0, 0)), mode="edge") if (hp, wp) != (h, w) else img
        codes = np.zeros((k, hp // BLOCK, wp // BLOCK, self.bits), dtype=bool)
        out = np.empty((hp, wp, 3), dtype=np.uint8) if reconstruct else None
        net = self.net
        for y0, y1, x0, x1 in self._tiles(hp, wp, self.tile, "encode"):
            x = self._to_tensor(padded[y0:y1, x0:x1])
            enc, dec = net.init_states()
            recon = torch.zeros_like(x)
            for t in range(k):
                b, enc = net.encode_step(x - recon, enc)
                codes[t, y0 // BLOCK: y1 // BLOCK, x0 // BLOCK: x1 // BLOCK] = (b[0] > 0).permute(1, 2, 0).cpu().numpy()
                if t < k - 1 or reconstruct:  # the last iteration's decoder output only matters to the decoder
                    delta, dec = net.decode_step(b, dec)
                    recon = net.reconstruct_step(recon, delta)
            if out is not None:
                out[y0:y1, x0:x1] = self._to_uint8(recon)
        return (codes, out[:h, :w]) if reconstruct else codes

    def held_bytes(self, height: int, width: int) -> int:
        """Bytes of the recurrent state (and image and reconstruction) of every tile of a height x width image:
        what :meth:`compress_to_bpp` holds to code iteration by iteration."""
        e, d = self.config.encoder_widths, self.config.decoder_widths
        per_pixel = 2 * (e[1] / 16 + e[2] / 64 + e[3] / 256 + d[0] / 256 + d[1] / 64 + d[2] / 16 + d[3] / 4)
        size = 2 if self.precision == "bf16" else 4
        return int(_padded(height) * _padded(width) * (per_pixel * size + 2 * 3 * 4))

    def _encode_progressive(self, img: np.ndarray, k: int):
        """Iteration by iteration over every tile: yields the codes (Hb, Wb, bits) of iterations 1..k of the whole
        image, the same as :meth:`encode`'s, holding every tile's state meanwhile (:meth:`held_bytes`). An
        iteration's decoder step runs when the next iteration is asked for. Call under inference_mode."""
        h, w = img.shape[:2]
        hp, wp = _padded(h), _padded(w)
        padded = np.pad(img, ((0, hp - h), (0, wp - w), (0, 0)), mode="edge") if (hp, wp) != (h, w) else img
        tiles = tile_grid(hp, wp, self.tile)
        net = self.net
        held: list[list] = [[None, None, *net.init_states(), None] for _ in tiles]  # x, recon, enc, dec, b
        for t in range(k):
            plane = np.zeros((hp // BLOCK, wp // BLOCK, self.bits), dtype=bool)
            for (y0, y1, x0, x1), s in zip(tiles, held):
                x, recon, enc, dec, b = s
                if x is None:
                    x = self._to_tensor(padded[y0:y1, x0:x1])
                    recon = torch.zeros_like(x)
                if b is not None:  # the previous iteration's decoder step
                    delta, dec = net.decode_step(b, dec)
                    recon = net.reconstruct_step(recon, delta)
                b, enc = net.encode_step(x - recon, enc)
                plane[y0 // BLOCK: y1 // BLOCK, x0 // BLOCK: x1 // BLOCK] = (b[0] > 0).permute(1, 2, 0).cpu().numpy()
                s[:] = x, recon, enc, dec, b
            yield plane

    def compress(self, img: np.ndarray, iterations: int, version: int | None = None) -> bytes:
        """The .rnnc file bytes of ``img`` (uint8 HxWx3) coded with ``iterations`` iterations.

        ``version`` None: 3 (the model's learned context model) when the model has one, else 2 (an
        adaptive context model); 1 writes the raw bits (the old format, and the entropy coders' baseline)."""
        if version is None:
            version = 3 if self.context_table is not None else 2
        if version not in VERSIONS:
            raise CodecError(f"version: this build writes versions {VERSIONS} (got {version})")
        if version == 3 and self.context_table is None:
            raise CodecError("version 3: this model has no fitted context model (write version 2)")
        codes = self.encode(img, iterations)
        header = self.header_for(img, codes.shape[0])
        if (header.iteration_bytes + CRC_SIZE + LENGTH_SIZE) * codes.shape[0] + HEADER_SIZE > 0xFFFFFFFF:
            raise InputError(f"image {img.shape[1]}x{img.shape[0]} too large for one .rnnc file")
        if version == 1:
            return _pack_v1(header, codes)
        return _pack_coded(header, codes, self.context_table if version == 3 else None)[0]

    def compress_to_bpp(self, img: np.ndarray, bpp: float) -> tuple[bytes, int]:
        """The file with the most iterations whose size stays within ``bpp`` bits per pixel, header
        included, and that number (the same bytes as :meth:`compress` with that number).

        Codes iteration by iteration and stops at the first iteration that no longer fits, holding every
        tile's state meanwhile; an image whose states would take more than :data:`EARLY_STOP_BYTES`
        (:meth:`held_bytes`) is encoded to the last iteration, one tile at a time, then truncated."""
        img = self._check_image(img)
        h, w = img.shape[:2]
        if self.held_bytes(h, w) <= EARLY_STOP_BYTES:
            return self._compress_to_bpp_early(img, bpp)
        data = self.compress(img, self.max_iterations)
        for k in range(self.max_iterations, 0, -1):
            cut = truncate(data, k) if k < self.max_iterations else data
            if bits_per_pixel(len(cut), h, w) <= bpp:
                return cut, k
        least = bits_per_pixel(len(truncate(data, 1)), h, w)
        raise CodecError(f"--bpp {bpp:g}: too low for this {w}x{h} image; one iteration takes {least:.4f} bpp")

    def _compress_to_bpp_early(self, img: np.ndarray, bpp: float) -> tuple[bytes, int]:
        h, w = img.shape[:2]
        header = self.header_for(img, self.max_iterations)
        if (header.iteration_bytes + CRC_SIZE + LENGTH_SIZE) * header.iterations + HEADER_SIZE > 0xFFFFFFFF:
            raise InputError(f"image {w}x{h} too large for one .rnnc file")
        records = _CodedRecords(header, self.context_table)
        kept: list[bytes] = []
        size = HEADER_SIZE
        with torch.inference_mode(), _memory_guard("encoding", self.tile):
            iterations = self._encode_progressive(img, self.max_iterations)
            for plane in iterations:
                record, _ = records.add(plane)
                if bits_per_pixel(size + len(record), h, w) > bpp:
                    break
                kept.append(record)
                size += len(record)
            iterations.close()
        if not kept:
            least = bits_per_pixel(size + len(record), h, w)
            raise CodecError(f"--bpp {bpp:g}: too low for this {w}x{h} image; one iteration takes {least:.4f} bpp")
        header = header.replace(version=records.version, iterations=len(kept))
        return header.pack() + b"".join(kept), len(kept)

    def reconstruct(self, img: np.ndarray, iterations: int) -> np.ndarray:
        """The in-memory path: what decoding the compressed file yields, without the file."""
        return self.encode(img, iterations, reconstruct=True)[1]

    # -- decoding
    def read_header(self, data: bytes) -> tuple[Header, int]:
        """(header, whole iterations present); checks the model and the pixel limit."""
        header = self._checked_header(data)
        return header, len(_records(data, header))

    def _check_model(self, header: Header) -> None:
        if header.fingerprint != self.fingerprint or header.bits != self.bits:
            raise ModelMismatchError(f"file was made by another model (fingerprint {header.fingerprint.hex()}, "
                                     f"this model is {self.fingerprint.hex()}): decode it with --model of that model")
        if header.iterations > self.max_iterations:
            raise BitstreamError(f"invalid .rnnc header ({header.iterations} iterations; this model makes at most "
                                 f"{self.max_iterations})")

    def _checked_header(self, data: bytes) -> Header:
        header = parse_header(data)
        self._check_model(header)
        if header.version == 3 and self.context_table is None:
            raise BitstreamError("invalid .rnnc file: version 3 needs the model's context model, and this model "
                                 "has none")
        limit = default_max_pixels() if self.max_pixels is None else self.max_pixels
        if limit and header.pixels > limit:
            raise BitstreamError(f"image of {header.width}x{header.height} = {header.pixels} pixels is over the "
                                 f"limit of {limit} (a decompression bomb?); --max-pixels 0 lifts it")
        return header

    def _codes(self, data: bytes, iterations: int | None) -> tuple[Header, np.ndarray]:
        header = self._checked_header(data)
        view = memoryview(data if isinstance(data, bytes) else bytes(data))
        chunks = [bytes(view[a:b]) for a, b in _records(view, header)]
        if iterations is None:
            k = len(chunks)
        else:
            k = self._check_iterations(iterations)
            if k > len(chunks):
                raise CodecError(f"iterations: the file holds {len(chunks)} iteration(s), cannot decode {k}")
        with _memory_guard("decoding", header.tile):
            return header, _unpack(header, chunks, k, self.context_table)

    def decompress(self, data: bytes, iterations: int | None = None) -> np.ndarray:
        """Decode a .rnnc file (or a prefix of whole iterations) to uint8 HxWx3.

        ``iterations``: decode only the first K (default: all present).
        """
        header, codes = self._codes(data, iterations)
        return self.decode(codes, header.height, header.width, header.tile)[-1]

    def decompress_progressive(self, data: bytes, iterations: int | None = None) -> list[np.ndarray]:
        """Every coarser image in one pass: element k-1 equals ``decompress(data, k)``."""
        header, codes = self._codes(data, iterations)
        return self.decode(codes, header.height, header.width, header.tile, every=True)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray, height: int, width: int, tile: int | None = None,
               every: bool = False) -> list[np.ndarray]:
        """Codes (K, Hb, Wb, bits) -> [uint8 image (height, width, 3)] after K iterations (``every``: after
        each of them), with the given tiling."""
        tile = self.tile if tile is None else tile
        with _memory_guard("decoding", tile):
            return self._decode(codes, height, width, tile, every)

    def _decode(self, codes: np.ndarray, height: int, width: int, tile: int, every: bool) -> list[np.ndarray]:
        hp, wp = _padded(height), _padded(width)
        k = codes.shape[0]
        out = np.empty((k if every else 1, hp, wp, 3), dtype=np.uint8)
        net = self.net
        for y0, y1, x0, x1 in self._tiles(hp, wp, tile, "decode"):
            _, dec = net.init_states()
            recon = torch.zeros((1, 3, y1 - y0, x1 - x0), device=self.device)
            for t in range(k):
                c = codes[t, y0 // BLOCK: y1 // BLOCK, x0 // BLOCK: x1 // BLOCK]
                b = net.codes_to_input(torch.from_numpy(np.ascontiguousarray(c.transpose(2, 0, 1)))[None])
                delta, dec = net.decode_step(b, dec)
                recon = net.reconstruct_step(recon, delta)
                if every:
                    out[t, y0:y1, x0:x1] = self._to_uint8(recon)
            if not every:
                out[0, y0:y1, x0:x1] = self._to_uint8(recon)
        return [o[:height, :width] for o in out]


def truncate(data: bytes, iterations: int) -> bytes:
    """A standalone file of the first ``iterations`` iterations (header rewritten): equals compressing
    with that many iterations, byte for byte. The real file of each rate, from one encoding."""
    header = parse_header(data)
    view = memoryview(data if isinstance(data, bytes) else bytes(data))
    spans = _records(view, header)
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) \
            or not 1 <= iterations <= len(spans):
        raise CodecError(f"iterations: the file holds {len(spans)} iteration(s), cannot keep {iterations}")
    end = spans[iterations - 1][1] + CRC_SIZE
    return header.replace(iterations=int(iterations)).pack() + bytes(view[HEADER_SIZE:end])


def load_codec(model: str | os.PathLike | None = None, device: str = "cpu", tile: int = DEFAULT_TILE,
               show_progress: bool = False, max_pixels: int | None = None, precision: str = "auto") -> RNNCodec:
    """The codec over a checkpoint path (default data/compressor/model.pt) or an MLflow model URI, at
    ``precision`` (auto, fp32 or bf16: see :class:`RNNCodec`)."""
    from pipeline.compression.inference import check_precision

    try:
        check_precision(precision)  # before the model is loaded
    except ValueError as err:
        raise CodecError(str(err)) from None
    return RNNCodec(load_model(model), device=device, tile=tile, show_progress=show_progress, max_pixels=max_pixels,
                    precision=precision)
