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

#: run state a workspace copy never takes from the checkout, even when git tracks it (a user may
#: commit dvc.lock): lock, DVC cache, run outputs, MLflow/Airflow stores, test artifacts, environments
RUN_STATE = ("dvc.lock", ".dvc/cache", ".dvc/tmp", ".dvc/config.local", "data", "mlruns", "mlartifacts",
             "mlflow.db", "airflow", ".cache", ".stack", ".dvc-remote", "tests/artifacts", ".venv", ".git",
             ".pytest_cache", "out", "runs")   # runs/: the long trainings' state kept across sessions
#: project files inside a run-state folder: data/images (evaluate.dataset: images) is in git, with its README
PROJECT_DATA = ("data/images/README.md",)
#: outside a git checkout only these are copied (the project's sources and configuration)
ALLOWLIST = (".ci", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore", "Makefile", "README.md",
             *PROJECT_DATA, "bench", "constraints.txt", "dags", "docker", "docs", "dvc.yaml", "params.yaml",
             "pipeline", "pyproject.toml", "scripts", "tests")


def _is_run_state(rel: str) -> bool:
    if rel in PROJECT_DATA:
        return False
    parts = rel.split("/")
    if "__pycache__" in parts or any(p.endswith(".egg-info") for p in parts) or rel.endswith(".pyc"):
        return True
    return any(rel == s or rel.startswith(s + "/") for s in RUN_STATE)


def project_files(src: Path = REPO) -> list[str]:
    """The files a workspace copy takes from ``src``: what git tracks or would track (not ignored),
    else the allowlist; never run state (``RUN_STATE``)."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=src, capture_output=True, text=True)
        in_git = top.returncode == 0 and Path(top.stdout.strip()).resolve() == src.resolve()
    except OSError:
        in_git = False
    if in_git:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=src,
                             capture_output=True, check=True).stdout
        names = sorted({n for n in out.decode().split("\0") if n})
    else:
        names = []
        for entry in ALLOWLIST:
            path = src / entry
            if path.is_file():
                names.append(entry)
            elif path.is_dir():
                names.extend(sorted(p.relative_to(src).as_posix() for p in path.rglob("*") if p.is_file()))
    return [n for n in names if not _is_run_state(n) and (src / n).is_file() and not (src / n).is_symlink()]


def mirror_path() -> Path:
    """The offline dataset mirror: $DATA_MIRROR, else ../shared/datasets beside the checkout."""
    path = Path(os.environ.get("DATA_MIRROR") or REPO.parent / "shared" / "datasets")
    if not (path / "SHA256SUMS").is_file():
        msg = f"dataset mirror not found at {path} (set DATA_MIRROR)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path.resolve()


def make_workspace(dest: Path, profile: str = "tiny", git: bool = False, src: Path = REPO) -> Path:
    """Copy the project's files (code, dvc.yaml, params.yaml; no run state) to ``dest``, select ``profile``."""
    from pipeline.config import set_params

    for rel in project_files(src):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, target)
    staged = subprocess.run(["git", "show", ":params.yaml"], cwd=src, capture_output=True)
    if staged.returncode == 0 and (src / ".git").exists():  # not a run's rewrite of the checkout's params.yaml
        (dest / "params.yaml").write_bytes(staged.stdout)
    (dest / "data").mkdir(exist_ok=True)
    set_params(dest / "params.yaml", profile, [])
    if git:
        subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
        subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
        subprocess.run(["git", "commit", "-qm", "workspace"], cwd=dest, check=True)
    return dest


def copy_workspace(src: Path, dest: Path, *skip: str) -> Path:
    """A copy of the stage workspace ``src`` at ``dest`` for one test, lean on disk (CI machines can be short of
    it): the download cache (``.cache``, the CIFAR-10 tarball) and the names in ``skip`` stay behind (run state:
    only at the top or in ``data/``, so ``classifier`` is data/classifier, never pipeline/classifier), and the
    inputs that ``download`` and ``augment`` left in ``data/raw`` and ``data/prepared`` are hard links (the
    later stages only read them; a re-run of those two replaces its outputs by rename, never writes into a
    file in place), copies where the file system refuses a link."""
    shared = (src / "data" / "raw", src / "data" / "prepared")

    def copy(a: str, b: str) -> None:
        if any(Path(a).is_relative_to(d) for d in shared):
            try:
                os.link(a, b)
                return
            except OSError:
                pass
        shutil.copy2(a, b)

    run_state = {Path(src), Path(src) / "data"}  # where the names in ``skip`` are left behind

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n in (".cache", "__pycache__") or (n in skip and Path(folder) in run_state)}

    shutil.copytree(src, dest, ignore=ignore, copy_function=copy)
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
