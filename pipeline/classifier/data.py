"""CIFAR-10 for the classifier: ``cifar10.npz`` (the augment stage's output) read, checked and put on the device."""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError

ARRAYS = ("x_train", "y_train", "x_test", "y_test", "label_names")


@dataclass
class CifarData:
    """Images as uint8 (N, 3, 32, 32) and labels as int64, already on the training device."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    label_names: list[str]
    digest: str = ""  # of the training arrays: part of the checkpoint fingerprint

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], device: torch.device | str = "cpu") -> "CifarData":
        def images(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous().to(device)

        def labels(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a.astype(np.int64)).to(device)

        digest = hashlib.sha256()
        for key in ("x_train", "y_train"):
            digest.update(np.ascontiguousarray(arrays[key]).tobytes())
        return cls(images(arrays["x_train"]), labels(arrays["y_train"]), images(arrays["x_test"]),
                   labels(arrays["y_test"]), [str(n) for n in arrays["label_names"]], digest.hexdigest()[:16])


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read and check ``cifar10.npz`` (the augment stage's output)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: not found (run `python -m pipeline augment` first)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ARRAYS if k not in z.files]
            if missing:
                raise PipelineError(f"{path}: missing arrays {', '.join(missing)}")
            arrays = {k: z[k] for k in ARRAYS}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise PipelineError(f"{path}: unreadable ({err})") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(x) != len(y) or len(x) == 0:
            raise PipelineError(f"{path}: x_{split} must be uint8 (N, 32, 32, 3) matching y_{split}")
        if y.min() < 0 or y.max() >= len(arrays["label_names"]):
            raise PipelineError(f"{path}: y_{split} has labels outside 0..{len(arrays['label_names']) - 1}")
    return arrays
