"""``make run`` speaks to people (issue 22): what its console shows, and which failures Airflow retries.

- the orchestrator (``local_run`` -> ``airflow dags test``) on a workspace where every stage is up to date:
  a line per stage saying so, the summary block, nothing of Airflow's own records or Python's warnings on
  the console (they go to the log file it names);
- the same console checks on CI's own ``make run PROFILE=tiny`` (``.ci/run`` hands its console over in
  ``MAKE_RUN_CONSOLE``);
- offline, no mirror: ``download`` fails fast, once (Airflow does not retry it), with the mirror hint;
- the retry convention: a stage's permanent error makes its task exit ``EXIT_PERMANENT`` through the guard and
  the DAG's operator fails it without retry; a transient error keeps the stage's exit status (retried).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import EXIT_PERMANENT
from tests.conftest import REPO, make_workspace
from tests.reliability.conftest import copy_seed, stage_env

#: what Airflow, DVC and Python print about themselves: never on make run's console
INTERNALS = re.compile(r"structlog|\[info\s*\]|\[debug|Bulk-writing|next_dagrun|RenderedTaskInstanceFields|"
                       r"::group::|No tasks to run|unrunnable tasks|DeprecationWarning|UserWarning|FutureWarning|"
                       r"Traceback|dag_processing|INFO -|WARNING -|airflow\.(models|utils|sdk)")


def check_console(text: str, ok: bool = True) -> list[str]:
    """The console of a ``make run`` / ``local_run``: its lines, checked for the summary and for internals."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    leaked = [ln for ln in lines if INTERNALS.search(ln)]
    assert not leaked, "Airflow's records or Python warnings on the console:\n" + "\n".join(leaked[:10])
    assert lines[0].startswith("pipeline: DAG pipeline, profile "), lines[:3]
    assert any("Airflow's log: airflow" in ln or "Airflow's log: " in ln for ln in lines[:3])
    if ok:
        done = [i for i, ln in enumerate(lines) if ln.startswith("pipeline done in ")]
        assert done, "no summary block:\n" + text[-2000:]
        block = "\n".join(lines[done[-1]:])
        for part in ("profile ", "commit ", "stages: ", "full log: ", "MLflow: ", "Airflow UI: "):
            assert part in block, (part, block)
    return lines


def _airflow_env(ws: Path, home: Path, mirror: Path | None, retries: int) -> dict[str, str]:
    env = stage_env(ws, mirror or Path("/nonexistent"))
    env.pop("PIPELINE_HOME")
    env.pop("PYTHONPATH")  # no fault harness here
    if mirror is None:
        env.pop("DATA_MIRROR")
    env.update(PIPELINE_WORKSPACE=str(ws), PIPELINE_TASK_RETRIES=str(retries), AIRFLOW_HOME=str(home),
               AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"), AIRFLOW__CORE__LOAD_EXAMPLES="False")
    for args in (["db", "migrate"], ["pools", "set", "dvc_workspace", "1", "dvc"]):
        init = subprocess.run([sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True,
                              timeout=900)
        assert init.returncode == 0, init.stdout[-2000:] + init.stderr[-2000:]
    return env


def _local_run(ws: Path, env: dict[str, str], conf: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.orchestration.local_run", "pipeline", "-c",
                           json.dumps(conf)], cwd=ws, env=env, capture_output=True, text=True, timeout=1500)


def _events(home: Path) -> list[dict]:
    feeds = sorted((home / "runs").glob("*.events"))
    return [json.loads(ln) for ln in feeds[-1].read_text().splitlines()] if feeds else []


@pytest.mark.slow
def test_second_run_reports_every_stage_up_to_date(pipeline_seed, tmp_path):
    ws = copy_seed(pipeline_seed, tmp_path / "ws")
    home = tmp_path / "airflow"
    env = _airflow_env(ws, home, pipeline_seed.mirror, retries=0)
    run = _local_run(ws, env, {"profile": "tiny"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = check_console(run.stdout)
    stages = ["download", "augment", "train_classifier", "train_compressor", "evaluate", "report"]
    for stage in stages:
        assert [ln for ln in lines if re.match(rf"\s+{stage}\s+up to date\s", ln)], (stage, run.stdout)
    assert not [ln for ln in lines if re.match(r"\s+\w+\s+(done|running|FAILED)\s", ln)]  # no stage ran
    assert re.search(r"classifier: test accuracy \d+\.\d\d %", run.stdout)
    assert len(lines) <= 40
    log = next((home / "runs").glob("*.log"))
    assert str(log) in run.stdout and log.stat().st_size > 0  # Airflow's records went here (outside ws: in full)
    assert not re.search(r"Traceback|Warning", run.stderr), run.stderr[-2000:]  # nothing of Python's on stderr


def test_ci_make_run_console():
    """CI's own ``make run PROFILE=tiny`` (``.ci/run`` saves its console and names it here)."""
    path = os.environ.get("MAKE_RUN_CONSOLE")
    if not path:
        pytest.skip("MAKE_RUN_CONSOLE not set: .ci/run sets it to the console of its make run")
    text = Path(path).read_text()
    lines = check_console(text[text.index("pipeline: DAG"):])  # make's own set-up line before it
    for stage in ("download", "augment", "train_classifier", "train_compressor", "evaluate", "report"):
        assert [ln for ln in lines if re.match(rf"\s+{stage}\s+(done|up to date)\s", ln)], stage
    assert len(lines) <= 40, len(lines)


@pytest.mark.slow
def test_offline_without_mirror_fails_fast_once_and_says_what_to_do(tmp_path):
    ws = make_workspace(tmp_path / "ws", "tiny", git=True)
    home = tmp_path / "airflow"
    env = _airflow_env(ws, home, None, retries=2)  # a retryable failure would be tried 3 times
    from pipeline.config import set_params

    set_params(ws / "params.yaml", None, ["data.cifar_url=http://cifar.mirror.invalid/cifar-10-python.tar.gz",
                                          "data.backoff_s=0.5"])
    subprocess.run(["git", "commit", "-qam", "unreachable source"], cwd=ws, check=True)
    run = _local_run(ws, env, {"profile": "tiny"})
    assert run.returncode != 0
    lines = check_console(run.stdout, ok=False)
    text = "\n".join(lines)
    assert "failing stage: download" in text
    assert "cannot reach http://cifar.mirror.invalid/cifar-10-python.tar.gz" in text and "DATA_MIRROR=" in text
    starts = [e for e in _events(home) if e["event"] == "task_start" and e["task"] == "download"]
    ends = [e for e in _events(home) if e["event"] == "task_end" and e["task"] == "download"]
    assert len(starts) == 1 and len(ends) == 1, "Airflow retried a failure a retry cannot fix"
    assert ends[0]["retryable"] is False and ends[0]["seconds"] < 30
    with sqlite3.connect(home / "airflow.db") as db:
        tries = db.execute("select try_number, state from task_instance where task_id = 'download'").fetchall()
    assert tries == [(1, "failed")], tries
    assert not (ws / "data/raw/cifar-10-batches-py").exists()  # nothing half-written


def _guarded(code: str, tmp_path: Path) -> tuple[int, list[dict]]:
    feed = tmp_path / "events"
    env = {**os.environ, "PIPELINE_EVENTS": str(feed), "PIPELINE_TASK": "stage", "PYTHONPATH": str(REPO)}
    rc = subprocess.run([sys.executable, "-m", "pipeline.orchestration.guard", "--", sys.executable, "-c", code],
                        env=env, capture_output=True, text=True, timeout=60).returncode
    return rc, [json.loads(ln) for ln in feed.read_text().splitlines()]


@pytest.mark.parametrize("error, rc, retryable", [("PipelineError", EXIT_PERMANENT, False),
                                                  ("TransientError", 1, True)])
def test_guard_tells_permanent_from_transient(tmp_path, error, rc, retryable):
    code = ("import sys; from pipeline.errors import run_cli, PipelineError, TransientError\n"
            f"def fail(): raise {error}('checksum mismatch')\n"
            "sys.exit(run_cli(fail))")
    got, feed = _guarded(code, tmp_path)
    assert got == rc
    end = feed[-1]
    assert end["event"] == "task_end" and end["retryable"] is retryable and end["error"] == "checksum mismatch"


def test_guard_passes_a_crash_on_as_retryable(tmp_path):
    got, feed = _guarded("import sys; from pipeline.errors import run_cli\n"
                         "def fail(): raise RuntimeError('bug')\nsys.exit(run_cli(fail))", tmp_path)
    assert got == 1 and feed[-1]["retryable"] is True and feed[-1]["error"] == "RuntimeError: bug"


@pytest.mark.parametrize("exit_status, retried", [(EXIT_PERMANENT, False), (1, True), (0, None)])
def test_stage_operator_fails_a_permanent_error_without_retry(airflow_db, exit_status, retried):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    sys.path.insert(0, str(REPO / "dags"))
    try:
        import pipeline_dag
    finally:
        sys.path.remove(str(REPO / "dags"))
    op = pipeline_dag.StageOperator(task_id=f"probe_{exit_status}", bash_command=f"exit {exit_status}",
                                    retries=2)
    if retried is None:
        op.execute({})
        return
    with pytest.raises(AirflowException) as caught:
        op.execute({})
    assert isinstance(caught.value, AirflowFailException) is (not retried)  # AirflowFailException: no retry


def test_a_full_disk_is_one_line_and_not_retried(tmp_path):
    code = ("import errno, sys; from pipeline.errors import run_cli\n"
            "def fail(): raise OSError(errno.ENOSPC, 'No space left on device', 'data/prepared/.patches.npz.tmp')\n"
            "sys.exit(run_cli(fail))")
    feed = tmp_path / "events"
    env = {**os.environ, "PIPELINE_EVENTS": str(feed), "PIPELINE_TASK": "augment", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.orchestration.guard", "--", sys.executable, "-c", code],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_PERMANENT
    assert "Traceback" not in proc.stderr
    assert "error: no space left on the device writing data/prepared/.patches.npz.tmp" in proc.stderr
