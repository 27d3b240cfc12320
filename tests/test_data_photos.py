"""download's optional photo set (data.photos; the gpu profile: DIV2K's training images) and augment reading it.

The real archive (3.5 GB) is never downloaded here: a tiny zip of small PNGs, made per test, stands in for it
in a temporary mirror beside the offline CIFAR-10 / Kodak mirror's files.
"""

from __future__ import annotations

import hashlib
import io
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import download
from pipeline.data.params import DataParams
from pipeline.errors import PipelineError
from pipeline.stage import defaults

DIV2K = "DIV2K_train_HR.zip"
DIV2K_VALID = "DIV2K_valid_HR.zip"


def _png(seed: int, size=(48, 40)) -> bytes:
    from PIL import Image

    img = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _zip(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    """A zip of ``members`` (name -> bytes) plus symlink members (name -> link target), in that order."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def _div2k_like(path: Path, n: int = 12) -> tuple[Path, dict[str, bytes]]:
    """A zip laid out like DIV2K_train_HR.zip (a top folder, then 0001.png ...), plus a non-image member."""
    pngs = {f"{i:04d}.png": _png(i) for i in range(1, n + 1)}
    members = {"DIV2K_train_HR/": b"", **{f"DIV2K_train_HR/{k}": v for k, v in pngs.items()},
               "DIV2K_train_HR/readme.txt": b"not an image"}
    return _zip(path, members), pngs


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _photos_params(archive: Path, **kw) -> DataParams:
    return DataParams(kodak_images=1, photos="div2k", photos_url=f"https://example.invalid/x/{archive.name}",
                      photos_sha256=_sha256(archive), photos_size=archive.stat().st_size, **kw)


def _mirror(root: Path, archive: Path | None, source: Path | None = None, sha: str | None = None,
            tests: Path | None = None) -> Path:
    """A mirror: the offline mirror's CIFAR-10 and Kodak (links, when ``source`` is given; else only
    SHA256SUMS lines for them) plus ``photos/<archive>`` with its line (``sha`` overrides the line's checksum),
    and ``test_photos/<tests>`` with its line."""
    root.mkdir(parents=True)
    lines = []
    if source is not None:
        lines += (source / "SHA256SUMS").read_text().splitlines()
        (root / download.CIFAR_TARBALL).symlink_to(source / download.CIFAR_TARBALL)
        (root / "kodak").symlink_to(source / "kodak", target_is_directory=True)
    else:
        lines += ["0" * 64 + "  " + download.CIFAR_TARBALL, "1" * 64 + "  kodak/kodim01.png"]
    if archive is not None:
        (root / "photos").mkdir()
        (root / "photos" / archive.name).write_bytes(archive.read_bytes())
        lines.append(f"{sha or _sha256(archive)}  photos/{archive.name}")
    if tests is not None:
        (root / "test_photos").mkdir()
        (root / "test_photos" / tests.name).write_bytes(tests.read_bytes())
        lines.append(f"{_sha256(tests)}  test_photos/{tests.name}")
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return root


# --- params -------------------------------------------------------------------------------------------------------


def test_photos_params_need_url_and_checksum_of_a_zip():
    from pydantic import ValidationError

    assert DataParams().photos is None  # the default: no photo set
    with pytest.raises(ValidationError, match="photos_sha256: required"):
        DataParams(photos="div2k", photos_url="https://example.invalid/a.zip")
    with pytest.raises(ValidationError, match="photos_url: required"):
        DataParams(photos="div2k", photos_sha256="a" * 64)
    with pytest.raises(ValidationError, match="not name a .zip"):
        DataParams(photos="div2k", photos_url="https://example.invalid/a.tar", photos_sha256="a" * 64)
    with pytest.raises(ValidationError, match="photos_sha256"):
        DataParams(photos="div2k", photos_url="https://example.invalid/a.zip", photos_sha256="A" * 64)


def test_gpu_profile_names_div2k_by_its_official_url_and_checksum():
    from pipeline.config import read_raw, resolve
    from tests.conftest import REPO

    raw = read_raw(REPO / "params.yaml")
    gpu = resolve({**raw, "profile": "gpu"})
    assert gpu.data.photos == "div2k"
    assert gpu.data.photos_url == "https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_train_HR.zip"
    # tensorflow/datasets, url_checksums/div2k.txt
    assert gpu.data.photos_sha256 == "9d0b9c463f6e35b6c62cc6a930ee2224f670b34c1df841a57670f9acf0f6c335"
    assert gpu.data.photos_size == 3530603713
    assert gpu.augment.patch_source == str(defaults(download).photos)  # the codec trains on what download unpacked
    for profile in ("cpu", "coursework", "tiny"):  # everyone else: no photo set, CIFAR-10 patches
        p = resolve({**raw, "profile": profile})
        assert p.data.photos is None and p.augment.patch_source == "cifar10", profile


def test_gpu_profile_evaluates_on_div2k_valid_too():
    """A second public set, by its official URL and the checksum tensorflow/datasets pins (url_checksums/div2k.txt):
    the gpu profile's headline never rests on Kodak alone."""
    from pydantic import ValidationError

    from pipeline.config import read_raw, resolve
    from tests.conftest import REPO

    gpu = resolve({**read_raw(REPO / "params.yaml"), "profile": "gpu"})
    assert gpu.data.test_photos == "div2k-valid" and gpu.evaluate.extra_datasets == ["div2k-valid"]
    assert gpu.data.test_photos_url == "https://data.vision.ee.ethz.ch/cvl/DIV2K/" + DIV2K_VALID
    assert gpu.data.test_photos_sha256 == "20dd31fd84d777bc1cf5d6b7654a3f569c0aec74458ae094122ad1d0489900fc"
    assert gpu.data.test_photos_size == 448993893
    with pytest.raises(ValidationError, match="test_photos_sha256: required"):
        DataParams(test_photos="div2k-valid", test_photos_url="https://example.invalid/a.zip")
    with pytest.raises(ValidationError, match="built-in set"):
        DataParams(test_photos="kodak", test_photos_url="https://example.invalid/a.zip", test_photos_sha256="a" * 64)


def test_test_photos_come_last_from_the_official_url_or_the_mirror(tmp_path):
    tests, _ = _div2k_like(tmp_path / DIV2K_VALID, 2)
    p = DataParams(kodak_images=1, test_photos="div2k-valid", test_photos_url="https://example.invalid/x/" + DIV2K_VALID,
                   test_photos_sha256=_sha256(tests), test_photos_size=tests.stat().st_size)
    remote = download.plan(p, None)[-1]
    assert remote.url.endswith(DIV2K_VALID) and remote.dest == download.CACHE / "test_photos" / DIV2K_VALID
    mirror = _mirror(tmp_path / "mirror", None, tests=tests)
    assert download.plan(p, str(mirror))[-1].url == str(mirror / "test_photos" / DIV2K_VALID)
    bare = _mirror(tmp_path / "bare", None)
    with pytest.raises(PipelineError, match=f"no entry for test_photos/{DIV2K_VALID} .data.test_photos: div2k-valid"):
        download.plan(p, str(bare))


# --- plan: which files, from where --------------------------------------------------------------------------------


def test_official_plan_adds_the_archive_last():
    p = DataParams(kodak_images=2, photos="div2k", photos_url="https://data.vision.ee.ethz.ch/cvl/DIV2K/" + DIV2K,
                   photos_sha256="9d" * 32, photos_size=10)
    remotes = download.plan(p, None)
    assert len(remotes) == 4 and remotes[-1].url == "https://data.vision.ee.ethz.ch/cvl/DIV2K/" + DIV2K
    assert (remotes[-1].algo, remotes[-1].digest, remotes[-1].size) == ("sha256", "9d" * 32, 10)
    assert remotes[-1].dest == download.CACHE / "photos" / DIV2K
    assert len(download.plan(DataParams(kodak_images=2), None)) == 3  # photos null: nothing more to fetch


def test_mirror_serves_the_archive_as_photos_entry(tmp_path):
    archive, _ = _div2k_like(tmp_path / DIV2K, 2)
    mirror = _mirror(tmp_path / "mirror", archive)
    remote = download.plan(_photos_params(archive), str(mirror))[-1]
    assert remote.url == str(mirror / "photos" / DIV2K) and remote.digest == _sha256(archive)


def test_mirror_without_the_archive_is_one_clear_error(tmp_path):
    archive, _ = _div2k_like(tmp_path / DIV2K, 2)
    mirror = _mirror(tmp_path / "mirror", None)
    with pytest.raises(PipelineError, match=f"SHA256SUMS has no entry for photos/{DIV2K} .data.photos: div2k"):
        download.plan(_photos_params(archive), str(mirror))


def test_mirror_checksum_must_equal_the_pinned_one(tmp_path):
    archive, _ = _div2k_like(tmp_path / DIV2K, 2)
    mirror = _mirror(tmp_path / "mirror", archive, sha="e" * 64)
    with pytest.raises(PipelineError, match="data.photos_sha256 is"):
        download.plan(_photos_params(archive), str(mirror))


@pytest.mark.parametrize("corrupt", ["byte", "size"])
def test_archive_checksum_or_size_mismatch_keeps_nothing(tmp_path, monkeypatch, corrupt):
    archive, _ = _div2k_like(tmp_path / DIV2K, 3)
    params = _photos_params(archive, retries=0)
    served = bytearray(archive.read_bytes())
    if corrupt == "byte":
        served[len(served) // 2] ^= 0xFF
    else:
        served += b"\0"
    source = tmp_path / "served.zip"
    source.write_bytes(bytes(served))
    dest = tmp_path / "cache" / "photos" / DIV2K
    remote = download.Remote(str(source), dest, "sha256", params.photos_sha256, params.photos_size)
    what = "checksum" if corrupt == "byte" else "size"
    with pytest.raises(PipelineError, match=f"{what} mismatch.*nothing was kept"):
        download.ensure(remote, params)
    assert not any(dest.parent.iterdir())  # no archive, no temporary
    source.write_bytes(archive.read_bytes())  # the right bytes: kept, and reused without a transfer
    assert download.ensure(remote, params) == archive.stat().st_size
    assert download.ensure(remote, params) == 0 and _sha256(dest) == params.photos_sha256


# --- unpacking ----------------------------------------------------------------------------------------------------


def test_extracts_exactly_the_pngs_flattening_the_top_folder(tmp_path):
    archive, pngs = _div2k_like(tmp_path / DIV2K, 5)
    assert download.safe_extract_photos(archive, tmp_path / "out") == 5
    got = {p.relative_to(tmp_path / "out").as_posix(): p.read_bytes() for p in (tmp_path / "out").rglob("*")}
    assert got == pngs  # 0001.png ... at the top, byte for byte; readme.txt and the folder entry left out


def test_nested_folders_are_kept_below_the_top_one(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"set/a/1.PNG": b"x", "set/b/2.png": b"y", "set/c.jpg": b"z"})
    assert download.safe_extract_photos(archive, tmp_path / "out") == 2
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()) \
        == ["a/1.PNG", "b/2.png"]


def test_hidden_members_are_skipped(tmp_path):
    """A zip made on macOS carries __MACOSX/ and ._name.png resource forks: not images, and not another top folder."""
    archive = _zip(tmp_path / "a.zip", {"set/0001.png": b"x", "set/._0001.png": b"fork",
                                        "__MACOSX/set/._0001.png": b"fork"})
    assert download.safe_extract_photos(archive, tmp_path / "out") == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["0001.png"]


def test_stale_temporaries_of_any_archive_are_found(tmp_path, monkeypatch):
    """A killed run's half-downloaded archive (whatever data.photos named then) is removed by the next run."""
    from pipeline.cleanup import remove_stale_temps

    monkeypatch.chdir(tmp_path)
    assert download._photo_cache_targets() == []  # no cache yet
    cache = download.CACHE / "photos"
    cache.mkdir(parents=True)
    (cache / f".{DIV2K}.k3x_9a2q.tmp").write_bytes(b"half")
    (cache / ".other.zip.abcdefgh.tmp").write_bytes(b"half")
    (cache / DIV2K).write_bytes(b"verified")  # a complete download stays
    assert sorted(download._photo_cache_targets()) == [cache / DIV2K, cache / "other.zip"]
    assert remove_stale_temps(*download._photo_cache_targets()) == 2
    assert [p.name for p in cache.iterdir()] == [DIV2K]


@pytest.mark.parametrize("members,links,why", [
    ({"DIV2K_train_HR/0001.png": b"x", "../evil.png": b"x"}, None, "outside the target"),
    ({"DIV2K_train_HR/../../evil.png": b"x"}, None, "outside the target"),
    ({"/tmp/evil.png": b"x"}, None, "outside the target"),
    ({"C:/evil.png": b"x"}, None, "outside the target"),
    ({"..\\evil.png": b"x"}, None, "outside the target"),
    ({"DIV2K_train_HR/0001.png": b"x"}, {"DIV2K_train_HR/0002.png": "/etc/passwd"}, "link member"),
    ({"DIV2K_train_HR/0001.png": b"x"}, {"DIV2K_train_HR/sub": ".."}, "link member"),  # not even a .png
], ids=["dotdot", "nested-dotdot", "absolute", "drive", "backslash", "symlink-png", "symlink-dir"])
def test_unsafe_members_refuse_the_whole_archive(tmp_path, members, links, why):
    archive = _zip(tmp_path / "bad.zip", members, links)
    (tmp_path / "work").mkdir()
    out = tmp_path / "work" / "out"
    with pytest.raises(PipelineError, match=f"refusing .*{why}"):
        download.safe_extract_photos(archive, out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip", "work"]
    assert not (tmp_path / "evil.png").exists()


def test_archive_without_pngs_or_not_a_zip(tmp_path):
    with pytest.raises(PipelineError, match="holds no PNG image"):
        download.safe_extract_photos(_zip(tmp_path / "a.zip", {"x/readme.txt": b"hi"}), tmp_path / "out")
    (tmp_path / "b.zip").write_bytes(b"not a zip at all")
    with pytest.raises(PipelineError, match="not a readable zip"):
        download.safe_extract_photos(tmp_path / "b.zip", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_member_is_caught_by_its_crc(tmp_path):
    data = _png(0)
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("p/0001.png", data)
        zf.writestr("p/0002.png", data)
    raw = bytearray(archive.read_bytes())
    raw[raw.index(data) + len(data) // 2] ^= 0xFF  # the first member's stored bytes, not its header
    archive.write_bytes(bytes(raw))
    with pytest.raises(PipelineError, match="cannot unpack"):
        download.safe_extract_photos(archive, tmp_path / "out")


# --- the stage, end to end (python -m pipeline download / augment in a workspace) -------------------------------


def _workspace(tmp_path: Path, profile: str, overrides: list[str]) -> Path:
    from pipeline.config import set_params
    from tests.conftest import make_workspace

    ws = make_workspace(tmp_path / "ws", profile=profile)
    set_params(ws / "params.yaml", None, overrides)
    return ws


def _stage(ws: Path, monkeypatch, mirror: Path, stage: str) -> int:
    from pipeline.__main__ import main

    monkeypatch.chdir(ws)
    monkeypatch.setenv("DATA_MIRROR", str(mirror))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    return main([stage])


@pytest.mark.slow
def test_gpu_profile_downloads_the_photos_and_augment_crops_them(tmp_path, monkeypatch, mirror):
    """The gpu profile's wiring, with its 3.5 GB archive replaced by a tiny one of the same name in the mirror
    (only the pinned checksum and size overridden) and tiny patch counts."""
    archive, pngs = _div2k_like(tmp_path / DIV2K, 12)
    tests, test_pngs = _div2k_like(tmp_path / DIV2K_VALID, 3)
    local = _mirror(tmp_path / "mirror", archive, source=mirror, tests=tests)
    ws = _workspace(tmp_path, "gpu", [f'data.photos_sha256="{_sha256(archive)}"',
                                      f"data.photos_size={archive.stat().st_size}", "data.kodak_images=1",
                                      f'data.test_photos_sha256="{_sha256(tests)}"',
                                      f"data.test_photos_size={tests.stat().st_size}",
                                      "augment.train_limit=64", "augment.test_limit=32", "augment.patches=40",
                                      "augment.val_patches=6", "augment.preview_grid=2"])
    assert _stage(ws, monkeypatch, local, "download") == 0
    photos = ws / "data" / "raw" / "photos"
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == pngs
    test_photos = ws / "data" / "raw" / "test_photos"  # the gpu profile's second evaluation set
    assert {p.name: p.read_bytes() for p in test_photos.iterdir()} == test_pngs
    assert not list(ws.rglob("*.tmp"))
    assert _stage(ws, monkeypatch, local, "augment") == 0
    patches = np.load(ws / "data" / "prepared" / "patches.npz")
    assert patches["train"].shape == (40, 32, 32, 3) and patches["val"].shape == (6, 32, 32, 3)
    from PIL import Image

    images = {name: np.asarray(Image.open(io.BytesIO(data))) for name, data in sorted(pngs.items())}
    held_out = set(sorted(images)[::10])  # photos.py holds every 10th file out for validation

    def source_of(patch):
        for name, img in images.items():
            windows = np.lib.stride_tricks.sliding_window_view(img, (32, 32, 3))
            if any((windows == p).all(axis=(-3, -2, -1)).any() for p in (patch, patch[:, ::-1])):  # flipped or not
                return name
        return None

    assert {source_of(p) for p in patches["val"]} <= held_out
    train_sources = {source_of(p) for p in patches["train"]}
    assert None not in train_sources and not train_sources & held_out and len(train_sources) == 10


@pytest.mark.slow
def test_gpu_profile_with_a_mirror_lacking_the_archive_fails_cleanly(tmp_path, monkeypatch, mirror, capsys):
    ws = _workspace(tmp_path, "gpu", ["data.kodak_images=1"])
    assert _stage(ws, monkeypatch, mirror, "download") == 1  # the offline mirror has no photos/ entry
    err = capsys.readouterr().err
    assert f"no entry for photos/{DIV2K}" in err and "Traceback" not in err
    assert not (ws / "data" / "raw").exists()  # nothing published, no empty folder left
