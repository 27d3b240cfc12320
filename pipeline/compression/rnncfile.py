"""The ``.rnnc`` file format: header, iteration records, CRCs, truncation (numpy only, no torch).

File layout (little-endian). The header is the same in every version::

    header (30 bytes)
      magic        4s   b"RNNC"
      version      u8   5 when the model has a fitted context model (4 when its table is from before
                        version 5), else 2 (1 and 3 are read too)
      bits         u8   code bits per 16x16 block per iteration (the model's)
      block        u8   16: pixels per code cell side
      tile         u16  side of the coding tiles in pixels (a multiple of 16, 16..2048; 0: one tile,
                        for images up to 2048 px a side)
      fingerprint  8s   first 8 bytes of the model's SHA-256 (config + weights)
      height       u32  image height in pixels
      width        u32  image width in pixels
      iterations   u8   iterations stored, K
      header_crc   u32  CRC-32 of the 26 bytes above

Versions 2 to 5, then K times, iteration by iteration::

      length       u32  n, the payload's bytes: at most R, the raw size of an iteration (below)
      payload      n    n == R: the raw bits as in version 1; n < R: the bits entropy-coded, n a
                        multiple of 4, by a range coder with -- version 3 -- the model's own learned
                        context model (:class:`pipeline.compression.context.ContextCoder`: each bit
                        predicted from the same block's other bits of this and the two previous
                        iterations and its coded neighbours), -- version 4 -- the same corrected as it
                        goes by what it learns of this image
                        (:class:`pipeline.compression.context.AdaptiveContextCoder`), -- version 5 --
                        the same with the coded neighbours' other channels as well
                        (:class:`pipeline.compression.context.NeighbourContextCoder`), or -- version 2 --
                        an adaptive context model carried over from the iterations before
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

The network that makes and reads the bits is :class:`pipeline.compression.codec.RNNCodec`; the model files it
loads are :mod:`pipeline.compression.modelfile`.
"""

from __future__ import annotations

import binascii
import math
import struct
from dataclasses import dataclass

import numpy as np

from pipeline.compression.errors import BitstreamError, CodecError

BLOCK = 16  # pixels per code cell side: the model's (pipeline.compression.model.BLOCK; a test checks they agree)

MAGIC = b"RNNC"
VERSION = 5  # what a model with a fitted context model writes (4 with a table from before 5; none: 2)
VERSIONS = (1, 2, 3, 4, 5)  # versions this build reads
TABLE_VERSIONS = (3, 4, 5)  # versions coded with the model's context table
_FIELDS = struct.Struct("<4sBBBH8sIIB")
_CRC = struct.Struct("<I")
_LENGTH = struct.Struct("<I")
HEADER_SIZE = _FIELDS.size + _CRC.size  # 30 bytes
CRC_SIZE = _CRC.size
LENGTH_SIZE = _LENGTH.size
DEFAULT_TILE = 768  # px: a Kodak image (768x512) is one tile; a 4000x3000 photo is 6x4 tiles
MAX_TILE = 2048  # px: the largest tile the encoder writes and the decoder accepts (bounds its memory)
MAX_SIDE = 1 << 20  # px; refuses absurd headers before anything is allocated


def default_max_pixels() -> int | None:
    """The decoder's default pixel limit: where Pillow refuses an image (2 x Image.MAX_IMAGE_PIXELS,
    read when called, so setting Pillow's limit sets this one); None when Pillow's is off."""
    from PIL import Image

    return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)



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


def check_tile(tile: int, height: int | None = None, width: int | None = None) -> str | None:
    """Why ``tile`` is outside what the encoder writes (None when it is fine)."""
    if tile == 0:
        if height is not None and max(padded_size(height), padded_size(width)) > MAX_TILE:
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
    why = check_tile(tile, height, width)
    if why:
        raise BitstreamError(f"invalid .rnnc header ({why})")
    return Header(bits=bits, tile=tile, fingerprint=fp, height=height, width=width, iterations=iterations,
                  version=version, block=block)


def record_spans(data: bytes, header: Header) -> list[tuple[int, int]]:
    """(start, end) of each whole iteration record present, CRCs checked; payload bytes for v2 to v5 exclude
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
    return header, [bytes(view[a:b]) for a, b in record_spans(view, header)]


def pack_v1(header: Header, codes: np.ndarray) -> bytes:
    """The version-1 file (raw bits) of codes (K, Hb, Wb, bits)."""
    parts = [header.replace(version=1).pack()]
    for t in range(codes.shape[0]):
        chunk = np.packbits(codes[t].reshape(-1)).tobytes()
        parts += [chunk, _CRC.pack(binascii.crc32(chunk))]
    return b"".join(parts)


def _plane_coder(version: int, shape: tuple[int, int, int], table: np.ndarray | None):
    """The entropy coder of one image's planes for a version-2, -3, -4 or -5 file."""
    if version in TABLE_VERSIONS:
        from pipeline.compression.context import (AdaptiveContextCoder, ContextCoder, NeighbourContextCoder,
                                                  table_version)

        if table is None:
            raise BitstreamError(f"invalid .rnnc file: version {version} needs the model's context model, and this "
                                 "model has none")
        served = table_version(table, shape[2])
        if served < version:
            raise BitstreamError(f"invalid .rnnc file: version {version} needs a version-{version} context model, "
                                 f"and this model's is version {served}")
        coder = {3: ContextCoder, 4: AdaptiveContextCoder, 5: NeighbourContextCoder}[version]
        return coder(*shape, table)
    from pipeline.compression.entropy import PlaneCoder

    return PlaneCoder(*shape)


def newest_version(table: np.ndarray | None, bits: int) -> int:
    """The version a model with this context table writes by default: its table's (5, or 4 for a table from
    before version 5), or 2 without one."""
    if table is None:
        return 2
    from pipeline.compression.context import table_version

    return table_version(table, bits)


class CodedRecords:
    """The iteration records (length, payload, crc) of a version-2 file -- the table's version (5, or 4 for a
    table from before 5; ``version`` 3 or 4 by choice) when given the model's context table -- one iteration
    at a time: the i-th call of :meth:`add` codes iteration i. Version 2 ignores the table; without one, every
    version is 2."""

    def __init__(self, header: Header, table: np.ndarray | None = None, version: int | None = None):
        if version is None:
            version = newest_version(table, header.bits)
        if version not in (2, *TABLE_VERSIONS):
            raise ValueError(f"version {version} is not an entropy-coded version")
        self.version = version if table is not None else 2
        table = table if self.version in TABLE_VERSIONS else None
        self.raw = header.iteration_bytes
        self.coder = _plane_coder(self.version, (*header.blocks, header.bits), table)

    def add(self, plane: np.ndarray) -> tuple[bytes, int]:
        """The record of the next iteration's codes (Hb, Wb, bits), and its payload's size."""
        payload = self.coder.encode(plane)
        if len(payload) >= self.raw:  # incompressible: store it raw (the model learned it all the same)
            payload = np.packbits(plane.reshape(-1)).tobytes()
        record = _LENGTH.pack(len(payload)) + payload
        return record + _CRC.pack(binascii.crc32(record)), len(payload)


def pack_coded(header: Header, codes: np.ndarray, table: np.ndarray | None = None,
               version: int | None = None) -> tuple[bytes, list[int]]:
    """The version-2 file of codes (K, Hb, Wb, bits) -- the table's version (or ``version`` 3 or 4) when given
    the model's context table -- and each iteration's payload size."""
    records = CodedRecords(header.replace(iterations=codes.shape[0]), table, version)
    parts = [header.replace(version=records.version).pack()]
    sizes = []
    for t in range(codes.shape[0]):
        record, size = records.add(codes[t])
        parts.append(record)
        sizes.append(size)
    return b"".join(parts), sizes


def unpack_codes(header: Header, chunks: list[bytes], k: int, table: np.ndarray | None = None) -> np.ndarray:
    """Codes (k, Hb, Wb, bits) bool of the first k payloads (versions 3 to 5: with the model's context table)."""
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



def truncate(data: bytes, iterations: int) -> bytes:
    """A standalone file of the first ``iterations`` iterations (header rewritten): equals compressing
    with that many iterations, byte for byte. The real file of each rate, from one encoding."""
    header = parse_header(data)
    view = memoryview(data if isinstance(data, bytes) else bytes(data))
    spans = record_spans(view, header)
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) \
            or not 1 <= iterations <= len(spans):
        raise CodecError(f"iterations: the file holds {len(spans)} iteration(s), cannot keep {iterations}")
    end = spans[iterations - 1][1] + CRC_SIZE
    return header.replace(iterations=int(iterations)).pack() + bytes(view[HEADER_SIZE:end])



# ----------------------------------------------------------------------------------------- tiling


def tile_grid(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Tiles (y0, y1, x0, x1) covering a height x width canvas (multiples of 16), row-major."""
    th = tile or height
    tw = tile or width
    return [(y, min(y + th, height), x, min(x + tw, width))
            for y in range(0, height, th) for x in range(0, width, tw)]


def padded_size(n: int) -> int:
    """``n`` px rounded up to whole blocks: the side the image is padded to (edge replication)."""
    return math.ceil(n / BLOCK) * BLOCK

