"""The RNN codec network: binarizer statistics, shapes, bit rate, the additive recurrence."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.compression.model import BLOCK, ModelConfig, RNNCompressor, binarize, count_parameters

CFG = ModelConfig(encoder_widths=(8, 16, 16, 16), decoder_widths=(16, 16, 16, 16), bits=32, iterations=3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_binarizer_outputs_are_plus_minus_one():
    z = torch.linspace(-1, 1, 201)
    torch.manual_seed(0)
    for stochastic in (True, False):
        b = binarize(z, stochastic)
        assert set(b.unique().tolist()) <= {-1.0, 1.0}
    det = binarize(z, False)
    assert torch.equal(det, torch.where(z >= 0, 1.0, -1.0))  # sign, with sign(0) = +1


def test_stochastic_binarizer_is_unbiased():
    """E[b] = z: with 40000 draws per value the mean's std is <= 0.005; allow 0.02 (4 sigma)."""
    torch.manual_seed(0)
    z = torch.linspace(-1, 1, 21)
    draws = binarize(z.expand(40000, -1).contiguous(), True)
    assert (draws.mean(0) - z).abs().max() < 0.02
    assert torch.equal(draws[:, 0], torch.full((40000,), -1.0))  # z = -1 and +1 are deterministic
    assert torch.equal(draws[:, -1], torch.full((40000,), 1.0))


def test_binarizer_gradient_is_straight_through():
    z = torch.linspace(-0.9, 0.9, 50, requires_grad=True)
    binarize(z, True).mul(torch.arange(50.0)).sum().backward()
    assert torch.equal(z.grad, torch.arange(50.0))


def test_forward_shapes_and_bit_rate():
    model = RNNCompressor(CFG).eval()
    x = torch.rand(2, 3, 48, 80) - 0.5
    with torch.no_grad():
        out = model(x)
        assert out.shape == (3, 2, 3, 48, 80)
        enc, _ = model.init_states()
        b, enc = model.encode_step(x, enc)
    assert b.shape == (2, 32, 48 // BLOCK, 80 // BLOCK)
    assert b.numel() / (2 * 48 * 80) == 0.125  # bits per pixel per iteration


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("reconstruction", ["additive", "one-shot"])
def test_reconstruction_follows_the_recurrence(cell, reconstruction):
    """additive: x̂_t = D_t(b_t) + x̂_{t-1}; one-shot: x̂_t = D_t(b_t) (γ = 0 at every t); both code
    r_{t-1} = x - x̂_{t-1}: replay the steps by hand."""
    torch.manual_seed(1)
    model = RNNCompressor(dataclasses.replace(CFG, cell=cell, reconstruction=reconstruction)).eval()
    x = torch.rand(1, 3, 32, 32) - 0.5
    with torch.no_grad():
        out = model(x)
        enc, dec = model.init_states()
        recon = torch.zeros_like(x)
        for t in range(CFG.iterations):
            b, enc = model.encode_step(x - recon, enc)
            delta, dec = model.decode_step(b, dec)
            recon = recon + delta if reconstruction == "additive" else delta
            torch.testing.assert_close(out[t], recon, rtol=0, atol=0)


def test_training_mode_is_stochastic_and_eval_is_deterministic():
    torch.manual_seed(2)
    model = RNNCompressor(CFG)
    x = torch.rand(4, 3, 32, 32) - 0.5
    with torch.no_grad():
        model.train()
        a, b = model(x), model(x)
        assert not torch.equal(a, b)
        model.eval()
        assert torch.equal(model(x), model(x))


def test_full_size_matches_the_paper():
    """E 64-256-512-512, D 512-512-256-128 with these kernels: about 35.5 M parameters (STACK.md)."""
    full = ModelConfig(encoder_widths=(64, 256, 512, 512), decoder_widths=(512, 512, 256, 128), bits=32, iterations=16)
    n = count_parameters(RNNCompressor(full))
    assert 35.0e6 < n < 36.0e6


def test_config_round_trip_and_validation():
    assert ModelConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError):
        ModelConfig(encoder_widths=(8, 16, 16, 16), decoder_widths=(10, 16, 16, 16), bits=32, iterations=3)
    with pytest.raises(ValueError):
        ModelConfig.from_dict({**CFG.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="missing keys \\['iterations'\\]"):  # no silent default architecture
        ModelConfig.from_dict({k: v for k, v in CFG.to_dict().items() if k != "iterations"})


def test_gru_cell_trains_and_differs_from_lstm():
    torch.manual_seed(4)
    gru = RNNCompressor(dataclasses.replace(CFG, cell="gru"))
    lstm = RNNCompressor(CFG)
    assert count_parameters(gru) < count_parameters(lstm)  # 3 gates against 4
    x = torch.rand(2, 3, 32, 32) - 0.5
    gru.train()
    gru(x).sub(x).abs().mean().backward()
    hidden = [p.grad for n, p in gru.named_parameters() if "conv_h" in n]
    assert hidden and all(g is not None and g.abs().sum() > 0 for g in hidden)  # the recurrence is used


def test_variant_fields_are_stored_only_off_their_defaults():
    """Model files (and fingerprints) from before cell/reconstruction existed stay as they were."""
    assert "cell" not in CFG.to_dict() and "reconstruction" not in CFG.to_dict()
    gru = dataclasses.replace(CFG, cell="gru", reconstruction="one-shot")
    assert gru.to_dict()["cell"] == "gru" and ModelConfig.from_dict(gru.to_dict()) == gru
    with pytest.raises(ValueError, match="cell"):
        dataclasses.replace(CFG, cell="rnn")
    with pytest.raises(ValueError, match="reconstruction"):
        dataclasses.replace(CFG, reconstruction="mixed")


def test_priming_runs_extra_first_steps_without_extra_bits():
    """priming k (Johnston et al. 2018): at t = 1, E runs k extra steps on x and D k extra steps on b_1 before
    the real ones; the codes of t = 1 and the output shapes are as without priming, the first reconstruction
    equals replaying the steps by hand, and the weights are the unprimed model's (the same parameters)."""
    torch.manual_seed(5)
    plain = RNNCompressor(CFG).eval()
    primed = RNNCompressor(dataclasses.replace(CFG, priming=2)).eval()
    primed.load_state_dict(plain.state_dict())
    assert count_parameters(primed) == count_parameters(plain)
    x = torch.rand(1, 3, 32, 32) - 0.5
    with torch.no_grad():
        out = primed(x)
        assert out.shape == plain(x).shape
        enc, dec = plain.init_states()
        for _ in range(3):  # 2 priming steps, then the real one
            z, enc = plain.encoder(x, enc)
        b = torch.where(z >= 0, 1.0, -1.0)
        for _ in range(3):
            delta, dec = plain.decoder(b, dec)
        torch.testing.assert_close(out[0], delta, rtol=0, atol=0)
        assert not torch.equal(out[0], plain(x)[0])  # the priming changed the first reconstruction
        # later steps never prime again: the second one continues from the primed states
        b2, _ = plain.encode_step(x - delta, enc)
        delta2, _ = plain.decode_step(b2, dec)
        torch.testing.assert_close(out[1], delta + delta2, rtol=0, atol=0)


def test_priming_is_stored_only_when_set_and_bounded():
    assert "priming" not in CFG.to_dict()
    primed = dataclasses.replace(CFG, priming=3)
    assert primed.to_dict()["priming"] == 3 and ModelConfig.from_dict(primed.to_dict()) == primed
    for bad in (-1, 9, 1.5, "2", True):
        with pytest.raises(ValueError, match="priming"):
            dataclasses.replace(CFG, priming=bad)
