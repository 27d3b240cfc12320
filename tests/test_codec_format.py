"""The .rnnc format and the RNNCodec API: exactness, sizes, progressive prefixes, errors."""

from __future__ import annotations

import binascii
import math
import struct

import numpy as np
import pytest
import torch

from pipeline.compression.codec import (
    CRC_SIZE, HEADER_SIZE, BitstreamError, CodecError, Header, ModelError, ModelMismatchError, RNNCodec,
    bits_per_pixel, file_size, load_codec, parse, save_model, tile_grid, truncate,
)
from pipeline.compression.model import ModelConfig, RNNCompressor
from pipeline.errors import PipelineError

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
    head = b"RNNC" + bytes([1, 32, 16]) + struct.pack("<H", 768) + bytes(range(8)) \
        + struct.pack("<IIB", 512, 768, 3)
    assert h.pack() == head + struct.pack("<I", binascii.crc32(head))
    assert len(h.pack()) == HEADER_SIZE == 30


def test_file_size_is_header_plus_packed_bits(codec):
    img = make_image(37, 53)
    for k in (1, 2, 4):
        data = codec.compress(img, k)
        blocks = math.ceil(37 / 16) * math.ceil(53 / 16)  # 3 x 4
        assert len(data) == HEADER_SIZE + k * (blocks * 32 // 8 + CRC_SIZE) == file_size(37, 53, k)
        assert bits_per_pixel(len(data), 37, 53) == pytest.approx(8 * len(data) / (37 * 53))


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
    step = file_size(37, 53, 2) - file_size(37, 53, 1)
    for j in (1, 2, 3):
        fewer = codec.compress(img, j)
        assert full[HEADER_SIZE:HEADER_SIZE + j * step] == fewer[HEADER_SIZE:]  # same bits, progressive
        prefix = full[:HEADER_SIZE + j * step]
        expected = codec.decompress(fewer)
        np.testing.assert_array_equal(codec.decompress(prefix), expected)
        np.testing.assert_array_equal(codec.decompress(full, iterations=j), expected)
        assert codec.read_header(prefix)[1] == j


def test_truncate_equals_compressing_fewer_iterations(codec):
    img = make_image(37, 53, seed=5)
    full = codec.compress(img, 4)
    for j in (1, 2, 4):
        assert truncate(full, j) == codec.compress(img, j)
    with pytest.raises(CodecError):
        truncate(full, 5)


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
    assert len(chunks[0]) == math.ceil(shape[0] / 16) * math.ceil(shape[1] / 16) * 4


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
    for bpp in (0.2, 0.3, 0.5, 10.0):
        k = codec.iterations_for_bpp(h, w, bpp)
        real = bits_per_pixel(len(codec.compress(make_image(h, w), k)), h, w)
        assert real <= bpp
        if k < codec.max_iterations:
            assert bits_per_pixel(file_size(h, w, k + 1), h, w) > bpp
    with pytest.raises(CodecError, match="too low"):
        codec.iterations_for_bpp(h, w, 0.1)


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
    flipped[HEADER_SIZE + 60] ^= 0x10  # a code bit of iteration 2
    _refuses(codec, bytes(flipped), "iteration 2 fails its checksum")
    _refuses(codec, good + b"\0", "after the last iteration")


def test_file_from_another_model_is_refused(good):
    other = RNNCodec(make_model(seed=1), tile=32)
    with pytest.raises(ModelMismatchError, match="another model"):
        other.decompress(good)


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
