"""Lossless entropy coding of the codec's bit planes: an adaptive context model and a range coder.

Each iteration of an image yields a plane of bits, ``(Hb, Wb, bits)``: one bit per code channel per
16x16 block. :class:`PlaneCoder` codes such planes one after another (iteration 1, 2, ...) with the
range coder of the maintained ``constriction`` library (``constriction.stream.queue``, with its
``Bernoulli(perfect=False)`` model; the version is pinned, as the coded bytes depend on how it
quantises probabilities); this module only supplies the probabilities. The model adapts as it goes, identically on both sides, so nothing
but the coded bits is stored, and a plane can be decoded as soon as the planes before it are (the
``.rnnc`` format's progressive property).

Coding order and contexts. Within a plane, channel by channel; within a channel, the blocks in four
interleaved phases of the 2x2 lattice: (even row, even column), (odd, odd), (even, odd), (odd, even).
All bits of one (channel, phase) group are coded in one vectorised call with probabilities that
depend only on bits already coded:

- the phase class: phase 0; phase 1; phases 2-3;
- a neighbourhood level 0..4 (``round(4 * ones / neighbours)``, 5 when there are none): phase 0
  counts the 5-point cross (the block and its 4 neighbours) in the previous channel of this plane;
  phase 1 the 4 diagonal neighbours in this channel (all phase 0); phases 2-3 the 4 direct neighbours
  in this channel (phases 0 and 1);
- the same block's bit in the previous channel (or "none" for channel 0);
- the same bit in the previous plane, i.e. the previous iteration (or "none" for the first);

so 3 x 6 x 3 x 3 = 162 contexts per channel. Each (channel, context) keeps integer counts of the zeros and
ones coded so far, shared across the planes of an image and updated after each group; a count
pair is halved when it passes ``COUNT_LIMIT``, and all counts are divided by ``2 ** DECAY_SHIFT`` at
the start of every new plane (the statistics of a channel change from iteration to iteration). A
table of the same contexts over all channels together serves as each channel's prior: the
probability of a one is ``(n1 + w q) / (n + w)`` with the channel's counts n1 of n, the all-channel
Krichevsky-Trofimov estimate q = (N1 + 1/2) / (N + 1) and w = ``PRIOR_WEIGHT``, all in integer
arithmetic in units of 2**-16, so encoder and decoder agree on every machine.
"""

from __future__ import annotations

import numpy as np

COUNT_LIMIT = 1023  # a (channel, context) count pair is halved when its total passes this
SHARED_LIMIT = 4095  # the same for the table of all channels together
PRIOR_WEIGHT = 4  # observations the all-channel estimate is worth as a channel's prior
DECAY_SHIFT = 1  # counts are halved (rounding up) at the start of each plane
PROB_BITS = 16  # probabilities are multiples of 2**-16, never 0 or 1
_NLEVEL, _NPREV = 6, 3
NCONTEXTS = 3 * _NLEVEL * _NPREV * _NPREV  # per channel


class EntropyError(ValueError):
    """The coded bytes are not a valid coding of a plane of the expected shape."""


def constriction():
    """The ``constriction`` package, imported when first coding (a clear error when it is missing)."""
    try:
        import constriction
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError(f"the .rnnc v2 entropy coder needs the 'constriction' package ({err})") from None
    return constriction


class Lattice:
    """The coding order's geometry for planes of (height_blocks, width_blocks): the four phases'
    positions and each position's neighbours, as flat indices into a plane with a one-block zero border."""

    def __init__(self, h: int, w: int):
        if h < 1 or w < 1:
            raise ValueError(f"empty plane shape ({h}, {w})")
        self.h, self.w = h, w
        yy, xx = np.mgrid[0:h, 0:w]
        phase = np.where((yy % 2 == 0) & (xx % 2 == 0), 0,
                         np.where((yy % 2 == 1) & (xx % 2 == 1), 1, np.where(yy % 2 == 0, 2, 3)))
        self.phase = phase.reshape(-1)
        self.where = [np.flatnonzero(self.phase == p) for p in range(4)]
        self.padded = (np.arange(h * w) // w + 1) * (w + 2) + np.arange(h * w) % w + 1  # position -> padded index
        step = w + 2
        self.diagonal = self.padded[:, None] + np.array([-step - 1, -step + 1, step - 1, step + 1])
        self.direct = self.padded[:, None] + np.array([-step, step, -1, 1])

    def pad(self, plane: np.ndarray) -> np.ndarray:
        """(h*w, C) -> (C, (h+2)*(w+2)) with a zero border."""
        out = np.zeros((plane.shape[1], (self.h + 2) * (self.w + 2)), dtype=np.int64)
        out[:, self.padded] = plane.T
        return out


class BitPlaneCoder:
    """Codes the bit planes ``shape`` = (Hb, Wb, bits) of one image, in order, with constriction's range
    coder and the probabilities of a subclass's model; one instance per image and direction.

    ``encode(plane)`` returns the range-coded bytes of the next plane; ``decode(data)`` returns the
    next plane from such bytes; ``observe(plane)`` updates the model with a plane stored otherwise
    (raw), exactly as coding it would. Subclasses implement ``_walk(plane, coder)``: one plane through
    the model, coded (``coder`` an encoder), decoded (``plane`` None, ``coder`` a decoder) or only
    learned from (``coder`` None), returning the plane.
    """

    shape: tuple[int, int, int]

    def _walk(self, plane: np.ndarray | None, coder) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def _code_group(coder, family, group: np.ndarray | None, probabilities) -> np.ndarray:
        """Encode ``group`` (0/1 ints) with P(1) = ``probabilities``, or (``group`` None) decode as many
        bits; a decoder's invalid data is an :class:`EntropyError`."""
        if group is not None:
            coder.encode(group, family, probabilities)
            return group
        try:
            group = np.asarray(coder.decode(family, probabilities), dtype=np.int32)
        except Exception as err:  # noqa: BLE001 - constriction reports invalid data as AssertionError
            raise EntropyError(f"coded bits do not decode ({type(err).__name__})") from None
        if group.shape != np.shape(probabilities) or ((group != 0) & (group != 1)).any():
            raise EntropyError("coded bits do not decode to a plane")
        return group

    def _check_plane(self, plane: np.ndarray) -> np.ndarray:
        plane = np.asarray(plane)
        if plane.shape != self.shape:
            raise ValueError(f"plane shape {plane.shape}, expected {self.shape}")
        return plane.astype(bool)

    def encode(self, plane: np.ndarray) -> bytes:
        """Range-coded bytes of ``plane`` (a multiple of 4 bytes: little-endian 32-bit words)."""
        encoder = constriction().stream.queue.RangeEncoder()
        self._walk(self._check_plane(plane), encoder)
        return encoder.get_compressed().astype("<u4").tobytes()

    def decode(self, data: bytes) -> np.ndarray:
        """The next plane, (Hb, Wb, bits) bool, from bytes made by :meth:`encode`."""
        if len(data) % 4:
            raise EntropyError(f"coded length {len(data)} is not a multiple of 4 bytes")
        words = np.frombuffer(bytes(data), dtype="<u4").astype(np.uint32)
        decoder = constriction().stream.queue.RangeDecoder(words)
        plane = self._walk(None, decoder)
        if not decoder.maybe_exhausted():
            raise EntropyError("coded bits continue past the end of the plane")
        return plane

    def observe(self, plane: np.ndarray) -> None:
        """Learn from a plane that was stored rather than coded."""
        self._walk(self._check_plane(plane), None)


class PlaneCoder(BitPlaneCoder):
    """The version-2 model: adaptive counts per (channel, context), carried from plane to plane."""

    def __init__(self, height_blocks: int, width_blocks: int, bits: int):
        if height_blocks < 1 or width_blocks < 1 or bits < 1:
            raise ValueError(f"empty plane shape ({height_blocks}, {width_blocks}, {bits})")
        self.shape = (height_blocks, width_blocks, bits)
        lat = Lattice(height_blocks, width_blocks)
        self._where = lat.where
        self._padded_where = [lat.padded[wh] for wh in lat.where]
        # the neighbours each phase looks at (all already coded when the phase comes: the block itself and
        # its direct neighbours in the previous channel; diagonal; direct; direct), and how many of them
        # are inside the image
        cross = np.concatenate([lat.padded[:, None], lat.direct], axis=1)
        self._neighbours = [nb[wh] for nb, wh in zip((cross, lat.diagonal, lat.direct, lat.direct), lat.where)]
        inside = np.pad(np.ones((height_blocks, width_blocks), np.int64), 1).reshape(-1)
        self._avail = [inside[nb].sum(axis=1) for nb in self._neighbours]
        self.counts = np.zeros((bits, NCONTEXTS, 2), dtype=np.int64)
        self._last = None  # the previous plane, as ``cur`` below
        self.shared = np.zeros((NCONTEXTS, 2), dtype=np.int64)  # all channels together
        self.planes = 0

    # -- the model
    def _context(self, cur: np.ndarray, c: int, p: int) -> np.ndarray:
        """Context of every position of group (channel c, phase p), from the bits of ``cur`` (C, (h+2)(w+2),
        zero border) that precede the group."""
        n = self._avail[p]
        if p == 0 and c == 0:
            level = np.full(n.size, _NLEVEL - 1, dtype=np.int64)
        else:
            ones = cur[c - 1 if p == 0 else c][self._neighbours[p]].sum(axis=1, dtype=np.int64)
            level = np.where(n > 0, (ones * 4 + n // 2) // np.maximum(n, 1), _NLEVEL - 1)
        prev_channel = 2 if c == 0 else cur[c - 1][self._padded_where[p]].astype(np.int64)
        prev_plane = 2 if self._last is None else self._last[c][self._padded_where[p]].astype(np.int64)
        return (((min(p, 2) * _NLEVEL + level) * _NPREV + prev_channel) * _NPREV) + prev_plane

    @staticmethod
    def _kt(counts: np.ndarray) -> np.ndarray:
        """Krichevsky-Trofimov estimate of P(1), (n1 + 1/2) / (n + 1), in units of 2**-16."""
        return ((2 * counts[..., 1] + 1) << PROB_BITS) // (2 * counts.sum(axis=-1) + 2)

    def _probabilities(self, c: int, ctx: np.ndarray) -> np.ndarray:
        """P(1) for each context of channel c: the channel's counts, with the estimate of all channels
        together as a prior worth ``PRIOR_WEIGHT`` observations (so a context new to this channel
        starts from what the other channels taught)."""
        shared = self._kt(self.shared)
        n0, n1 = self.counts[c, :, 0], self.counts[c, :, 1]
        q = ((n1 << PROB_BITS) + PRIOR_WEIGHT * shared) // (n0 + n1 + PRIOR_WEIGHT)
        q = np.clip(q, 1, (1 << PROB_BITS) - 1)
        return (q.astype(np.float64) / (1 << PROB_BITS))[ctx]  # exact in float64

    def _update(self, c: int, ctx: np.ndarray, bits: np.ndarray) -> None:
        seen = np.bincount(ctx * 2 + bits, minlength=NCONTEXTS * 2).reshape(NCONTEXTS, 2)
        for table, limit in ((self.counts[c], COUNT_LIMIT), (self.shared, SHARED_LIMIT)):
            table += seen
            big = table.sum(axis=1) > limit
            if big.any():
                table[big] = (table[big] + 1) >> 1

    def _walk(self, plane: np.ndarray | None, coder) -> np.ndarray:
        """One plane through the model: code it (``coder`` an encoder), decode it (``plane`` None,
        ``coder`` a decoder), or only learn from it (``coder`` None)."""
        h, w, bits = self.shape
        if self.planes:
            self.counts = (self.counts + (1 << DECAY_SHIFT) - 1) >> DECAY_SHIFT
            self.shared = (self.shared + (1 << DECAY_SHIFT) - 1) >> DECAY_SHIFT
        cur = np.zeros((bits, (h + 2) * (w + 2)), dtype=np.int8)  # channel-major, zero border
        src = None if plane is None else np.ascontiguousarray(plane.transpose(2, 0, 1)).reshape(bits, -1)
        family = constriction().stream.model.Bernoulli(perfect=False) if coder is not None else None
        for c in range(bits):
            for p in range(4):
                ctx = self._context(cur, c, p)
                group = None if plane is None else src[c, self._where[p]].astype(np.int32)
                if coder is not None:
                    group = self._code_group(coder, family, group, self._probabilities(c, ctx))
                cur[c, self._padded_where[p]] = group
                self._update(c, ctx, group.astype(np.int64))
        self.planes += 1
        self._last = cur
        return cur.reshape(bits, h + 2, w + 2)[:, 1:-1, 1:-1].transpose(1, 2, 0).astype(bool)
