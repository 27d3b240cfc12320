"""The ``.rnnc`` file format and the codec API over a trained :class:`RNNCompressor`.

File layout (version 1, little-endian)::

    header (30 bytes)
      magic        4s   b"RNNC"
      version      u8   1
      bits         u8   code bits per 16x16 block per iteration (the model's)
      block        u8   16: pixels per code cell side
      tile         u16  side of the coding tiles in pixels (a multiple of 16; 0: one tile)
      fingerprint  8s   first 8 bytes of the model's SHA-256 (config + weights)
      height       u32  image height in pixels
      width        u32  image width in pixels
      iterations   u8   iterations stored, K
      header_crc   u32  CRC-32 of the 26 bytes above
    K times, iteration by iteration:
      bits         ceil(bits * Hb * Wb / 8) bytes: for each 16x16 block in raster order, its bits
                   (1 = +1, 0 = -1), MSB first; Hb, Wb = ceil(height/16), ceil(width/16)
      crc          u32  CRC-32 of those bytes

So the size is ``HEADER_SIZE + K * (iteration bytes + 4)`` and any prefix of whole iterations is a
valid, coarser image (progressive): the decoder reads the iterations present and says so when the
header promised more. A partial iteration, a bad checksum, a foreign magic or version, or another
model's fingerprint are errors (:class:`BitstreamError`, :class:`ModelMismatchError`).

The image is padded to a multiple of 16 (edge replication) and split into ``tile`` x ``tile`` tiles
(row-major; the last row/column smaller); each tile is coded independently, so memory is bounded by
the tile, not the image. The tiling is stored in the header, so the decoder repeats it exactly.
"""

from __future__ import annotations

import binascii
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

MAGIC = b"RNNC"
VERSION = 1
_FIELDS = struct.Struct("<4sBBBH8sIIB")
_CRC = struct.Struct("<I")
HEADER_SIZE = _FIELDS.size + _CRC.size  # 30 bytes
CRC_SIZE = _CRC.size
DEFAULT_TILE = 768  # px: a Kodak image (768x512) is one tile; a 4000x3000 photo is 6x4 tiles
DEFAULT_MODEL = Path("data/compressor/model.pt")
MODEL_FORMAT = "rnnc-model"
MAX_SIDE = 1 << 20  # px; refuses absurd headers before anything is allocated


class CodecError(PipelineError):
    """Any error of the codec a user can cause."""


class BitstreamError(CodecError):
    """The bytes are not a (complete, intact) .rnnc file."""


class ModelMismatchError(CodecError):
    """The file was made by another model than the one decoding it."""


class ModelError(CodecError):
    """The model could not be loaded."""


class InputError(CodecError):
    """The input image is unusable."""


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
        hb, wb = self.blocks
        return (self.bits * hb * wb + 7) // 8

    def pack(self) -> bytes:
        head = _FIELDS.pack(MAGIC, self.version, self.bits, self.block, self.tile, self.fingerprint,
                            self.height, self.width, self.iterations)
        return head + _CRC.pack(binascii.crc32(head))


def file_size(height: int, width: int, iterations: int, bits: int = 32) -> int:
    """Exact size in bytes of a file holding ``iterations`` iterations of a height x width image."""
    h = Header(bits=bits, tile=0, fingerprint=b"\0" * 8, height=height, width=width, iterations=iterations)
    return HEADER_SIZE + iterations * (h.iteration_bytes + CRC_SIZE)


def bits_per_pixel(n_bytes: int, height: int, width: int) -> float:
    """BPP of a file of ``n_bytes`` bytes, header included: 8 N / (H W)."""
    return 8 * n_bytes / (height * width)


def parse(data: bytes) -> tuple[Header, list[bytes]]:
    """Check a file and split it into its header and the iterations present (whole ones only).

    Fewer whole iterations than the header says is a valid progressive prefix; anything else that
    does not add up is a :class:`BitstreamError`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise BitstreamError("not an .rnnc file (bad magic bytes)")
    if len(data) < HEADER_SIZE:
        raise BitstreamError(f"truncated .rnnc file: {len(data)} bytes, the header alone needs {HEADER_SIZE}")
    version = data[len(MAGIC)]
    if version != VERSION:
        raise BitstreamError(f"unsupported .rnnc version {version} (this build reads version {VERSION})")
    head = data[: _FIELDS.size]
    (crc,) = _CRC.unpack_from(data, _FIELDS.size)
    if binascii.crc32(head) != crc:
        raise BitstreamError("corrupt .rnnc header (checksum mismatch)")
    _, version, bits, block, tile, fp, height, width, iterations = _FIELDS.unpack(head)
    if block != BLOCK or bits == 0 or tile % BLOCK:
        raise BitstreamError(f"invalid .rnnc header (bits={bits}, block={block}, tile={tile})")
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE) or iterations == 0:
        raise BitstreamError(f"invalid .rnnc header (size {width}x{height}, {iterations} iterations)")
    header = Header(bits=bits, tile=tile, fingerprint=fp, height=height, width=width, iterations=iterations,
                    version=version, block=block)
    step = header.iteration_bytes + CRC_SIZE
    payload = memoryview(data)[HEADER_SIZE:]
    whole, rest = divmod(len(payload), step)
    if whole > iterations or (whole == iterations and rest):
        raise BitstreamError(f"corrupt .rnnc file: {len(payload) - iterations * step} bytes after the last iteration")
    if rest:
        raise BitstreamError(f"truncated .rnnc file: iteration {whole + 1} of {iterations} is incomplete "
                             f"({rest} of {step} bytes)")
    if whole == 0:
        raise BitstreamError(f"truncated .rnnc file: no complete iteration (header says {iterations})")
    chunks = []
    for t in range(whole):
        chunk = payload[t * step: t * step + header.iteration_bytes]
        (crc,) = _CRC.unpack_from(payload, t * step + header.iteration_bytes)
        if binascii.crc32(chunk) != crc:
            raise BitstreamError(f"corrupt .rnnc file: iteration {t + 1} fails its checksum")
        chunks.append(bytes(chunk))
    return header, chunks


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
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.digest()[:8]


def save_model(model: RNNCompressor, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Self-contained checkpoint: format tag, config, float32 state_dict, fingerprint, metadata."""
    from pipeline.utils import atomic_path

    state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
    ckpt = {"format": MODEL_FORMAT, "version": 1, "config": model.config.to_dict(), "state_dict": state,
            "fingerprint": model_fingerprint(model).hex(), "meta": meta or {}}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> RNNCompressor:
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
    """A checkpoint path (default data/compressor/model.pt) or an MLflow model URI -> model on CPU."""
    source = str(source if source is not None else DEFAULT_MODEL)
    if source.startswith(("models:/", "runs:/")) or "://" in source:
        return _load_mlflow(source)
    path = Path(source)
    if not path.is_file():
        raise ModelError(f"model {source}: no such file (train one with `python -m pipeline train_compressor`, "
                         "or pass --model PATH or --model models:/rnn-compressor/VERSION)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ModelError(f"model {source}: not a readable checkpoint ({type(err).__name__})") from None
    return model_from_checkpoint(ckpt, f"model {source}")


def _load_mlflow(uri: str) -> RNNCompressor:
    try:
        import mlflow.pytorch

        from pipeline.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - MLflow raises many types for a bad URI
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"model {uri}: cannot load from MLflow: {first}") from None
    if not isinstance(model, RNNCompressor):
        raise ModelError(f"model {uri}: is a {type(model).__name__}, not an RNN codec")
    return model.float().eval()


# ----------------------------------------------------------------------------------------- codec


class RNNCodec:
    """Compress uint8 HxWx3 images to .rnnc bytes and back, with one trained model.

    Encoding and decoding run the same ops on the same tiles in the same order, so the decoder's
    image equals the encoder's own reconstruction bit for bit (on the same device and build).
    """

    def __init__(self, model: RNNCompressor, device: str | torch.device = "cpu", tile: int = DEFAULT_TILE,
                 show_progress: bool = False):
        if tile < 0 or tile % BLOCK or tile > 0xFFFF:
            raise CodecError(f"tile: must be 0 or a multiple of {BLOCK} up to 65520 (got {tile})")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise CodecError(f"device: {device!r} is not a torch device") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise CodecError("device: CUDA is not available here (use --device cpu)")
        self.model = model.to(self.device).float().eval()
        self.config: ModelConfig = model.config
        self.fingerprint = model_fingerprint(model)
        self.max_iterations: int = self.config.iterations
        self.bits: int = self.config.bits
        self.tile = tile
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
        """Most iterations whose file (header included) stays within ``bpp`` bits per pixel."""
        fits = [k for k in range(1, self.max_iterations + 1)
                if bits_per_pixel(file_size(height, width, k, self.bits), height, width) <= bpp]
        if not fits:
            least = bits_per_pixel(file_size(height, width, 1, self.bits), height, width)
            raise CodecError(f"--bpp {bpp:g}: too low for a {width}x{height} image; one iteration needs {least:.4f} bpp")
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
        h, w = img.shape[:2]
        hp, wp = _padded(h), _padded(w)
        padded = np.pad(img, ((0, hp - h), (0, wp - w), (0, 0)), mode="edge") if (hp, wp) != (h, w) else img
        codes = np.zeros((k, hp // BLOCK, wp // BLOCK, self.bits), dtype=bool)
        out = np.empty((hp, wp, 3), dtype=np.uint8) if reconstruct else None
        for y0, y1, x0, x1 in self._tiles(hp, wp, self.tile, "encode"):
            x = self._to_tensor(padded[y0:y1, x0:x1])
            enc, dec = self.model.init_states()
            recon = torch.zeros_like(x)
            for t in range(k):
                b, enc = self.model.encode_step(x - recon, enc)
                codes[t, y0 // BLOCK: y1 // BLOCK, x0 // BLOCK: x1 // BLOCK] = (b[0] > 0).permute(1, 2, 0).cpu().numpy()
                if t < k - 1 or reconstruct:  # the last iteration's decoder output only matters to the decoder
                    delta, dec = self.model.decode_step(b, dec)
                    recon = recon + delta
            if out is not None:
                out[y0:y1, x0:x1] = self._to_uint8(recon)
        return (codes, out[:h, :w]) if reconstruct else codes

    def compress(self, img: np.ndarray, iterations: int) -> bytes:
        """The .rnnc file bytes of ``img`` (uint8 HxWx3) coded with ``iterations`` iterations."""
        codes = self.encode(img, iterations)
        header = self.header_for(img, codes.shape[0])
        parts = [header.pack()]
        for t in range(codes.shape[0]):
            chunk = np.packbits(codes[t].reshape(-1)).tobytes()
            parts += [chunk, _CRC.pack(binascii.crc32(chunk))]
        return b"".join(parts)

    def reconstruct(self, img: np.ndarray, iterations: int) -> np.ndarray:
        """The in-memory path: what decoding the compressed file yields, without the file."""
        return self.encode(img, iterations, reconstruct=True)[1]

    # -- decoding
    def read_header(self, data: bytes) -> tuple[Header, int]:
        """(header, whole iterations present); checks the model fingerprint."""
        header, chunks = parse(data)
        self._check_model(header)
        return header, len(chunks)

    def _check_model(self, header: Header) -> None:
        if header.fingerprint != self.fingerprint or header.bits != self.bits:
            raise ModelMismatchError(f"file was made by another model (fingerprint {header.fingerprint.hex()}, "
                                     f"this model is {self.fingerprint.hex()}): decode it with --model of that model")

    def _codes(self, data: bytes, iterations: int | None) -> tuple[Header, np.ndarray]:
        header, chunks = parse(data)
        self._check_model(header)
        if iterations is None:
            k = len(chunks)
        else:
            k = self._check_iterations(iterations)
            if k > len(chunks):
                raise CodecError(f"iterations: the file holds {len(chunks)} iteration(s), cannot decode {k}")
        hb, wb = header.blocks
        n = hb * wb * header.bits
        codes = np.stack([np.unpackbits(np.frombuffer(c, dtype=np.uint8), count=n).reshape(hb, wb, header.bits)
                          for c in chunks[:k]])
        return header, codes

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
        hp, wp = _padded(height), _padded(width)
        k = codes.shape[0]
        out = np.empty((k if every else 1, hp, wp, 3), dtype=np.uint8)
        for y0, y1, x0, x1 in self._tiles(hp, wp, tile, "decode"):
            _, dec = self.model.init_states()
            recon = torch.zeros((1, 3, y1 - y0, x1 - x0), device=self.device)
            for t in range(k):
                c = codes[t, y0 // BLOCK: y1 // BLOCK, x0 // BLOCK: x1 // BLOCK]
                b = torch.from_numpy(np.ascontiguousarray(c.transpose(2, 0, 1), dtype=np.float32))
                b = (b * 2 - 1)[None].to(self.device).contiguous()
                delta, dec = self.model.decode_step(b, dec)
                recon = recon + delta
                if every:
                    out[t, y0:y1, x0:x1] = self._to_uint8(recon)
            if not every:
                out[0, y0:y1, x0:x1] = self._to_uint8(recon)
        return [o[:height, :width] for o in out]


def truncate(data: bytes, iterations: int) -> bytes:
    """A standalone file of the first ``iterations`` iterations (header rewritten): equals compressing
    with that many iterations, byte for byte. The real file of each rate, from one encoding."""
    header, chunks = parse(data)
    if not 1 <= iterations <= len(chunks):
        raise CodecError(f"iterations: the file holds {len(chunks)} iteration(s), cannot keep {iterations}")
    short = Header(bits=header.bits, tile=header.tile, fingerprint=header.fingerprint, height=header.height,
                   width=header.width, iterations=iterations)
    step = header.iteration_bytes + CRC_SIZE
    return short.pack() + bytes(data[HEADER_SIZE: HEADER_SIZE + iterations * step])


def load_codec(model: str | os.PathLike | None = None, device: str = "cpu", tile: int = DEFAULT_TILE,
               show_progress: bool = False) -> RNNCodec:
    """The codec over a checkpoint path (default data/compressor/model.pt) or an MLflow model URI."""
    return RNNCodec(load_model(model), device=device, tile=tile, show_progress=show_progress)
