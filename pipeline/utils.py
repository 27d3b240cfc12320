"""Small helpers shared by the stages: atomic writes, JSON, seeding, device choice, progress."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    Works for files and directories: nothing half-written is ever left at ``path``, and nothing is
    deleted that the caller did not ask to write. A file is never put in place of an existing
    directory (``IsADirectoryError``; the directory is left as it was). A directory written by the
    block replaces a directory at ``path`` (the caller's own output folder, written again): the old
    one is first renamed aside, so ``path`` always holds a whole folder, and only then removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp = Path(tmp)
    old = tmp.with_name(tmp.name + ".old")
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            if not tmp.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def file_digest(path: str | os.PathLike, algo: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def git_commit(folder: str | os.PathLike) -> str | None:
    """The commit checked out in the git work tree that holds ``folder`` (None: not in one, or no git)."""
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=30)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): elsewhere bf16 is emulated, slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def select_device(prefer: str = "auto"):
    """``auto``: CUDA when present, else the CPU on all its cores."""
    import torch

    if prefer == "auto":
        prefer = "cuda" if torch.cuda.is_available() else "cpu"
    if prefer == "cpu":
        torch.set_num_threads(cpu_threads())
    return torch.device(prefer)


def cpu_threads() -> int:
    """The CPU threads this process may use: OMP_NUM_THREADS when set, else the cores it may run on
    (``taskset`` and container CPU sets respected, unlike ``os.cpu_count()``)."""
    try:
        wanted = int(os.environ.get("OMP_NUM_THREADS", "") or 0)
    except ValueError:
        wanted = 0
    if wanted > 0:
        return wanted
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on stderr (quiet when PIPELINE_NO_PROGRESS is set). Under ``make run``
    (``PIPELINE_EVENTS`` set) it also reports its position to the console, every few seconds."""
    from tqdm.auto import tqdm

    from pipeline import events

    kwargs.setdefault("disable", bool(os.environ.get("PIPELINE_NO_PROGRESS")))
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    if events.enabled() and not kwargs["disable"]:
        kwargs.setdefault("mininterval", 2.0)  # the redraws land in a log file: a few are enough
        return _reported_bar()(iterable, **kwargs)
    return tqdm(iterable, **kwargs)


def _reported_bar():
    from tqdm.auto import tqdm

    from pipeline import events

    class Reported(tqdm):
        def display(self, msg=None, pos=None):
            events.emit("progress", task=os.environ.get("PIPELINE_TASK", ""), desc=self.desc or "", n=self.n,
                        total=self.total, unit=self.unit)
            return super().display(msg, pos)

    return Reported


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
