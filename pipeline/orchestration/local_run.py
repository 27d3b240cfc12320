"""``python -m pipeline.orchestration.local_run DAG_ID [ARGS...]``: ``make run``'s orchestrator.

Runs ``airflow dags test DAG_ID ARGS...`` (the whole DAG in one process, no scheduler) with two
guarantees a bare ``airflow dags test`` lacks:

- one at a time per ``AIRFLOW_HOME``: a second ``make run`` waits for the first (an exclusive
  ``flock`` on ``$AIRFLOW_HOME/local_run.lock``, held until ``airflow`` exits), so two runs never
  rewrite params.yaml or run DVC in the same workspace at once;
- a DAG run left ``running`` by an earlier orchestrator that was killed (kill -9, a closed terminal)
  is marked ``failed`` first, with its unfinished task instances: no scheduler would ever do it, and
  the next ``start`` task then closes that run's MLflow parent run as KILLED. Holding the lock
  proves no other local orchestrator is alive.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path


def _log(msg: str) -> None:
    print(f"local_run: {msg}", file=sys.stderr, flush=True)


def fail_orphaned_test_runs() -> list[str]:
    """Mark ``failed`` every DAG run started by ``airflow dags test`` that is still running/queued.

    Only call while holding the lock (no live local orchestrator). Returns ``dag_id/run_id`` of each.
    """
    from sqlalchemy import select

    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState
    from airflow.utils.types import DagRunTriggeredByType

    unfinished = [TaskInstanceState.RUNNING, TaskInstanceState.QUEUED, TaskInstanceState.SCHEDULED,
                  TaskInstanceState.UP_FOR_RETRY, TaskInstanceState.UP_FOR_RESCHEDULE, TaskInstanceState.DEFERRED]
    failed = []
    with create_session() as session:
        runs = session.scalars(select(DagRun).where(DagRun.state.in_([DagRunState.RUNNING, DagRunState.QUEUED]),
                                                    DagRun.triggered_by == DagRunTriggeredByType.TEST)).all()
        for run in runs:
            tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == run.dag_id,
                                                             TaskInstance.run_id == run.run_id)).all()
            for ti in tis:
                if ti.state in unfinished or ti.state is None:
                    ti.state = TaskInstanceState.FAILED if ti.state in unfinished else TaskInstanceState.UPSTREAM_FAILED
            run.set_state(DagRunState.FAILED)
            failed.append(f"{run.dag_id}/{run.run_id}")
    for name in failed:
        _log(f"DAG run {name} was left running by a killed orchestrator: marked failed")
    return failed


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m pipeline.orchestration.local_run DAG_ID [airflow dags test args...]",
              file=sys.stderr)
        return 2
    home = Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / "local_run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _log(f"another run holds {home / 'local_run.lock'}: waiting for it to finish")
        fcntl.flock(fd, fcntl.LOCK_EX)
    fail_orphaned_test_runs()
    airflow = shutil.which("airflow", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                            os.environ.get("PATH", "")]))
    if airflow is None:
        _log("airflow not found (run `make setup`)")
        return 1
    os.set_inheritable(fd, True)  # the lock stays held by `airflow dags test` until it exits
    os.execv(airflow, [airflow, "dags", "test", *args])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
