"""The original CIFAR-10 python batches, read safely: only plain values and numeric arrays are unpickled
(a tampered mirror or tarball cannot run code), and a batch of another shape is one clear error."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.utils import progress


def _plain_dtype(*args):
    """``numpy.dtype`` for the unpickler: plain numeric dtypes only (an object dtype could hold anything)."""
    dtype = np.dtype(*args)
    if dtype.hasobject or dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"refusing dtype {dtype}")
    return dtype


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what the CIFAR-10 python batches hold: dicts, lists, bytes, str, int and numpy arrays.

    Any other global (``os.system``, ``builtins.eval``, ...) is refused, so a tampered mirror or
    tarball cannot run code when its batches are read.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): None,  # how numpy 1.x pickled arrays (the CIFAR files)
        ("numpy._core.multiarray", "_reconstruct"): None,
        ("numpy", "ndarray"): None,
        ("numpy", "dtype"): _plain_dtype,
        # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1"): str -> bytes only
        ("_codecs", "encode"): __import__("codecs").encode,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of the CIFAR-10 format)")
        if self.ALLOWED[(module, name)] is not None:
            return self.ALLOWED[(module, name)]
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct

            return _reconstruct
        return np.ndarray


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise PipelineError(f"{path}: missing; run the download stage first (dvc repro download)")
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as err:  # corrupt or tampered pickle
        raise PipelineError(f"{path}: cannot read CIFAR-10 batch: {err}") from None
    if not isinstance(batch, dict):
        raise PipelineError(f"{path}: not a CIFAR-10 batch (a {type(batch).__name__}, not a dict)")
    return batch


def load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python batch of CIFAR-10 as HWC uint8 images and int64 labels."""
    batch = _unpickle(path)
    try:
        x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as err:
        raise PipelineError(f"{path}: not a CIFAR-10 batch ({err})") from None
    if len(x) != len(y) or y.ndim != 1:
        raise PipelineError(f"{path}: not a CIFAR-10 batch ({len(x)} images, {len(y)} labels)")
    return x, y


def label_names(raw: Path) -> np.ndarray:
    try:
        return np.array([n.decode() for n in _unpickle(raw / "batches.meta")[b"label_names"]])
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise PipelineError(f"{raw / 'batches.meta'}: not CIFAR-10's label names ({err})") from None


def load_cifar(raw: Path) -> dict[str, np.ndarray]:
    """Read the original python batches into HWC uint8 arrays."""
    xs, ys = [], []
    for name in progress([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], desc="CIFAR-10 batches"):
        x, y = load_batch(raw / name)
        xs.append(x)
        ys.append(y)
    return {"x_train": np.ascontiguousarray(np.concatenate(xs[:5])), "y_train": np.concatenate(ys[:5]),
            "x_test": np.ascontiguousarray(xs[5]), "y_test": ys[5], "label_names": label_names(raw)}
