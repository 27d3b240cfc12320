"""Shared fixtures. Environment for Airflow is set here, before anything imports airflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SESSION_TMP = Path(tempfile.mkdtemp(prefix="pipeline-tests-"))
DAG_WORKSPACE = SESSION_TMP / "dag_ws"

os.environ["AIRFLOW_HOME"] = str(SESSION_TMP / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ["PIPELINE_WORKSPACE"] = str(DAG_WORKSPACE)
os.environ["PIPELINE_TASK_RETRIES"] = "0"  # a failing stage fails the test at once
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["PIPELINE_NO_PROGRESS"] = "1"
os.environ.setdefault("GIT_AUTHOR_NAME", "tests")
os.environ.setdefault("GIT_AUTHOR_EMAIL", "tests@example.invalid")
os.environ.setdefault("GIT_COMMITTER_NAME", "tests")
os.environ.setdefault("GIT_COMMITTER_EMAIL", "tests@example.invalid")

#: what a workspace copy leaves out at the top level (environments, run outputs, caches)
TOP_IGNORE = {".venv", ".git", "data", ".cache", "mlflow.db", "mlartifacts", "airflow", ".pytest_cache",
              ".dvc-remote", ".notes", ".whl", "out", ".stack"}


def _ignore(src: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    if Path(src) == REPO:
        skip |= TOP_IGNORE & set(names)
    return skip


def mirror_path() -> Path:
    """The offline dataset mirror: $DATA_MIRROR, else ../shared/datasets beside the checkout."""
    path = Path(os.environ.get("DATA_MIRROR") or REPO.parent / "shared" / "datasets")
    if not (path / "SHA256SUMS").is_file():
        msg = f"dataset mirror not found at {path} (set DATA_MIRROR)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path.resolve()


def make_workspace(dest: Path, profile: str = "tiny", git: bool = False) -> Path:
    """Copy the project (code, dvc.yaml, params.yaml) to ``dest`` and select ``profile``."""
    from pipeline.config import set_params

    shutil.copytree(REPO, dest, ignore=_ignore)
    (dest / "data").mkdir(exist_ok=True)
    set_params(dest / "params.yaml", profile, [])
    if git:
        subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
        subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
        subprocess.run(["git", "commit", "-qm", "workspace"], cwd=dest, check=True)
    return dest


def run_stage(workspace: Path, stage: str) -> None:
    """Run ``python -m pipeline <stage>`` in-process inside ``workspace``."""
    from pipeline.__main__ import main

    old = Path.cwd()
    os.chdir(workspace)
    try:
        assert main([stage]) == 0, f"stage {stage} failed"
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions: one torch thread is fastest, and on a busy machine far faster than several."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def mirror() -> Path:
    return mirror_path()


@pytest.fixture(scope="session")
def tiny_workspace(mirror: Path) -> Path:
    """A project copy on the tiny profile with download + augment done; MLflow in its own DB."""
    ws = make_workspace(SESSION_TMP / "tiny_ws")
    os.environ["DATA_MIRROR"] = str(mirror)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{ws / 'mlflow.db'}"
    os.environ["PIPELINE_HOME"] = str(ws)
    for stage in ("download", "augment"):
        run_stage(ws, stage)
    return ws


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow SQLite DB with the DAGs serialised (dag.test() needs both)."""
    home = Path(os.environ["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    if not DAG_WORKSPACE.exists():
        make_workspace(DAG_WORKSPACE, profile="cpu", git=True)  # the DAG run switches it to tiny
    airflow = [sys.executable, "-m", "airflow"]
    for cmd in (["db", "migrate"], ["dags", "reserialize"], ["pools", "set", "dvc_workspace", "1", "dvc"]):
        proc = subprocess.run(airflow + cmd, capture_output=True, text=True, env=os.environ.copy())
        assert proc.returncode == 0, f"airflow {' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return home


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_TMP, ignore_errors=True)
