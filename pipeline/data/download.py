"""Stage ``download``: CIFAR-10 (python tarball) and the 24 Kodak PNGs, verified before use.

Sources: the official URLs in params.yaml, or a mirror (``data.mirror`` or env ``DATA_MIRROR``): a
directory or URL holding ``SHA256SUMS``, ``cifar-10-python.tar.gz`` and ``kodak/kodimNN.png``.
Every file is downloaded to a temporary name in ``.cache/downloads`` and renamed only once its
checksum matches; the tarball is verified before it is unpacked, and unpacked into a temporary
folder that is renamed into ``data/raw`` at the end. A re-run finds the verified files in the cache
and transfers nothing.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.cleanup import remove_stale_temps
from pipeline.data.params import DataParams
from pipeline.errors import PipelineError
from pipeline.utils import atomic_path, file_digest, log, progress

#: the stage's outputs (pipeline/stage.py); dvc.yaml's cmd passes them
PATHS = {"cifar": "data/raw/cifar-10-batches-py", "kodak": "data/raw/kodak"}
SECTIONS = ("data",)
CACHE = Path(".cache/downloads")  # verified downloads, reused by a re-run (not a DVC output)
CIFAR_TARBALL = "cifar-10-python.tar.gz"
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_MEMBERS = ["batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
#: sha256 of the official kodimNN.png files (the well-known 768x512 / 512x768 PNGs)
KODAK_SHA256 = {
    1: "a56e27cbf5f843c048b6af1d6e090760e9c92fadba88b7dee0205918a37523bd",
    2: "4f4b74a79237e311d72cad958237b5f7088d8bce1c82305ebefe1a70e3022dfd",
    3: "e25ca1ff2f0c0cb5fdfd5f9b0a0bb21ac4c3de3c84a67f35b09a85d3306249db",
    4: "e3b946107c5d3441c022f678d0c3caf1e224d81b1604ba840a4f88e562de61aa",
    5: "10349e963c5c813d327852f82c1795fa4148d69fedffc4c589bee458e3ac3d53",
    6: "363510303b715d4cbc384e1ce227e466b613a09e1b71ae985882bf8e7fbd9b18",
    7: "b77d3f006f42414bb242222e0482e750c0fb9e5ee8d4bed2f6f11c5605fe54a4",
    8: "ba23983c76b4832ee0e8af0592664756841a16779acd69f792e268fb6d13d6e7",
    9: "6a4361c2fc194feb4edaa9f9a4a0620fb9943e460ac7fdf037fb0f6dd6607a7d",
    10: "9dfb70f5867c29ff9ed6313683f19b3d867849e40fbc0c4c54a4a89df341cf23",
    11: "7936814b58b5387fce2e4e2488b4ec830dadd95fa9520f358ddb30990b50f2b6",
    12: "d78c37c2f04f23761ed2367dd77e2db584ddd4c3950833fecf89f199a8126980",
    13: "bc34a3ce58dea09dce1704c997171602de90cb34d0c8503a988b77f473d39b08",
    14: "55a94550ff18f3246c4074fd32b77b0c74447c26b6ad274d564d999c0450ba6e",
    15: "7538cbb80cb9103606c48b806eae57d56c885c7f90b9b3be70a41160f9cbb683",
    16: "a89c7268ccd4718ba424a99fc4643c572cf692ca6eae887185ceb4e9f11d2e54",
    17: "37afcc89fbdcb76d9518e04b2fc011027e2f4cd14b3b2f83cefd721641a47c5b",
    18: "1a9258c365988961d87a0598725b609139c303ad48a5aad6c503c3b1a87849aa",
    19: "b7450b264b1b0a411390d8931b112c27905a992520fc90569dc4b920aa32bbdc",
    20: "3b46c71e3b92a563820ba32936be8330c586c41f938efd94be938386aae4328a",
    21: "ac958597c82073f6bb65129c68f72b651db5b9efd82e11547d07350214bc268b",
    22: "1cee58eb1f2d9c7ebb254d208a03c783ce6cf2c4d8c2cf45e235dd23b4ce1b29",
    23: "e3111a2fd4da24af15d6459ef9eacfe54106b38e27b4a21821b75c3f5d2d5baf",
    24: "1071c68372cc5a01435c2c225a5cf7d4bb803846ec08bb6b3d6721b156d7cb96",
}


@dataclass(frozen=True)
class Remote:
    """One file to fetch: where from, where to, and the checksum it must have."""

    url: str
    dest: Path
    algo: str  # "md5" | "sha256"
    digest: str


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "file")


def _join(base: str, rel: str) -> str:
    if _is_url(base):
        return base.rstrip("/") + "/" + rel
    return str(Path(base) / rel)


def _open(src: str, timeout: float):
    if _is_url(src):
        req = urllib.request.Request(src, headers={"User-Agent": "rnn-compression-pipeline"})
        resp = urllib.request.urlopen(req, timeout=timeout)
        size = resp.headers.get("Content-Length")
        return resp, int(size) if size else None
    path = Path(src)
    if not path.is_file():
        raise PipelineError(f"{src}: not found")
    return open(path, "rb"), path.stat().st_size


def _fetch(src: str, dest: Path, params: DataParams) -> None:
    """Copy ``src`` (URL or path) to ``dest`` with a progress bar, retrying network errors."""
    delay = params.backoff_s
    for attempt in range(params.retries + 1):
        try:
            with atomic_path(dest) as tmp:
                stream, size = _open(src, params.timeout_s)
                with stream, open(tmp, "wb") as out, progress(
                        total=size, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                    for chunk in iter(lambda: stream.read(1 << 20), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
            return
        except urllib.error.HTTPError as err:
            if err.code < 500 or attempt == params.retries:
                raise PipelineError(f"download of {src} failed: HTTP {err.code} {err.reason}") from None
            reason = f"HTTP {err.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
            if attempt == params.retries:
                raise PipelineError(f"download of {src} failed after {attempt + 1} tries: {err}") from None
            reason = str(err)
        log(f"[download] {src}: {reason}; retry {attempt + 1}/{params.retries} in {delay:.1f}s")
        time.sleep(delay)
        delay *= 2


def ensure(remote: Remote, params: DataParams) -> int:
    """Make ``remote.dest`` hold the verified file: reuse a valid cached copy, else download it.

    The download lands in a temporary file that is checked before it takes the final name, so a
    checksum mismatch leaves nothing behind. Returns the number of bytes transferred.
    """
    if remote.dest.is_file() and file_digest(remote.dest, remote.algo) == remote.digest:
        return 0
    remote.dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(remote.dest) as tmp:
        _fetch(remote.url, tmp, params)
        got = file_digest(tmp, remote.algo)
        if got != remote.digest:
            raise PipelineError(f"checksum mismatch for {remote.url}: {remote.algo} is {got}, "
                                f"expected {remote.digest}; nothing was kept")
    return remote.dest.stat().st_size


def read_sums(mirror: str, params: DataParams) -> dict[str, str]:
    """Parse the mirror's ``SHA256SUMS`` (``<sha256>  <relative path>`` lines)."""
    src = _join(mirror, "SHA256SUMS")
    dest = CACHE / "mirror-SHA256SUMS"
    if _is_url(mirror):
        _fetch(src, dest, params)
    else:
        if not Path(src).is_file():
            raise PipelineError(f"mirror {mirror}: no SHA256SUMS there (is the path right?)")
        dest = Path(src)
    sums = {}
    for line in dest.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def plan(params: DataParams, mirror: str | None) -> list[Remote]:
    """The files to fetch, with the checksum each must match."""
    kodak = [f"kodim{i:02d}.png" for i in range(1, params.kodak_images + 1)]
    if mirror:
        sums = read_sums(mirror, params)
        wanted = [CIFAR_TARBALL, *(f"kodak/{k}" for k in kodak)]
        missing = [w for w in wanted if w not in sums]
        if missing:
            raise PipelineError(f"mirror {mirror}: SHA256SUMS has no entry for {missing[0]}")
        return [Remote(_join(mirror, w), CACHE / w, "sha256", sums[w]) for w in wanted]
    return [Remote(params.cifar_url, CACHE / CIFAR_TARBALL, "md5", params.cifar_md5)] + [
        Remote(params.kodak_url.format(index=i), CACHE / "kodak" / f"kodim{i:02d}.png", "sha256",
               KODAK_SHA256[i]) for i in range(1, params.kodak_images + 1)]


def safe_extract_cifar(tarball: Path, dest: Path) -> None:
    """Unpack the CIFAR-10 batches into ``dest`` (a new folder), refusing unsafe members."""
    want = {f"{CIFAR_DIR}/{m}" for m in CIFAR_MEMBERS}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                name = os.path.normpath(m.name)
                if name.startswith(("/", "..")) or os.path.isabs(m.name) or ".." in Path(m.name).parts:
                    raise PipelineError(f"{tarball}: refusing tar member {m.name!r} (outside the target)")
                if m.issym() or m.islnk():
                    raise PipelineError(f"{tarball}: refusing link member {m.name!r}")
                if name in want and m.isfile():
                    members.append(m)
            found = {os.path.normpath(m.name) for m in members}
            if found != want:
                raise PipelineError(f"{tarball}: missing {sorted(want - found)[0]}")
            dest.mkdir(parents=True)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise PipelineError(f"{tarball}: cannot unpack: {err}") from None


def fetch(params: DataParams, mirror: str | None, cifar_dir: Path, kodak_dir: Path) -> dict[str, float]:
    """Download (or find in the cache) and verify everything, then publish ``cifar_dir`` and ``kodak_dir``."""
    start = time.perf_counter()
    remotes = plan(params, mirror)
    log(f"[download] source: {mirror or 'official URLs'}")
    transferred = sum(ensure(r, params) for r in progress(remotes, desc="files", unit="file"))
    cifar_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cifar_dir) as tmp:
        safe_extract_cifar(remotes[0].dest, tmp)
        for item in (tmp / CIFAR_DIR).iterdir():  # flatten cifar-10-batches-py/cifar-10-batches-py
            item.rename(tmp / item.name)
        (tmp / CIFAR_DIR).rmdir()
    kodak_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(kodak_dir) as tmp:
        tmp.mkdir()
        for remote in remotes[1:]:
            shutil.copyfile(remote.dest, tmp / remote.dest.name)
    log(f"[download] CIFAR-10 in {cifar_dir}, {len(remotes) - 1} Kodak images in {kodak_dir} "
        f"({transferred / 1e6:.1f} MB transferred)")
    return {"transferred_bytes": transferred, "files": len(remotes), "seconds": time.perf_counter() - start}


def run(params, paths) -> None:
    """The stage (pipeline/stage.py): ``params`` validated, its MLflow run active."""
    import mlflow

    mirror = os.environ.get("DATA_MIRROR") or params.data.mirror
    remove_stale_temps(paths.cifar, paths.kodak, CACHE / CIFAR_TARBALL, CACHE / "mirror-SHA256SUMS",
                       *(CACHE / "kodak" / f"kodim{i:02d}.png" for i in range(1, 25)), stage="download")
    mlflow.set_tag("data_source", mirror or "official")
    try:
        mlflow.log_metrics(fetch(params.data, mirror, paths.cifar, paths.kodak))
    finally:  # a failed run leaves no empty folder behind in data/
        for folder in {paths.cifar.parent, paths.kodak.parent}:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
