"""The orchestrator killed mid-stage, then the DAG run again.

- unit: the stage guard (pipeline/orchestration/guard.py) takes DVC and the stage down when the task
  process that started it is killed with SIGKILL;
- end to end (tiny profile): ``make run``'s orchestrator (``local_run`` -> ``airflow dags test``) is
  killed with SIGKILL while ``train_classifier`` trains. Nothing of it may go on running; the re-run
  succeeds, marks the killed DAG run failed, leaves no MLflow run RUNNING (the killed stage's and the
  killed pipeline's parent closed as KILLED, with a note), and its classifier equals an uninterrupted
  run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, make_workspace


def _procs_in(folder: Path) -> list[tuple[int, str]]:
    """(pid, command line) of live processes whose working directory is inside ``folder``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z" and (cwd == str(folder) or cwd.startswith(str(folder) + "/")):
            found.append((int(entry), cmd))
    return found


def _wait(predicate, timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def test_guard_takes_the_stage_down_with_its_task(tmp_path):
    """Task process -> bash -> exec guard -> a shell with two children; SIGKILL the task process: the
    whole tree under the guard is gone within seconds (before: it lived on under PID 1)."""
    work = tmp_path / "work"
    work.mkdir()
    task = tmp_path / "task.py"
    task.write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen(['bash', '-c', 'exec {sys.executable} -m pipeline.orchestration.guard -- "
        "bash -c \"sleep 300 & sleep 301; wait\"'], cwd=sys.argv[1], start_new_session=True,\n"
        f"                 env={{'PYTHONPATH': {str(REPO)!r}, 'PATH': '/usr/bin:/bin'}})\n"
        "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, str(task), str(work)])
    try:
        assert _wait(lambda: len([p for p in _procs_in(work) if "sleep 30" in p[1]]) >= 2, 60), _procs_in(work)
    finally:
        proc.kill()
        proc.wait()
    left = _wait(lambda: not _procs_in(work), 30) or _procs_in(work)
    assert left is True, f"still running after the task process was killed: {left}"


def test_guard_passes_the_exit_status_through(tmp_path):
    assert subprocess.run([sys.executable, "-m", "pipeline.orchestration.guard", "--", "bash", "-c", "exit 3"],
                          cwd=REPO).returncode == 3


@pytest.mark.slow
@pytest.mark.faults
def test_orchestrator_killed_mid_stage_then_rerun(mirror, tmp_path, monkeypatch):
    import mlflow

    ws = make_workspace(tmp_path / "ws", "tiny", git=True)
    home = tmp_path / "airflow"  # its own Airflow DB, set up as `make airflow-init` does
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "MLFLOW_", "AIRFLOW"))}
    env.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
               PIPELINE_WORKSPACE=str(ws), PIPELINE_TASK_RETRIES="0", PIPELINE_NO_PROGRESS="1",
               DATA_MIRROR=str(mirror), MLFLOW_TRACKING_URI=f"sqlite:///{ws / 'mlflow.db'}", DVC_NO_ANALYTICS="1",
               AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
               AIRFLOW__CORE__LOAD_EXAMPLES="False")
    for args in (["db", "migrate"], ["pools", "set", "dvc_workspace", "1", "dvc"]):
        init = subprocess.run([sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True,
                              timeout=900)
        assert init.returncode == 0, init.stdout[-2000:] + init.stderr[-2000:]
    cmd = [sys.executable, "-m", "pipeline.orchestration.local_run", "pipeline", "-c", json.dumps({"profile": "tiny"})]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def training():  # the stage has started: its MLflow run is open (the stage process exists)
        if not [p for p in _procs_in(ws) if "pipeline train_classifier" in p[1]] or not (ws / "mlflow.db").exists():
            return False
        client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
        return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5,
                                  filter_string="tags.dvc_stage = 'train_classifier' and attributes.status = 'RUNNING'")

    assert _wait(training, 1800, 1.0), (tmp_path / "first.log").read_text()[-3000:]
    os.kill(first.pid, signal.SIGKILL)  # the orchestrator only: its children are left to fend for themselves
    first.wait()
    gone = _wait(lambda: not _procs_in(ws), 60)
    assert gone, f"left running after the orchestrator died: {_procs_in(ws)}"

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "was left running by a killed orchestrator: marked failed" in second.stderr

    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    assert not [(r.info.run_name, r.info.status) for r in runs if r.info.status == "RUNNING"]
    parents = [r for r in runs if r.data.tags.get("pipeline_parent") == "true"]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED"]
    killed_parent = next(r for r in parents if r.info.status == "KILLED")
    assert "orchestrator killed" in killed_parent.data.tags["orphaned"]
    killed = [r for r in runs if r.data.tags.get("dvc_stage") == "train_classifier" and r.info.status == "KILLED"]
    assert len(killed) == 1 and killed[0].data.tags.get("mlflow.parentRunId") == killed_parent.info.run_id
    assert "orphaned" in killed[0].data.tags

    runs_json = subprocess.run([sys.executable, "-m", "airflow", "dags", "list-runs", "pipeline", "-o", "json"],
                               env=env, capture_output=True, text=True, timeout=600)
    table = next(line for line in runs_json.stdout.splitlines() if line.startswith("[{"))  # after any log lines
    states = {r["run_id"]: r["state"] for r in json.loads(table)}
    assert states[killed_parent.data.tags["airflow.run_id"]] == "failed", states
    assert sorted(states.values()) == ["failed", "success"]

    # the stage result equals an uninterrupted run's
    model = ws / "data" / "classifier" / "model.pt"
    after_kill = hashlib.sha256(model.read_bytes()).hexdigest()
    again = subprocess.run([sys.executable, "-m", "dvc", "repro", "-f", "--single-item", "train_classifier"], cwd=ws,
                           env={**env, "PIPELINE_HOME": str(ws)}, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert hashlib.sha256(model.read_bytes()).hexdigest() == after_kill
