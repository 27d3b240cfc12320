"""download and augment: checksums, mirrors, safe unpacking, outputs."""

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import download
from pipeline.data.augment import preview_grid, random_patches
from pipeline.data.params import AugmentationParams, DataParams
from pipeline.data.transforms import augment_batch, random_cutout, random_flip, random_translate
from pipeline.errors import PipelineError
from pipeline.utils import file_digest


def _tar_with(member_name: str, path: Path, link: bool = False) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(member_name)
        if link:
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    return path


@pytest.mark.parametrize("name,link", [("../evil", False), ("/abs/evil", False),
                                       ("cifar-10-batches-py/data_batch_1", True)])
def test_unsafe_tar_members_refused(tmp_path, name, link):
    tarball = _tar_with(name, tmp_path / "t.tar.gz", link)
    with pytest.raises(PipelineError, match="refusing"):
        download.safe_extract_cifar(tarball, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "evil").exists()


def test_mirror_checksum_mismatch_leaves_nothing(tmp_path, mirror, monkeypatch, capsys):
    """One corrupted byte in the mirror's tarball: clear error, exit != 0, nothing in data/."""
    from pipeline.__main__ import main
    from tests.conftest import make_workspace

    bad = tmp_path / "mirror"
    bad.mkdir()
    shutil.copy(mirror / "SHA256SUMS", bad)
    shutil.copytree(mirror / "kodak", bad / "kodak")
    data = bytearray((mirror / "cifar-10-python.tar.gz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "cifar-10-python.tar.gz").write_bytes(bytes(data))
    ws = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(ws)
    monkeypatch.setenv("DATA_MIRROR", str(bad))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    assert main(["download"]) == 1
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "sha256" in err and "Traceback" not in err
    assert [p.name for p in (ws / "data").iterdir()] == ["images"]  # only the project's data/images (its README)
    assert not list((ws / ".cache").rglob("*.tar.gz*"))


def test_missing_mirror_entry(tmp_path):
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  cifar-10-python.tar.gz\n")
    with pytest.raises(PipelineError, match="no entry for kodak/kodim01.png"):
        download.plan(DataParams(kodak_images=1), str(tmp_path))


def test_official_plan_uses_md5_and_kodak_hashes():
    remotes = download.plan(DataParams(kodak_images=2), None)
    assert remotes[0].algo == "md5" and remotes[0].digest == "c58f30108f718f92721af3b95e74349a"
    assert remotes[2].url == "http://r0k.us/graphics/kodak/kodak/kodim02.png"
    assert remotes[2].digest == download.KODAK_SHA256[2]


def test_network_errors_retry_with_backoff(tmp_path, monkeypatch):
    calls, sleeps = [], []

    def flaky(src, timeout):
        calls.append(src)
        if len(calls) < 3:
            raise ConnectionError("reset")
        return io.BytesIO(b"hello"), 5

    monkeypatch.setattr(download, "_open", flaky)
    monkeypatch.setattr(download.time, "sleep", sleeps.append)
    body = b"hello"
    remote = download.Remote("http://x/f", tmp_path / "f", "sha256", hashlib.sha256(body).hexdigest())
    assert download.ensure(remote, DataParams(retries=3, backoff_s=0.5)) == 5
    assert sleeps == [0.5, 1.0] and remote.dest.read_bytes() == body
    assert download.ensure(remote, DataParams()) == 0  # valid file in place: nothing transferred
    assert len(calls) == 3


def test_download_outputs_and_rerun_transfers_nothing(tiny_workspace):
    raw = tiny_workspace / "data" / "raw"
    assert sorted(p.name for p in (raw / "cifar-10-batches-py").iterdir()) == sorted(download.CIFAR_MEMBERS)
    assert len(list((raw / "kodak").glob("kodim*.png"))) == 24
    assert (raw / "photos").is_dir() and not any((raw / "photos").iterdir())  # data.photos null: declared, empty
    assert (raw / "test_photos").is_dir() and not any((raw / "test_photos").iterdir())  # data.test_photos null
    sums = download.read_sums(str(download_mirror()), DataParams())
    for png in (raw / "kodak").iterdir():
        assert file_digest(png, "sha256") == sums[f"kodak/{png.name}"]


def download_mirror():
    from tests.conftest import mirror_path

    return mirror_path()


def test_augment_outputs(tiny_workspace):
    from pipeline.config import load_params

    params = load_params(tiny_workspace / "params.yaml")
    cifar = np.load(tiny_workspace / "data/prepared/cifar10.npz")
    assert cifar["x_train"].shape == (params.augment.train_limit, 32, 32, 3) and cifar["x_train"].dtype == np.uint8
    assert cifar["y_test"].shape == (params.augment.test_limit,)
    assert list(cifar["y_test"][:10]) == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # the known first test labels
    assert list(cifar["label_names"][:2]) == ["airplane", "automobile"]
    patches = np.load(tiny_workspace / "data/prepared/patches.npz")
    assert patches["train"].shape == (params.augment.patches, 32, 32, 3)
    assert patches["val"].shape == (params.augment.val_patches, 32, 32, 3)
    assert (tiny_workspace / "data/prepared/preview.png").stat().st_size > 0


def test_patches_are_reproducible_crops():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    a = random_patches(images, 20, 16, 0, False, np.random.default_rng(1))
    b = random_patches(images, 20, 16, 0, False, np.random.default_rng(1))
    assert np.array_equal(a, b)
    for patch in a:  # every unpadded patch is a real window of some source image
        assert any((np.lib.stride_tricks.sliding_window_view(img, (16, 16, 3)) == patch).all(axis=(-3, -2, -1)).any()
                   for img in images)


def test_patches_larger_than_cifar_images_come_from_upsampled_sources(tiny_workspace, tmp_path):
    """patch_size 64 (a 4x4 grid of 16-px code blocks, so the ConvLSTMs see interior positions) needs patch_scale >= 2."""
    from pydantic import ValidationError

    from pipeline.data.augment import prepare
    from pipeline.data.params import AugmentParams

    with pytest.raises(ValidationError, match="patch_size: 64 px is larger than a CIFAR-10 image upsampled x1"):
        AugmentParams(patch_size=64, patch_scale=1)
    with pytest.raises(ValidationError, match="multiple of 16"):
        AugmentParams(patch_size=40, patch_scale=2)
    params = AugmentParams(train_limit=20, test_limit=10, patches=12, val_patches=5, patch_size=64, patch_scale=2,
                           preview_grid=2)
    out = {k: tmp_path / f"{k}.out" for k in ("cifar", "patches", "preview")}
    prepare(params, AugmentationParams(), 0, tiny_workspace / "data/raw/cifar-10-batches-py", out["cifar"],
            out["patches"], out["preview"])
    patches = np.load(out["patches"])
    assert patches["train"].shape == (12, 64, 64, 3) and patches["val"].shape == (5, 64, 64, 3)
    val_source = np.load(out["cifar"])["x_test"]
    # a val patch (no padding) of a x2 upsampled image, downsampled back by 2x2 means, is close to a source image
    small = patches["val"].reshape(5, 32, 2, 32, 2, 3).mean(axis=(2, 4))
    assert all(min(np.abs(s - v.astype(float)).mean() for v in val_source) < 8 for s in small)
    from PIL import Image

    assert Image.open(out["preview"]).size == ((2 * 34 * 2 + 8) * 3, 2 * 34 * 3)


def test_preview_grid_shape():
    tiles = np.zeros((4, 8, 8, 3), np.uint8)
    assert preview_grid(tiles, 2).shape == (20, 20, 3)


def test_flip_twice_is_identity_and_translate_is_a_shift():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    flipped = random_flip(x, torch.Generator().manual_seed(1))
    assert torch.equal(random_flip(flipped, torch.Generator().manual_seed(1)), x)
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(-1)) for f, o in zip(flipped, x))
    moved = random_translate(x, 2, gen)
    assert moved.shape == x.shape
    # the centre 4x4 of the shifted image is a window of the original
    for m, o in zip(moved, x):
        centre = m[:, 2:6, 2:6]
        assert any(torch.equal(centre, o[:, 2 + dy:6 + dy, 2 + dx:6 + dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))


def test_cutout_zeroes_at_most_a_square():
    x = torch.ones(32, 3, 16, 16)
    out = random_cutout(x, 4, torch.Generator().manual_seed(0))
    zeros = (out == 0).sum(dim=(2, 3))
    assert (zeros <= 16).all() and (zeros > 0).any()
    assert (zeros[:, 0] == zeros[:, 1]).all()  # same square in every channel
    assert torch.equal(augment_batch(x, AugmentationParams(flip=False, translate=0, cutout=0)), x)


# ---------------------------------------------------------------------------------------------
# issue 9: CIFAR-10 batches are read with a restricted unpickler; stale temporaries are removed


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_batch_that_runs_code_is_refused(tmp_path, protocol):
    """A tampered batch (valid pickle, calls os.system when loaded) is refused; the command never runs."""
    import pickle

    from pipeline.data.cifar import _unpickle

    marker = tmp_path / "pwned"
    evil = tmp_path / "data_batch_1"
    evil.write_bytes(pickle.dumps({"data": _RunsCode(marker), "labels": [1]}, protocol=protocol))
    with pytest.raises(PipelineError, match="cannot read CIFAR-10 batch: refusing"):
        _unpickle(evil)
    assert not marker.exists()
    # sanity: the unrestricted pickle module would have run it (so the test does test something)
    pickle.loads(evil.read_bytes())
    assert marker.exists()


def test_cifar_batch_with_object_array_is_refused(tmp_path):
    import pickle

    from pipeline.data.cifar import _unpickle

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.array([1, "x"], dtype=object)}, protocol=2))
    with pytest.raises(PipelineError, match="refusing"):
        _unpickle(path)


def test_restricted_unpickler_reads_a_numpy_batch_like_the_original(tmp_path):
    """What the format has (dict of bytes keys, list of int, bytes, str, uint8 array) round-trips."""
    import pickle

    from pipeline.data.cifar import _unpickle

    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [3, 1, 4],
             b"data": np.arange(3 * 3072, dtype=np.uint8).reshape(3, 3072), b"filenames": [b"a.png", "b.png"]}
    for protocol in (2, 4):
        path = tmp_path / f"p{protocol}"
        path.write_bytes(pickle.dumps(batch, protocol=protocol))
        got = _unpickle(path)
        assert got[b"labels"] == [3, 1, 4] and got[b"filenames"] == [b"a.png", "b.png"]
        assert got[b"data"].dtype == np.uint8 and np.array_equal(got[b"data"], batch[b"data"])


def test_real_cifar_batches_load_through_the_restricted_unpickler(tmp_path, mirror):
    """The official batches (numpy 1.x pickles, protocol 2) still load, and equal the plain pickle's."""
    import pickle

    from pipeline.data.cifar import _unpickle

    with tarfile.open(mirror / "cifar-10-python.tar.gz") as tar:
        tar.extract("cifar-10-batches-py/test_batch", tmp_path, filter="data")
        tar.extract("cifar-10-batches-py/batches.meta", tmp_path, filter="data")
    got = _unpickle(tmp_path / "cifar-10-batches-py" / "test_batch")
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        plain = pickle.load(f, encoding="bytes")
    assert got[b"data"].shape == (10000, 3072) and np.array_equal(got[b"data"], plain[b"data"])
    assert got[b"labels"] == plain[b"labels"]
    meta = _unpickle(tmp_path / "cifar-10-batches-py" / "batches.meta")
    assert meta[b"label_names"][0] == b"airplane"


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    from pipeline.cleanup import remove_stale_temps

    raw = tmp_path / "raw"
    (raw / ".cifar-10-batches-py.ab12.tmp").mkdir(parents=True)
    (raw / ".cifar-10-batches-py.ab12.tmp" / "data_batch_1").write_bytes(b"x" * 100)
    (raw / ".kodak.zz.tmp").write_bytes(b"x")
    (raw / "..kodak.zz.tmp.yy.tmp").write_bytes(b"x")  # a temporary of a temporary (nested atomic writes)
    keep = [raw / "cifar-10-batches-py", raw / ".other.x.tmp", raw / "kodak.tmp", raw / ".kodak.notes"]
    keep[0].mkdir()
    for path in keep[1:]:
        path.write_text("mine")
    assert remove_stale_temps(raw / "cifar-10-batches-py", raw / "kodak") == 3
    assert sorted(p.name for p in raw.iterdir()) == sorted(p.name for p in keep)
