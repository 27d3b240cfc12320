"""The classifier's two training recipes, one object each: what differs between them and nothing else.

- ``Coursework``: plain CNN, Adam, per-epoch sawtooth learning rate, mean cross-entropy.
- ``Fast``: airbench-style: whitening conv initialised from training images, nesterov SGD with BN
  biases on their own lr, per-step triangle lr, lookahead (EMA), label smoothing on a summed loss,
  alternating (derandomised) flip, channels_last, bf16 autocast on CUDA and on CPUs with native bf16.

``make_recipe(cfg, total_steps, n_epochs)`` picks one; the loop in ``pipeline/classifier/train.py``
calls the hooks below in a fixed order, the same for both.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from pipeline.classifier.model import Classifier
from pipeline.classifier.params import TrainClassifierParams
from pipeline.data.params import AugmentationParams
from pipeline.utils import cpu_has_bf16


def sawtooth(lr_max: float, lr_min: float, epochs: int, teeth: int) -> list[float]:
    """Per-epoch learning rates: ``teeth`` linear decays lr_max -> lr_min, each restarting at lr_max.

    Each tooth spans ceil(epochs / teeth) epochs (the last one may be cut short).
    """
    period = math.ceil(epochs / teeth)
    rates = []
    for epoch in range(epochs):
        t = epoch % period
        frac = t / (period - 1) if period > 1 else 0.0
        rates.append(lr_max + (lr_min - lr_max) * frac)
    return rates


def fast_lr_factor(step: int, total: int, warmup: float, final: float) -> float:
    """airbench's triangle: 0.2x -> 1x over the warm-up fraction, then linear to ``final``x."""
    warm = int(total * warmup)
    if step < warm:
        frac = step / warm
        return 0.2 * (1 - frac) + frac
    frac = (step - warm) / max(total - warm, 1)
    return (1 - frac) + final * frac


class Lookahead:
    """airbench's lookahead: every few steps the weights move to an EMA of themselves."""

    def __init__(self, model: torch.nn.Module):
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float) -> None:
        for key, value in model.state_dict().items():
            if key in self.ema:
                self.ema[key].lerp_(value, 1 - decay)
                value.copy_(self.ema[key])


def _with_base_lr(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]
    return opt


class Coursework:
    """The coursework's recipe: the loss is a batch mean, the lr changes once per epoch."""

    name = "coursework"

    def __init__(self, cfg: TrainClassifierParams, total_steps: int, n_epochs: int):
        self.cfg, self.c = cfg, cfg.coursework
        self.lrs = sawtooth(self.c.lr_max, self.c.lr_min, n_epochs, self.c.teeth)

    def model_config(self) -> dict[str, Any]:
        """The plain-dict architecture config stored in model.pt (``build_classifier`` rebuilds it)."""
        c = self.c
        return {"arch": "coursework", "widths": list(c.widths), "dense": c.dense, "dropout": c.dropout,
                "batchnorm": c.batchnorm}

    def init_model(self, model: Classifier, x_train: torch.Tensor, gen: torch.Generator) -> None:
        pass

    def optimizer(self, model: Classifier) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return _with_base_lr(torch.optim.Adam(params, lr=self.c.lr_max, weight_decay=self.c.weight_decay))

    def criterion(self) -> torch.nn.Module:
        return torch.nn.CrossEntropyLoss(reduction="mean")

    def augmentation(self) -> AugmentationParams:
        """What ``augment_batch`` applies on top of ``flip`` (below)."""
        return self.cfg.augmentation

    def flip(self, xb: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        return xb

    def start_epoch(self, model: Classifier, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.lrs[epoch]

    def before_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        pass

    def after_step(self, model: Classifier, step: int) -> None:
        pass

    def end_epoch(self, model: Classifier, step: int) -> None:
        pass

    def loss_weight(self, world_size: int, part: int, batch: int) -> float:
        """DDP averages gradients over ranks: the weight that makes the average the whole batch's."""
        return world_size * (part / batch)

    def loss_total(self, loss: torch.Tensor, n: int) -> torch.Tensor:
        """The batch's summed loss (for the epoch mean)."""
        return loss.detach() * n

    def autocast(self, device: torch.device):
        return contextlib.nullcontext()

    def channels_last(self, device: torch.device) -> bool:
        return self.c.channels_last

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any], device: torch.device) -> None:
        pass


class Fast(Coursework):
    """airbench's recipe (see the module docstring); the loss is summed over the batch."""

    name = "fast"

    def __init__(self, cfg: TrainClassifierParams, total_steps: int, n_epochs: int):
        self.cfg, self.f = cfg, cfg.fast
        self.total = total_steps
        self.flip_base: torch.Tensor | None = None
        self.lookahead: Lookahead | None = None
        ramp = torch.arange(total_steps + 1, dtype=torch.float64) / total_steps
        self.decays = (self.f.lookahead_decay ** self.f.lookahead_every * ramp**3).tolist()

    def model_config(self) -> dict[str, Any]:
        f = self.f
        return {"arch": "fast", "widths": list(f.widths), "bn_momentum": f.bn_momentum, "scale": f.scale}

    def init_model(self, model: Classifier, x_train: torch.Tensor, gen: torch.Generator) -> None:
        """The whitening conv, from ``fast.whiten_samples`` random training images."""
        with torch.no_grad():
            sample = x_train[torch.randperm(len(x_train), device=x_train.device, generator=gen)[:self.f.whiten_samples]]
            model.net.init_whitening(model.normalize(sample.float() / 255))

    def optimizer(self, model: Classifier) -> torch.optim.Optimizer:
        """Nesterov SGD, BN biases on ``bias_scaler`` x the lr; also starts the lookahead from the weights."""
        f = self.f
        kilostep = 1024 * (1 + 1 / (1 - f.momentum))  # summed loss: lr per example, momentum-corrected
        lr = f.lr / kilostep
        wd = f.weight_decay * self.cfg.batch_size / kilostep
        lr_bias = lr * f.bias_scaler
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        norm_biases = [p for k, p in named if "norm" in k]
        others = [p for k, p in named if "norm" not in k]
        opt = torch.optim.SGD([dict(params=norm_biases, lr=lr_bias, weight_decay=wd / lr_bias),
                               dict(params=others, lr=lr, weight_decay=wd / lr)],
                              momentum=f.momentum, nesterov=True)
        self.lookahead = Lookahead(model)
        return _with_base_lr(opt)

    def criterion(self) -> torch.nn.Module:
        return torch.nn.CrossEntropyLoss(label_smoothing=self.f.label_smoothing, reduction="sum")

    def augmentation(self) -> AugmentationParams:
        if self.f.alternating_flip:  # the flip is ``flip`` below
            return self.cfg.augmentation.model_copy(update={"flip": False})
        return self.cfg.augmentation

    def flip(self, xb: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        """Alternating flip: each image mirrored on every other epoch, from a per-image coin (``flip_base``)."""
        if not (self.f.alternating_flip and self.cfg.augmentation.flip):
            return xb
        flip = self.flip_base[idx] ^ bool(epoch % 2)
        return torch.where(flip[:, None, None, None], xb.flip(-1), xb)

    def start_epoch(self, model: Classifier, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        model.net.whiten.bias.requires_grad_(epoch < self.f.whiten_bias_epochs)

    def before_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        factor = fast_lr_factor(step, self.total, self.f.warmup, self.f.final_lr)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    def after_step(self, model: Classifier, step: int) -> None:
        if step % self.f.lookahead_every == 0 or step == self.total:
            self.lookahead.update(model, self.decays[step])

    def end_epoch(self, model: Classifier, step: int) -> None:
        if step == self.total:
            self.lookahead.update(model, 1.0)  # finish on the lookahead (EMA) weights

    def loss_weight(self, world_size: int, part: int, batch: int) -> float:
        return world_size  # summed loss: each rank's sum, averaged, times the world

    def loss_total(self, loss: torch.Tensor, n: int) -> torch.Tensor:
        return loss.detach()

    def autocast(self, device: torch.device):
        """bf16/fp16 autocast on CUDA; bf16 on CPUs that compute it natively (fp16 is not offered there)."""
        if device.type == "cuda" and self.f.autocast != "off":
            return torch.autocast("cuda", dtype=torch.bfloat16 if self.f.autocast == "bf16" else torch.float16)
        if device.type == "cpu" and self.f.autocast == "bf16" and cpu_has_bf16():
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def channels_last(self, device: torch.device) -> bool:
        return self.f.channels_last

    def state(self) -> dict[str, Any]:
        return {"lookahead": {k: v.detach().cpu() for k, v in self.lookahead.ema.items()}}

    def load_state(self, state: dict[str, Any], device: torch.device) -> None:
        self.lookahead.ema = {k: v.to(device) for k, v in state["lookahead"].items()}


RECIPES = {"coursework": Coursework, "fast": Fast}


def make_recipe(cfg: TrainClassifierParams, total_steps: int = 1, n_epochs: int = 1) -> Coursework:
    return RECIPES[cfg.recipe](cfg, total_steps, n_epochs)
