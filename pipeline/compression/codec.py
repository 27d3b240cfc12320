"""The codec API over a trained :class:`RNNCompressor`: images to ``.rnnc`` bytes and back.

The file format is :mod:`pipeline.compression.rnncfile`, the model files :mod:`pipeline.compression.modelfile`.

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

import contextlib
import os

import numpy as np
import torch

from pipeline.compression.errors import BitstreamError, CodecError, InputError, ModelMismatchError, OutOfMemory
from pipeline.compression.model import BLOCK, ModelConfig, RNNCompressor
from pipeline.compression.modelfile import load_model, model_fingerprint
from pipeline.compression.rnncfile import (CRC_SIZE, DEFAULT_TILE, HEADER_SIZE, LENGTH_SIZE, MAX_SIDE,
                                           TABLE_VERSIONS, VERSIONS, CodedRecords, Header, check_tile,
                                           default_max_pixels, max_file_size, newest_version, pack_coded,
                                           pack_v1, padded_size, parse_header, record_spans, tile_grid, truncate,
                                           unpack_codes)
from pipeline.images import bits_per_pixel

EARLY_STOP_BYTES = 2 << 30  # compress_to_bpp codes iteration by iteration when every tile's state fits this


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

        why = check_tile(tile) if isinstance(tile, (int, np.integer)) and not isinstance(tile, bool) else "not an int"
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
        why = check_tile(self.tile, *img.shape[:2])
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
        hp, wp = padded_size(h), padded_size(w)
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
        return int(padded_size(height) * padded_size(width) * (per_pixel * size + 2 * 3 * 4))

    def _encode_progressive(self, img: np.ndarray, k: int):
        """Iteration by iteration over every tile: yields the codes (Hb, Wb, bits) of iterations 1..k of the whole
        image, the same as :meth:`encode`'s, holding every tile's state meanwhile (:meth:`held_bytes`). An
        iteration's decoder step runs when the next iteration is asked for. Call under inference_mode."""
        h, w = img.shape[:2]
        hp, wp = padded_size(h), padded_size(w)
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

        ``version`` None: 5 (the model's learned context model over the neighbours' channels too, adapted to
        the image as it is coded) when the model has one (4 when its table is from before version 5), else 2
        (an adaptive context model); 4 without the neighbours' channels; 3 the learned model alone, not
        adapted; 1 the raw bits (the old format, and the entropy coders' baseline)."""
        newest = newest_version(self.context_table, self.bits)
        if version is None:
            version = newest
        if version not in VERSIONS:
            raise CodecError(f"version: this build writes versions {VERSIONS} (got {version})")
        if version in TABLE_VERSIONS and self.context_table is None:
            raise CodecError(f"version {version}: this model has no fitted context model (write version 2)")
        if version in TABLE_VERSIONS and version > newest:
            raise CodecError(f"version {version}: this model's context model is from before version {version} "
                             f"(write version {newest} or lower)")
        codes = self.encode(img, iterations)
        header = self.header_for(img, codes.shape[0])
        if (header.iteration_bytes + CRC_SIZE + LENGTH_SIZE) * codes.shape[0] + HEADER_SIZE > 0xFFFFFFFF:
            raise InputError(f"image {img.shape[1]}x{img.shape[0]} too large for one .rnnc file")
        if version == 1:
            return pack_v1(header, codes)
        return pack_coded(header, codes, self.context_table, version)[0]

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
        records = CodedRecords(header, self.context_table)
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
        return header, len(record_spans(data, header))

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
        if header.version in TABLE_VERSIONS and self.context_table is None:
            raise BitstreamError(f"invalid .rnnc file: version {header.version} needs the model's context model, "
                                 "and this model has none")
        limit = default_max_pixels() if self.max_pixels is None else self.max_pixels
        if limit and header.pixels > limit:
            raise BitstreamError(f"image of {header.width}x{header.height} = {header.pixels} pixels is over the "
                                 f"limit of {limit} (a decompression bomb?); --max-pixels 0 lifts it")
        return header

    def _codes(self, data: bytes, iterations: int | None) -> tuple[Header, np.ndarray]:
        header = self._checked_header(data)
        view = memoryview(data if isinstance(data, bytes) else bytes(data))
        chunks = [bytes(view[a:b]) for a, b in record_spans(view, header)]
        if iterations is None:
            k = len(chunks)
        else:
            k = self._check_iterations(iterations)
            if k > len(chunks):
                raise CodecError(f"iterations: the file holds {len(chunks)} iteration(s), cannot decode {k}")
        with _memory_guard("decoding", header.tile):
            return header, unpack_codes(header, chunks, k, self.context_table)

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
        hp, wp = padded_size(height), padded_size(width)
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
