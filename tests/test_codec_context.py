"""The .rnnc v3, v4 and v5 entropy models (pipeline.compression.context): exact, lossless, learnable, tied to the
model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.compression import context as cx
from pipeline.compression.entropy import EntropyError
from pipeline.compression.codec import RNNCodec
from pipeline.compression.errors import BitstreamError, CodecError
from pipeline.compression.modelfile import load_model, model_fingerprint, save_model
from pipeline.compression.rnncfile import parse, truncate
from tests.test_codec_format import CFG, forge, make_image, make_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BITS = 8


def correlated_planes(n_planes: int, h: int, w: int, bits: int = BITS, seed: int = 0, flip: float = 0.05):
    """Planes whose channels copy channel 0 (each bit flipped with probability ``flip``) and whose
    channel 0 repeats the previous plane's: what a learned context model should predict well."""
    rng = np.random.default_rng(seed)
    base = rng.random((h, w)) < 0.5
    planes = []
    for _ in range(n_planes):
        base = base ^ (rng.random((h, w)) < flip)
        plane = np.repeat(base[:, :, None], bits, axis=2) ^ (rng.random((h, w, bits)) < flip)
        planes.append(plane)
    return np.stack(planes)


def random_table(iterations: int = 3, bits: int = BITS, seed: int = 0, version: int = 4) -> np.ndarray:
    """A table of the version-3/4 width, or (``version`` 5) with the neighbours' channels' columns after it."""
    rng = np.random.default_rng(seed)
    table = rng.normal(0, 1.5, (iterations, bits, cx.n_features(bits)))
    if version == 5:
        table = np.concatenate([table, rng.normal(0, 0.5, (iterations, bits, bits))], axis=2)
    return cx.quantize(table)


CODERS = [cx.ContextCoder, cx.AdaptiveContextCoder, cx.NeighbourContextCoder]  # versions 3, 4 and 5


def table_for(coder, **kw) -> np.ndarray:
    return random_table(version=coder.version, **kw)


def round_trip(planes: np.ndarray, table: np.ndarray, coder=cx.ContextCoder) -> list[bytes]:
    h, w, bits = planes.shape[1:]
    enc, dec = coder(h, w, bits, table), coder(h, w, bits, table)
    out = []
    for plane in planes:
        data = enc.encode(plane)
        np.testing.assert_array_equal(dec.decode(data), plane)
        out.append(data)
    return out


def test_logistic_table_is_exact_and_symmetric():
    lut = cx.LUT
    assert lut.shape == (2 * cx.LUT_HALF + 1,) and lut[cx.LUT_HALF] == 1 << 15
    assert (np.diff(lut) >= 0).all() and lut.min() >= 1 and lut.max() <= (1 << 16) - 1
    inner = np.arange(-150, 151)  # unclipped: p(z) + p(-z) = 1 exactly after correct rounding
    assert (lut[cx.LUT_HALF + inner] + lut[cx.LUT_HALF - inner] == 1 << 16).all()
    assert lut[cx.LUT_HALF + 16] == 47911  # 2**16 / (1 + e^-1) = 47910.97: golden value (every platform)
    np.testing.assert_array_equal(cx.probability(np.array([0, 64, -64, 10 ** 6])) * (1 << 16),
                                  [32768, 47911, 65536 - 47911, lut[-1]])


@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("kind", ["random", "zeros", "ones", "correlated"])
def test_round_trip_is_lossless(kind, coder):
    rng = np.random.default_rng(1)
    shape = (4, 5, 7, BITS)
    planes = {"random": rng.random(shape) < 0.5, "zeros": np.zeros(shape, bool), "ones": np.ones(shape, bool),
              "correlated": correlated_planes(4, 5, 7)}[kind]
    coded = round_trip(planes, table_for(coder), coder)  # 4 planes with a 3-row table: the last row serves plane 4
    assert all(len(d) % 4 == 0 for d in coded)


@pytest.mark.parametrize("coder", CODERS)
def test_one_block_and_one_channel_planes(coder):
    for h, w, bits in ((1, 1, 1), (1, 9, 3), (6, 1, 2)):
        planes = np.random.default_rng(h * w).random((3, h, w, bits)) < 0.5
        round_trip(planes, table_for(coder, iterations=2, bits=bits), coder)


@pytest.mark.parametrize("version", [3, 5])
def test_the_coder_sees_exactly_the_features_the_fit_used(version, monkeypatch):
    """Probabilities at coding time (from the bits coded so far) equal the fitted logistic model applied to
    the whole plane's features (plane_features): the fit optimises the code length the coder achieves.
    Version 5 (learning off): the same with the neighbours' channels, the table's last ``bits`` columns."""
    monkeypatch.setattr(cx, "ETA_FIRST", 0)
    monkeypatch.setattr(cx, "ETA_LATER", 0)
    planes = correlated_planes(3, 6, 5)
    table = random_table(version=version)
    lat = cx.Lattice(6, 5)
    pm = planes.reshape(3, 30, BITS).astype(np.int64) * 2 - 1
    coder = (cx.ContextCoder if version == 3 else cx.NeighbourContextCoder)(6, 5, BITS, table)
    tril = np.tril(np.ones((BITS, BITS)), -1)
    for t in range(3):
        seen = []

        class Capture:
            def encode(self, group, family, p):
                seen.append(np.asarray(p))

        coder._walk(planes[t], Capture())
        shared, local, cls = cx.plane_features(lat, pm[t], pm[t - 1] if t else None, pm[t - 2] if t > 1 else None)
        wt = table[t]
        mask = np.concatenate([np.ones((BITS, 2 * BITS)), tril], axis=1)
        z = shared[:, :3 * BITS] @ (wt[:, :3 * BITS] * mask).T + (local * wt[:, 3 * BITS:3 * BITS + 3]).sum(-1) \
            + wt[:, 3 * BITS + 3:3 * BITS + 6].T[cls]
        if version == 5:
            z = z + shared[:, 3 * BITS:] @ (wt[:, 3 * BITS + 6:] * tril).T
        expected = cx.probability(z.astype(np.int64))
        i = 0
        for c in range(BITS):
            for where in lat.where:
                np.testing.assert_array_equal(seen[i], expected[where, c])
                i += 1


def test_a_fitted_table_compresses_correlated_bits():
    codes = np.stack([correlated_planes(3, 8, 8, seed=s) for s in range(40)])  # (N, iterations, h, w, bits)
    table, cost = cx.fit(codes)
    assert table.shape == (3, BITS, cx.n_features(BITS, 5)) and table.dtype == np.float32
    np.testing.assert_array_equal(table * cx.WEIGHT_SCALE, np.round(table * cx.WEIGHT_SCALE))  # on the grid
    assert np.abs(table).max() <= cx.WEIGHT_LIMIT
    assert cost[0] < 0.55 and max(cost[1:]) < 0.45  # channels copy channel 0; channel 0 copies the last plane
    unseen = correlated_planes(3, 8, 8, seed=99)
    coded = round_trip(unseen, cx.quantize(table))
    raw = 8 * 8 * BITS / 8
    assert sum(map(len, coded)) < 0.6 * 3 * raw


@pytest.mark.parametrize("coder", CODERS)
def test_corrupt_coded_bytes_are_refused(coder):
    table = table_for(coder)
    data = coder(4, 4, BITS, table).encode(np.ones((4, 4, BITS), bool))
    with pytest.raises(EntropyError, match="multiple of 4"):
        coder(4, 4, BITS, table).decode(data + b"\0")
    with pytest.raises(EntropyError, match="continue past"):
        coder(4, 4, BITS, table).decode(data + b"\xff" * 8)
    with pytest.raises(ValueError, match="does not fit"):
        coder(4, 4, BITS, table[:, :, :-1])


def test_v4_without_learning_codes_exactly_as_v3(monkeypatch):
    """Version 4 is version 3 plus the learned delta: with a learning rate of zero it writes v3's very bytes
    (the same features, table and probabilities, computed its own way)."""
    monkeypatch.setattr(cx, "ETA_FIRST", 0)
    monkeypatch.setattr(cx, "ETA_LATER", 0)
    for shape, seed in (((5, 7), 0), ((1, 1), 1), ((12, 9), 2)):
        planes = correlated_planes(4, *shape, seed=seed)
        assert round_trip(planes, random_table(seed=seed), cx.AdaptiveContextCoder) == \
            round_trip(planes, random_table(seed=seed))


def test_v5_with_zero_neighbour_weights_codes_exactly_as_v4():
    """Version 5 is version 4 plus the neighbours' channels, whose weights it does not learn: with their
    columns zero it writes v4's very bytes; a version-5 table also serves versions 3 and 4 by its first columns."""
    for shape, seed in (((5, 7), 0), ((1, 1), 1), ((12, 9), 2)):
        planes = correlated_planes(4, *shape, seed=seed)
        table = random_table(seed=seed)
        wide = np.concatenate([table, np.zeros(table.shape[:2] + (BITS,), dtype=table.dtype)], axis=2)
        assert cx.table_version(wide, BITS) == 5 and cx.table_version(table, BITS) == 4
        assert round_trip(planes, wide, cx.NeighbourContextCoder) == round_trip(planes, table, cx.AdaptiveContextCoder)
        for coder in (cx.ContextCoder, cx.AdaptiveContextCoder):
            assert round_trip(planes, random_table(seed=seed, version=5), coder) == \
                round_trip(planes, random_table(seed=seed, version=5)[:, :, :cx.n_features(BITS)], coder)
    with pytest.raises(ValueError, match="version-4 context table cannot code version 5"):
        cx.NeighbourContextCoder(4, 4, BITS, random_table())


def neighbour_planes(n_planes: int, h: int, w: int, bits: int = BITS, seed: int = 0, flip: float = 0.03):
    """Planes whose channel c > 0 is the sign of the sum of channel c - 1 over the block's 4 direct neighbours
    (random where it is 0; each bit flipped with probability ``flip``), channel 0 random: nothing at the same
    block predicts a bit, the neighbours' other channels do."""
    rng = np.random.default_rng(seed)
    planes = np.zeros((n_planes, h, w, bits), dtype=bool)
    for t in range(n_planes):
        planes[t, :, :, 0] = rng.random((h, w)) < 0.5
        for c in range(1, bits):
            pm = np.pad(planes[t, :, :, c - 1].astype(int) * 2 - 1, 1)
            total = pm[:-2, 1:-1] + pm[2:, 1:-1] + pm[1:-1, :-2] + pm[1:-1, 2:]
            bit = np.where(total == 0, rng.random((h, w)) < 0.5, total > 0)
            planes[t, :, :, c] = bit ^ (rng.random((h, w)) < flip)
    return planes


def test_a_fitted_v5_table_uses_the_neighbours_channels():
    """On bits predictable only from a neighbour's other channel, the fitted version-5 table codes far
    below a bit per bit, and below what the same table's version-4 columns achieve."""
    codes = np.stack([neighbour_planes(2, 8, 8, seed=s) for s in range(30)])
    table, cost = cx.fit(codes)
    assert table.shape == (2, BITS, cx.n_features(BITS, 5)) and cost[0] < 0.6
    unseen = neighbour_planes(2, 16, 16, seed=99)
    v5 = sum(map(len, round_trip(unseen, cx.quantize(table), cx.NeighbourContextCoder)))
    v4 = sum(map(len, round_trip(unseen, cx.quantize(table), cx.AdaptiveContextCoder)))
    assert v5 < 0.6 * unseen.size / 8 and v5 < 0.75 * v4


def test_v4_learns_what_the_table_does_not_know():
    """Planes whose bits are 1 with probability 0.85 under a table that knows nothing (all zero: P = 1/2
    everywhere): v3 spends a bit per bit, v4 learns the bias as it codes and spends far less."""
    planes = np.random.default_rng(3).random((3, 16, 16, BITS)) < 0.85
    table = np.zeros((3, BITS, cx.n_features(BITS)), dtype=np.int64)
    v3 = sum(map(len, round_trip(planes, table)))
    v4 = sum(map(len, round_trip(planes, table, cx.AdaptiveContextCoder)))
    assert v3 >= 0.99 * planes.size / 8 and v4 < 0.8 * v3  # entropy of 0.85: 0.61 bits per bit
    # the delta it learned is a positive bias for every channel, and bounded
    coder = cx.AdaptiveContextCoder(16, 16, BITS, table)
    coder.encode(planes[0])
    assert (coder.delta[:, 3 * BITS + 3:].sum(axis=1) > 0).all() and np.abs(coder.delta).max() <= cx.DELTA_LIMIT


# ----------------------------------------------------------------------------------------- with the codec


@pytest.fixture(scope="module")
def fitted(one_thread):
    model = make_model()
    images = np.stack([make_image(64, 64, seed=s) for s in range(24)])
    info = cx.fit_model(model, images)
    assert info["patches"] == 24 and len(info["fit_bits_per_bit"]) == CFG.iterations
    return model


def test_an_unfitted_model_keeps_its_fingerprint_and_writes_v2():
    model = make_model()
    assert not model.context.any()
    state = {k: v for k, v in model.state_dict().items() if k != "context"}  # a model file from before v3
    old = make_model(seed=5)
    old.load_state_dict(state)
    assert model_fingerprint(old) == model_fingerprint(model)
    codec = RNNCodec(model, tile=0)
    assert codec.context_table is None and parse(codec.compress(make_image(32, 48), 2))[0].version == 2
    with pytest.raises(CodecError, match="no fitted context model"):
        codec.compress(make_image(32, 48), 2, version=3)


def test_fitted_model_writes_v5_that_decodes_and_truncates(fitted, tmp_path):
    codec = RNNCodec(fitted, tile=32)
    img = make_image(37, 53, seed=3)
    data = codec.compress(img, 4)
    assert parse(data)[0].version == 5
    np.testing.assert_array_equal(codec.decompress(data), codec.reconstruct(img, 4))
    for k in (1, 2, 3):
        assert truncate(data, k) == codec.compress(img, k)  # truncation equals fewer iterations
        np.testing.assert_array_equal(codec.decompress(data, k), codec.reconstruct(img, k))
    for version in (1, 2, 3, 4):  # the same model still writes and reads its older versions
        older = codec.compress(img, 4, version=version)
        assert parse(older)[0].version == version
        np.testing.assert_array_equal(codec.decompress(older), codec.decompress(data))
    # the table travels in the model file and is in the fingerprint; on its 1/64 grid float16 holds it exactly
    assert torch.equal(fitted.context.half().float(), fitted.context)
    save_model(fitted, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert torch.equal(loaded.context, fitted.context)
    assert model_fingerprint(loaded) == codec.fingerprint != model_fingerprint(make_model())
    np.testing.assert_array_equal(RNNCodec(loaded, tile=32).decompress(data), codec.decompress(data))


def test_a_model_with_a_table_from_before_v5_loads_and_writes_v4(fitted, tmp_path):
    """A model file whose context table is version 4's width (every release before version 5) loads as it is,
    keeps its fingerprint, writes version 4 by default, and refuses to write or read version 5."""
    state = fitted.state_dict()
    state["context"] = state["context"][:, :, :cx.n_features(CFG.bits)].clone()
    old = make_model(seed=5)
    old.load_state_dict(state)
    assert old.context.shape == state["context"].shape and torch.equal(old.context, state["context"])
    save_model(old, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt")
    assert model_fingerprint(loaded) == model_fingerprint(old) != model_fingerprint(fitted)
    codec = RNNCodec(loaded, tile=32)
    img = make_image(37, 53, seed=3)
    data = codec.compress(img, 3)
    assert parse(data)[0].version == 4
    np.testing.assert_array_equal(codec.decompress(data), codec.reconstruct(img, 3))
    with pytest.raises(CodecError, match="from before version 5"):
        codec.compress(img, 3, version=5)
    with pytest.raises(BitstreamError, match="needs a version-5 context model"):
        codec.decompress(forge(codec, {"version": 5}, [bytes(16)]))
    cx.fit_model(loaded, np.stack([make_image(64, 64, seed=s) for s in range(8)]))  # a refit makes it version 5
    assert cx.table_version(cx.to_table(loaded.context), CFG.bits) == 5
    assert parse(RNNCodec(loaded, tile=32).compress(img, 2))[0].version == 5


@pytest.mark.parametrize("version", [3, 4, 5])
def test_a_table_version_file_for_a_model_without_a_table_is_refused(version):
    codec = RNNCodec(make_model(), tile=32)  # unfitted: its fingerprint, but a version-3/4 header
    with pytest.raises(BitstreamError, match=f"version {version} needs the model's context model"):
        codec.decompress(forge(codec, {"version": version}, [bytes(16)]))


@pytest.mark.parametrize("version", [3, 4, 5])
def test_corrupt_table_version_payload_is_a_bitstream_error(fitted, version):
    codec = RNNCodec(fitted, tile=32)
    with pytest.raises(BitstreamError, match="iteration 1"):
        codec.decompress(forge(codec, {"version": version}, [b"\xff" * 8]))


def test_v3_coded_bytes_are_pinned():
    """The v3 bytes of fixed planes under a fixed table (golden SHA-256): written files must keep decoding, so
    a change to the features, the logistic table or the coding order shows here."""
    import hashlib

    digest = hashlib.sha256()
    for shape, seed in (((5, 7), 0), ((1, 1), 1), ((32, 48), 2)):
        planes = correlated_planes(4, *shape, seed=seed)
        for data in round_trip(planes, random_table(seed=seed)):
            digest.update(data)
    assert digest.hexdigest() == "be8d4cb40e9cebcc81e04af36614ce5a6827aaf89146159310e5db2007defab8"


def test_v5_coded_bytes_are_pinned():
    """The same for version 5 (a version-5 table, its learning steps included)."""
    import hashlib

    digest = hashlib.sha256()
    for shape, seed in (((5, 7), 0), ((1, 1), 1), ((32, 48), 2)):
        planes = correlated_planes(4, *shape, seed=seed)
        for data in round_trip(planes, random_table(seed=seed, version=5), cx.NeighbourContextCoder):
            digest.update(data)
    assert digest.hexdigest() == "429947c9d3504fccafd7ac3a04b6597ea639bae61c900bfa6104b848c4a87eac"


def test_v4_coded_bytes_are_pinned():
    """The same for version 4 (its learning steps included)."""
    import hashlib

    digest = hashlib.sha256()
    for shape, seed in (((5, 7), 0), ((1, 1), 1), ((32, 48), 2)):
        planes = correlated_planes(4, *shape, seed=seed)
        for data in round_trip(planes, random_table(seed=seed), cx.AdaptiveContextCoder):
            digest.update(data)
    assert digest.hexdigest() == "0484f749e98c6f90bafbe47250c00d229dbc1c87aa4dd0cf58592c28f5d39169"
