"""kill -9 of a stage at exact points, then a re-run (tiny profile, through DVC as the DAG runs it).

For ``download`` (mid-fetch, mid-extraction, before renames, mid-copy), ``train_classifier`` and
``train_compressor`` (mid-epoch, mid-checkpoint write, a complete checkpoint not yet renamed, a
half-written model), five points each: the stage process SIGKILLs itself at the point (the harness in
``fault/sitecustomize.py``); each point runs in the session the previous one left, so later points
resume from what earlier ones wrote. After each kill DVC must not accept the stage; after the last,
one plain forced re-run must give outputs equal to an uninterrupted run with the same seed, ``dvc
status`` clean, no temporary file left, and no MLflow run of the stage left RUNNING (the killed ones
closed as KILLED with a note).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_workspace

pytestmark = [pytest.mark.slow, pytest.mark.faults]

FAULT_DIR = Path(__file__).resolve().parent / "fault"
#: stage -> five kill points (see fault/sitecustomize.py), in the order they are hit
POINTS = {
    "download": ["replace cifar-10-python.tar.gz 1",   # tarball fetched, before it takes its verified name
                 "extract - 3",                        # mid-extraction (3 of 7 batch files written)
                 "replace cifar-10-batches-py 1",      # extraction complete, folder not yet renamed
                 "call shutil:copyfile 1",             # mid-copy of the Kodak images
                 "call mlflow:log_metrics 1"],         # outputs in place, MLflow not yet told
    "train_classifier": ["step - 2",                   # mid-epoch 1, no checkpoint yet
                         "save-half last.pt 2",        # epoch 2's checkpoint half-written (epoch 1's kept)
                         "step - 3",                   # resumed from epoch 1: mid-epoch 2
                         "replace last.pt 1",          # resumed: epoch 2's checkpoint complete, not renamed
                         "save-half model.pt 1"],      # model.pt half-written (in the outputs' temp folder)
    "train_compressor": ["step - 3",
                         "save-half last.pt 2",
                         "step - 3",
                         "replace last.pt 1",
                         "save-half model.pt 1"],
}
#: outputs compared with the uninterrupted run (metrics without timings)
COMPARED = {
    "download": ["data/raw/cifar-10-batches-py", "data/raw/kodak"],
    "train_classifier": ["data/classifier/model.pt", "data/classifier/metrics.json", "data/classifier/history.csv"],
    "train_compressor": ["data/compressor/model.pt", "data/compressor/metrics.json"],
}
TIMING = ("time", "seconds", "_per_s", "_s")


def _digest(path: Path) -> dict[str, str]:
    if path.is_dir():
        return {str(p.relative_to(path)): _digest(p)[""] for p in sorted(path.rglob("*")) if p.is_file()}
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


def _snapshot(ws: Path, stage: str) -> dict[str, dict[str, str]]:
    return {out: _digest(ws / out) for out in COMPARED[stage]}


def _temps(ws: Path) -> list[str]:
    return sorted(str(p.relative_to(ws)) for root in ("data", ".cache") if (ws / root).exists()
                  for p in (ws / root).rglob("*.tmp"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory, mirror):
    """A git workspace on tiny where an uninterrupted `dvc repro` ran every stage under test."""
    ws = make_workspace(tmp_path_factory.mktemp("kill") / "ws", "tiny", git=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "MLFLOW_", "AIRFLOW_"))}
    env.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
               DATA_MIRROR=str(mirror), MLFLOW_TRACKING_URI=f"sqlite:///{ws / 'mlflow.db'}",
               PIPELINE_HOME=str(ws), PIPELINE_NO_PROGRESS="1", DVC_NO_ANALYTICS="1",
               PYTHONPATH=str(FAULT_DIR), OMP_NUM_THREADS="1")
    ws_env[ws] = env
    proc = _dvc(ws, "repro", "augment")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reference[ws] = {"download": _snapshot(ws, "download")}
    return ws


ws_env: dict[Path, dict[str, str]] = {}
reference: dict[Path, dict] = {}


def _dvc(ws: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(ws_env[ws])
    if fault:
        env["PIPELINE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=1800)


def _runs(ws: Path, stage: str):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    return [r for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string=f"tags.dvc_stage = '{stage}'",
        max_results=1000)]


@pytest.mark.parametrize("stage", list(POINTS))
def test_kill_9_then_rerun_gives_the_uninterrupted_result(ws, stage):
    if stage == "download":
        shutil.rmtree(ws / ".cache", ignore_errors=True)  # make it fetch again (from the mirror)
    else:  # the uninterrupted run of this stage, with the same seed
        proc = _dvc(ws, "repro", "--single-item", stage)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        reference[ws][stage] = _snapshot(ws, stage)
    killed_before = sum(r.info.status == "KILLED" for r in _runs(ws, stage))
    for point in POINTS[stage]:
        proc = _dvc(ws, "repro", "-f", "--single-item", stage, fault=f"{stage} {point}")
        assert proc.returncode != 0, f"{stage}: kill point {point!r} was never reached:\n{proc.stderr[-2000:]}"
        assert "exited with -9" in proc.stderr or "exited with 137" in proc.stderr, proc.stderr[-2000:]  # SIGKILL
        status = _dvc(ws, "status", stage)
        assert status.returncode == 0, status.stderr
        if "up to date" in status.stdout:  # DVC accepts what is there only if it is the complete result
            assert _snapshot(ws, stage) == reference[ws][stage], f"after a kill at {point!r} DVC accepts {stage}"
    debris = _temps(ws)
    proc = _dvc(ws, "repro", "-f", "--single-item", stage)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _snapshot(ws, stage) == reference[ws][stage], f"{stage}: re-run after kills differs from the uninterrupted run"
    status = _dvc(ws, "status", *(s for s in POINTS if s in reference[ws]))  # and everything upstream
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    assert _temps(ws) == [], f"temporary files left after the re-run (before it: {debris})"
    runs = _runs(ws, stage)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"], "a killed stage's MLflow run is still RUNNING"
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert len(killed) - killed_before == len(POINTS[stage])
    assert all(r.data.tags.get("orphaned") for r in killed)  # each closed with a note saying why
