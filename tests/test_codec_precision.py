"""The codec's inference engine (pipeline/compression/inference.py) and its precisions: the same function as
the model as written, bit-exact decoding at the encoder's precision, files that decode at either precision,
--precision validated, and --bpp stopping at the first iteration that no longer fits.

bf16 runs on any CPU (emulated, slowly, without AVX512-BF16/AMX): the images and models here are tiny."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.compression import codec as codec_module
from pipeline.compression.cli import main
from pipeline.compression.codec import RNNCodec, load_codec
from pipeline.compression.errors import CodecError
from pipeline.compression.modelfile import load_model, save_model
from pipeline.compression.rnncfile import HEADER_SIZE
from pipeline.compression.inference import InferenceNet, resolve_precision
from pipeline.evaluation.metrics import psnr
from tests.test_codec_format import CFG, make_image, make_model

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "rnnc-cpu.pt"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VARIANTS = {
    "lstm": CFG,
    "gru": dataclasses.replace(CFG, cell="gru"),
    "one-shot": dataclasses.replace(CFG, reconstruction="one-shot"),
    "primed": dataclasses.replace(CFG, priming=1),
    "wide-hidden": dataclasses.replace(CFG, encoder_hidden_kernel=3, decoder_hidden_kernels=(3, 1, 3, 1)),
}


def _run(net, x: torch.Tensor, bits: list[torch.Tensor] | None, k: int):
    """k iterations of encode (or, given ``bits``, those bits) and decode: (bits, reconstructions)."""
    enc, dec = net.init_states()
    recon = torch.zeros_like(x)
    out_bits, recons = [], []
    for t in range(k):
        if bits is None:
            b, enc = net.encode_step(x - recon, enc)
            b = b.float().contiguous()
        else:
            b = bits[t]
        out_bits.append(b)
        step_in = net.codes_to_input(b > 0) if isinstance(net, InferenceNet) else b
        delta, dec = net.decode_step(step_in, dec)
        recon = net.reconstruct_step(recon, delta)
        recons.append(recon.float())
    return out_bits, recons


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_engine_computes_the_model(variant):
    """fp32: the engine's decoder gives the model's output from the same bits, and its encoder the same bits
    (up to rounding); bf16: the same within bf16's rounding."""
    model = make_model(cfg=VARIANTS[variant])
    x = torch.from_numpy(make_image(32, 48)).permute(2, 0, 1)[None].float() / 255 - 0.5
    with torch.inference_mode():
        bits, ref = _run(model, x, None, 3)
        for precision, tol in (("fp32", 1e-4), ("bf16", 0.05)):
            net = InferenceNet(model, "cpu", precision)
            _, out = _run(net, x, bits, 3)  # the model's bits through the engine's decoder
            for a, b in zip(out, ref):
                assert float((a - b).abs().max()) < tol, (precision, float((a - b).abs().max()))
            own, _ = _run(net, x, None, 1)
            agree = float((own[0] == bits[0]).float().mean())
            assert agree >= (0.99 if precision == "fp32" else 0.9), (precision, agree)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_precision_decodes_bit_identically_to_the_encoder(precision):
    codec = RNNCodec(make_model(), tile=32, precision=precision)  # 37x53: 2x2 tiles
    img = make_image(37, 53)
    for k in (1, 3):
        data = codec.compress(img, k)
        np.testing.assert_array_equal(codec.decompress(data), codec.reconstruct(img, k))
    np.testing.assert_array_equal(codec.decompress_progressive(data)[1], codec.reconstruct(img, 2))


def test_files_do_not_record_the_precision():
    img = make_image(40, 56)
    a = RNNCodec(make_model(), tile=32, precision="fp32").compress(img, 2)
    b = RNNCodec(make_model(), tile=32, precision="bf16").compress(img, 2)
    assert a[:HEADER_SIZE] == b[:HEADER_SIZE]


@pytest.fixture(scope="module")
def shipped():
    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED} is not here (a trained model makes the quality tolerance meaningful)")
    return load_model(SHIPPED)


def test_cross_precision_round_trip_is_within_tolerance(shipped):
    """A bf16 file decoded at fp32, and an fp32 file at bf16: within 0.02 dB PSNR of the writer's own
    reconstruction (issue 23's tolerance), on a small image with the shipped model."""
    img = make_image(64, 96, seed=3)
    img = np.clip(np.round(img.astype(np.float32) * 0.5 + 64), 0, 255).astype(np.uint8)  # less noise: a photo-like PSNR
    codecs = {p: RNNCodec(shipped, precision=p) for p in ("fp32", "bf16")}
    for writer, reader in (("bf16", "fp32"), ("fp32", "bf16")):
        data = codecs[writer].compress(img, 4)
        own = codecs[writer].decompress_progressive(data)
        other = codecs[reader].decompress_progressive(data)
        for k in range(4):
            assert abs(psnr(other[k], img) - psnr(own[k], img)) <= 0.02, (writer, reader, k + 1)
        back = codecs[reader].compress(other[-1], 2)  # and back: the reader's image re-encoded decodes at the writer's
        assert codecs[writer].decompress(back).shape == img.shape


def test_precision_is_validated():
    with pytest.raises(CodecError, match="precision must be one of auto, fp32, bf16"):
        RNNCodec(make_model(), precision="fp16")
    with pytest.raises(CodecError, match="precision"):  # before the (missing) model is read
        load_codec("no/such/model.pt", precision="double")
    assert RNNCodec(make_model(), precision="fp32").precision == "fp32"


def test_auto_is_bf16_only_where_native(monkeypatch):
    import pipeline.utils

    monkeypatch.setattr(pipeline.utils, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(pipeline.utils, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cpu") == "fp32"
    assert RNNCodec(make_model()).precision == "fp32"


def test_cli_precision(tmp_path, capsys):
    from PIL import Image

    model = tmp_path / "model.pt"
    save_model(make_model(), model)
    png = tmp_path / "in.png"
    Image.fromarray(make_image(30, 40)).save(png)
    out = tmp_path / "x.rnnc"
    assert main(["compress", str(png), str(out), "-k", "2", "--model", str(model), "--precision", "fp64"]) != 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --precision must be one of auto, fp32, bf16"), err
    assert not out.exists()
    assert main(["compress", str(png), str(out), "-k", "2", "--model", str(model), "--precision", "bf16"]) == 0
    assert "bf16" in capsys.readouterr().out
    back = tmp_path / "back.png"
    assert main(["decompress", str(out), str(back), "--model", str(model), "--precision", "fp32"]) == 0
    assert np.asarray(Image.open(back)).shape == (30, 40, 3)
    assert main(["decompress", str(out), str(back), "--model", str(model), "--precision", "x"]) != 0
    assert "--precision" in capsys.readouterr().err


def _count_encoder_steps(codec, monkeypatch) -> list[int]:
    calls = [0]
    step = codec.net.encode_step

    def counted(*args, **kwargs):
        calls[0] += 1
        return step(*args, **kwargs)

    monkeypatch.setattr(codec.net, "encode_step", counted)
    return calls


@pytest.mark.parametrize("tile", [0, 32])
def test_bpp_stops_at_the_first_iteration_that_does_not_fit(tile, monkeypatch):
    codec = RNNCodec(make_model(), tile=tile)
    h, w = 48, 80
    img = make_image(h, w)
    files = [codec.compress(img, k) for k in range(1, 5)]
    tiles = len(codec_module.tile_grid(h, w, tile))
    calls = _count_encoder_steps(codec, monkeypatch)
    for k, data in enumerate(files, 1):
        calls[0] = 0
        got, n = codec.compress_to_bpp(img, 8 * len(data) / (h * w))
        assert (got, n) == (data, k)  # the same bytes as compressing with that many iterations
        assert calls[0] == tiles * min(k + 1, 4)  # the encoder ran one iteration past the last that fits, no more
    monkeypatch.setattr(codec_module, "EARLY_STOP_BYTES", 0)  # too large to hold every tile: encode all, truncate
    calls[0] = 0
    assert codec.compress_to_bpp(img, 8 * len(files[1]) / (h * w)) == (files[1], 2)
    assert calls[0] == tiles * 4
    with pytest.raises(CodecError, match="too low"):
        codec.compress_to_bpp(img, 8 * (len(files[0]) - 1) / (h * w))


def test_evaluate_passes_its_precision_to_the_codec(monkeypatch):
    from pipeline.evaluation import codecs as C
    from pipeline.evaluation.params import EvaluateParams

    assert EvaluateParams().rnn_precision == "auto"
    with pytest.raises(ValueError, match="rnn_precision"):
        EvaluateParams(rnn_precision="fp16")
    seen = {}

    class Fake:
        max_iterations = 2
        precision = "fp32"

    def loader(model, device="cpu", precision="auto"):
        seen["precision"] = precision
        return Fake()

    rnn = C.RNN.from_params(EvaluateParams(rnn_precision="bf16", codecs=["rnn"]), rnn_loader=loader)
    assert seen == {"precision": "bf16"} and rnn.config()["precision"] == "fp32"
    C.RNN.from_params(EvaluateParams(codecs=["rnn"]), rnn_loader=lambda model, device: Fake())  # the old contract
