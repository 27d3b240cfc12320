"""Each codec wrapper: round trip through real bytes, decoded by an independent decoder too; the
encoder settings read back from the files' own markers; the RNN sweep's truncation."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.evaluation import codecs as C
from pipeline.evaluation import specs as S
from pipeline.evaluation.metrics import psnr


class FakeRNNCodec:
    """Stand-in with the RNNCodec contract (compress/decompress/decompress_progressive/max_iterations,
    plus truncate) for tests.

    A toy progressive codec with a real header and real packed bits: 8x8 block means quantised to
    ``max_iterations`` bits, iteration t carrying the t-th most significant bit plane; a file of k
    iterations is a prefix of the file of more (header rewritten), as with the .rnnc format.
    """

    max_iterations = 4
    block = 8

    def _planes(self, img: np.ndarray) -> list[bytes]:
        h, w, _ = img.shape
        f, bits = self.block, self.max_iterations
        ph, pw = -(-h // f) * f, -(-w // f) * f
        x = np.pad(img.astype(np.float32), ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
        m = x.reshape(ph // f, f, pw // f, f, 3).mean((1, 3))
        q = np.round(m / 255 * (2**bits - 1)).astype(np.uint16)
        return [np.packbits(((q >> (bits - 1 - b)) & 1).astype(np.uint8)).tobytes() for b in range(bits)]

    def compress(self, img: np.ndarray, iterations: int) -> bytes:
        h, w, _ = img.shape
        return b"FAKE" + struct.pack(">HHB", h, w, iterations) + b"".join(self._planes(img)[:iterations])

    def truncate(self, data: bytes, iterations: int) -> bytes:
        h, w, k = struct.unpack(">HHB", data[4:9])
        if not 1 <= iterations <= k:
            raise PipelineError(f"cannot keep {iterations} of {k} iterations")
        per = (len(data) - 9) // k
        return b"FAKE" + struct.pack(">HHB", h, w, iterations) + data[9: 9 + iterations * per]

    def decompress_progressive(self, data: bytes, iterations: int | None = None) -> list[np.ndarray]:
        if data[:4] != b"FAKE" or len(data) < 9:
            raise PipelineError("not a FAKE file")
        h, w, k = struct.unpack(">HHB", data[4:9])
        f, bits = self.block, self.max_iterations
        gh, gw = -(-h // f), -(-w // f)
        n = gh * gw * 3
        per = (n + 7) // 8
        if len(data) != 9 + k * per:
            raise PipelineError("truncated FAKE file")
        q = np.zeros(n, np.uint16)
        out = []
        for b in range(k if iterations is None else iterations):
            plane = np.unpackbits(np.frombuffer(data[9 + b * per: 9 + (b + 1) * per], np.uint8))[:n]
            q |= plane.astype(np.uint16) << (bits - 1 - b)
            mid = (2 ** (bits - 1 - b) - 1) / 2  # unknown low bits: their middle value
            m = (q.reshape(gh, gw, 3).astype(np.float32) + mid) / (2**bits - 1) * 255
            out.append(np.repeat(np.repeat(m, f, 0), f, 1)[:h, :w].round().clip(0, 255).astype(np.uint8))
        return out

    def decompress(self, data: bytes, iterations: int | None = None) -> np.ndarray:
        return self.decompress_progressive(data, iterations)[-1]


def make_image(h: int = 200, w: int = 264, seed: int = 0) -> np.ndarray:
    """A smooth, textured RGB test image (deterministic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(xx / 17 + c) * np.cos(yy / 23 - c) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


PILLOW = [(C.JPEG, [10, 90]), (C.JPEG2000, [96, 12]), (C.WebP, [10, 90]), (C.AVIF, [10, 80])]


def independent_decode(name: str, data: bytes) -> np.ndarray:
    """The same file through imagecodecs' own builds of the reference libraries (not Pillow)."""
    import imagecodecs

    decode = {"jpeg": imagecodecs.jpeg8_decode, "jpeg2000": imagecodecs.jpeg2k_decode,
              "webp": imagecodecs.webp_decode, "avif": imagecodecs.avif_decode}[name]
    return np.asarray(decode(data))[..., :3]


@pytest.mark.parametrize("cls,settings", PILLOW, ids=[c.name for c, _ in PILLOW])
def test_pillow_codec_round_trip(cls, settings):
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
    # a standard file: another decoder build reads the same picture (within rounding of the colour conversion)
    other = independent_decode(codec.name, low)
    assert other.shape == img.shape
    assert np.abs(other.astype(int) - out.astype(int)).mean() < 1.0


def test_sweep_codes_every_setting_through_its_own_file():
    import time

    codec = C.JPEG([5, 50, 90])
    img = make_image()
    t0 = time.perf_counter()
    coded = list(codec.sweep(img))
    wall = time.perf_counter() - t0
    assert [c.setting for c in coded] == [5, 50, 90]
    for c in coded:
        assert c.data == codec.encode(img, c.setting)  # deterministic encoder: the same file again
        assert np.array_equal(c.decoded, codec.decode(c.data))
        assert c.encode_s > 0 and c.decode_s > 0  # each coding's own time...
    assert sum(c.encode_s + c.decode_s for c in coded) <= wall  # ...disjoint parts of the sweep's


def test_jpeg2000_ratio_sets_the_rate():
    codec = C.JPEG2000([24])
    img = make_image(256, 256)
    data = codec.encode(img, 24)  # 24 bits/pixel / 24 = about 1 bpp, headers aside
    assert 0.7 < 8 * len(data) / (256 * 256) <= 1.1
    assert data[:4] == b"\xff\x4f\xff\x51"  # raw J2K codestream (SOC, SIZ), no JP2 box


# ----------------------------------------------------------------------------- settings read from the files

def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of every JPEG marker segment before the scan data (ITU-T T.81 B.1)."""
    assert data[:2] == b"\xff\xd8"  # SOI
    out, i = [], 2
    while i < len(data):
        assert data[i] == 0xFF
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        out.append((marker, data[i + 4:i + 2 + length]))
        if marker == 0xDA:  # SOS: entropy-coded data follows
            break
        i += 2 + length
    return out


#: BITS (code counts per length 1..16) of the example Huffman tables of ITU-T T.81 Annex K.3,
#: which libjpeg uses unless the tables are optimised
ANNEX_K_BITS = {
    (0, 0): (0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0),  # DC luminance
    (0, 1): (0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),  # DC chrominance
    (1, 0): (0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D),  # AC luminance
    (1, 1): (0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77),  # AC chrominance
}


def jpeg_huffman_bits(segments) -> dict[tuple[int, int], tuple[int, ...]]:
    tables = {}
    for marker, payload in segments:
        if marker != 0xC4:
            continue
        j = 0
        while j < len(payload):
            tc, th = payload[j] >> 4, payload[j] & 15
            bits = tuple(payload[j + 1:j + 17])
            tables[(tc, th)] = bits
            j += 17 + sum(bits)
    return tables


def test_jpeg_is_baseline_420_with_optimised_huffman_tables():
    img = make_image(256, 320)
    data = C.JPEG([30]).encode(img, 30)
    segments = jpeg_segments(data)
    markers = [m for m, _ in segments]
    assert 0xC0 in markers and not {0xC1, 0xC2, 0xC3} & set(markers)  # SOF0: baseline sequential Huffman
    sof = dict(segments)[0xC0]
    precision, height, width, ncomp = sof[0], *struct.unpack(">HH", sof[1:5]), sof[5]
    assert (precision, height, width, ncomp) == (8, 256, 320, 3)
    sampling = [sof[6 + 3 * k + 1] for k in range(3)]  # H<<4 | V per component
    assert sampling == [0x22, 0x11, 0x11]  # Y at 2x2, Cb and Cr at 1x1: 4:2:0
    tables = jpeg_huffman_bits(segments)
    assert set(tables) == set(ANNEX_K_BITS)
    assert all(tables[k] != ANNEX_K_BITS[k] for k in tables)  # every table built for this image
    # and without optimisation the same encoder does write Annex K's tables (the parser reads them right)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=30, optimize=False, subsampling="4:2:0")
    assert jpeg_huffman_bits(jpeg_segments(buf.getvalue())) == ANNEX_K_BITS
    assert len(data) < len(buf.getvalue())


def j2k_cod(data: bytes) -> dict[str, int]:
    """The COD marker segment of a JPEG 2000 codestream (ITU-T T.800 A.6.1)."""
    assert data[:2] == b"\xff\x4f"  # SOC
    i = 2
    while i < len(data) - 4:
        marker = struct.unpack(">H", data[i:i + 2])[0]
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker == 0xFF52:
            seg = data[i + 4:i + 2 + length]
            return {"scod": seg[0], "progression": seg[1], "layers": struct.unpack(">H", seg[2:4])[0], "mct": seg[4],
                    "levels": seg[5], "transform": seg[9]}
        assert marker != 0xFF90, "no COD before the first tile"  # SOT
        i += 2 + length
    raise AssertionError("no COD marker")


def test_jpeg2000_uses_the_97_wavelet_and_the_colour_transform():
    cod = j2k_cod(C.JPEG2000([40]).encode(make_image(), 40))
    assert cod["transform"] == 0  # 0: 9-7 irreversible filter (1 would be the 5-3 reversible one)
    assert cod["mct"] == 1  # multiple component transformation on (ICT with the 9-7 filter)
    assert cod["layers"] == 1 and cod["levels"] >= 1
    # the parser tells the settings apart: Pillow's defaults are 5-3 without MCT
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(make_image()).save(buf, "JPEG2000", no_jp2=True)
    default = j2k_cod(buf.getvalue())
    assert (default["transform"], default["mct"]) == (1, 0)


def test_webp_is_lossy_vp8():
    data = C.WebP([50], method=4).encode(make_image(), 50)
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    assert data[12:16] == b"VP8 " and b"VP8L" not in data  # lossy VP8 bitstream, not lossless VP8L
    assert data[23:26] == b"\x9d\x01\x2a"  # VP8 key frame start code


def isobmff_box(data: bytes, kind: bytes) -> bytes:
    i = data.index(kind)
    size = struct.unpack(">I", data[i - 4:i])[0]
    return data[i + 4:i - 4 + size]


def test_avif_is_420_8bit_and_the_speed_reaches_the_encoder():
    codec = C.AVIF([40], speed=6)
    if codec.available():
        pytest.skip(codec.available())
    img = make_image()
    data = codec.encode(img, 40)
    assert data[4:8] == b"ftyp" and b"avif" in isobmff_box(data, b"ftyp")
    av1c = isobmff_box(data, b"av1C")
    assert av1c[0] == 0x81  # marker, version 1
    profile = av1c[1] >> 5
    high_bitdepth, mono, sub_x, sub_y = (av1c[2] >> 6) & 1, (av1c[2] >> 4) & 1, (av1c[2] >> 3) & 1, (av1c[2] >> 2) & 1
    assert (profile, mono, sub_x, sub_y, high_bitdepth) == (0, 0, 1, 1, 0)  # Main profile, colour, 4:2:0, 8 bit
    pixi = isobmff_box(data, b"pixi")
    assert pixi[4] == 3 and list(pixi[5:8]) == [8, 8, 8]
    # the speed is not written in the file; a different speed must give a different file
    assert C.AVIF([40], speed=10).encode(img, 40) != data


def test_jpegxl_is_lossy_and_its_settings_reach_libjxl():
    codec = C.JPEGXL([2.0], effort=7)
    assert codec.available() is None  # imagecodecs (with libjxl) is a dependency
    img = make_image()
    data = codec.encode(img, 2.0)
    assert data[:2] == b"\xff\x0a"  # bare JPEG XL codestream
    out = codec.decode(data)
    assert out.shape == img.shape and not np.array_equal(out, img) and psnr(out, img) > 25
    coarse = codec.encode(img, 8.0)
    assert len(coarse) < len(data) and psnr(codec.decode(coarse), img) < psnr(out, img)
    assert C.JPEGXL([2.0], effort=3).encode(img, 2.0) != data
    import imagecodecs

    assert np.array_equal(np.asarray(imagecodecs.jpegxl_decode(data))[..., :3], out)


def test_bpp_formula():
    assert C.bpp(3 * 64, 64, 24) == 1.0
    assert C.bpp(0, 10, 10) == 0.0
    assert C.bpp(49152, 512, 768) == 1.0  # a 48 KiB file of a Kodak image


def test_decode_rejects_garbage():
    with pytest.raises(Exception):
        C.JPEG([50]).decode(b"not an image")


def test_rnn_wrapper_round_trip():
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


def test_rnn_sweep_is_one_encode_and_truncation():
    class Counting(FakeRNNCodec):
        calls: list[int] = []

        def compress(self, img, iterations):
            self.calls.append(iterations)
            return super().compress(img, iterations)

    fake = Counting()
    codec = C.RNN(fake, [1, 2, 4])
    img = make_image()
    coded = list(codec.sweep(img))
    assert fake.calls == [4]  # one encode, at the largest count
    assert [c.setting for c in coded] == [1, 2, 4]
    for c in coded:  # each file equals a separate encode with that many iterations, and decodes the same
        assert c.data == FakeRNNCodec().compress(img, int(c.setting))
        assert np.array_equal(c.decoded, FakeRNNCodec().decompress(c.data))


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
    assert list(C.REGISTRY) == list(S.SPECS)  # every spec implemented, in the params' order
    for name, cls in C.REGISTRY.items():
        assert cls.name == name and cls.setting and cls.label and cls.color
    assert len({cls.color for cls in C.REGISTRY.values()}) == len(C.REGISTRY)  # curves told apart


def test_params_schema_follows_the_registry():
    """Every registered codec has its sweep and knobs in the evaluate section, with the class's
    defaults, and its sweep checked by the class's rule (the bad key named)."""
    from pipeline.evaluation.params import EvaluateParams

    p = EvaluateParams()
    assert p.codecs == list(C.REGISTRY)
    for cls in C.REGISTRY.values():
        want = None if cls.default_sweep is None else list(cls.default_sweep)
        assert getattr(p, cls.sweep_key()) == want
        assert cls.spec is S.SPECS[cls.name] and cls.sweep_key() == f"{cls.name}_{cls.setting}"
        for arg, knob in cls.knobs.items():
            assert knob.key == f"{cls.name}_{arg}" and getattr(p, knob.key) == knob.default
    assert p.webp_method == 4 and p.jpegxl_effort == 7 and p.rnn_model == "data/compressor/model.pt"
    for key, bad in (("jpeg_quality", [0]), ("webp_quality", [101]), ("jpeg2000_ratio", [1.0]),
                     ("jpegxl_distance", [0.0]), ("rnn_iterations", [0])):
        with pytest.raises(ValueError, match=key):
            EvaluateParams(**{key: bad})


def test_a_new_codec_is_one_class():
    """A codec specified with its sweep and a knob: params know its keys, build makes it from them."""
    try:
        _raw_codec_round_trip()
    finally:
        C.REGISTRY.pop("raw", None)
        S.SPECS.pop("raw", None)
    with pytest.raises(ValueError):
        C.register(C.JPEG)  # a name registered twice
    with pytest.raises(ValueError, match="sweep key"):
        S.CodecSpec("raw", "Raw", "level", "raw_levels", "black", (1,), bool, "", "")


def _raw_codec_round_trip():
    S.add(S.CodecSpec("raw", "Raw", "level", "raw_level", "black", (1, 2), lambda v: v > 0, "levels are > 0", "",
                      knobs=(S.Knob("raw_gain", int, 3, "", ge=1),)))

    @C.register
    class Raw(C.Codec):
        spec = S.SPECS["raw"]

        def __init__(self, settings, gain):
            super().__init__(settings)
            self.gain = gain

        def encode(self, img, setting):
            return img.tobytes()

        def decode(self, data):
            return np.frombuffer(data, np.uint8).reshape(64, 48, 3)

    from pipeline.evaluation import params as P

    fields = P._codec_fields()
    assert fields["raw_level"][1].default == [1, 2] and fields["raw_gain"][1].default == 3
    Model = P.create_model("M", __base__=P.Section, **fields)
    codecs, _ = C.build(type("Params", (), {"codecs": ["raw"], **Model(raw_level=[5], raw_gain=2).model_dump()}))
    assert codecs[0].settings == [5] and codecs[0].gain == 2 and C.color("raw") == "black"


def test_dvc_plots_list_every_registered_codec():
    """The dvc.yaml plots of the evaluation curves name one curves/<codec>.csv per registered codec."""
    import yaml

    from tests.conftest import REPO

    plots = {}
    for entry in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]:
        plots.update(entry)
    want = {f"data/evaluation/curves/{name}.csv" for name in C.REGISTRY}
    for name, column in (("ms_ssim_vs_bpp", "ms_ssim"), ("ms_ssim_db_vs_bpp", "ms_ssim_db"), ("psnr_vs_bpp", "psnr")):
        y = plots[name]["y"]
        assert set(y) == want, name
        assert set(y.values()) == {column}


def tiny_real_model(path, iterations: int = 3, **variant):
    """A tiny randomly initialised RNNCompressor saved in the project's model format."""
    import torch

    from pipeline.compression import model as model_mod
    from pipeline.compression import modelfile
    from pipeline.compression.params import TrainCompressorParams

    torch.manual_seed(0)
    cfg = TrainCompressorParams(encoder_widths=(8, 16, 16, 16), decoder_widths=(16, 16, 16, 16),
                                iterations=iterations, val_iterations=(1, iterations), **variant)
    modelfile.save_model(model_mod.RNNCompressor(model_mod.ModelConfig.from_params(cfg)), path)
    return path


def test_rnn_wrapper_with_the_real_codec(tmp_path, one_thread):
    """Through pipeline.compression.codec's real file format (untrained tiny model)."""
    codec = C.RNN(C.load_rnn(str(tiny_real_model(tmp_path / "m.pt", 2)), device="cpu"), None)
    assert codec.settings == [1, 2]
    assert "ConvGRU, additive" in codec.describe()  # the report says which variant it evaluated
    assert (codec.config()["cell"], codec.config()["reconstruction"]) == ("gru", "additive")
    lstm = C.RNN(C.load_rnn(str(tiny_real_model(tmp_path / "l.pt", 2, cell="lstm")), device="cpu"), None)
    assert "ConvLSTM, additive" in lstm.describe() and lstm.config()["cell"] == "lstm"
    assert "priming" not in codec.config() and "priming" not in codec.describe()
    primed = C.RNN(C.load_rnn(str(tiny_real_model(tmp_path / "p.pt", 2, priming=2)), device="cpu"), None)
    assert "2 priming steps" in primed.describe() and primed.config()["priming"] == "2 steps"
    img = make_image(48, 80)  # not a multiple of 16: padded and cropped back by the codec
    one, two = codec.encode(img, 1), codec.encode(img, 2)
    for data in (one, two):
        out = codec.decode(data)
        assert out.shape == img.shape and out.dtype == np.uint8
    assert len(two) > len(one) > 0
    with pytest.raises(PipelineError):
        codec.decode(b"garbage" * 10)


def test_truncation_equals_encoding_with_fewer_iterations(tmp_path, one_thread):
    """The real codec: truncate(compress(img, K), k) is byte for byte compress(img, k), and it decodes to
    the same pixels as the progressive decode of the full file (issue 12, item 5)."""
    from pipeline.compression.codec import load_codec
    from pipeline.compression.rnncfile import truncate

    real = load_codec(tiny_real_model(tmp_path / "m.pt", 3), device="cpu")
    img = make_image(64, 96, seed=7)
    full = real.compress(img, 3)
    every = real.decompress_progressive(full)
    assert len(every) == 3
    for k in (1, 2, 3):
        alone = real.compress(img, k)
        assert truncate(full, k) == alone
        pixels = real.decompress(alone)
        assert np.array_equal(pixels, every[k - 1])
        assert np.array_equal(pixels, real.decompress(full, k))
    # and the evaluation's sweep yields exactly those files and pixels, with bpp from their sizes
    coded = list(C.RNN(real, [1, 3]).sweep(img))
    assert [c.data for c in coded] == [real.compress(img, 1), full]
    assert all(np.array_equal(c.decoded, real.decompress(c.data)) for c in coded)
