"""pipeline.utils.atomic_path: whole outputs or none, and never a deleted folder it was not asked to write."""

from __future__ import annotations

import pytest

from pipeline.utils import atomic_path, atomic_write_bytes


def test_file_is_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_file_never_replaces_a_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"irreplaceable")
    with pytest.raises(IsADirectoryError):
        atomic_write_bytes(folder, b"an .rnnc file")
    assert (folder / "holiday.jpg").read_bytes() == b"irreplaceable"
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]  # no temporary left behind


def test_a_file_never_replaces_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError):
        atomic_write_bytes(".", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_a_written_folder_replaces_the_callers_folder_whole(tmp_path):
    out = tmp_path / "stage_out"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("1")
    with atomic_path(out) as tmp:  # the stage runs again: its own output folder is replaced
        tmp.mkdir()
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    with pytest.raises(RuntimeError):  # a failed run leaves the previous output as it was
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "c.txt").write_text("3")
            raise RuntimeError("crash")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage_out"]


def test_a_folder_never_replaces_a_file(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("old report")
    with pytest.raises(NotADirectoryError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
    assert target.read_text() == "old report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
