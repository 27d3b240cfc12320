"""The orchestrator killed mid-stage, then the DAG run again.

- unit: the stage guard (pipeline/orchestration/guard.py) takes DVC and the stage down when the task
  process that started it is killed with SIGKILL;
- end to end (tiny profile): ``make run``'s orchestrator (``local_run`` -> ``airflow dags test``) is
  killed with SIGKILL while ``train_classifier`` is in its second epoch (held there by the fault
  harness at its 6th optimiser step, so the kill lands mid-stage whatever the machine's speed; the
  workspace is a copy of the uninterrupted seed run with ``train_classifier`` not yet run, so only it
  and ``report`` run). Nothing of it may go on running; the re-run succeeds, marks the killed DAG run
  failed, leaves no MLflow run RUNNING (the killed stage's and the killed pipeline's parent closed as
  KILLED, with a note), and its classifier equals the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.reliability.conftest import copy_seed, dvc_changed, snapshot, stage_env


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


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a container's PID 1 may be slow to reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(predicate, timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def test_guard_takes_the_stage_down_with_its_task(tmp_path):
    """Task process -> bash -> exec guard -> a shell with two children, their output a pipe the task
    process reads (as Airflow's); SIGKILL the task process: the whole tree under the guard is gone
    within seconds (before: it lived on under PID 1; then the guard's own message about it hit the
    pipe nobody read any more, and the BrokenPipeError ended the guard before it stopped anything)."""
    work = tmp_path / "work"
    work.mkdir()
    task = tmp_path / "task.py"
    task.write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen(['bash', '-c', 'exec {sys.executable} -m pipeline.orchestration.guard -- "
        "bash -c \"sleep 300 & sleep 301; wait\"'], cwd=sys.argv[1], start_new_session=True,\n"
        "                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,  # as Airflow reads a task's output\n"
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


def test_the_stage_command_runs_the_guards_python_whatever_the_shell_read(tmp_path):
    """Debian's ``bash -c`` reads ~/.bashrc when its stdin is a socket (as under sshd), and a ``pyenv init``
    there puts another ``python`` first on PATH. Seen in the browser test's DAG run under two xdist workers:
    the stage's PATH had pyenv's shims ahead of the venv, and ``python -m pipeline`` ran the system
    interpreter (``No module named 'mlflow'``). The guard puts its own interpreter's folder first for what it
    runs; DVC runs the stage's cmd with ``bash --noprofile --norc``."""
    home, other = tmp_path / "home", tmp_path / "other-bin"
    home.mkdir()
    other.mkdir()
    (other / "python").write_text("#!/bin/sh\necho another-python\n")
    (other / "python").chmod(0o755)
    (home / ".bashrc").write_text(f"export PATH={other}:$PATH\n")
    stage = "python -c 'import sys; print(sys.executable)'"   # as DVC runs dvc.yaml's cmd
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(home)}
    task_end, _ = socket.socketpair()
    with task_end:
        seen = subprocess.run(["bash", "-c", "command -v python"], stdin=task_end, env=env,
                              capture_output=True, text=True, timeout=60).stdout.strip()
        task = f"exec {sys.executable} -m pipeline.orchestration.guard -- bash --noprofile --norc -c \"{stage}\""
        out = subprocess.run(["bash", "-c", task], stdin=task_end, env=env, capture_output=True, text=True, timeout=60)
    if seen != str(other / "python"):
        pytest.skip(f"this bash does not read ~/.bashrc with a socket on stdin (python is {seen or 'not found'})")
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).parent == Path(sys.executable).parent, out.stdout


@pytest.mark.slow
def test_orchestrator_killed_mid_stage_then_rerun(pipeline_seed, tmp_path):
    import mlflow

    ws = copy_seed(pipeline_seed, tmp_path / "ws")
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    del lock["stages"]["train_classifier"]  # never run here: the DAG runs it (and report, downstream of it)
    (ws / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    home = tmp_path / "airflow"  # its own Airflow DB, set up as `make airflow-init` does
    env = stage_env(ws, pipeline_seed.mirror)
    env.pop("PIPELINE_HOME")
    env.update(PIPELINE_WORKSPACE=str(ws), PIPELINE_TASK_RETRIES="0", AIRFLOW_HOME=str(home),
               AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"), AIRFLOW__CORE__LOAD_EXAMPLES="False")
    for args in (["db", "migrate"], ["pools", "set", "dvc_workspace", "1", "dvc"]):
        init = subprocess.run([sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True,
                              timeout=900)
        assert init.returncode == 0, init.stdout[-2000:] + init.stderr[-2000:]
    cmd = [sys.executable, "-m", "pipeline.orchestration.local_run", "pipeline", "-c", json.dumps({"profile": "tiny"})]
    held = tmp_path / "held.jsonl"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, cwd=tmp_path, env={**env, "PIPELINE_FAULT": "train_classifier step - 6",
                                                     "PIPELINE_FAULT_ACTION": "hold", "PIPELINE_FAULT_LOG": str(held)},
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # the stage holds at its 6th step (epoch 2 of 2; 4 steps an epoch on tiny), its MLflow run open
    assert _wait(lambda: held.exists() or first.poll() is not None, 1200, 0.5) and first.poll() is None, \
        (tmp_path / "first.log").read_text()[-3000:]
    assert (ws / "data/checkpoints/train_classifier/last.pt").is_file()  # epoch 1's checkpoint
    stage_pid = json.loads(held.read_text())["pid"]
    os.kill(first.pid, signal.SIGKILL)  # the orchestrator only: its children are left to fend for themselves
    first.wait()
    gone = _wait(lambda: not _procs_in(ws), 60)
    assert gone, f"left running after the orchestrator died: {_procs_in(ws)}"
    assert _wait(lambda: not _alive(stage_pid), 60), f"stage process {stage_pid} still running"

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
    assert killed[0].data.tags.get("pipeline.pid") == str(stage_pid) and killed[0].data.tags.get("orphaned")
    finished = [r.info.run_name for r in runs if r.info.status == "FINISHED" and "dvc_stage" in r.data.tags]
    assert sorted(finished) == ["report", "train_classifier"]  # the others were up to date: skipped

    with sqlite3.connect(home / "airflow.db") as db:
        states = dict(db.execute("select run_id, state from dag_run where dag_id = 'pipeline'").fetchall())
    assert states[killed_parent.data.tags["airflow.run_id"]] == "failed", states
    assert sorted(states.values()) == ["failed", "success"]

    # the stage result equals the uninterrupted run's, and DVC accepts the whole pipeline as it is
    assert snapshot(ws, "train_classifier") == pipeline_seed.reference["train_classifier"]
    assert dvc_changed(ws) == {}
