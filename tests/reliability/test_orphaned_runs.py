"""MLflow runs a killed process left RUNNING are closed as KILLED, with a note, and only those
(pipeline/tracking.py), on a real SQLite store; and a stage stopped by SIGTERM closes its own run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One migrated store for the module (creating one costs seconds); each test its own experiment."""
    home = tmp_path_factory.mktemp("orphans")
    old = {k: os.environ.get(k) for k in ("PIPELINE_HOME", "MLFLOW_TRACKING_URI")}
    os.environ.update(PIPELINE_HOME=str(home), MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}")
    import mlflow

    yield home, mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_tracking_uri(None)  # tracking.mlflow_module() set it (and the variable) for this process
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def dead_owner(home: Path) -> dict[str, str]:
    """Process tags naming a process that has exited (as a kill -9 leaves them)."""
    from pipeline import tracking

    child = subprocess.Popen(["sleep", "60"])
    ticks = tracking._start_ticks(child.pid)
    child.kill()
    child.wait()
    return {"pipeline.host": os.uname().nodename, "pipeline.pid": str(child.pid), "pipeline.pid_start": ticks,
            "pipeline.workspace": str(home.resolve())}


def test_only_runs_whose_process_is_gone_are_closed(store, request):
    from pipeline import tracking

    home, client = store
    exp = client.create_experiment(request.node.name)
    alive = tracking.process_tags()
    reused = {**alive, "pipeline.pid_start": "1"}  # this pid, but another process's start time: gone
    elsewhere = {**dead_owner(home), "pipeline.workspace": "/another/workspace"}
    made = {
        "dead": ({**dead_owner(home), "dvc_stage": "train_classifier"}),
        "reused": ({**reused, "dvc_stage": "train_classifier"}),
        "alive": ({**alive, "dvc_stage": "train_classifier"}),
        "elsewhere": ({**elsewhere, "dvc_stage": "train_classifier"}),
        "other_stage": ({**dead_owner(home), "dvc_stage": "evaluate"}),
        "parent": ({**dead_owner(home), "pipeline_parent": "true"}),
    }
    ids = {name: client.create_run(exp, run_name=name, tags=tags).info.run_id for name, tags in made.items()}
    done = client.create_run(exp, tags={**dead_owner(home), "dvc_stage": "train_classifier"}).info.run_id
    client.set_terminated(done, "FINISHED")

    closed = tracking.close_orphaned_stage_runs(exp, "train_classifier")
    assert sorted(closed) == sorted([ids["dead"], ids["reused"]])
    status = {name: client.get_run(i).info.status for name, i in ids.items()}
    assert status == {"dead": "KILLED", "reused": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING",
                      "other_stage": "RUNNING", "parent": "RUNNING"}
    assert "ended without closing this run" in client.get_run(ids["dead"]).data.tags["orphaned"]
    assert client.get_run(done).info.status == "FINISHED"

    assert tracking.close_orphaned_stage_runs(exp) == [ids["other_stage"]]  # every stage; never a parent
    assert client.get_run(ids["parent"]).info.status == "RUNNING"


def test_a_stage_run_whose_push_failed_is_marked_failed_and_only_that_one(store, request):
    """remote_exec: when `dvc push STAGE` fails, the run that attempt's stage finished is FAILED (tag
    `unpublished`), so the retry's run is the only FINISHED one; older, other-stage, other-workspace and
    still-running runs are left alone."""
    import time

    from pipeline import tracking, tracking_runs

    home, client = store
    exp = client.create_experiment(request.node.name)
    mine = {**tracking.process_tags(), "dvc_stage": "evaluate"}
    since = int(time.time() * 1000)
    made = {
        "this_attempt": (mine, since + 5, "FINISHED"),
        "earlier": (mine, since - 60_000, "FINISHED"),
        "other_stage": ({**mine, "dvc_stage": "report"}, since + 5, "FINISHED"),
        "other_copy": ({**mine, "pipeline.workspace": "/another/copy"}, since + 5, "FINISHED"),
        "running": (mine, since + 1, "RUNNING"),
    }
    ids = {}
    for name, (tags, start, status) in made.items():
        ids[name] = client.create_run(exp, run_name=name, tags=tags, start_time=start).info.run_id
        if status != "RUNNING":
            client.set_terminated(ids[name], status)
    assert tracking_runs.mark_unpublished("evaluate", since, "dvc push evaluate failed", exp) == [ids["this_attempt"]]
    status = {name: client.get_run(i).info.status for name, i in ids.items()}
    assert status == {"this_attempt": "FAILED", "earlier": "FINISHED", "other_stage": "FINISHED",
                      "other_copy": "FINISHED", "running": "RUNNING"}
    assert client.get_run(ids["this_attempt"]).data.tags["unpublished"] == "dvc push evaluate failed"

    # the retry re-ran the stage (a newer run of this copy): the unpublished run stays FAILED
    retry = client.create_run(exp, run_name="retry", tags=mine, start_time=since + 10_000).info.run_id
    client.set_terminated(retry, "FINISHED")
    assert tracking_runs.republish_skipped("evaluate", since + 9_000, "pushed later", exp) is None
    assert client.get_run(ids["this_attempt"]).info.status == "FAILED"
    # the retry found the stage up to date and only pushed: the newest run of this copy is the result again
    client.delete_run(retry)
    assert tracking_runs.republish_skipped("evaluate", since + 9_000, "pushed later", exp) == ids["this_attempt"]
    run = client.get_run(ids["this_attempt"])
    assert run.info.status == "FINISHED" and run.data.tags["published_on_retry"] == "pushed later"
    assert "unpublished" not in run.data.tags
    assert tracking_runs.republish_skipped("evaluate", since + 9_000, "pushed later", exp) is None  # nothing left to do


def test_a_killed_orchestrators_parent_and_stage_runs_are_closed(store, request):
    """The next DAG run's ``start`` closes the parent of a DAG run that is over, and the stage run its
    killed orchestrator left open, whichever stage it was (the new run may not run that stage)."""
    from pipeline import tracking

    home, client = store
    name = request.node.name
    exp = tracking.experiment_id(name)
    parent_tags = {**tracking.process_tags(), "pipeline_parent": "true", "airflow.dag_id": "pipeline"}
    over = client.create_run(exp, tags={**parent_tags, "airflow.run_id": "over"}).info.run_id
    running = client.create_run(exp, tags={**parent_tags, "airflow.run_id": "running"}).info.run_id
    child = client.create_run(exp, tags={**dead_owner(home), "dvc_stage": "train_compressor",
                                         "mlflow.parentRunId": over}).info.run_id

    closed = tracking.close_orphaned_parents(name, lambda dag_id, run_id: run_id == "over")
    assert sorted(closed) == sorted([over, child])
    assert client.get_run(over).info.status == "KILLED" and client.get_run(running).info.status == "RUNNING"
    assert "orchestrator killed" in client.get_run(over).data.tags["orphaned"]
    assert client.get_run(child).info.status == "KILLED" and client.get_run(child).data.tags["orphaned"]


def test_a_stage_stopped_by_sigterm_closes_its_own_run_killed(store, tmp_path):
    """SIGTERM (the guard stopping a task) in the middle of a stage: its run ends KILLED with a note,
    and the process exits 130 with one line, no traceback."""
    home, client = store
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, time, types
        from pipeline.__main__ import _interrupt_on_sigterm
        from pipeline.errors import run_cli
        from pipeline import tracking

        params = types.SimpleNamespace(tracking=types.SimpleNamespace(experiment="sigterm"), profile="tiny",
                                       seed=0, flat=lambda: {"train_classifier.epochs": 2})

        def stage():
            with tracking.stage_run("train_classifier", params) as run:
                print(run.info.run_id, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(60)

        _interrupt_on_sigterm()
        sys.exit(run_cli(stage))
    """))
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == ["error: interrupted"]
    run = client.get_run(proc.stdout.split()[0])
    assert run.info.status == "KILLED" and "interrupted" in run.data.tags["orphaned"]
