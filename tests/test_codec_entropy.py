"""The entropy coder of .rnnc v2 (pipeline.compression.entropy): lossless, adaptive, and strict on bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.compression.entropy import EntropyError, PlaneCoder


def round_trip(planes: list[np.ndarray]) -> list[bytes]:
    """Code the planes in order with one coder, decode them with another; assert equality."""
    shape = planes[0].shape
    enc, dec = PlaneCoder(*shape), PlaneCoder(*shape)
    coded = [enc.encode(p) for p in planes]
    for plane, data in zip(planes, coded):
        assert len(data) % 4 == 0
        np.testing.assert_array_equal(dec.decode(data), plane)
    return coded


def binary_entropy(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 32), (3, 4, 32), (5, 7, 8), (32, 48, 32), (2, 33, 3)])
def test_random_planes_round_trip(shape):
    rng = np.random.default_rng(sum(shape))
    planes = [rng.random(shape) < p for p in (0.5, 0.1, 0.9, 0.5)]
    coded = round_trip(planes)
    n = int(np.prod(shape))
    if n >= 1000:  # uniform bits cost about one bit each: the coder does not expand them much
        assert len(coded[0]) * 8 <= 1.05 * n + 64


@pytest.mark.parametrize("value", [False, True])
def test_constant_planes_round_trip_and_shrink(value):
    shape = (32, 48, 32)
    planes = [np.full(shape, value)] * 3
    coded = round_trip(planes)
    raw = np.prod(shape) / 8
    assert len(coded[0]) < 0.05 * raw  # the model learns a constant plane within the first one
    assert len(coded[2]) <= len(coded[0])


def test_biased_bits_cost_close_to_their_entropy():
    """i.i.d. bits with P(1) = 0.1: the coded size must approach n H(0.1) (0.469 bits a bit), an
    independent bound computed from the source, not from the coder."""
    rng = np.random.default_rng(1)
    shape = (32, 48, 32)
    planes = [rng.random(shape) < 0.1 for _ in range(4)]
    coded = round_trip(planes)
    n = np.prod(shape)
    bits = 8 * sum(len(c) for c in coded[1:])  # after the first plane the counts have settled
    assert bits <= 1.06 * 3 * n * binary_entropy(0.1)
    assert bits >= 0.95 * 3 * n * binary_entropy(0.1)  # nothing can beat the entropy by much


def test_spatial_context_beats_the_marginal():
    """Blobs: bits equal to their neighbours. The same marginal (half ones) coded i.i.d. would cost
    about one bit each; the neighbourhood contexts must do far better."""
    rng = np.random.default_rng(2)
    shape = (32, 48, 32)
    coarse = rng.random((8, 12, 32)) < 0.5
    plane = np.repeat(np.repeat(coarse, 4, axis=0), 4, axis=1)  # 4x4 blocks of equal bits per channel
    assert 0.4 < plane.mean() < 0.6
    coded = round_trip([plane, plane])
    assert 8 * len(coded[1]) < 0.5 * np.prod(shape)


def test_observe_keeps_encoder_and_decoder_in_step():
    """A plane stored raw is learned with observe(); the next coded plane then decodes."""
    rng = np.random.default_rng(4)
    shape = (6, 9, 32)
    planes = [rng.random(shape) < 0.2 for _ in range(3)]
    enc, dec = PlaneCoder(*shape), PlaneCoder(*shape)
    coded = [enc.encode(p) for p in planes]
    dec.observe(planes[0])  # as if plane 1 had been stored raw
    np.testing.assert_array_equal(dec.decode(coded[1]), planes[1])
    np.testing.assert_array_equal(dec.decode(coded[2]), planes[2])
    fresh = PlaneCoder(*shape)  # without plane 1 the model differs: plane 2's coding is not plane 1's
    assert coded[1] != fresh.encode(planes[1])


def test_bad_codings_raise_entropy_error():
    shape = (4, 4, 32)
    data = PlaneCoder(*shape).encode(np.ones(shape, dtype=bool))
    with pytest.raises(EntropyError, match="multiple of 4"):
        PlaneCoder(*shape).decode(data + b"\0")
    with pytest.raises(EntropyError):
        PlaneCoder(*shape).decode(data + b"\xff" * 8)  # words left over after the plane
    rng = np.random.default_rng(5)
    refused = 0
    for _ in range(50):
        garbage = rng.integers(0, 256, 4 * int(rng.integers(1, 12)), dtype=np.uint8).tobytes()
        try:
            plane = PlaneCoder(*shape).decode(garbage)
            assert plane.shape == shape and plane.dtype == bool
        except EntropyError:
            refused += 1
    assert refused > 0
    with pytest.raises(ValueError, match="shape"):
        PlaneCoder(*shape).encode(np.ones((4, 4, 16), dtype=bool))


def test_v2_coded_bytes_are_pinned():
    """The .rnnc v2 bytes of a fixed sequence of planes (golden SHA-256, from the coder as first released):
    files already written must keep decoding, so any change to the model or coding order shows here."""
    import hashlib

    rng = np.random.default_rng(1)
    digest = hashlib.sha256()
    for shape in [(1, 1, 1), (1, 5, 3), (7, 1, 4), (32, 48, 32), (5, 6, 8), (2, 2, 32)]:
        enc, dec = PlaneCoder(*shape), PlaneCoder(*shape)
        base = rng.random(shape) < 0.3
        for t in range(4):
            plane = base ^ (rng.random(shape) < 0.1 * (t + 1))
            if t == 1:  # a plane stored raw: both sides only learn from it
                enc.observe(plane)
                dec.observe(plane)
                continue
            data = enc.encode(plane)
            np.testing.assert_array_equal(dec.decode(data), plane)
            digest.update(data)
    assert digest.hexdigest() == "ad56acda2a6b0cd2745ae25e08e3671613eb68a5f0ccfc40f5f8124be1b4952e"
