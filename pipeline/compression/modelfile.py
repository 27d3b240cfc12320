"""Model files of the RNN codec: a self-contained checkpoint (format tag, config, weights, fingerprint,
metadata) written by :func:`save_model` and read back, fingerprint checked, by :func:`load_model` (a path or
an MLflow model URI). The fingerprint is what every ``.rnnc`` file records of its model."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from pipeline.compression.errors import ModelError
from pipeline.compression.model import ModelConfig, RNNCompressor

DEFAULT_MODEL = Path("data/compressor/model.pt")
MODEL_FORMAT = "rnnc-model"


def model_fingerprint(model: RNNCompressor) -> bytes:
    """8-byte digest of the model's config and weights: files record it, decoders check it."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name == "context" and not tensor.any():
            continue  # an unfitted entropy model: the fingerprint of the weights alone, as before it existed
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.digest()[:8]


def save_model(model: RNNCompressor, path: str | os.PathLike, meta: dict | None = None,
               dtype: torch.dtype = torch.float32) -> None:
    """Self-contained checkpoint: format tag, config, state_dict (stored as ``dtype``), fingerprint, metadata.

    The fingerprint is of the model's weights as they are: for a ``dtype`` narrower than float32 they
    must already be representable in it (see ``tools.release.to_half``), or loading fails.
    """
    from pipeline.utils import atomic_path

    state = {k: v.detach().to("cpu", dtype).clone() for k, v in model.state_dict().items()}
    ckpt = {"format": MODEL_FORMAT, "version": 1, "config": model.config.to_dict(), "state_dict": state,
            "fingerprint": model_fingerprint(model).hex(), "meta": meta or {}}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # to a file object: torch.save names the zip's folder after a file *name* (here the random
        # temporary one), so the same weights would hash differently on every run (and DVC re-run
        # everything downstream); through a file object the folder is always "archive"
        torch.save(ckpt, f)


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> RNNCompressor:
    if isinstance(ckpt, dict) and "state_dict" not in ckpt and isinstance(ckpt.get("model"), dict):
        ckpt = {**ckpt, "state_dict": ckpt["model"]}  # a training checkpoint (train_compressor's last.pt)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise ModelError(f"{source}: not an RNN codec checkpoint (no config/state_dict)")
    try:
        model = RNNCompressor(ModelConfig.from_dict(dict(ckpt["config"])))
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise ModelError(f"{source}: checkpoint does not match the model: {str(err).splitlines()[0]}") from None
    expected = ckpt.get("fingerprint")
    if expected and model_fingerprint(model).hex() != expected:
        raise ModelError(f"{source}: checkpoint is corrupt (weights do not match its fingerprint)")
    return model.float().eval()


def load_model(source: str | os.PathLike | None = None) -> RNNCompressor:
    """A checkpoint path (default data/compressor/model.pt) or an MLflow model URI (``models:/…``,
    ``runs:/…``: the checkpoint logged there, ``pipeline.tracking_models.logged_checkpoint``) -> model on CPU.
    Either way the file is read with ``torch.load(weights_only=True)`` and its fingerprint checked."""
    from pipeline.tracking_models import is_model_uri, logged_checkpoint

    source = str(source if source is not None else DEFAULT_MODEL)
    if is_model_uri(source):
        with logged_checkpoint(source, "rnn-compressor", "an RNN codec", ModelError) as path:
            return _read_model(path, source)
    path = Path(source)
    if not path.is_file():
        raise ModelError(f"model {source}: no such file (train one with `python -m pipeline train_compressor`, "
                         "or pass --model PATH or --model models:/rnn-compressor/VERSION)")
    return _read_model(path, source)


def _read_model(path: Path, source: str) -> RNNCompressor:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ModelError(f"model {source}: not a readable checkpoint ({type(err).__name__})") from None
    return model_from_checkpoint(ckpt, f"model {source}")

