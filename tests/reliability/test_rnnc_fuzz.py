"""Hostile .rnnc files: 10,000 mutated and random files through the decoder in-process, and a few
hundred through the ``rnnc`` command line. Each must decode to an image within the pixel limit or
end with the codec's own one-line error: no other exception, no traceback, no decode slower than a
bound, no allocation past a bound. Half of the mutants get their checksums recomputed, so the checks
behind the CRCs (header ranges, payload lengths, the entropy decoder) are reached, not only the CRCs.
"""

from __future__ import annotations

import binascii
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.compression.cli import main as rnnc_main
from pipeline.compression.codec import RNNCodec
from pipeline.compression.errors import CodecError
from pipeline.compression.modelfile import save_model
from pipeline.compression.rnncfile import HEADER_SIZE
from tests.test_codec_format import make_image, make_model

REPO = Path(__file__).resolve().parents[2]
MAX_PIXELS = 64 * 64  # the decoder's pixel limit here: every accepted file decodes quickly and small
SECONDS_BOUND = 2.0  # CPU seconds no single decode may exceed (a tiny model on at most 4096 pixels takes ms);
# CPU time, not wall time, so that a busy machine does not fail the test
ALLOC_BOUND = 8 << 20  # bytes traced (Python and numpy) at the peak of one decode

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(900)]


def fix_crcs(buf: bytearray) -> bytearray:
    """Recompute every checksum the mutant still has a place for, so the decoder looks past them."""
    if len(buf) < HEADER_SIZE:
        return buf
    buf[26:30] = struct.pack("<I", binascii.crc32(bytes(buf[:26])))
    pos = HEADER_SIZE
    if buf[4] == 2:
        while pos + 4 <= len(buf):
            (n,) = struct.unpack_from("<I", buf, pos)
            end = pos + 4 + n
            if end + 4 > len(buf):
                break
            buf[end:end + 4] = struct.pack("<I", binascii.crc32(bytes(buf[pos:end])))
            pos = end + 4
    elif buf[4] == 1:
        bits, height, width = buf[5], *struct.unpack_from("<II", buf, 17)
        raw = (bits * -(-height // 16) * -(-width // 16) + 7) // 8
        while raw and pos + raw + 4 <= len(buf):
            buf[pos + raw: pos + raw + 4] = struct.pack("<I", binascii.crc32(bytes(buf[pos:pos + raw])))
            pos += raw + 4
    return buf


def mutate(rng: np.random.Generator, seeds: list[bytes]) -> bytes:
    """One hostile file: a seeded mutation of a valid file, or random bytes."""
    buf = bytearray(seeds[int(rng.integers(len(seeds)))])
    op = int(rng.integers(10))
    if op == 0:  # flip a few bits anywhere
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(len(buf)))
            buf[i] ^= 1 << int(rng.integers(8))
    elif op == 1:  # overwrite a header field with an extreme or random value
        offset, size = [(4, 1), (5, 1), (6, 1), (7, 2), (17, 4), (21, 4), (25, 1)][int(rng.integers(7))]
        choices = [0, 1, 15, 16, 17, 2048, 2064, 65535, (1 << (8 * size)) - 1, int(rng.integers(1 << (8 * size)))]
        value = choices[int(rng.integers(len(choices)))] % (1 << (8 * size))
        buf[offset:offset + size] = value.to_bytes(size, "little")
    elif op == 2:  # truncate
        del buf[int(rng.integers(len(buf) + 1)):]
    elif op == 3:  # append junk
        buf += rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif op == 4:  # a record's length field
        if len(buf) >= HEADER_SIZE + 4:
            value = [0, 1, 3, 4, 47, 48, 49, 0xFFFFFFFF, int(rng.integers(1 << 32))][int(rng.integers(9))]
            buf[HEADER_SIZE:HEADER_SIZE + 4] = struct.pack("<I", value)
    elif op == 5:  # random bytes over a stretch of the payload
        if len(buf) > HEADER_SIZE:
            a = int(rng.integers(HEADER_SIZE, len(buf)))
            b = min(len(buf), a + int(rng.integers(1, 32)))
            buf[a:b] = rng.integers(0, 256, b - a, dtype=np.uint8).tobytes()
    elif op == 6:  # splice two files
        other = seeds[int(rng.integers(len(seeds)))]
        cut = int(rng.integers(len(buf) + 1))
        buf = buf[:cut] + bytearray(other[int(rng.integers(len(other) + 1)):])
    elif op == 7:  # delete or duplicate a stretch
        a = int(rng.integers(len(buf) + 1))
        b = min(len(buf), a + int(rng.integers(1, 16)))
        buf = buf[:a] + buf[b:] if rng.random() < 0.5 else buf[:b] + buf[a:b] + buf[b:]
    elif op == 8:  # random bytes, some with the magic
        n = int(rng.integers(0, 200))
        buf = bytearray(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        if rng.random() < 0.5:
            buf[:5] = b"RNNC" + bytes([int(rng.integers(1, 4))])
    else:  # a plausible header (random size, tile, iterations) over a random payload
        head = struct.pack("<4sBBBH8sIIB", b"RNNC", int(rng.integers(1, 5)), 32, 16,
                           int(rng.choice([0, 16, 32, 768, 2048])), seeds[0][9:17], int(rng.integers(1, 80)),
                           int(rng.integers(1, 80)), int(rng.integers(1, 6)))
        buf = bytearray(head + bytes(4)) + bytearray(rng.integers(0, 256, int(rng.integers(0, 120)),
                                                                  dtype=np.uint8).tobytes())
    if rng.random() < 0.5:
        buf = fix_crcs(buf)
    return bytes(buf)


@pytest.fixture(scope="module")
def codec(one_thread) -> RNNCodec:
    from pipeline.compression.context import fit_model

    model = make_model()
    fit_model(model, np.stack([make_image(48, 48, seed) for seed in range(16)]))  # writes v5, reads v1-v5
    return RNNCodec(model, tile=32, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def seeds(codec) -> list[bytes]:
    """Valid files: every version, several sizes and iteration counts, a compressible (flat) image."""
    files = []
    for (h, w), k, seed in [((16, 16), 1, 0), ((37, 53), 3, 1), ((33, 20), 4, 2), ((48, 64), 2, 3)]:
        img = make_image(h, w, seed)
        files += [codec.compress(img, k)] + [codec.compress(img, k, version=v) for v in (1, 2, 3, 4)]
    flat = np.full((64, 64, 3), 77, dtype=np.uint8)
    files += [codec.compress(flat, 4), codec.compress(flat, 4, version=2)]  # entropy-coded records
    return files


def check_decode(codec: RNNCodec, data: bytes) -> str:
    """'ok' or 'refused'; anything else (another exception, a bad image, too slow) fails the test."""
    t0 = time.process_time()
    try:
        img = codec.decompress(data)
    except CodecError as err:
        text = str(err)
        assert text and "\n" not in text, repr(text)
        outcome = "refused"
    else:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.shape[0] * img.shape[1] <= MAX_PIXELS
        outcome = "ok"
    assert time.process_time() - t0 < SECONDS_BOUND
    return outcome


def test_ten_thousand_hostile_files_in_process(codec, seeds):
    rng = np.random.default_rng(20261129)
    for data in seeds:  # the seeds themselves decode
        assert check_decode(codec, data) == "ok"
    outcomes = {"ok": 0, "refused": 0}
    messages: set[str] = set()
    peak = 0
    tracemalloc.start()
    try:
        for i in range(10_000):
            data = mutate(rng, seeds)
            tracemalloc.reset_peak()
            try:
                outcome = check_decode(codec, data)
            except AssertionError:
                raise
            except Exception as err:  # noqa: BLE001 - the point: nothing but CodecError may escape
                pytest.fail(f"case {i}: {type(err).__name__}: {err} (file {data[:64].hex()}...)")
            peak = max(peak, tracemalloc.get_traced_memory()[1])
            outcomes[outcome] += 1
            if outcome == "refused":
                try:
                    codec.decompress(data)
                except CodecError as err:
                    messages.add(str(err).split(":")[0].split("(")[0].strip())
    finally:
        tracemalloc.stop()
    assert peak < ALLOC_BOUND, f"a decode traced {peak} bytes at its peak"
    assert outcomes["ok"] > 100 and outcomes["refused"] > 5000, outcomes  # both paths well exercised
    # the checks behind the CRCs were reached, not only the CRCs
    joined = " | ".join(sorted(messages))
    for reached in ("invalid .rnnc header", "corrupt .rnnc file", "truncated .rnnc file", "not an .rnnc file"):
        assert reached in joined, joined


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, codec) -> Path:
    path = tmp_path_factory.mktemp("fuzz_model") / "model.pt"
    save_model(codec.model, path)
    return path


def test_hundreds_of_hostile_files_through_the_command_line(tmp_path, seeds, model_path, capsys):
    rng = np.random.default_rng(7)
    src = tmp_path / "in.rnnc"
    out = tmp_path / "out.png"
    codes = {0: 0, 1: 0}
    for i in range(300):
        src.write_bytes(mutate(rng, seeds))
        capsys.readouterr()
        rc = rnnc_main(["decompress", str(src), str(out), "--model", str(model_path), "--max-pixels", str(MAX_PIXELS)])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note: ")]
        if rc == 0:
            assert lines == [], err
            with Image.open(out) as im:
                assert im.size[0] * im.size[1] <= MAX_PIXELS
            out.unlink()
        else:
            assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), (i, err)
            assert not out.exists()
        assert "Traceback" not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.rnnc"], i  # no temporary left behind
        codes[min(rc, 1)] += 1
    assert codes[0] > 0 and codes[1] > 0, codes


def test_hostile_files_through_the_installed_command_in_subprocesses(tmp_path, seeds, model_path):
    """A few through a real process: exit status and stderr as a user sees them."""
    rng = np.random.default_rng(11)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    files = [mutate(rng, seeds) for _ in range(4)] + [b"RNNC\x02" + bytes(40)]
    for i, data in enumerate(files):
        src = tmp_path / f"f{i}.rnnc"
        src.write_bytes(data)
        proc = subprocess.run([sys.executable, "-m", "pipeline.compression.cli", "decompress", str(src),
                               str(tmp_path / f"o{i}.png"), "--model", str(model_path), "--max-pixels", str(MAX_PIXELS)],
                              capture_output=True, text=True, timeout=120, env=env)
        assert "Traceback" not in proc.stderr
        if proc.returncode:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
            assert not (tmp_path / f"o{i}.png").exists()
