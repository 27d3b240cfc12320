"""The state the kill tests share: one uninterrupted run of the whole tiny pipeline, made once.

``pipeline_seed`` runs ``dvc repro`` of every stage once in a git workspace (tiny profile, data from
the mirror): its outputs are the reference each interrupted-then-resumed stage must equal, and each
kill test starts from a copy of it (``copy_seed``), so no test re-runs the stages upstream of the one
it kills. A copy takes the code, ``dvc.lock``, the DVC cache (hard links: DVC never writes a cache
file in place) and the outputs; not DVC's run cache (it would restore a stage a test wants run), the
download cache (``download`` must fetch again), checkpoints, nor the MLflow store (each copy starts
from an empty, already migrated one: creating it costs seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import make_workspace

FAULT_DIR = Path(__file__).resolve().parent / "fault"
#: outputs compared with the uninterrupted run (metrics and history without timings)
COMPARED = {
    "download": ["data/raw/cifar-10-batches-py", "data/raw/kodak", "data/raw/photos"],
    "train_classifier": ["data/classifier/model.pt", "data/classifier/metrics.json",
                         "data/classifier/history.csv"],
    "train_compressor": ["data/compressor/model.pt", "data/compressor/metrics.json",
                         "data/compressor/history.csv"],
}
TIMING = ("time", "seconds", "_per_s", "_s", "tflops")


def digest(path: Path) -> dict[str, str] | None:
    """What must be equal between two runs with the same seed (None: the path does not exist)."""
    if not path.exists():
        return None
    if path.is_dir():
        return {str(p.relative_to(path)): digest(p)[""] for p in sorted(path.rglob("*")) if p.is_file()}
    if path.suffix == ".json":
        metrics = json.loads(path.read_text())
        keep = {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}
        return {"": json.dumps(keep, sort_keys=True)}
    if path.suffix == ".csv":
        rows = path.read_text().splitlines()
        header = rows[0].split(",")
        cols = [i for i, name in enumerate(header) if not any(t in name for t in TIMING)]
        return {"": "\n".join(",".join(r.split(",")[i] for i in cols) for r in rows)}
    return {"": hashlib.sha256(path.read_bytes()).hexdigest()}


def snapshot(ws: Path, stage: str) -> dict[str, dict[str, str] | None]:
    return {out: digest(ws / out) for out in COMPARED[stage]}


def stage_env(ws: Path, mirror: Path) -> dict[str, str]:
    """The environment DVC runs the stages of ``ws`` in (the fault harness on PYTHONPATH, inactive
    until PIPELINE_FAULT is set)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "MLFLOW_", "AIRFLOW"))}
    env.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
               DATA_MIRROR=str(mirror), MLFLOW_TRACKING_URI=f"sqlite:///{ws / 'mlflow.db'}",
               PIPELINE_HOME=str(ws), PIPELINE_NO_PROGRESS="1", DVC_NO_ANALYTICS="1",
               PYTHONPATH=str(FAULT_DIR), OMP_NUM_THREADS="1")
    return env


def dvc(ws: Path, env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=timeout)


def dvc_changed(ws: Path, *targets: str, with_deps: bool = False) -> dict:
    """``dvc status [--with-deps] targets`` (in-process: a DVC start-up per call costs seconds): {} when
    up to date."""
    import contextlib

    from dvc.repo import Repo

    with contextlib.chdir(ws), Repo(str(ws)) as repo:  # --with-deps finds no stage from another folder
        return repo.status(targets=list(targets) or None, with_deps=with_deps)


@dataclass
class Seed:
    ws: Path
    mirror: Path
    empty_mlflow_db: Path
    reference: dict[str, dict] = field(default_factory=dict)


@pytest.fixture(scope="session")
def pipeline_seed(tmp_path_factory, mirror) -> Seed:
    root = tmp_path_factory.mktemp("seed")
    empty = root / "empty-mlflow.db"
    migrate = subprocess.run([sys.executable, "-c", "import mlflow, sys; mlflow.MlflowClient(sys.argv[1])"
                              ".search_experiments()", f"sqlite:///{empty}"], capture_output=True, text=True,
                             timeout=600)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    ws = make_workspace(root / "ws", "tiny", git=True)
    shutil.copy2(empty, ws / "mlflow.db")
    proc = dvc(ws, stage_env(ws, mirror), "repro", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert dvc_changed(ws) == {}
    return Seed(ws, mirror, empty, {stage: snapshot(ws, stage) for stage in COMPARED})


def copy_seed(seed: Seed, dest: Path) -> Path:
    """A workspace in the state the seed's uninterrupted run left, with an empty MLflow store."""
    skip = {seed.ws: {".cache", "mlflow.db", "mlruns", "mlartifacts"}, seed.ws / "data": {"checkpoints"},
            seed.ws / ".dvc" / "cache": {"runs"}}  # DVC's run cache would restore a stage instead of running it

    def ignore(folder, names):
        return skip.get(Path(folder), set()) & set(names)

    def copy(src, dst):
        if f"{os.sep}.dvc{os.sep}cache{os.sep}" in src:
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(seed.ws, dest, symlinks=True, ignore=ignore, copy_function=copy)
    shutil.copy2(seed.empty_mlflow_db, dest / "mlflow.db")
    return dest
