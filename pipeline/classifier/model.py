"""The two CIFAR-10 networks and the wrapper every saved classifier goes through.

- ``CourseworkCNN``: the coursework's plain CNN (conv-conv-pool blocks, then dense layers).
- ``FastNet``: an airbench-style net: a frozen 2x2 whitening conv (initialised from the training
  patches' covariance), three conv-pool-BN-GELU groups, global max pool, linear head scaled down.

``Classifier`` wraps either with the input normalisation, so a saved model takes float images in
[0, 1], shape (N, 3, 32, 32), and returns logits. ``build_classifier(config)`` rebuilds one from the
plain-dict config stored in ``model.pt`` (see ``save_classifier`` / ``load_classifier``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import PipelineError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------------------------
# coursework: plain CNN


class CourseworkCNN(nn.Module):
    """Blocks of [conv3x3-(BN)-ReLU] x2 then 2x2 max pool, then dense-ReLU-dropout-dense."""

    def __init__(self, widths, dense: int, dropout: float, batchnorm: bool, num_classes: int = 10):
        """The architecture's values come from train_classifier.coursework (params.yaml) or a model file."""
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for width in widths:
            for _ in range(2):
                layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=not batchnorm)]
                if batchnorm:
                    layers += [nn.BatchNorm2d(width)]
                layers += [nn.ReLU(inplace=True)]
                c_in = width
            layers += [nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        side = 32 // 2 ** len(widths)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c_in * side * side, dense),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(dense, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --------------------------------------------------------------------------------------------
# fast: airbench-style


class FrozenScaleBN(nn.BatchNorm2d):
    """BatchNorm with the scale fixed at 1 (only the shift learns) and a tiny eps."""

    def __init__(self, width: int, momentum: float = 0.6, eps: float = 1e-12):
        super().__init__(width, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


class ConvGroup(nn.Module):
    """conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU."""

    def __init__(self, c_in: int, c_out: int, bn_momentum: float):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding="same", bias=False)
        self.norm1 = FrozenScaleBN(c_out, bn_momentum)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding="same", bias=False)
        self.norm2 = FrozenScaleBN(c_out, bn_momentum)
        for conv in (self.conv1, self.conv2):  # identity-like (partial dirac) init
            w = conv.weight.data
            torch.nn.init.dirac_(w[: w.size(1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.gelu(self.norm1(x))
        return F.gelu(self.norm2(self.conv2(x)))


class FastNet(nn.Module):
    def __init__(self, widths, bn_momentum: float, scale: float, whiten_kernel: int = 2, num_classes: int = 10):
        """The architecture's values come from train_classifier.fast (params.yaml) or a model file."""
        super().__init__()
        whiten_width = 2 * 3 * whiten_kernel**2
        self.whiten = nn.Conv2d(3, whiten_width, whiten_kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad = False
        groups, c_in = [], whiten_width
        for width in widths:
            groups.append(ConvGroup(c_in, width, bn_momentum))
            c_in = width
        self.groups = nn.Sequential(*groups)
        self.head = nn.Linear(c_in, num_classes, bias=False)
        self.scale = scale

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening conv to the ZCA-like eigenbasis of the images' k x k patches.

        ``images``: normalised float (N, 3, H, W). Filters come in +/- pairs (2 * 3 * k^2).
        """
        k = self.whiten.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, h, w, k, k
        patches = patches.transpose(1, 3).reshape(-1, 3 * k * k)  # (N*h*w, C*k*k) in (c,kh,kw) order
        cov = patches.T @ patches / len(patches)
        eigval, eigvec = torch.linalg.eigh(cov.double())
        eigval, eigvec = eigval.flip(0).float(), eigvec.T.flip(0).float()
        filters = (eigvec / torch.sqrt(eigval + eps)[:, None]).reshape(-1, 3, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))
        self.whiten.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        x = self.groups(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) * self.scale


# --------------------------------------------------------------------------------------------
# wrapper + persistence


class Classifier(nn.Module):
    """Normalisation + network: float images in [0, 1] (N, 3, 32, 32) -> logits (N, classes)."""

    def __init__(self, net: nn.Module, label_names: list[str] | None = None):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1))
        self.label_names = list(label_names or [])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def build_net(config: dict[str, Any]) -> nn.Module:
    """``config``: {"arch": "coursework" | "fast", **constructor kwargs}."""
    kwargs = dict(config)
    arch = kwargs.pop("arch")
    if arch == "coursework":
        return CourseworkCNN(**kwargs)
    if arch == "fast":
        return FastNet(**kwargs)
    raise ValueError(f"unknown classifier architecture {arch!r}")


def build_classifier(config: dict[str, Any], label_names: list[str] | None = None) -> Classifier:
    return Classifier(build_net(config), label_names)


def save_classifier(path: str | os.PathLike, model: Classifier, config: dict[str, Any], **extra) -> None:
    """Self-contained file: architecture config + label names + state_dict (+ extra metadata)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": "cifar10-classifier/1", "config": dict(config),
                "label_names": list(model.label_names), "state_dict": state, **extra}, path)


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu", source: str | None = None
                    ) -> Classifier:
    """Load a ``save_classifier`` file (weights only: nothing is unpickled but tensors and plain values);
    a missing or foreign file raises PipelineError, naming ``source`` (default: the path)."""
    source = source or str(path)
    if not os.path.isfile(path):
        raise PipelineError(f"{source}: model file not found (run `python -m pipeline train_classifier`)")
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise PipelineError(f"{source}: not a readable classifier checkpoint ({type(err).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != "cifar10-classifier/1":
        raise PipelineError(f"{source}: not a classifier saved by this pipeline")
    try:
        model = build_classifier(blob["config"], blob.get("label_names"))
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise PipelineError(f"{source}: classifier checkpoint does not match its architecture ({err})") from None
    return model.to(device).eval()
