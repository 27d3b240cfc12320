"""kill -9 of a stage at exact points, then a re-run (tiny profile, through DVC as the DAG runs it).

For ``download`` (a fetched tarball not yet renamed, mid-extraction, an extracted folder not yet
renamed, mid-copy of the Kodak images, outputs in place but MLflow not yet told), ``train_classifier``
and ``train_compressor`` (mid-epoch, a half-written checkpoint, mid-epoch after a resume, a complete
checkpoint not yet renamed, a half-written model), five points each. The stage process SIGKILLs
itself at the point, chosen by progress it makes (the n-th optimiser step, ``torch.save``, rename,
extracted member, call; the harness in ``fault/sitecustomize.py``), never by time; the harness
records what was in progress, and the test checks the kill happened there (the half-written or
complete temporary on disk, the resume the run logged). Each point runs in the state the previous
one left, so later points resume from what earlier ones wrote.

After each kill: nothing partial is at an output path (each output is absent or equal to the
uninterrupted run's) and DVC accepts the stage only if its outputs are the complete result. After
the last, one plain re-run gives outputs equal to the uninterrupted run with the same seed
(``pipeline_seed``, run once for all stages; ``model.pt`` byte for byte), ``dvc status`` of the stage
and of everything upstream is clean, no
temporary file is left, and no MLflow run of the stage is left RUNNING (the five killed ones closed
as KILLED with a note).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.reliability.conftest import COMPARED, copy_seed, dvc, dvc_changed, snapshot, stage_env

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Point:
    fault: str            # "<kind> <arg> <n>" (fault/sitecustomize.py)
    phase: str            # what a kill there interrupts, checked on disk by ``check_phase``
    resumed: int | None = None  # a training stage: the epoch the killed run resumed after (None: fresh)


POINTS = {
    "download": [
        Point("replace cifar-10-python.tar.gz 1", "complete temp file"),   # fetched and verified, not renamed
        Point("extract - 3", "mid-extraction"),                            # 3 of 7 batch files written
        Point("replace cifar-10-batches-py 1", "complete temp folder"),    # extracted, folder not renamed
        Point("call shutil:copyfile 1", "cifar in place, kodak not"),      # mid-copy of the Kodak images
        Point("call mlflow:log_metrics 1", "outputs in place"),            # MLflow not yet told
    ],
    "train_classifier": [
        Point("step - 2", "mid-epoch"),                                    # epoch 1, no checkpoint yet
        Point("save-half last.pt 2", "half-written temp file"),            # epoch 2's checkpoint; epoch 1's kept
        Point("step - 3", "mid-epoch", resumed=1),                         # mid-epoch 2
        Point("replace last.pt 1", "complete temp file", resumed=1),       # epoch 2's checkpoint, not renamed
        Point("save-half model.pt 1", "half-written temp file", resumed=1),  # in the outputs' temp folder
    ],
    "train_compressor": [
        Point("step - 3", "mid-epoch"),
        Point("save-half last.pt 2", "half-written temp file"),
        Point("step - 3", "mid-epoch", resumed=1),
        Point("replace last.pt 1", "complete temp file", resumed=1),
        Point("save-half model.pt 1", "half-written temp file", resumed=1),
    ],
}
CHECKPOINT = "data/checkpoints/{stage}/last.pt"


def temps(ws: Path) -> list[str]:
    return sorted(str(p.relative_to(ws)) for root in ("data", ".cache") if (ws / root).exists()
                  for p in (ws / root).rglob("*.tmp"))


def mlflow_runs(ws: Path, stage: str):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.dvc_stage = '{stage}'", max_results=1000)


def _epoch(checkpoint: Path) -> int:
    import torch

    return int(torch.load(checkpoint, map_location="cpu", weights_only=False)["epoch"])


def check_phase(ws: Path, stage: str, point: Point, record: dict, reference: dict, mirror: Path) -> None:
    """The kill happened where the point says: what the harness recorded is on disk as expected."""
    now = snapshot(ws, stage)
    if point.phase in ("complete temp file", "half-written temp file"):
        temp = Path(record["path"])  # .NAME.<random>.tmp, or NAME inside the outputs' .<folder>.<random>.tmp
        assert temp.is_file() and (temp.name.endswith(".tmp") or temp.parent.name.endswith(".tmp")), record
        if point.phase == "half-written temp file":
            assert temp.stat().st_size == record["written"] < record["size"], record
        elif stage == "download":  # the whole tarball, verified, under its temporary name
            assert temp.stat().st_size == (mirror / "cifar-10-python.tar.gz").stat().st_size, record
        else:  # the whole next checkpoint, not yet in place of the last one
            assert _epoch(temp) == point.resumed + 1 and _epoch(Path(record["target"])) == point.resumed, record
    elif point.phase == "mid-extraction":
        folder = Path(record["path"]).parents[1]  # <temp folder>/cifar-10-batches-py/<member>
        assert folder.name.startswith(".cifar-10-batches-py.") and folder.name.endswith(".tmp"), record
        assert len([p for p in folder.rglob("*") if p.is_file()]) == 3, record
    elif point.phase == "complete temp folder":
        folder = Path(record["path"])
        assert folder.name.endswith(".tmp") and len([p for p in folder.rglob("*") if p.is_file()]) == 7, record
        assert now["data/raw/cifar-10-batches-py"] is None
    elif point.phase == "cifar in place, kodak not":
        assert now["data/raw/cifar-10-batches-py"] == reference["data/raw/cifar-10-batches-py"]
        assert now["data/raw/kodak"] is None and now["data/raw/photos"] is None  # photos come after Kodak
    elif point.phase == "outputs in place":
        assert now == reference
    else:
        assert point.phase == "mid-epoch" and record["step"] == int(point.fault.split()[-1]), record
    if stage != "download":  # the last complete checkpoint: none before a fresh run's first epoch ends
        last = ws / CHECKPOINT.format(stage=stage)
        if point.resumed is not None:
            expected = point.resumed + (point.fault.startswith("save-half model.pt"))  # epoch 2 then renamed
            assert _epoch(last) == expected, point
        else:
            assert last.is_file() == point.fault.startswith("save-half last.pt 2"), point


@pytest.mark.parametrize("stage", list(POINTS))
def test_kill_9_then_rerun_gives_the_uninterrupted_result(pipeline_seed, tmp_path, stage):
    ws = copy_seed(pipeline_seed, tmp_path / "ws")
    env = stage_env(ws, pipeline_seed.mirror)
    reference = pipeline_seed.reference[stage]
    record_file = tmp_path / "faults.jsonl"
    for i, point in enumerate(POINTS[stage]):
        proc = dvc(ws, {**env, "PIPELINE_FAULT": f"{stage} {point.fault}", "PIPELINE_FAULT_LOG": str(record_file)},
                   "repro", "-f", "--single-item", stage)
        output = proc.stdout + proc.stderr
        records = [json.loads(line) for line in record_file.read_text().splitlines()] if record_file.exists() else []
        assert len(records) == i + 1, f"{stage}: kill point {point.fault!r} was never reached:\n{output[-3000:]}"
        assert proc.returncode != 0 and re.search(r"exited with (-9|137)", output), output[-3000:]  # SIGKILL
        resumed = re.search(r"resuming from \S+ after epoch (\d+)/", output)
        assert (int(resumed.group(1)) if resumed else None) == point.resumed, output[-3000:]
        check_phase(ws, stage, point, records[-1], reference, pipeline_seed.mirror)
        # never a partial output: each output is absent or the complete result
        now = snapshot(ws, stage)
        assert all(now[out] in (None, reference[out]) for out in COMPARED[stage]), (point, now)
        changed = dvc_changed(ws, stage)
        if not changed:  # DVC accepts what is there only if it is the complete result
            assert now == reference, f"after a kill at {point.fault!r} DVC accepts {stage}"
        else:
            assert None in now.values() or point.phase == "outputs in place", (point, changed)
    debris = temps(ws)
    proc = dvc(ws, env, "repro", "-f", "--single-item", stage)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert snapshot(ws, stage) == reference, f"{stage}: re-run after kills differs from the uninterrupted run"
    # the stage and everything upstream (downstream stages see new timings in metrics.json: they would re-run)
    assert dvc_changed(ws, stage, with_deps=True) == {}, "dvc status is not clean after the re-run"
    assert temps(ws) == [], f"temporary files left after the re-run (before it: {debris})"
    runs = mlflow_runs(ws, stage)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"], "a killed stage's MLflow run is still RUNNING"
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert len(killed) == len(POINTS[stage]) and all(r.data.tags.get("orphaned") for r in killed)
    assert [r.info.status for r in runs].count("FINISHED") == 1
