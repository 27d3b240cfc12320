"""The .rnnc format and the RNNCodec API: exactness, sizes, progressive prefixes, errors."""

from __future__ import annotations

import binascii
import dataclasses
import math
import struct

import numpy as np
import pytest
import torch

from pipeline.compression.codec import RNNCodec, load_codec
from pipeline.compression.errors import BitstreamError, CodecError, ModelError, ModelMismatchError, OutOfMemory
from pipeline.compression.modelfile import save_model
from pipeline.compression.rnncfile import (
    CRC_SIZE, HEADER_SIZE, MAX_TILE, Header, file_size, max_file_size, parse, tile_grid, truncate,
)
from pipeline.compression.model import ModelConfig, RNNCompressor
from pipeline.errors import PipelineError
from pipeline.images import bits_per_pixel

CFG = ModelConfig(encoder_widths=(8, 16, 16, 16), decoder_widths=(16, 16, 16, 16), bits=32, iterations=4)


def make_model(seed: int = 0, cfg: ModelConfig = CFG) -> RNNCompressor:
    torch.manual_seed(seed)
    return RNNCompressor(cfg).eval()


def make_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish test image: gradients plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], axis=2)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def codec(one_thread) -> RNNCodec:
    return RNNCodec(make_model(), tile=32)  # small tiles: a 37x53 image spans 2x2 tiles


def test_header_golden_bytes():
    h = Header(bits=32, tile=768, fingerprint=bytes(range(8)), height=512, width=768, iterations=3)
    head = b"RNNC" + bytes([5, 32, 16]) + struct.pack("<H", 768) + bytes(range(8)) \
        + struct.pack("<IIB", 512, 768, 3)
    assert h.pack() == head + struct.pack("<I", binascii.crc32(head))
    assert len(h.pack()) == HEADER_SIZE == 30


def write_v1(codes: np.ndarray, fingerprint: bytes, height: int, width: int, tile: int) -> bytes:
    """A version-1 file written independently of the codec, from the format's description."""
    head = b"RNNC" + bytes([1, codes.shape[3], 16]) + struct.pack("<H", tile) + fingerprint \
        + struct.pack("<IIB", height, width, codes.shape[0])
    out = head + struct.pack("<I", binascii.crc32(head))
    for plane in codes:
        chunk = np.packbits(plane.reshape(-1)).tobytes()
        out += chunk + struct.pack("<I", binascii.crc32(chunk))
    return out


def records_v2(data: bytes) -> list[bytes]:
    """The payloads of a version-2 file, read independently of the codec (lengths and CRCs checked)."""
    pos, payloads = HEADER_SIZE, []
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        record = data[pos: pos + 4 + n]
        assert struct.unpack_from("<I", data, pos + 4 + n)[0] == binascii.crc32(record)
        payloads.append(record[4:])
        pos += 8 + n
    assert pos == len(data)
    return payloads


def test_version_1_files_still_decode(codec):
    img = make_image(37, 53, seed=8)
    codes = codec.encode(img, 3)
    v1 = write_v1(codes, codec.fingerprint, 37, 53, codec.tile)
    assert codec.compress(img, 3, version=1) == v1  # the codec's own v1 writer agrees with the description
    assert len(v1) == HEADER_SIZE + 3 * (3 * 4 * 32 // 8 + CRC_SIZE) == file_size(37, 53, 3)
    assert parse(v1)[0].version == 1
    np.testing.assert_array_equal(codec.decompress(v1), codec.reconstruct(img, 3))
    np.testing.assert_array_equal(codec.decompress(v1[: file_size(37, 53, 2)]), codec.reconstruct(img, 2))
    assert truncate(v1, 1) == codec.compress(img, 1, version=1)
    # the same bits in both versions decode to the same image
    np.testing.assert_array_equal(codec.decompress(v1), codec.decompress(codec.compress(img, 3)))


def test_v2_layout_and_size_bound(codec):
    img = make_image(37, 53)
    raw = 3 * 4 * 32 // 8  # 3 x 4 blocks, 32 bits each
    codes = codec.encode(img, 4)
    data = codec.compress(img, 4)
    payloads = records_v2(data)
    assert len(payloads) == 4 and all(len(p) <= raw for p in payloads)
    assert all(len(p) == raw or len(p) % 4 == 0 for p in payloads)
    for plane, p in zip(codes, payloads):
        if len(p) == raw:  # stored raw: exactly the packed bits
            assert p == np.packbits(plane.reshape(-1)).tobytes()
    assert len(data) <= max_file_size(37, 53, 4) == file_size(37, 53, 4) + 4 * 4
    assert bits_per_pixel(len(data), 37, 53) == pytest.approx(8 * len(data) / (37 * 53))


def test_entropy_coding_shrinks_a_smooth_image():
    """A flat image gives the same bits in every block: the coded file is far smaller than the raw one."""
    c = RNNCodec(make_model(), tile=0)
    img = np.full((128, 192, 3), 90, dtype=np.uint8)
    v2, v1 = c.compress(img, 4), c.compress(img, 4, version=1)
    assert len(v1) == file_size(128, 192, 4)
    assert len(v2) < 0.5 * len(v1)
    np.testing.assert_array_equal(c.decompress(v2), c.decompress(v1))


def test_round_trip_through_file_equals_in_memory_path(codec):
    img = make_image(37, 53)
    for k in (1, 3):
        decoded = codec.decompress(codec.compress(img, k))
        assert decoded.dtype == np.uint8 and decoded.shape == img.shape
        np.testing.assert_array_equal(decoded, codec.reconstruct(img, k))


def test_round_trip_whole_image_tile_and_default_tile():
    img = make_image(40, 70, seed=3)
    for tile in (0, 768):
        c = RNNCodec(make_model(), tile=tile)
        data = c.compress(img, 2)
        assert parse(data)[0].tile == tile
        np.testing.assert_array_equal(c.decompress(data), c.reconstruct(img, 2))


def test_decoder_uses_the_tiling_in_the_file():
    img = make_image(48, 80, seed=4)
    data = RNNCodec(make_model(), tile=32).compress(img, 2)
    other = RNNCodec(make_model(), tile=0)  # a decoder configured differently still follows the file
    np.testing.assert_array_equal(other.decompress(data), RNNCodec(make_model(), tile=32).reconstruct(img, 2))


def test_prefix_of_whole_iterations_decodes_like_fewer_iterations(codec):
    img = make_image(37, 53, seed=1)
    full = codec.compress(img, 4)
    for j in (1, 2, 3):
        fewer = codec.compress(img, j)
        assert full.startswith(fewer[HEADER_SIZE:], HEADER_SIZE)  # same records: progressive
        prefix = full[:len(fewer)]
        expected = codec.decompress(fewer)
        np.testing.assert_array_equal(codec.decompress(prefix), expected)
        np.testing.assert_array_equal(codec.decompress(full, iterations=j), expected)
        assert codec.read_header(prefix)[1] == j


def test_truncate_equals_compressing_fewer_iterations(codec):
    img = make_image(37, 53, seed=5)
    full = codec.compress(img, 4)
    for j in (1, 2, 3, 4):
        short = truncate(full, j)
        assert short == codec.compress(img, j)
        np.testing.assert_array_equal(codec.decompress(short), codec.reconstruct(img, j))
    with pytest.raises(CodecError):
        truncate(full, 5)
    with pytest.raises(CodecError):
        truncate(full, 0)


def test_progressive_decode_gives_every_iteration_in_one_pass(codec):
    img = make_image(37, 53, seed=6)
    data = codec.compress(img, 4)
    images = codec.decompress_progressive(data)
    assert len(images) == 4
    for j, decoded in enumerate(images, start=1):
        np.testing.assert_array_equal(decoded, codec.decompress(data, iterations=j))


@pytest.mark.parametrize("shape", [(1, 1), (15, 17), (16, 16), (33, 70), (70, 33)])
def test_odd_sizes_keep_their_shape(codec, shape):
    img = make_image(*shape, seed=2)
    data = codec.compress(img, 1)
    out = codec.decompress(data)
    assert out.shape == img.shape
    header, chunks = parse(data)
    assert (header.height, header.width) == shape
    assert header.iteration_bytes == math.ceil(shape[0] / 16) * math.ceil(shape[1] / 16) * 4
    assert len(chunks[0]) <= header.iteration_bytes


def test_tile_grid_covers_canvas_exactly_once():
    cover = np.zeros((96, 160), dtype=int)
    tiles = tile_grid(96, 160, 64)
    for y0, y1, x0, x1 in tiles:
        assert (y1 - y0) % 16 == 0 and (x1 - x0) % 16 == 0
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all() and len(tiles) == 2 * 3
    assert tile_grid(96, 160, 0) == [(0, 96, 0, 160)]


def test_more_iterations_than_the_model_has_is_refused(codec):
    with pytest.raises(CodecError, match="iterations"):
        codec.compress(make_image(16, 16), 5)
    with pytest.raises(CodecError, match="iterations"):
        codec.compress(make_image(16, 16), 0)


def test_decoding_more_iterations_than_stored_is_refused(codec):
    data = codec.compress(make_image(16, 16), 2)
    with pytest.raises(CodecError, match="holds 2"):
        codec.decompress(data, iterations=3)


def test_bpp_target_picks_the_most_iterations_that_fit(codec):
    h, w = 64, 96
    img = make_image(h, w)
    sizes = [len(codec.compress(img, k)) for k in range(1, 5)]  # independent: one encoding per count
    exact = [8 * n / (h * w) for n in sizes]
    for bpp in exact + [(exact[0] + exact[1]) / 2, (exact[2] + exact[3]) / 2, 10.0]:
        data, k = codec.compress_to_bpp(img, bpp)
        assert len(data) == sizes[k - 1] and bits_per_pixel(len(data), h, w) <= bpp
        assert k == max(j for j in range(1, 5) if exact[j - 1] <= bpp)
        if bpp >= 0.2:  # the bound-based count never overshoots
            assert exact[codec.iterations_for_bpp(h, w, bpp) - 1] <= bpp
    with pytest.raises(CodecError, match="too low"):
        codec.compress_to_bpp(img, 8 * (sizes[0] - 1) / (h * w))


def test_tile_range_is_checked_on_both_sides():
    for tile in (8, 24, MAX_TILE + 16, -16):
        with pytest.raises(CodecError, match="tile"):
            RNNCodec(make_model(), tile=tile)
    with pytest.raises(CodecError, match="tile 0"):
        RNNCodec(make_model(), tile=0).compress(np.zeros((16, MAX_TILE + 1, 3), dtype=np.uint8), 1)


# ------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def good(codec) -> bytes:
    return codec.compress(make_image(37, 53), 3)


def _refuses(codec, data, match):
    with pytest.raises(BitstreamError, match=match) as info:
        codec.decompress(data)
    assert isinstance(info.value, PipelineError)


def test_truncated_files_are_refused(codec, good):
    _refuses(codec, good[:-1], "incomplete")
    _refuses(codec, good[: HEADER_SIZE + 10], "incomplete")
    _refuses(codec, good[:HEADER_SIZE], "no complete iteration")
    _refuses(codec, good[:HEADER_SIZE - 1], "truncated")
    _refuses(codec, good[:2], "magic")
    _refuses(codec, b"", "magic")


def test_foreign_and_corrupt_files_are_refused(codec, good):
    _refuses(codec, b"\x89PNG\r\n\x1a\n" + bytes(100), "magic")
    _refuses(codec, bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)), "magic")
    _refuses(codec, good[:4] + bytes([9]) + good[5:], "version 9")
    flipped = bytearray(good)
    flipped[20] ^= 0x01  # height
    _refuses(codec, bytes(flipped), "header")
    flipped = bytearray(good)
    second = HEADER_SIZE + 8 + len(records_v2(good)[0])  # where iteration 2's record starts
    flipped[second + 4 + 3] ^= 0x10  # a byte of its payload
    _refuses(codec, bytes(flipped), "iteration 2 fails its checksum")
    _refuses(codec, good + b"\0", "after the last iteration")


def test_file_from_another_model_is_refused(good):
    other = RNNCodec(make_model(seed=1), tile=32)
    with pytest.raises(ModelMismatchError, match="another model"):
        other.decompress(good)


def forge(codec, fields: dict | None = None, records: list[bytes] | None = None, version: int = 2,
          payload: bytes | None = None) -> bytes:
    """A file with valid checksums whose header fields and records say what the test wants: every
    check behind the CRCs must be reached by such files."""
    f = dict(magic=b"RNNC", version=version, bits=32, block=16, tile=32, fp=codec.fingerprint, height=37,
             width=53, iterations=1)
    f.update(fields or {})
    head = struct.pack("<4sBBBH8sIIB", f["magic"], f["version"], f["bits"], f["block"], f["tile"], f["fp"],
                       f["height"], f["width"], f["iterations"])
    out = head + struct.pack("<I", binascii.crc32(head))
    if payload is not None:
        return out + payload
    for r in records or []:
        rec = struct.pack("<I", len(r)) + r
        out += rec + struct.pack("<I", binascii.crc32(rec))
    return out


RAW = 3 * 4 * 4  # the raw size of one iteration of a 37x53 image (3 x 4 blocks of 32 bits)


@pytest.mark.parametrize("fields, match", [
    ({"tile": 8}, "tile"), ({"tile": 24}, "tile"), ({"tile": MAX_TILE + 16}, "tile"),
    ({"tile": 0, "width": MAX_TILE + 1}, "tile 0"), ({"block": 8}, "block"), ({"bits": 0}, "bits"),
    ({"iterations": 0}, "iterations"), ({"height": 0}, "size"), ({"width": 0}, "size"),
    ({"width": (1 << 20) + 1}, "size"), ({"iterations": 5}, "at most 4"), ({"bits": 16}, "another model"),
    ({"fp": bytes(8)}, "another model"), ({"magic": b"RNNX"}, "magic"), ({"version": 0}, "version 0"),
    ({"version": 4}, "version 4"),
])
def test_header_fields_are_range_checked_behind_valid_crcs(codec, fields, match):
    data = forge(codec, fields, [bytes(RAW)])
    assert parse is not None and binascii.crc32(data[:26]) == struct.unpack_from("<I", data, 26)[0]
    with pytest.raises(CodecError, match=match):
        codec.decompress(data)


@pytest.mark.parametrize("iterations, records, extra, match", [
    (1, [bytes(RAW + 1)], b"", "claims 49 bytes"),        # longer than an iteration can be
    (1, [bytes(RAW - 1)], b"", "claims 47 bytes"),        # coded payloads are whole 32-bit words
    (1, [bytes(RAW)], b"\0", "after the last iteration"),
    (1, [bytes(RAW), bytes(RAW)], b"", "after the last iteration"),  # more iterations than the header says
    (1, [], b"", "no complete iteration"),
    (2, [bytes(RAW)], b"\xff\xff\xff\x7f", "claims 2147483647"),  # a huge length in the next record
    (2, [bytes(RAW)], b"\x30\0\0\0" + bytes(10), "incomplete"),
    (2, [bytes(RAW)], b"\x30\0", "incomplete"),
])
def test_payload_lengths_are_checked_behind_valid_crcs(codec, iterations, records, extra, match):
    data = forge(codec, {"iterations": iterations}, records) + extra
    with pytest.raises(BitstreamError, match=match):
        codec.decompress(data)


def test_v1_payload_must_match_the_header_behind_valid_crcs(codec):
    rec = bytes(RAW) + struct.pack("<I", binascii.crc32(bytes(RAW)))
    assert codec.decompress(forge(codec, {"iterations": 2}, version=1, payload=rec)).shape == (37, 53, 3)
    _refuses(codec, forge(codec, {"iterations": 1}, version=1, payload=rec + rec), "after the last iteration")
    _refuses(codec, forge(codec, {"iterations": 1}, version=1, payload=rec[:-1]), "incomplete")


def test_coded_payload_that_is_not_a_coding_is_refused_or_decodes(codec):
    """Garbage behind a valid CRC: the range decoder either yields some plane or the codec's own error."""
    rng = np.random.default_rng(3)
    outcomes = set()
    for n in (4, 8, 16, 40, 44):
        for _ in range(5):
            data = forge(codec, {"iterations": 1}, [rng.integers(0, 256, n, dtype=np.uint8).tobytes()])
            try:
                assert codec.decompress(data).shape == (37, 53, 3)
                outcomes.add("decoded")
            except BitstreamError as err:
                assert "iteration 1" in str(err)
                outcomes.add("refused")
    assert "refused" in outcomes  # e.g. words left over after the plane


def test_pixel_limit_refuses_huge_headers_in_milliseconds(codec, monkeypatch):
    import time

    from PIL import Image

    huge = forge(codec, {"height": 65535, "width": 65535, "tile": 768, "iterations": 4}, [bytes(64)])
    t0 = time.perf_counter()
    with pytest.raises(BitstreamError, match="over the limit of"):
        codec.decompress(huge)
    assert time.perf_counter() - t0 < 0.05
    with pytest.raises(BitstreamError, match="over the limit"):
        codec.read_header(huge)
    v1 = forge(codec, {"height": 65535, "width": 65535, "tile": 768}, version=1, payload=bytes(100))
    with pytest.raises(BitstreamError):  # the v1 payload it implies is not there either
        RNNCodec(codec.model, tile=32, max_pixels=0).decompress(v1)
    # the limit follows Pillow's: 2 x MAX_IMAGE_PIXELS; max_pixels sets it, 0 lifts it
    good = codec.compress(make_image(37, 53), 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 37 * 53 // 2 - 1)
    with pytest.raises(BitstreamError, match=f"limit of {2 * (37 * 53 // 2 - 1)}"):
        codec.decompress(good)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", (37 * 53 + 1) // 2)
    assert codec.decompress(good).shape == (37, 53, 3)
    assert RNNCodec(codec.model, tile=32, max_pixels=0).decompress(good).shape == (37, 53, 3)
    with pytest.raises(BitstreamError, match="limit of 100"):
        RNNCodec(codec.model, tile=32, max_pixels=100).decompress(good)


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                 "you tried to allocate 68719476736 bytes."),
    MemoryError(),
])
def test_out_of_memory_is_one_clear_error(codec, good, monkeypatch, error):
    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr(codec.net, "decode_step", boom)
    with pytest.raises(OutOfMemory, match="out of memory while decoding"):
        codec.decompress(good)
    monkeypatch.setattr(codec.net, "encode_step", boom)
    with pytest.raises(OutOfMemory, match="out of memory while encoding"):
        codec.compress(make_image(16, 16), 1)


def test_other_runtime_errors_are_not_called_out_of_memory(codec, good, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(codec.net, "decode_step", boom)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        codec.decompress(good)


def test_checkpoint_round_trip_keeps_fingerprint(tmp_path, codec, good):
    path = tmp_path / "model.pt"
    save_model(codec.model, path)
    loaded = load_codec(path, tile=32)
    assert loaded.fingerprint == codec.fingerprint and loaded.max_iterations == 4
    np.testing.assert_array_equal(loaded.decompress(good), codec.decompress(good))


def test_bad_checkpoints_are_refused(tmp_path, codec):
    with pytest.raises(ModelError, match="no such file"):
        load_codec(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a readable checkpoint"):
        load_codec(junk)
    path = tmp_path / "model.pt"
    save_model(codec.model, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["decoder.conv_out.weight"] += 1  # weights no longer match the fingerprint
    torch.save(ckpt, path)
    with pytest.raises(ModelError, match="corrupt"):
        load_codec(path)


def test_bad_images_are_refused(codec):
    with pytest.raises(CodecError):
        codec.compress(np.zeros((8, 8), dtype=np.uint8), 1)
    with pytest.raises(CodecError):
        codec.compress(np.zeros((8, 8, 3), dtype=np.float32), 1)


def test_gru_one_shot_model_round_trips_through_files():
    """The codec follows the model's reconstruction rule: a one-shot GRU model's file decodes to its reconstruction."""
    model = make_model(5, dataclasses.replace(CFG, cell="gru", reconstruction="one-shot"))
    codec = RNNCodec(model, tile=32)
    img = make_image(37, 53)
    for k in (1, 3):
        data = codec.compress(img, k)
        np.testing.assert_array_equal(codec.decompress(data), codec.reconstruct(img, k))
        np.testing.assert_array_equal(RNNCodec(model, tile=32).decompress_progressive(data)[-1], codec.decompress(data))


def test_the_file_format_module_needs_no_torch(tmp_path):
    """pipeline.compression.rnncfile reads, checks and truncates .rnnc files without torch (numpy only):
    imported in a fresh interpreter, torch is not loaded, and a file of every version parses and truncates."""
    import subprocess
    import sys
    from pathlib import Path

    model = make_model()
    codec = RNNCodec(model, tile=32)
    img = make_image(40, 72)
    for v in (1, 2):
        (tmp_path / f"v{v}.rnnc").write_bytes(codec.compress(img, 3, version=v))
    code = ("import sys\n"
            "from pipeline.compression import rnncfile\n"
            "for name in sys.argv[1:]:\n"
            "    data = open(name, 'rb').read()\n"
            "    header, chunks = rnncfile.parse(data)\n"
            "    assert len(chunks) == 3 and rnncfile.parse(rnncfile.truncate(data, 2))[0].iterations == 2\n"
            "    rnncfile.unpack_codes(header, chunks, 3)\n"
            "print('torch' in sys.modules)\n")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code, *sorted(map(str, tmp_path.glob("*.rnnc")))], cwd=repo,
                         capture_output=True, text=True, check=True, env={"PYTHONPATH": str(repo), "PATH": ""})
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_the_format_block_is_the_models():
    from pipeline.compression import context, rnncfile
    from pipeline.compression import model as model_module

    assert rnncfile.BLOCK == context.BLOCK == model_module.BLOCK
