"""The codec's inference engine: the trained :class:`RNNCompressor` rearranged for speed, in fp32 or bf16.

Training runs the model as written (``model.py``); :class:`pipeline.compression.codec.RNNCodec` runs this
engine, which computes the same function with the same weights, faster:

- **precision** ``fp32`` or ``bf16`` (weights and activations; the reconstruction is accumulated in fp32).
  ``auto`` picks bf16 where it is native -- CUDA, or a CPU with AVX512-BF16 or AMX -- and fp32 elsewhere:
  without native bf16 a CPU emulates it, many times slower than fp32. No file records the precision: its
  bits are the encoder's decisions, and a decoder at either precision reads them. Decoding at the encoder's
  precision (same build, same device) reproduces the encoder's reconstruction bit for bit; at the other
  precision it differs by rounding.
- **fused ConvLSTM cells**: where the hidden kernel equals the input kernel (the decoder's last two cells),
  one convolution over [x, h] instead of two and a sum; where the hidden kernel is 1x1, a matrix product
  accumulated in place into the gates (``addmm_``). Gates reordered (i, f, o, g).
- **fp32 on a CPU**: the decoder's 3x3 convolutions by NNPACK's Winograd transform (about 2x fewer
  operations than oneDNN's direct convolution; relative error ~1e-4, far below bf16's), in NCHW; the
  encoder's strided convolutions by oneDNN in channels_last (its native layout: no reorders). tanh as
  2 sigmoid(2x) - 1 (PyTorch's CPU tanh is 3-4x slower than its sigmoid), with the factors of 2 moved
  into the weights (exact): the g gate's rows are doubled, the state keeps 2c and h/2, and every
  convolution reading h doubles its weights.
- **memory**: glibc's malloc keeps freed memory for reuse (``mallopt``) instead of handing every tensor
  over 32 MB back to the kernel and faulting it in again, zeroed, on the next iteration.
- no tanh before the binarizer's sign (sign(tanh(z)) = sign(z)); the 1x1 convolutions are matrix products.

GRU cells run as written (in the chosen precision, channels_last).
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F

from pipeline.compression.model import ConvLSTMCell, RNNCompressor

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_CL = torch.channels_last


def check_precision(precision: object) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ValueError with one clear line."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    return precision


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16/AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        from pipeline.utils import cpu_has_bf16

        return cpu_has_bf16()
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> bf16 where native (:func:`native_bf16`), else fp32; fp32 and bf16 stay as they are."""
    precision = check_precision(precision)
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


_MALLOC_TUNED = False


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse (Linux, once per process).

    By default every block over 32 MB is mmap-ed and unmapped again on free, so each of the codec's large
    activations is page-faulted in, zeroed by the kernel, on every iteration; keeping it costs no extra
    peak memory (the process's peak is the same) and saves that work. Does nothing elsewhere."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB come from the heap
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: freed heap memory is kept (up to 2 GiB free)
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        pass


def _nnpack_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether NNPACK takes this device and dtype. The call also initializes NNPACK (once per process):
    without it torch._nnpack_spatial_convolution fails ("NNPACK SpatialConvolution_updateOutput failed")."""
    if device.type != "cpu" or dtype != torch.float32:
        return False
    try:
        return bool(torch._nnpack_available())
    except AttributeError:
        return False


class _Layout:
    """How one half of the network holds its activations: contiguous NCHW (``nchw``) or channels_last."""

    def __init__(self, nchw: bool, nnpack: bool):
        self.nchw = nchw
        self.nnpack = nnpack and nchw

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous() if self.nchw else t.contiguous(memory_format=_CL)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return w.contiguous() if self.nchw else w.contiguous(memory_format=_CL)

    def conv(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride, padding) -> torch.Tensor:
        if self.nnpack and tuple(stride) == (1, 1) and w.shape[-1] == w.shape[-2] == 3:
            return torch._nnpack_spatial_convolution(x, w, bias, list(padding))
        return F.conv2d(x, w, bias, stride, padding)

    def pointwise(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """A 1x1 convolution without bias as a matrix product; ``w`` is (Cout, Cin)."""
        n, c, h, wd = x.shape
        if self.nchw:
            return torch.matmul(w, x.reshape(n, c, h * wd)).view(n, -1, h, wd)
        y = torch.matmul(x.permute(0, 2, 3, 1).reshape(n * h * wd, c), w.t())
        return y.view(n, h, wd, -1).permute(0, 3, 1, 2)

    def accumulate(self, gates: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
        """gates += the 1x1 convolution of h by w (Cout, Cin), in place."""
        n, c4, hh, ww = gates.shape
        c = h.shape[1]
        if self.nchw:
            if n == 1:
                gates.view(c4, hh * ww).addmm_(w, h.reshape(c, hh * ww))
            else:
                gates.view(n, c4, hh * ww).add_(torch.matmul(w, h.reshape(n, c, hh * ww)))
        else:
            gates.permute(0, 2, 3, 1).reshape(n * hh * ww, c4).addmm_(
                h.permute(0, 2, 3, 1).reshape(n * hh * ww, c), w.t())


class _LSTM:
    """A ConvLSTM cell for inference (see the module's notes). ``in_scale``: how much smaller than the true
    input the input x arrives (0.5 after a cell that keeps h/2); ``halve``: the sigmoid form of tanh, with
    the state (h/2, 2c)."""

    def __init__(self, cell: ConvLSTMCell, dtype: torch.dtype, device: torch.device, layout: _Layout,
                 in_scale: float, halve: bool):
        c = cell.hidden
        self.hidden, self.layout, self.halve = c, layout, halve
        order = torch.cat([torch.arange(0, 2 * c), torch.arange(3 * c, 4 * c), torch.arange(2 * c, 3 * c)])
        rows = torch.ones(4 * c, 1, 1, 1, dtype=torch.float64)
        if halve:
            rows[3 * c:] = 2.0  # the g gate's pre-activation doubled: sigmoid(2g) gives tanh(g)
        wx = cell.conv_x.weight.detach().double()[order] * rows / in_scale
        wh = cell.conv_h.weight.detach().double()[order] * rows * (2.0 if halve else 1.0)  # h arrives halved
        bias = cell.conv_x.bias
        self.bias = None if bias is None else (bias.detach().double()[order] * rows.view(-1)).to(device, dtype)
        self.stride, self.padding = cell.conv_x.stride, cell.conv_x.padding
        self.wx = layout.weight(wx.to(device, dtype))
        kx, kh = wx.shape[-1], wh.shape[-1]
        self.w_cat = self.wh_mat = self.wh = None
        if kh == kx and tuple(self.stride) == (1, 1) and tuple(cell.conv_h.padding) == tuple(self.padding):
            self.w_cat = layout.weight(torch.cat([wx, wh], dim=1).to(device, dtype))  # one conv over [x, h]
        elif kh == 1:
            self.wh_mat = wh.reshape(4 * c, c).to(device, dtype).contiguous()
        else:
            self.wh = layout.weight(wh.to(device, dtype))
            self.h_padding = cell.conv_h.padding

    def __call__(self, x: torch.Tensor, state):
        lay = self.layout
        if state is None:  # t = 1: h = c = 0, the hidden convolution adds nothing
            gates = lay.conv(x, self.wx, self.bias, self.stride, self.padding)
        else:
            h_prev, c_prev = state
            if self.w_cat is not None:
                gates = lay.conv(lay(torch.cat([x, h_prev], dim=1)), self.w_cat, self.bias, (1, 1), self.padding)
            else:
                gates = lay.conv(x, self.wx, self.bias, self.stride, self.padding)
                if self.wh_mat is not None:
                    lay.accumulate(gates, h_prev, self.wh_mat)
                else:
                    gates += lay.conv(h_prev, self.wh, None, (1, 1), self.h_padding)
        c = self.hidden
        if self.halve:
            gates.sigmoid_()
            i, f, o, g = gates.split(c, dim=1)
            g.sub_(0.5)  # tanh(g) / 2
            if state is None:
                cell = torch.mul(i, g).mul_(4.0)  # 2c = 2 i tanh(g)
            else:
                cell = torch.mul(f, c_prev)
                cell.addcmul_(i, g, value=4.0)
            h = torch.sigmoid(cell).sub_(0.5).mul_(o)  # o tanh(c) / 2
        else:
            gates[:, : 3 * c].sigmoid_()
            gates[:, 3 * c:].tanh_()
            i, f, o, g = gates.split(c, dim=1)
            if state is None:
                cell = torch.mul(i, g)
            else:
                cell = torch.mul(f, c_prev)
                cell.addcmul_(i, g)
            h = torch.tanh(cell).mul_(o)
        h = lay(h)
        return h, (h, lay(cell))


class _Module:
    """A cell run as written (GRU), channels_last; its output is the true h."""

    def __init__(self, cell: torch.nn.Module):
        self.cell = cell

    def __call__(self, x: torch.Tensor, state):
        h, state = self.cell(x, state)
        return h.contiguous(memory_format=_CL), state


class InferenceNet:
    """The encoder and decoder of a trained model for inference, at one precision on one device.

    ``encode_step``/``decode_step``/``reconstruct_step`` mirror :class:`RNNCompressor`'s (same recurrences,
    same priming). Images, residuals and reconstructions are fp32 (N, 3, H, W); codes are +-1 in the network's
    dtype and the decoder's layout, as :meth:`codes_to_input` makes them from bits.
    """

    def __init__(self, model: RNNCompressor, device: torch.device | str = "cpu", precision: str = "auto"):
        self.device = dev = torch.device(device)
        self.precision = resolve_precision(precision, dev)
        self.dtype = dt = DTYPES[self.precision]
        self.config = cfg = model.config
        if dev.type == "cpu":
            keep_freed_memory()
        lstm = cfg.cell == "lstm"
        halve = lstm and dt == torch.float32 and dev.type == "cpu"  # bf16: tanh itself (its sigmoid is coarse)
        nnpack = lstm and _nnpack_ok(dev, dt)
        self.enc_layout = _Layout(nchw=False, nnpack=False)  # oneDNN's strided convolutions: channels_last
        self.dec_layout = _Layout(nchw=nnpack, nnpack=nnpack)
        m = copy.deepcopy(model).float().eval()
        out_scale = 0.5 if halve else 1.0  # what each cell's output is of the true h

        def cells(rnn, layout, first_scale):
            if not lstm:
                return [_Module(c.to(dev, dt).to(memory_format=_CL)) for c in rnn]
            return [_LSTM(c, dt, dev, layout, first_scale if k == 0 else out_scale, halve)
                    for k, c in enumerate(rnn)]

        e, d = m.encoder, m.decoder
        self.enc_conv = self.enc_layout.weight(e.conv.weight.detach().to(dev, dt))
        self.enc_conv_bias = None if e.conv.bias is None else e.conv.bias.detach().to(dev, dt)
        self.enc_conv_args = (e.conv.stride, e.conv.padding)
        self.enc_cells = cells(e.rnn, self.enc_layout, 1.0)
        # the binarizer's sign is unchanged by the scale of h, and by the tanh that is skipped
        self.binarizer = e.binarizer.weight.detach()[:, :, 0, 0].to(dev, dt).contiguous()
        self.dec_in = d.conv_in.weight.detach()[:, :, 0, 0].to(dev, dt).contiguous()
        self.dec_cells = cells(d.rnn, self.dec_layout, 1.0)
        self.dec_out = (d.conv_out.weight.detach()[:, :, 0, 0].double() / out_scale).to(dev, dt).contiguous()
        self.one_shot = cfg.reconstruction == "one-shot"

    @staticmethod
    def init_states():
        return RNNCompressor.init_states()

    def _encoder(self, r: torch.Tensor, states):
        x = F.conv2d(r, self.enc_conv, self.enc_conv_bias, *self.enc_conv_args)
        new = []
        for cell, s in zip(self.enc_cells, states):
            x, s = cell(x, s)
            new.append(s)
        return self.enc_layout.pointwise(x, self.binarizer), new

    def encode_step(self, r: torch.Tensor, states):
        """fp32 residual (N, 3, H, W) -> codes +-1 (N, bits, H/16, W/16), ready for :meth:`decode_step`; states."""
        r = self.enc_layout(r.to(self.dtype))
        if states[0] is None:
            for _ in range(self.config.priming):
                _, states = self._encoder(r, states)
        z, states = self._encoder(r, states)
        return self.dec_layout(torch.where(z >= 0, 1.0, -1.0).to(self.dtype)), states

    def codes_to_input(self, bits: torch.Tensor) -> torch.Tensor:
        """bool or +-1 codes (N, bits, h, w) -> the decoder's input, as :meth:`encode_step` returns it."""
        if bits.dtype == torch.bool:
            bits = torch.where(bits, 1.0, -1.0)
        return self.dec_layout(bits.to(self.device, self.dtype))

    def _decoder(self, b: torch.Tensor, states):
        lay = self.dec_layout
        x = lay.pointwise(b, self.dec_in)
        new = []
        for cell, s in zip(self.dec_cells, states):
            x, s = cell(lay(x), s)
            new.append(s)
            x = F.pixel_shuffle(x, 2)
        return lay.pointwise(lay(x), self.dec_out), new

    def decode_step(self, b: torch.Tensor, states):
        """Codes (from :meth:`encode_step` or :meth:`codes_to_input`) -> this iteration's output, states."""
        if states[0] is None:
            for _ in range(self.config.priming):
                _, states = self._decoder(b, states)
        return self._decoder(b, states)

    def reconstruct_step(self, recon: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x̂_t (fp32) from x̂_{t-1} (fp32) and the decoder's output D_t(b_t)."""
        out = out.float()
        return out.contiguous() if self.one_shot else recon + out
