"""The .rnnc v3, v4 and v5 entropy models: a context model learned with the codec (v4: and corrected as it
codes by what it learns of the image, :class:`AdaptiveContextCoder`; v5: the same with the neighbours' channels
as well), and a range coder.

The codec's bits are nearly incompressible one by one (after the first iteration a trained model
uses each bit at close to 1 bit of entropy, and the adaptive model of version 2 saves only 0.3-3.5 %
per iteration), but they are far from independent of each other: at the same 16x16 block, the 32
bits of one iteration are correlated with each other and with the bits of the iterations before. A
logistic model over those bits, fitted on training images' codes once the codec is trained and
stored with its weights (:func:`fit`), predicts each bit from

- the same block's bits of the previous iteration (``bits`` features) and of the one before that
  (``bits``), and this iteration's channels already coded at the block (``bits``, zero from the
  channel itself on);
- the sum of this channel's already-coded neighbours in this iteration: the 4 diagonal ones for the
  blocks of phase 1, the 4 direct ones for phases 2-3 (two features; phase 0 has none);
- the sum of this channel's 4 direct neighbours in the previous iteration;
- a bias per phase class (0; 1; 2-3);

so ``3 * bits + 6`` features per (iteration, channel), each -1, 0 or +1 (bits as -1/+1, absent as 0)
or a small sum. Version 5 adds ``bits`` more at the end of the row: for each channel already coded in this
iteration (those before this one: complete over the whole plane), the sum of its bits at the 4 direct
neighbours -- the spatial context across channels. Measured before building it (the shipped ConvGRU, 12
Kodak images' codes fitted, 12 scored): 4.2 / 1.7 / 0.5 % fewer bits at iterations 1 / 2 / 3
(``docs/experiments.md``). A version-5 table (``4 * bits + 6`` wide) serves versions 3 and 4 too, by its
first ``3 * bits + 6`` columns. Blocks are coded channel by channel and, within a channel, in the four phases of
version 2's 2x2 lattice ((even, even), (odd, odd), (even, odd), (odd, even)), one vectorised range
coder call per (channel, phase) group, with ``constriction``'s range coder (as version 2).

Exactness: the weights are stored on a grid of 1/64 within +-16 (exact in float16 and float32), the
logit is an integer sum (units of 1/64), and P(1) is read from a table of the logistic function at
multiples of 1/16 within +-12, computed at import with :mod:`decimal` (correctly rounded on every
platform) in units of 2**-16, so encoder and decoder agree on every machine. The weights are part of
the model (its ``context`` buffer, covered by the model fingerprint); a model whose table is all zeros
(never fitted) writes version 2 instead.
"""

from __future__ import annotations

import decimal
import math

import numpy as np

from pipeline.compression.entropy import BitPlaneCoder, Lattice, constriction

PROB_BITS = 16
WEIGHT_SCALE = 64  # weights are multiples of 1/64 ...
WEIGHT_LIMIT = 16.0  # ... within +-16 (so float16 stores them exactly)
LUT_STEP = 4  # logit units (1/64) per table step: the table is at multiples of 1/16
LUT_HALF = 192  # table entries either side of 0: logits within +-12
EXTRA = 6  # features after the 3 * bits bit features: nb_diagonal, nb_direct, prev_nb_direct, 3 biases
NEWEST = 5  # the table version a fit makes (its width: n_features(bits, 5))
BLOCK = 16  # pixels per code cell side: the model's (which imports this module; a test checks they agree)


def n_features(bits: int, version: int = 4) -> int:
    """Features per (iteration, channel) of a version-3/4 table, or of a version-5 one (``bits`` more)."""
    return 3 * bits + EXTRA + (bits if version >= 5 else 0)


def table_version(table: np.ndarray, bits: int) -> int:
    """The newest .rnnc version a table (iterations, bits, F) serves: 5 if F is the version-5 width, 4 if the
    version-3/4 one; ValueError for any other shape."""
    shape = np.shape(table)
    for version in (5, 4):
        if len(shape) == 3 and shape[0] >= 1 and shape[1:] == (bits, n_features(bits, version)):
            return version
    raise ValueError(f"context table of shape {shape} does not fit {bits} bits")


def _logistic_table() -> np.ndarray:
    """P(1) at logit j/16, j = -192..192, in units of 2**-16, clipped to 1..2**16-1 (exact on every platform)."""
    ctx = decimal.Context(prec=40)
    out = []
    for j in range(-LUT_HALF, LUT_HALF + 1):
        p = ctx.divide(1, ctx.add(1, ctx.exp(decimal.Decimal(-j) / 16)))
        q = int((p * (1 << PROB_BITS)).to_integral_value(rounding=decimal.ROUND_HALF_EVEN))
        out.append(min(max(q, 1), (1 << PROB_BITS) - 1))
    return np.array(out, dtype=np.int64)


LUT = _logistic_table()


def quantize(weights: np.ndarray) -> np.ndarray:
    """Float weights -> integers in units of 1/64, clipped to +-16 (what the model stores, times 64)."""
    lim = int(WEIGHT_LIMIT * WEIGHT_SCALE)
    return np.clip(np.round(np.asarray(weights, dtype=np.float64) * WEIGHT_SCALE), -lim, lim).astype(np.int64)


def probability(logit64: np.ndarray) -> np.ndarray:
    """Integer logits (units of 1/64) -> P(1) as float64 multiples of 2**-16 (exact)."""
    idx = np.clip(np.floor_divide(logit64 + LUT_STEP // 2, LUT_STEP), -LUT_HALF, LUT_HALF) + LUT_HALF
    return LUT[idx].astype(np.float64) / (1 << PROB_BITS)


def plane_features(lattice: Lattice, cur: np.ndarray, prev: np.ndarray | None, prev2: np.ndarray | None):
    """The features of every bit of a plane, from the whole plane (for fitting; the coder computes the
    same values from the bits coded so far). cur, prev, prev2: (h*w, bits) in {-1, +1} (prev/prev2
    None before the second/third iteration). Returns (shared (P, 4*bits): prev, prev2, cur and cur's
    direct-neighbour sums (version 5) -- the coder masks the last two to the channels before each one;
    local (P, bits, 3): nb_diagonal, nb_direct, prev_nb_direct, each already zero where the phase does
    not use it; phase class (P,))."""
    p, bits = cur.shape
    zeros = np.zeros_like(cur)
    prev = zeros if prev is None else prev
    prev2 = zeros if prev2 is None else prev2
    padded, padded_prev = lattice.pad(cur), lattice.pad(prev)
    diag = padded[:, lattice.diagonal].sum(axis=2).T  # (P, bits)
    direct = padded[:, lattice.direct].sum(axis=2).T
    shared = np.concatenate([prev, prev2, cur, direct], axis=1)
    prev_direct = padded_prev[:, lattice.direct].sum(axis=2).T
    ph = lattice.phase[:, None]
    local = np.stack([np.where(ph == 1, diag, 0), np.where(ph >= 2, direct, 0), prev_direct], axis=2)
    return shared, local, np.minimum(lattice.phase, 2)


class ContextCoder(BitPlaneCoder):
    """Codes the bit planes of one image with a fitted table, in order (iteration 1, 2, ...); one
    instance per image and direction (encode, decode, observe: :class:`BitPlaneCoder`). ``table``:
    (iterations, bits, 3*bits+6) integer weights in units of 1/64 (:func:`quantize`; a version-5 table's
    first columns); planes past the table's iterations use its last row."""

    version = 3

    def __init__(self, height_blocks: int, width_blocks: int, bits: int, table: np.ndarray):
        if bits < 1:
            raise ValueError(f"empty plane shape ({height_blocks}, {width_blocks}, {bits})")
        table = np.asarray(table, dtype=np.int64)
        if table_version(table, bits) < self.version:
            raise ValueError(f"a version-{table_version(table, bits)} context table cannot code version {self.version}")
        self.table = table[:, :, :n_features(bits, self.version)]  # a wider table serves by its first columns
        self.shape = (height_blocks, width_blocks, bits)
        self.lattice = Lattice(height_blocks, width_blocks)
        self.history: list[np.ndarray] = []  # the last two planes, (P, bits) in {-1, +1}
        self.planes = 0

    def _end_plane(self, cur: np.ndarray) -> np.ndarray:
        """The plane just walked (``cur``: (bits, padded positions) in -1/+1) joins the history; returns it as
        (h, w, bits) bool."""
        plane_pm = cur[:, self.lattice.padded].T  # (P, bits) in {-1, +1}
        self.history = (self.history + [plane_pm])[-2:]
        self.planes += 1
        return (plane_pm > 0).reshape(self.shape)

    def _walk(self, plane: np.ndarray | None, coder) -> np.ndarray:
        h, w, bits = self.shape
        lat = self.lattice
        wt = self.table[min(self.planes, len(self.table) - 1)]  # (bits, F)
        prev = self.history[-1] if self.history else None
        prev2 = self.history[-2] if len(self.history) > 1 else None
        npos = h * w
        # the logit of every bit from the previous planes, then the channels' contributions as they come
        logit = np.zeros((npos, bits), dtype=np.int64)
        if prev is not None:
            logit += prev @ wt[:, :bits].T
            padded_prev = lat.pad(prev)
            logit += padded_prev[:, lat.direct].sum(axis=2).T * wt[:, 3 * bits + 2]
        if prev2 is not None:
            logit += prev2 @ wt[:, bits:2 * bits].T
        cls = np.minimum(lat.phase, 2)
        logit += wt[:, 3 * bits + 3 + cls].T  # (P, bits) bias of each position's phase class
        cur = np.zeros((bits, (h + 2) * (w + 2)), dtype=np.int64)  # -1/+1 coded so far, zero elsewhere
        src = None if plane is None else plane.reshape(npos, bits)
        family = constriction().stream.model.Bernoulli(perfect=False) if coder is not None else None
        for c in range(bits):
            for p in range(4):
                where = lat.where[p]
                z = logit[where, c]
                if p == 1:
                    z = z + cur[c][lat.diagonal[where]].sum(axis=1) * wt[c, 3 * bits]
                elif p >= 2:
                    z = z + cur[c][lat.direct[where]].sum(axis=1) * wt[c, 3 * bits + 1]
                group = None if plane is None else src[where, c].astype(np.int32)
                if coder is not None:
                    group = self._code_group(coder, family, group, probability(z))
                cur[c, lat.padded[where]] = 2 * group.astype(np.int64) - 1
            # channel c is complete: its bits join the later channels' logits
            logit[:, c + 1:] += np.outer(cur[c, lat.padded], wt[c + 1:, 2 * bits + c])
        return self._end_plane(cur)


# ------------------------------------------------------------------------ version 4: adapting to the image

FINE = 4096  # version 4 works in weights of 1/4096: the table's 1/64 steps times 64, plus the learned delta
ETA_FIRST, ETA_LATER = 41, 10  # learning rate per plane, in units of 1/1024: ~0.04 on the first, ~0.01 later
DELTA_LIMIT = 16 * FINE  # the delta stays within +-16


def probability_fine(logit: np.ndarray) -> np.ndarray:
    """Integer logits in units of 1/4096 -> P(1) in units of 2**-16 (int64): the same table as
    :func:`probability` (a logit of k/64 maps to the same entry)."""
    step = LUT_STEP * (FINE // WEIGHT_SCALE)
    return LUT[np.clip(np.floor_divide(logit + step // 2, step), -LUT_HALF, LUT_HALF) + LUT_HALF]


class AdaptiveContextCoder(ContextCoder):
    """Version 4: the fitted table of version 3 plus a correction learned from this image as it is coded.

    The table is fitted on CIFAR-10 crops; an image's statistics differ (fitted on Kodak's own codes, the
    table would spend 0.58 instead of 0.67 bits per bit at iteration 1). Both sides keep a delta of the
    same shape as a table row, added to the row of every plane's iteration, and after each (channel,
    phase) group move that channel's delta one gradient step against the group's log loss:
    ``delta[c] -= eta * sum((p - y) * x) / sqrt(n)`` over its n bits, eta ~0.04 on the first plane and
    ~0.01 after, the delta halved at each new plane. All in integers (weights in units of 1/4096,
    probabilities in 2**-16, floor divisions), so encoder and decoder agree on every machine. With the
    delta at zero it predicts exactly what version 3 does. Measured on the 24 Kodak images' codes of the
    shipped model: bits per code bit 0.686 / 0.847 / 0.891 at iterations 1-3 -> 0.643 / 0.820 / 0.875.
    """

    version = 4

    def __init__(self, height_blocks: int, width_blocks: int, bits: int, table: np.ndarray):
        super().__init__(height_blocks, width_blocks, bits, table)
        self.delta = np.zeros((bits, n_features(bits, self.version)), dtype=np.int64)
        self._class = np.eye(3, dtype=np.int64)[np.minimum(self.lattice.phase, 2)]  # (P, 3) phase-class one-hot
        self._isqrt = [max(1, math.isqrt(len(wh))) for wh in self.lattice.where]

    def _walk(self, plane: np.ndarray | None, coder) -> np.ndarray:
        h, w, bits = self.shape
        lat = self.lattice
        npos = h * w
        wt = self.table[min(self.planes, len(self.table) - 1)] * (FINE // WEIGHT_SCALE)  # (bits, F), 1/4096
        eta = ETA_FIRST if self.planes == 0 else ETA_LATER
        if self.planes:
            self.delta = np.floor_divide(self.delta, 2)
        zeros = np.zeros((npos, bits), dtype=np.int64)
        prev = self.history[-1] if self.history else zeros
        prev2 = self.history[-2] if len(self.history) > 1 else zeros
        prev_direct = lat.pad(prev)[:, lat.direct].sum(axis=2).T  # (P, bits)
        cur = np.zeros((bits, (h + 2) * (w + 2)), dtype=np.int64)  # -1/+1 coded so far, zero elsewhere
        # v5: each completed channel's direct-neighbour sums
        cur_direct = np.zeros((bits, npos) if self.version >= 5 else (0, 0), dtype=np.int64)
        src = None if plane is None else plane.reshape(npos, bits)
        family = constriction().stream.model.Bernoulli(perfect=False) if coder is not None else None
        for c in range(bits):
            for p in range(4):
                where = lat.where[p]
                n = len(where)
                seen = cur[:c, lat.padded[where]].T  # this plane's channels before c
                nb = np.zeros((n, 2), dtype=np.int64)
                if p == 1:
                    nb[:, 0] = cur[c][lat.diagonal[where]].sum(axis=1)
                elif p >= 2:
                    nb[:, 1] = cur[c][lat.direct[where]].sum(axis=1)
                later = np.zeros((n, bits - c), dtype=np.int64)
                parts = [prev[where], prev2[where], seen, later, nb, prev_direct[where, c:c + 1], self._class[where]]
                if self.version >= 5:
                    parts += [cur_direct[:c, where].T, later]
                x = np.concatenate(parts, axis=1)  # (n, F)
                q = probability_fine(x @ (wt[c] + self.delta[c]))
                group = None if plane is None else src[where, c].astype(np.int32)
                if coder is not None:
                    group = self._code_group(coder, family, group, q.astype(np.float64) / (1 << PROB_BITS))
                group = np.asarray(group, dtype=np.int64)
                cur[c, lat.padded[where]] = 2 * group - 1
                grad = (q - (group << PROB_BITS)) @ x  # units of 2**-16
                step = np.floor_divide(grad * eta, 1024 * (1 << PROB_BITS) // FINE * self._isqrt[p])
                step[n_features(bits):] = 0  # v5: the neighbours' channels' weights are the table's, not learned
                self.delta[c] = np.clip(self.delta[c] - step, -DELTA_LIMIT, DELTA_LIMIT)
            if self.version >= 5:
                cur_direct[c] = cur[c][lat.direct].sum(axis=1)
        return self._end_plane(cur)


class NeighbourContextCoder(AdaptiveContextCoder):
    """Version 5: version 4 with ``bits`` more features, the direct-neighbour sums of the channels already
    coded in this plane (a version-5 table, :func:`n_features` ``(bits, 5)`` wide). Everything else -- the
    table's other columns, the learning, the integers -- is version 4's; the new columns keep the table's
    weights (learned at version 4's rate, 32 features of magnitude up to 4 made the delta diverge: kodim04's
    first iteration cost 1.61 bits per bit; fixed, 0.549 against version 4's 0.609)."""

    version = 5


# ----------------------------------------------------------------------------------------- fitting


def model_codes(model, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """The codec's bits of ``images`` (N, H, W, 3) uint8, H and W multiples of 16, every iteration:
    (N, iterations, H/16, W/16, bits) bool -- what the codec would code for each as one tile."""
    import torch

    n, h, w, _ = images.shape
    if h % BLOCK or w % BLOCK:
        raise ValueError(f"images of {h}x{w}: sides must be multiples of {BLOCK}")
    iterations, bits = model.config.iterations, model.config.bits
    out = np.zeros((n, iterations, h // BLOCK, w // BLOCK, bits), dtype=bool)
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.inference_mode():
            for i in range(0, n, batch):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).to(device)
                x = x.permute(0, 3, 1, 2).float() / 255.0 - 0.5
                enc, dec = model.init_states()
                recon = torch.zeros_like(x)
                for t in range(iterations):
                    b, enc = model.encode_step(x - recon, enc)
                    out[i:i + batch, t] = (b > 0).permute(0, 2, 3, 1).cpu().numpy()
                    if t < iterations - 1:
                        delta, dec = model.decode_step(b, dec)
                        recon = model.reconstruct_step(recon, delta)
    finally:
        model.train(was_training)
    return out


def fit(codes: np.ndarray, steps: int = 60, l2: float = 1e-4) -> tuple[np.ndarray, list[float]]:
    """Fit the context table to codes (N, iterations, Hb, Wb, bits) bool: one logistic regression per
    (iteration, channel) by L-BFGS, all channels of an iteration at once. Returns the table as float32
    weights on the stored grid (multiples of 1/64 within +-16), shape (iterations, bits, 4*bits+6) (a
    version-5 table), and per iteration the bits per code bit it spends on the fitting codes (1.0: no saving)."""
    import torch

    n, iterations, h, w, bits = codes.shape
    lat = Lattice(h, w)
    pm = codes.reshape(n, iterations, h * w, bits).astype(np.int64) * 2 - 1
    nf = n_features(bits, NEWEST)
    tril = torch.tril(torch.ones(bits, bits), diagonal=-1)  # channel c sees channels < c
    mask = torch.cat([torch.ones(bits, 2 * bits), tril, torch.ones(bits, EXTRA), tril], 1)  # (bits, nf)
    table = np.zeros((iterations, bits, nf), dtype=np.float32)
    cost = []
    for t in range(iterations):
        parts = [plane_features(lat, pm[i, t], pm[i, t - 1] if t else None, pm[i, t - 2] if t > 1 else None)
                 for i in range(n)]
        shared = torch.from_numpy(np.concatenate([q[0] for q in parts])).float()
        local = torch.from_numpy(np.concatenate([q[1] for q in parts])).float()
        cls = torch.from_numpy(np.concatenate([q[2] for q in parts]))
        target = torch.from_numpy((pm[:, t].reshape(-1, bits) > 0).astype(np.float32))
        weights = torch.zeros(bits, nf, requires_grad=True)
        opt = torch.optim.LBFGS([weights], max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

        def logits(wt):
            wt = wt * mask
            z = shared @ torch.cat([wt[:, :3 * bits], wt[:, 3 * bits + EXTRA:]], 1).T \
                + (local * wt[:, 3 * bits:3 * bits + 3]).sum(-1)
            return z + wt[:, 3 * bits + 3:3 * bits + EXTRA].T[cls]

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(weights), target) \
                + l2 * (weights ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            wt = (weights * mask).numpy()
        table[t] = quantize(wt) / WEIGHT_SCALE
        with torch.no_grad():
            z = logits(torch.from_numpy(table[t]))
            cost.append(float(torch.nn.functional.binary_cross_entropy_with_logits(z, target)) / np.log(2))
    return table, cost


def fit_model(model, images: np.ndarray, batch: int = 32) -> dict:
    """Fit ``model``'s context table (its ``context`` buffer, replaced by a version-5 one) to its codes of
    ``images`` (N, H, W, 3) uint8 (training patches; never the test set). Returns what to record."""
    import time

    import torch

    t0 = time.perf_counter()
    codes = model_codes(model, images, batch)
    table, cost = fit(codes)
    with torch.no_grad():  # a model loaded with a version-4 table gets a version-5 one
        model.context = torch.from_numpy(table).to(model.context)
    return {"patches": int(images.shape[0]), "patch_side": int(images.shape[1]),
            "fit_bits_per_bit": [round(c, 4) for c in cost], "seconds": round(time.perf_counter() - t0, 1)}


def to_table(buffer) -> np.ndarray | None:
    """A model's ``context`` buffer -> the integer table :class:`ContextCoder` takes (None if never fitted)."""
    arr = np.asarray(buffer.detach().cpu().double() if hasattr(buffer, "detach") else buffer, dtype=np.float64)
    if not arr.size or not arr.any():
        return None
    return quantize(arr)
