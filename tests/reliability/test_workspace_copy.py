"""Test workspaces never take run state from the checkout (issue 9 item 1: after `make run`, the
copies took dvc.lock and the DVC cache, so `download` was checked out of the cache and never ran)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import PROJECT_DATA, REPO, copy_workspace, make_workspace, project_files

RUN_STATE = ["dvc.lock", ".dvc/cache/files/md5/ab/cdef", ".dvc/tmp/rwlock", ".dvc/config.local", "data/raw/x.bin",
             "data/classifier/model.pt", "mlruns/0/meta.yaml", "mlartifacts/1/a.txt", "mlflow.db",
             "airflow/airflow.db", ".cache/downloads/cifar-10-python.tar.gz", "tests/artifacts/browser/01.png",
             ".stack/airflow.pid", "pipeline/__pycache__/x.cpython-311.pyc"]
SOURCES = ["pipeline/__init__.py", "pipeline/stage.py", "dags/dag.py", "dvc.yaml", "params.yaml", ".dvc/config",
           "tests/test_x.py", "Makefile"]


def _project(root: Path, git: bool) -> Path:
    for rel in SOURCES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("profile: tiny\n" if rel == "params.yaml" else f"# {rel}\n")
    if git:
        (root / ".gitignore").write_text("/data/*\n/mlflow.db\n/mlruns/\n/mlartifacts/\n/airflow/\n.cache/\n")
        (root / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        subprocess.run(["git", "add", "-A"], cwd=root, check=True)
        subprocess.run(["git", "commit", "-qm", "project"], cwd=root, check=True)
    for rel in RUN_STATE:  # what a run leaves (dvc.lock even committed, as the README suggests)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("state\n")
    if git:
        subprocess.run(["git", "add", "-f", "dvc.lock"], cwd=root, check=True)
        subprocess.run(["git", "commit", "-qm", "lock"], cwd=root, check=True)
    (root / "pipeline" / "new_module.py").write_text("# not committed yet, not ignored\n")
    return root


@pytest.mark.parametrize("git", [True, False])
def test_copy_takes_sources_and_no_run_state(tmp_path, git):
    src = _project(tmp_path / "src", git)
    files = set(project_files(src))
    assert set(SOURCES) <= files
    assert "pipeline/new_module.py" in files  # work in progress is tested too
    assert not files & set(RUN_STATE), sorted(files & set(RUN_STATE))


def test_params_yaml_comes_from_the_index_not_from_a_run(tmp_path):
    """A DAG run rewrites the checkout's params.yaml (profile, overrides); the copy takes the version git
    has staged, so a test's starting point does not depend on what ran last."""
    src = tmp_path / "src"
    src.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=src, check=True)
    for rel in ("params.yaml", "dvc.yaml"):
        (src / rel).write_text((REPO / rel).read_text())
    subprocess.run(["git", "add", "-A"], cwd=src, check=True)
    subprocess.run(["git", "commit", "-qm", "p"], cwd=src, check=True)
    (src / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("seed: 0", "seed: 7"))
    ws = make_workspace(tmp_path / "ws", "tiny", src=src)
    text = (ws / "params.yaml").read_text()
    assert "seed: 0" in text and "seed: 7" not in text and "profile: tiny" in text


def test_the_real_checkout_copy_has_no_run_state():
    files = project_files(REPO)
    assert "dvc.yaml" in files and "pipeline/__main__.py" in files
    assert not [f for f in files if f == "dvc.lock" or f.startswith(("data/", ".dvc/cache", ".dvc/tmp", "mlruns/",
                                                                    "tests/artifacts/", "airflow/", ".cache/"))
                and f not in PROJECT_DATA]  # data/images/README.md: the one project file under data/ (issue 26)
    assert set(PROJECT_DATA) <= set(files)


def test_copy_of_a_stage_workspace_is_lean_and_independent(tmp_path):
    """``copy_workspace``: no download cache, no skipped names; data/raw and data/prepared shared by hard link,
    everything else (code, params, outputs a test may change) a real copy."""
    src = tmp_path / "src"
    for rel in ("params.yaml", "pipeline/stage.py", ".cache/downloads/cifar-10-python.tar.gz", "data/raw/kodak/a.png",
                "data/prepared/patches.npz", "data/classifier/model.pt", "mlflow.db"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(f"{rel}\n")
    ws = copy_workspace(src, tmp_path / "ws", "mlflow.db")
    assert not (ws / ".cache").exists() and not (ws / "mlflow.db").exists()
    for rel in ("data/raw/kodak/a.png", "data/prepared/patches.npz"):
        assert (ws / rel).stat().st_ino == (src / rel).stat().st_ino
    for rel in ("params.yaml", "pipeline/stage.py", "data/classifier/model.pt"):
        assert (ws / rel).read_text() == f"{rel}\n" and (ws / rel).stat().st_ino != (src / rel).stat().st_ino
    (ws / "data/classifier/model.pt").write_text("changed\n")
    assert (src / "data/classifier/model.pt").read_text() == "data/classifier/model.pt\n"
