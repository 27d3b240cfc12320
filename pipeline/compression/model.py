"""Toderici et al. (2017) recurrent image codec: ConvLSTM encoder E, binarizer B, ConvLSTM decoder D.

One iteration codes the residual left by the previous ones ("additive reconstruction"):

    b_t = B(E_t(r_{t-1}))        r_0 = x
    x̂_t = D_t(b_t) + x̂_{t-1}     x̂_0 = 0   (γ = 0 at t = 1, 1 after)
    r_t = x - x̂_t

Two variants of the paper are configurations (``ModelConfig``): ``reconstruction: one-shot`` (γ = 0 at
every t: the decoder outputs the whole image each iteration, x̂_t = D_t(b_t)) and ``cell: gru``
(convolutional GRUs instead of LSTMs); a third is Johnston et al. (2018)'s hidden-state priming
(``priming: k``: at t = 1, E and D first run k extra steps on the same input, r_0 = x and b_1, their
outputs discarded, so the recurrent state spreads context before the first bits are used; no extra bits).
The defaults are the coursework's (additive, LSTM, no priming).

E: strided 3x3 conv, then three strided ConvLSTMs (16x down in all). B: 1x1 conv, tanh, sign
(stochastic or deterministic while training, with a straight-through gradient; sign(z) at inference), so each
16x16 block yields ``bits`` bits per iteration. D: 1x1 conv, four ConvLSTMs each followed by
depth-to-space x2, then a 1x1 conv to RGB. E_t and D_t are the same weights; the index t is their
recurrent state. Pixels are in [-0.5, 0.5].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.compression.context import NEWEST, n_features
from pipeline.compression.params import MAX_PRIMING

BLOCK = 16  # pixels per code cell side: E downsamples 16x, D upsamples 16x

State = tuple[torch.Tensor, torch.Tensor] | None


@dataclass(frozen=True)
class ModelConfig:
    # the architecture: no defaults here (params.yaml's train_compressor, or the model file, gives them)
    encoder_widths: tuple[int, ...]  # strided conv, then ConvLSTM 1..3
    decoder_widths: tuple[int, ...]  # ConvLSTM 1..4 (each then depth-to-space)
    bits: int  # code channels per 16x16 block per iteration
    iterations: int  # iterations trained: the most a file may hold
    encoder_hidden_kernel: int = 1  # hidden-to-hidden kernel of the encoder's ConvLSTMs
    decoder_hidden_kernels: tuple[int, ...] = (1, 1, 3, 3)  # the decoder's, per layer
    cell: str = "lstm"  # recurrent cell of E and D: lstm | gru
    reconstruction: str = "additive"  # additive (x̂_t = D_t(b_t) + x̂_{t-1}) | one-shot (x̂_t = D_t(b_t))
    priming: int = 0  # extra steps of E and D at t = 1 on the same input (Johnston et al. 2018); 0: none

    def __post_init__(self) -> None:
        if len(self.encoder_widths) != 4 or len(self.decoder_widths) != 4 or len(self.decoder_hidden_kernels) != 4:
            raise ValueError("ModelConfig: encoder_widths, decoder_widths and decoder_hidden_kernels need 4 entries")
        if any(w % 4 for w in self.decoder_widths):
            raise ValueError("ModelConfig: decoder widths must be multiples of 4")
        if self.cell not in CELLS:
            raise ValueError(f"ModelConfig: cell {self.cell!r} is not one of {sorted(CELLS)}")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"ModelConfig: reconstruction {self.reconstruction!r} is not one of {RECONSTRUCTIONS}")
        if type(self.priming) is not int or not 0 <= self.priming <= MAX_PRIMING:
            raise ValueError(f"ModelConfig: priming {self.priming!r} is not within 0..{MAX_PRIMING}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields; the variant fields only when not at their defaults, so that the files and
        fingerprints of models from before the variants existed stay what they were."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        for name, default in _VARIANT_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {sorted(unknown)}")
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} - set(d)
        if missing:
            raise ValueError(f"ModelConfig: missing keys {sorted(missing)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def from_params(cls, p) -> "ModelConfig":
        """From a ``TrainCompressorParams`` section."""
        return cls(encoder_widths=tuple(p.encoder_widths), decoder_widths=tuple(p.decoder_widths),
                   bits=p.bits, iterations=p.iterations, cell=p.cell, reconstruction=p.reconstruction,
                   priming=p.priming)


class ConvGRUCell(nn.Module):
    """GRU whose gates are convolutions (Toderici et al. 2017's GRU variant). The state is (h, h), the
    same shape as an LSTM's (h, c), so that E and D treat both cells alike."""

    def __init__(self, cin: int, hidden: int, kernel: int = 3, stride: int = 1, hidden_kernel: int = 1):
        super().__init__()
        self.hidden = hidden
        self.conv_x = nn.Conv2d(cin, 3 * hidden, kernel, stride, kernel // 2)
        self.conv_h = nn.Conv2d(hidden, 3 * hidden, hidden_kernel, 1, hidden_kernel // 2, bias=False)

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        xr, xz, xn = self.conv_x(x).chunk(3, dim=1)
        if state is None:  # t = 1 starts from h = 0
            z = torch.sigmoid(xz)
            h = (1 - z) * torch.tanh(xn)
        else:
            hr, hz, hn = self.conv_h(state[0]).chunk(3, dim=1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h = (1 - z) * torch.tanh(xn + r * hn) + z * state[0]
        return h, (h, h)


class ConvLSTMCell(nn.Module):
    """LSTM whose gates are convolutions: input conv (may be strided) + hidden conv."""

    def __init__(self, cin: int, hidden: int, kernel: int = 3, stride: int = 1, hidden_kernel: int = 1):
        super().__init__()
        self.hidden = hidden
        self.conv_x = nn.Conv2d(cin, 4 * hidden, kernel, stride, kernel // 2)
        self.conv_h = nn.Conv2d(hidden, 4 * hidden, hidden_kernel, 1, hidden_kernel // 2, bias=False)

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        gates = self.conv_x(x)
        if state is not None:  # t = 1 starts from h = c = 0: skip the convolution of zeros
            gates = gates + self.conv_h(state[0])
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(i) * torch.tanh(g)
        if state is not None:
            c = torch.sigmoid(f) * state[1] + c
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)


def binarize(z: torch.Tensor, stochastic: bool, straight_through: bool = True) -> torch.Tensor:
    """Map z in [-1, 1] to {-1, +1}.

    Stochastic: +1 with probability (1 + z) / 2, so E[b] = z (Toderici et al.'s training binarizer).
    Deterministic: sign(z), with sign(0) = +1 (inference, and training when so configured).
    With ``straight_through`` (whenever gradients are on) the gradient passes straight through
    (d b / d z = 1): the value is exactly b, since z - z.detach() is 0.
    """
    if stochastic:
        u = torch.rand(z.shape, device=z.device, dtype=torch.float32)
        b = torch.where(u < (1 + z.float()) / 2, 1.0, -1.0).to(z.dtype)
    else:
        b = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    if straight_through and torch.is_grad_enabled():
        return b + (z - z.detach())
    return b


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.encoder_widths
        self.conv = nn.Conv2d(3, w[0], 3, 2, 1, bias=False)
        cell = CELLS[cfg.cell]
        self.rnn = nn.ModuleList(cell(w[i], w[i + 1], 3, 2, cfg.encoder_hidden_kernel) for i in range(3))
        self.binarizer = nn.Conv2d(w[3], cfg.bits, 1, bias=False)

    def forward(self, r: torch.Tensor, states: list[State]) -> tuple[torch.Tensor, list[State]]:
        """Residual (N,3,H,W) -> pre-binarisation code tanh(.) in [-1,1] (N,bits,H/16,W/16)."""
        x = self.conv(r)
        new = []
        for cell, s in zip(self.rnn, states):
            x, s = cell(x, s)
            new.append(s)
        return torch.tanh(self.binarizer(x)), new


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.decoder_widths
        self.conv_in = nn.Conv2d(cfg.bits, w[0], 1, bias=False)
        cins = [w[0]] + [wi // 4 for wi in w[:3]]
        cell = CELLS[cfg.cell]
        self.rnn = nn.ModuleList(cell(cins[i], w[i], 3, 1, cfg.decoder_hidden_kernels[i]) for i in range(4))
        self.conv_out = nn.Conv2d(w[3] // 4, 3, 1, bias=False)

    def forward(self, b: torch.Tensor, states: list[State]) -> tuple[torch.Tensor, list[State]]:
        """Bits (N,bits,h,w) in {-1,+1} -> this iteration's additive output (N,3,16h,16w)."""
        x = self.conv_in(b)
        new = []
        for cell, s in zip(self.rnn, states):
            x, s = cell(x, s)
            new.append(s)
            x = F.pixel_shuffle(x, 2)
        return self.conv_out(x), new


class RNNCompressor(nn.Module):
    """E, B and D together. ``forward`` returns every iteration's reconstruction (for training)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # training only (not part of the model file): the binarizer in train mode; eval is always sign(z)
        self.stochastic_binarizer = True
        # the .rnnc v3/v4/v5 entropy model, fitted to the trained codec's bits (pipeline.compression.context.fit):
        # per iteration and code channel, logistic weights over 4 * bits + 6 context features (a version-5
        # table; model files from before version 5 hold 3 * bits + 6: versions 3 and 4); all zero (never
        # fitted) means files are written as version 2. Not trained by gradient descent.
        self.register_buffer("context", torch.zeros(cfg.iterations, cfg.bits, n_features(cfg.bits, NEWEST)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # model files and checkpoints from before the context model have no table: load them unfitted
        table = state_dict.setdefault(prefix + "context", torch.zeros_like(self.context))
        if isinstance(table, torch.Tensor) and table.shape[:2] == self.context.shape[:2] \
                and table.shape[2] == n_features(self.config.bits, 4):  # a version-4 table: loaded as it is
            self.context = torch.zeros_like(table)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @staticmethod
    def init_states() -> tuple[list[State], list[State]]:
        return [None] * 3, [None] * 4

    def encode_step(self, r: torch.Tensor, enc_states: list[State]) -> tuple[torch.Tensor, list[State]]:
        if enc_states[0] is None:  # t = 1: priming steps first (their codes are not sent)
            for _ in range(self.config.priming):
                _, enc_states = self.encoder(r, enc_states)
        z, enc_states = self.encoder(r, enc_states)
        return binarize(z, self.training and self.stochastic_binarizer), enc_states

    def decode_step(self, b: torch.Tensor, dec_states: list[State]) -> tuple[torch.Tensor, list[State]]:
        if dec_states[0] is None:  # t = 1: priming steps on the same bits (their outputs are dropped)
            for _ in range(self.config.priming):
                _, dec_states = self.decoder(b, dec_states)
        return self.decoder(b, dec_states)

    def reconstruct_step(self, recon: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x̂_t from x̂_{t-1} and the decoder's output D_t(b_t): their sum (additive), or the output (one-shot)."""
        return out if self.config.reconstruction == "one-shot" else recon + out

    def forward(self, x: torch.Tensor, iterations: int | None = None) -> torch.Tensor:
        """x (N,3,H,W) in [-0.5,0.5], H and W multiples of 16 -> reconstructions (T,N,3,H,W), T = iterations."""
        iterations = iterations or self.config.iterations
        enc, dec = self.init_states()
        recon = torch.zeros_like(x)
        outs = []
        for _ in range(iterations):
            b, enc = self.encode_step(x - recon, enc)
            delta, dec = self.decode_step(b, dec)
            recon = self.reconstruct_step(recon, delta)
            outs.append(recon)
        return torch.stack(outs)


CELLS = {"lstm": ConvLSTMCell, "gru": ConvGRUCell}
RECONSTRUCTIONS = ("additive", "one-shot")
_VARIANT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                     if f.name in ("cell", "reconstruction", "priming")}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: RNNCompressor, side: int = 32, iterations: int | None = None) -> float:
    """FLOPs (2 x multiply-adds of every convolution) of one forward pass over one side x side patch.

    Counted on the ops actually run (the first iteration skips the hidden convolutions). Training
    costs about 3x this (forward + backward); patches/s x 3 x this = achieved FLOP/s.
    """
    total = 0

    def hook(mod: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = mod.kernel_size
        total += 2 * out.numel() * (mod.in_channels // mod.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, 3, side, side, device=device), iterations)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return float(total)
