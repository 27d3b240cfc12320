"""Stage ``download``: CIFAR-10 (python tarball), the 24 Kodak PNGs and, when ``data.photos`` names one,
a high-resolution photo set (a .zip of PNGs, e.g. DIV2K's training images), verified before use; likewise
``data.test_photos``, a public test set for ``evaluate.dataset`` (e.g. DIV2K's validation images), unpacked
into ``data/raw/test_photos`` (mirror: ``test_photos/<archive name>``; written on every run, empty when null).

Sources: the official URLs in params.yaml, or a mirror (``data.mirror`` or env ``DATA_MIRROR``): a
directory or URL holding ``SHA256SUMS``, ``cifar-10-python.tar.gz``, ``kodak/kodimNN.png`` and, for
the photo set, ``photos/<archive name>`` (``photos/DIV2K_train_HR.zip``).
Every file is downloaded to a temporary name in ``.cache/downloads`` and renamed only once its
checksum matches; archives are verified before they are unpacked, and unpacked into a temporary
folder that is renamed into ``data/raw`` at the end. A re-run finds the verified files in the cache
and transfers nothing. ``data/raw/photos`` is written on every run (empty when ``data.photos`` is
null), so dvc.yaml declares it for every profile.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.cleanup import remove_stale_temps
from pipeline.data.params import DataParams
from pipeline.errors import PipelineError, TransientError
from pipeline.utils import atomic_path, file_digest, log, progress

STAGE = "download"
#: the stage's outputs (pipeline/stage.py); dvc.yaml's cmd gives them
PATHS = ("cifar", "kodak", "photos", "test_photos")
SECTIONS = ("data",)
CACHE = Path(".cache/downloads")  # verified downloads, reused by a re-run (not a DVC output)
CIFAR_TARBALL = "cifar-10-python.tar.gz"
CIFAR_DIR = "cifar-10-batches-py"
PHOTOS = "photos"  # the photo archive's folder in the cache and in a mirror
TEST_PHOTOS = "test_photos"  # the same for data.test_photos' archive (evaluate.dataset)
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
    size: int | None = None  # bytes, when known in advance (checked before the checksum)
    mirror: bool = False  # from a mirror (not the official source): its error hint differs


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


MIRROR_HINT = ("no network? Point the pipeline at a mirror: DATA_MIRROR=/path/or/url make run (or data.mirror in "
               "params.yaml). A mirror is a folder or URL holding SHA256SUMS, cifar-10-python.tar.gz and "
               "kodak/kodim01.png .. kodim24.png (this project's CI uses ../shared/datasets)")


def _unreachable(err: BaseException) -> bool:
    """No route to the host at all (name not resolved, network or host unreachable, connection refused):
    a retry in a few seconds meets the same, unlike a time-out or a dropped connection."""
    import errno
    import socket

    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, socket.gaierror | ConnectionRefusedError):
        return True
    return isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)


def _fetch(src: str, dest: Path, params: DataParams, mirror: bool = False) -> None:
    """Copy ``src`` (URL or path) to ``dest`` with a progress bar, retrying network errors.

    A host that cannot be reached at all is tried once more, then refused for good (a retry cannot bring
    the network back): the error names the URL, the reason and, for the official sources, how to use a
    mirror. Time-outs, dropped connections and server errors are retried with exponential back-off and,
    when they last, end in a ``TransientError`` (the DAG retries the stage later).
    """
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
            if err.code < 500:
                raise PipelineError(f"download of {src} failed: HTTP {err.code} {err.reason}") from None
            if attempt == params.retries:
                raise TransientError(f"download of {src} failed after {attempt + 1} tries: HTTP {err.code} "
                                     f"{err.reason}") from None
            reason = f"HTTP {err.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
            text = str(getattr(err, "reason", err))
            if _unreachable(err) and attempt >= min(1, params.retries):
                where = "check the mirror's address (DATA_MIRROR or data.mirror)" if mirror else MIRROR_HINT
                raise PipelineError(f"cannot reach {src} ({text}); {where}") from None
            if attempt == params.retries:
                raise TransientError(f"download of {src} failed after {attempt + 1} tries: {text}") from None
            reason = text
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
        _fetch(remote.url, tmp, params, remote.mirror)
        if remote.size is not None and tmp.stat().st_size != remote.size:
            raise PipelineError(f"size mismatch for {remote.url}: {tmp.stat().st_size} bytes, "
                                f"expected {remote.size}; nothing was kept")
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
        _fetch(src, dest, params, mirror=True)
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


def photos_entry(params: DataParams) -> str:
    """The photo archive's path in a mirror and in the cache: ``photos/DIV2K_train_HR.zip``."""
    return f"{PHOTOS}/{params.photos_archive}"


def test_photos_entry(params: DataParams) -> str:
    """The test set archive's path in a mirror and in the cache: ``test_photos/DIV2K_valid_HR.zip``."""
    return f"{TEST_PHOTOS}/{params.test_photos_archive}"


def plan(params: DataParams, mirror: str | None) -> list[Remote]:
    """The files to fetch, with the checksum each must match: CIFAR-10, the Kodak images, then the
    photo archive when ``params.photos`` names one, then the test set archive when ``params.test_photos`` does."""
    kodak = [f"kodim{i:02d}.png" for i in range(1, params.kodak_images + 1)]
    photos = photos_entry(params) if params.photos else None
    tests = test_photos_entry(params) if params.test_photos else None
    if mirror:
        sums = read_sums(mirror, params)
        wanted = [CIFAR_TARBALL, *(f"kodak/{k}" for k in kodak)]
        missing = [w for w in wanted if w not in sums]
        if missing:
            raise PipelineError(f"mirror {mirror}: SHA256SUMS has no entry for {missing[0]}")
        remotes = [Remote(_join(mirror, w), CACHE / w, "sha256", sums[w], mirror=True) for w in wanted]
        if photos:
            if photos not in sums:
                raise PipelineError(f"mirror {mirror}: SHA256SUMS has no entry for {photos} (data.photos: "
                                    f"{params.photos}); add the archive and its line, or set data.photos: null")
            if sums[photos] != params.photos_sha256:
                raise PipelineError(f"mirror {mirror}: SHA256SUMS gives {sums[photos]} for {photos}, but "
                                    f"data.photos_sha256 is {params.photos_sha256}")
            remotes.append(Remote(_join(mirror, photos), CACHE / photos, "sha256", params.photos_sha256,
                                  params.photos_size, mirror=True))
        if tests:
            if tests not in sums:
                raise PipelineError(f"mirror {mirror}: SHA256SUMS has no entry for {tests} (data.test_photos: "
                                    f"{params.test_photos}); add the archive and its line, or set data.test_photos: "
                                    "null")
            if sums[tests] != params.test_photos_sha256:
                raise PipelineError(f"mirror {mirror}: SHA256SUMS gives {sums[tests]} for {tests}, but "
                                    f"data.test_photos_sha256 is {params.test_photos_sha256}")
            remotes.append(Remote(_join(mirror, tests), CACHE / tests, "sha256", params.test_photos_sha256,
                                  params.test_photos_size, mirror=True))
        return remotes
    remotes = [Remote(params.cifar_url, CACHE / CIFAR_TARBALL, "md5", params.cifar_md5)] + [
        Remote(params.kodak_url.format(index=i), CACHE / "kodak" / f"kodim{i:02d}.png", "sha256",
               KODAK_SHA256[i]) for i in range(1, params.kodak_images + 1)]
    if photos:
        remotes.append(Remote(params.photos_url, CACHE / photos, "sha256", params.photos_sha256, params.photos_size))
    if tests:
        remotes.append(Remote(params.test_photos_url, CACHE / tests, "sha256", params.test_photos_sha256,
                              params.test_photos_size))
    return remotes


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


def _unsafe(name: str) -> bool:
    """An archive member name that would land outside the target folder (absolute, drive, ``..``)."""
    posix = name.replace("\\", "/")
    return posix.startswith("/") or bool(re.match(r"^[A-Za-z]:", posix)) or ".." in PurePosixPath(posix).parts


def photo_members(archive: Path) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """The PNG images of a zip archive, each with its path below the target folder (the single top folder
    that holds them all, ``DIV2K_train_HR/``, dropped). Any member that would land outside the target
    (absolute path, drive letter, ``..``), a link or another non-regular file makes the whole archive
    refused; other regular files (not ``.png``, or hidden: ``.name``, ``__MACOSX/``) are skipped."""
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise PipelineError(f"{archive}: not a readable zip archive: {err}") from None
    pngs = []
    for info in infos:
        if _unsafe(info.filename):
            raise PipelineError(f"{archive}: refusing zip member {info.filename!r} (outside the target)")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise PipelineError(f"{archive}: refusing link member {info.filename!r}")
        if info.is_dir():
            continue
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: no type recorded (DOS attributes, writestr)
            raise PipelineError(f"{archive}: refusing member {info.filename!r} (not a regular file)")
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        hidden = any(part.startswith(".") or part == "__MACOSX" for part in parts)  # e.g. macOS's ._0001.png
        if parts and parts[-1].lower().endswith(".png") and not hidden:
            pngs.append((info, parts))
    if not pngs:
        raise PipelineError(f"{archive}: holds no PNG image")
    tops = {parts[0] for _, parts in pngs}
    if len(tops) == 1 and all(len(parts) > 1 for _, parts in pngs):  # flatten DIV2K_train_HR/0001.png
        pngs = [(info, parts[1:]) for info, parts in pngs]
    return pngs


def safe_extract_photos(archive: Path, dest: Path) -> int:
    """Unpack the PNG images of ``archive`` into ``dest`` (a new folder), refusing unsafe members
    (``photo_members``); zipfile checks each member's CRC as it is read. Returns the number of images."""
    members = photo_members(archive)
    need = sum(info.file_size for info, _ in members)
    free = shutil.disk_usage(dest.parent).free
    if need > free:
        raise PipelineError(f"{archive}: unpacking needs {need / 1e9:.2f} GB, only {free / 1e9:.2f} GB free "
                            f"in {dest.parent}")
    dest.mkdir(parents=True)
    root = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for info, parts in progress(members, desc=f"unpacking {archive.name}", unit="image"):
                target = dest.joinpath(*parts)
                if root not in target.resolve().parents:  # belt and braces: checked by name above
                    raise PipelineError(f"{archive}: refusing zip member {info.filename!r} (outside the target)")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "xb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except FileExistsError as err:
        raise PipelineError(f"{archive}: two members unpack to {err.filename}") from None
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as err:
        raise PipelineError(f"{archive}: cannot unpack: {err}") from None
    return len(members)


def _publish_photos(archive: Remote | None, folder: Path) -> int:
    """Unpack a verified photo archive into ``folder`` (atomically), or publish it empty when no set is named:
    the folder is declared in dvc.yaml for every profile. Returns the number of images."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder) as tmp:
        if archive:
            return safe_extract_photos(archive.dest, tmp)
        tmp.mkdir()
    return 0


def fetch(params: DataParams, mirror: str | None, cifar_dir: Path, kodak_dir: Path,
          photos_dir: Path, test_photos_dir: Path | None = None) -> dict[str, float]:
    """Download (or find in the cache) and verify everything, then publish ``cifar_dir``, ``kodak_dir``,
    ``photos_dir`` (the photo set's PNGs; empty when ``params.photos`` is null) and ``test_photos_dir`` (the
    test set's PNGs; empty when ``params.test_photos`` is null; None: not written)."""
    start = time.perf_counter()
    remotes = plan(params, mirror)
    test = remotes.pop() if params.test_photos else None
    photos = remotes.pop() if params.photos else None
    archives = [a for a in (photos, test) if a]
    log(f"[download] source: {mirror or 'official URLs'}"
        + (f"; photos: {params.photos} ({photos.url})" if photos else "")
        + (f"; test photos: {params.test_photos} ({test.url})" if test else ""))
    for archive in archives:
        if archive.size and not (archive.dest.is_file() and archive.dest.stat().st_size == archive.size):
            archive.dest.parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(archive.dest.parent).free
            if archive.size > free:
                raise PipelineError(f"{archive.url}: {archive.size / 1e9:.2f} GB to download, only "
                                    f"{free / 1e9:.2f} GB free in {archive.dest.parent}")
    transferred = sum(ensure(r, params) for r in progress(remotes + archives, desc="files", unit="file"))
    for archive in archives:
        photo_members(archive.dest)  # refuse an unsafe archive before anything is published
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
    images = _publish_photos(photos, photos_dir)
    tests = _publish_photos(test, test_photos_dir) if test_photos_dir is not None else 0
    log(f"[download] CIFAR-10 in {cifar_dir}, {len(remotes) - 1} Kodak images in {kodak_dir}"
        + (f", {images} {params.photos} images in {photos_dir}" if photos else "")
        + (f", {tests} {params.test_photos} images in {test_photos_dir}" if test and test_photos_dir else "")
        + f" ({transferred / 1e6:.1f} MB transferred)")
    return {"transferred_bytes": transferred, "files": len(remotes) + len(archives), "photos": images,
            "test_photos": tests, "seconds": time.perf_counter() - start}


def _photo_cache_targets(name: str = PHOTOS) -> list[Path]:
    """The archives whose temporaries a killed run may have left in the cache (whatever data.photos, or
    data.test_photos for ``name`` TEST_PHOTOS, names now)."""
    folder = CACHE / name
    if not folder.is_dir():
        return []
    return [folder / p.name[1:].rsplit(".", 2)[0] for p in folder.iterdir()
            if p.name.startswith(".") and p.name.endswith(".tmp")]


def run(params, paths) -> None:
    """The stage (pipeline/stage.py): ``params`` validated, its MLflow run active."""
    import mlflow

    mirror = os.environ.get("DATA_MIRROR") or params.data.mirror
    remove_stale_temps(paths.cifar, paths.kodak, paths.photos, paths.test_photos, CACHE / CIFAR_TARBALL,
                       CACHE / "mirror-SHA256SUMS", *(CACHE / "kodak" / f"kodim{i:02d}.png" for i in range(1, 25)),
                       *_photo_cache_targets(), *_photo_cache_targets(TEST_PHOTOS), stage="download")
    mlflow.set_tag("data_source", mirror or "official")
    mlflow.set_tag("photos", params.data.photos or "none")
    try:
        mlflow.log_metrics(fetch(params.data, mirror, paths.cifar, paths.kodak, paths.photos, paths.test_photos))
    finally:  # a failed run leaves no empty folder behind in data/
        for folder in {paths.cifar.parent, paths.kodak.parent, paths.photos.parent, paths.test_photos.parent}:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
