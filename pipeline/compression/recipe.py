"""The codec's training recipe: the learning-rate schedule, the losses (L1/L2, mixed with SSIM or MS-SSIM),
bf16 autocast and the weights' moving average -- what :class:`pipeline.compression.train.CompressorTask`
trains with, and what ``bench/bench_recipe.py`` varies."""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch

from pipeline.compression.params import TrainCompressorParams
from pipeline.utils import cpu_has_bf16


def lr_factor(p: TrainCompressorParams, total_steps: int):
    """step -> multiplier of p.lr: linear warm-up, then constant / cosine / multistep."""
    warm = int(p.lr_warmup * total_steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, total_steps - warm)
        if p.lr_schedule == "cosine":
            return p.lr_floor + (1 - p.lr_floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        if p.lr_schedule == "multistep":
            return p.lr_gamma ** sum(step >= m * total_steps for m in p.lr_milestones)
        return 1.0

    return f


def residual_loss(x: torch.Tensor, recon: torch.Tensor, kind: str = "l1", ssim_weight: float = 0.84,
                  ssim_window: int = 11, weights=None) -> torch.Tensor:
    """Mean over iterations of the reconstruction loss of x̂_t (``recon``: iterations first), or its
    weighted mean with ``weights`` (one per iteration).

    l1: mean |x - x̂_t|; l2: mean (x - x̂_t)^2; l1_ssim: w (1 - SSIM(x̂_t, x)) + (1 - w) mean |x - x̂_t|
    (Zhao et al. 2017's mix, with single-scale SSIM: a 32 px patch is too small for five scales), which
    trains for the structural quality the codec is judged by (MS-SSIM) as well as for the pixels;
    l1_msssim: the same mix with MS-SSIM over as many of Wang et al.'s scales as the patch holds
    (``multiscale_ssim``: 3 at 64 px, 4 at 128 px with the 11-px window).
    """
    r = x.float()[None] - recon.float()
    t = recon.shape[0]
    if weights is None:
        if kind == "l2":
            return r.square().mean()
        if kind == "l1":
            return r.abs().mean()
    per_iteration = (r.square() if kind == "l2" else r.abs()).flatten(1).mean(dim=1)
    if kind in ("l1_ssim", "l1_msssim"):
        ref = (x.float() + 0.5).expand(t, *x.shape).reshape(-1, *x.shape[1:])
        out = recon.float().reshape(-1, *x.shape[1:]) + 0.5
        if kind == "l1_ssim":
            from pytorch_msssim import ssim

            s = ssim(out, ref, data_range=1.0, win_size=ssim_window, size_average=False)
        else:
            s = multiscale_ssim(out, ref, ssim_window)
        per_iteration = ssim_weight * (1 - s.view(t, -1).mean(dim=1)) + (1 - ssim_weight) * per_iteration
    if weights is None:
        return per_iteration.mean()
    w = torch.as_tensor(weights, dtype=torch.float32, device=x.device)
    return (per_iteration * w).sum() / w.sum()


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, finest scale first


def msssim_levels(side: int, window: int) -> int:
    """Scales of MS-SSIM a ``side``-px image holds with a ``window``-px Gaussian window (at most 5)."""
    levels = 1
    while levels < 5 and side // 2 ** levels >= window:
        levels += 1
    return levels


def multiscale_ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11) -> torch.Tensor:
    """MS-SSIM of images in [0, 1] (N, C, H, W) -> (N,), over ``msssim_levels`` scales, Wang et al.'s weights
    of those scales renormalised: pytorch_msssim's ``ms_ssim`` at fewer scales, without its 5-scale size check
    (a 64-px training patch holds 3 scales of the 11-px window; the evaluation's 5 need 161 px)."""
    import torch.nn.functional as F
    from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

    levels = msssim_levels(min(x.shape[-2:]), window)
    w = torch.tensor(MS_SSIM_WEIGHTS[:levels], device=x.device)
    w = w / w.sum()
    win = _fspecial_gauss_1d(window, 1.5).repeat([x.shape[1], 1, 1, 1])
    factors = []
    for level in range(levels):
        s, cs = _ssim(x, y, data_range=1.0, win=win, size_average=False)
        if level < levels - 1:
            factors.append(torch.relu(cs))
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    factors.append(torch.relu(s))
    return torch.prod(torch.stack(factors) ** w.view(-1, 1, 1), dim=0).mean(dim=1)


def task_loss(p: TrainCompressorParams, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """The configured training loss (``p.loss``) of one batch."""
    return residual_loss(x, recon, p.loss, p.ssim_weight, p.ssim_window, p.iteration_weights)


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA, and on CPUs with native bf16 (measured 1.3-1.5x on the codec here)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if amp and device.type == "cpu" and cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


class EMA:
    """Exponential moving average of a model's parameters (the weights that are validated and published).

    ``decay`` None: no averaging, the model's own weights are used.
    """

    def __init__(self, model: torch.nn.Module, decay: float | None):
        self.decay = decay
        self.params = [p for p in model.parameters()]
        self.shadow = [p.detach().clone() for p in self.params] if decay else None

    @torch.no_grad()
    def update(self) -> None:
        if self.shadow is not None:
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    def state_dict(self) -> list[torch.Tensor] | None:
        return self.shadow

    def load_state_dict(self, state: list[torch.Tensor] | None) -> None:
        if self.shadow is not None and state is not None:
            for s, v in zip(self.shadow, state):
                s.copy_(v)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Overwrite the model's parameters with the averaged weights (no-op without averaging)."""
        if self.shadow is not None:
            torch._foreach_copy_(self.params, self.shadow)

    @contextmanager
    def applied(self):
        """Temporarily swap the averaged weights into the model."""
        if self.shadow is None:
            yield
            return
        saved = [p.detach().clone() for p in self.params]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, saved)
