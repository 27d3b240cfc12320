"""Each codec wrapper: round trip through real bytes, shape/dtype, bpp from the file size."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.evaluation import codecs as C
from pipeline.evaluation.metrics import psnr


class FakeRNNCodec:
    """Stand-in with the RNNCodec contract (compress/decompress/max_iterations) for tests.

    Each iteration adds one bit plane of 8x8 block means, so files grow with iterations and
    quality improves: a toy progressive codec with a real header and real packed bits.
    """

    max_iterations = 4
    block = 8

    def compress(self, img: np.ndarray, iterations: int) -> bytes:
        h, w, _ = img.shape
        f = self.block
        ph, pw = -(-h // f) * f, -(-w // f) * f
        x = np.pad(img.astype(np.float32), ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
        m = x.reshape(ph // f, f, pw // f, f, 3).mean((1, 3))
        bits = iterations + 1
        q = np.round(m / 255 * (2**bits - 1)).astype(np.uint16)
        planes = b"".join(np.packbits(((q >> (bits - 1 - b)) & 1).astype(np.uint8)).tobytes() for b in range(bits))
        return b"FAKE" + struct.pack(">HHB", h, w, iterations) + planes

    def decompress(self, data: bytes, iterations: int | None = None) -> np.ndarray:
        if data[:4] != b"FAKE" or len(data) < 9:
            raise PipelineError("not a FAKE file")
        h, w, k = struct.unpack(">HHB", data[4:9])
        f = self.block
        gh, gw = -(-h // f), -(-w // f)
        n, bits = gh * gw * 3, k + 1
        per = (n + 7) // 8
        q = np.zeros(n, np.uint16)
        for b in range(bits):
            plane = np.unpackbits(np.frombuffer(data[9 + b * per: 9 + (b + 1) * per], np.uint8))[:n]
            q |= plane.astype(np.uint16) << (bits - 1 - b)
        m = q.reshape(gh, gw, 3).astype(np.float32) / (2**bits - 1) * 255
        return np.repeat(np.repeat(m, f, 0), f, 1)[:h, :w].round().clip(0, 255).astype(np.uint8)


def make_image(h: int = 200, w: int = 264, seed: int = 0) -> np.ndarray:
    """A smooth, textured RGB test image (deterministic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(xx / 17 + c) * np.cos(yy / 23 - c) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


PILLOW = [(C.JPEG, [10, 90]), (C.JPEG2000, [96, 12]), (C.WebP, [10, 90]), (C.AVIF, [10, 80])]


@pytest.mark.parametrize("cls,settings", PILLOW, ids=[c.name for c, _ in PILLOW])
def test_pillow_codec_round_trip_and_bpp(cls, settings):
    codec = cls(settings)
    if codec.available():
        pytest.skip(codec.available())
    img = make_image()
    low, high = (codec.encode(img, s) for s in settings)
    assert isinstance(low, bytes) and len(low) > 0
    out = codec.decode(low)
    assert out.shape == img.shape and out.dtype == np.uint8
    # lossy but close, and a higher setting spends more bits for a better picture
    assert psnr(codec.decode(high), img) > psnr(out, img) > 20
    assert len(high) > len(low)
    h, w = img.shape[:2]
    assert C.bpp(len(low), h, w) == pytest.approx(8 * len(low) / (h * w))


def test_jpeg2000_ratio_sets_the_rate():
    codec = C.JPEG2000([24])
    img = make_image(256, 256)
    data = codec.encode(img, 24)  # 24 bits/pixel / 24 = about 1 bpp, headers aside
    assert 0.7 < C.bpp(len(data), 256, 256) <= 1.1
    assert data[:4] == b"\xff\x4f\xff\x51"  # raw J2K codestream (SOC, SIZ), no JP2 box


def test_webp_is_lossy():
    img = make_image()
    data = C.WebP([50]).encode(img, 50)
    assert data[:4] == b"RIFF" and b"VP8 " in data[:20]  # VP8 (lossy), not VP8L (lossless)


def test_bpp_formula():
    assert C.bpp(3 * 64, 64, 24) == 1.0
    assert C.bpp(0, 10, 10) == 0.0


def test_decode_rejects_garbage():
    with pytest.raises(Exception):
        C.JPEG([50]).decode(b"not an image")


def test_rnn_wrapper_round_trip_and_bpp():
    fake = FakeRNNCodec()
    codec = C.RNN(fake, None)
    assert codec.settings == [1, 2, 3, 4]
    img = make_image()
    sizes, quality = [], []
    for k in codec.settings:
        data = codec.encode(img, k)
        out = codec.decode(data)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert data == fake.compress(img, k)  # the real file bytes, unchanged
        sizes.append(len(data))
        quality.append(psnr(out, img))
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert quality == sorted(quality)


def test_rnn_wrapper_drops_iterations_beyond_the_model():
    codec = C.RNN(FakeRNNCodec(), [1, 2, 8, 16])
    assert codec.settings == [1, 2]
    with pytest.raises(PipelineError):
        C.RNN(FakeRNNCodec(), [8, 16])


def test_build_skips_unavailable_and_uses_loader():
    from pipeline.evaluation.params import EvaluateParams

    p = EvaluateParams(codecs=["jpeg", "jpegxl", "rnn"], rnn_iterations=[1, 3])
    calls = []

    def loader(model, device):
        calls.append((model, device))
        return FakeRNNCodec()

    codecs, skipped = C.build(p, device="cpu", rnn_loader=loader)
    names = [c.name for c in codecs]
    assert calls == [("data/compressor/model.pt", "cpu")]
    assert "jpeg" in names and "rnn" in names
    assert codecs[names.index("rnn")].settings == [1, 3]
    if C.JPEGXL([1]).available():
        assert "jpegxl" in skipped and "jpegxl" not in names
    else:
        assert "jpegxl" in names


def test_jpegxl_round_trip_when_installed():
    codec = C.JPEGXL([2])
    if codec.available():
        pytest.skip(codec.available())
    img = make_image()
    out = codec.decode(codec.encode(img, 2))
    assert out.shape == img.shape and psnr(out, img) > 25


def test_registry_names_match():
    assert set(C.REGISTRY) == {"jpeg", "jpeg2000", "webp", "avif", "jpegxl", "rnn"}
    for name, cls in C.REGISTRY.items():
        assert cls.name == name and cls.setting


def test_rnn_wrapper_with_the_real_codec(tmp_path):
    """Through pipeline.compression.codec's real file format (untrained tiny model)."""
    codec_mod = pytest.importorskip("pipeline.compression.codec")
    model_mod = pytest.importorskip("pipeline.compression.model")
    import torch

    from pipeline.compression.params import TrainCompressorParams

    torch.manual_seed(0)
    cfg = TrainCompressorParams(encoder_widths=(8, 16, 16, 16), decoder_widths=(16, 16, 16, 16), iterations=2,
                                val_iterations=(1, 2))
    codec_mod.save_model(model_mod.RNNCompressor(model_mod.ModelConfig.from_params(cfg)), tmp_path / "m.pt")
    codec = C.RNN(C.load_rnn(str(tmp_path / "m.pt"), device="cpu"), None)
    assert codec.settings == [1, 2]
    img = make_image(48, 80)  # not a multiple of 16: padded and cropped back by the codec
    one, two = codec.encode(img, 1), codec.encode(img, 2)
    for data in (one, two):
        out = codec.decode(data)
        assert out.shape == img.shape and out.dtype == np.uint8
    # each iteration adds at least 32 bits per 16x16 block (0.125 bpp of code); the file also has a header
    blocks = 3 * 5
    assert blocks * 32 // 8 <= len(two) - len(one) < blocks * 32 // 8 + 32
    assert C.bpp(len(one), 48, 80) > 0.125
    assert C.bpp(len(two), 48, 80) == pytest.approx(8 * len(two) / (48 * 80))
    with pytest.raises(PipelineError):
        codec.decode(b"garbage" * 10)
