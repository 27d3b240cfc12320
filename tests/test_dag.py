"""The Airflow DAG: derived from dvc.yaml, imports cleanly, runs end to end on the tiny profile."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.orchestration.dvcgraph import descendants, load_stages
from tests.conftest import DAG_WORKSPACE, REPO


def test_graph_follows_outs_to_deps():
    stages = load_stages(REPO / "dvc.yaml")
    assert list(stages)[:2] == ["download", "augment"]
    assert stages["download"].upstream == set()
    assert stages["augment"].upstream == {"download"}
    for stage in stages.values():
        argv = stage.cmd.split()  # one entry point for every stage, then its path options only
        assert argv[:4] == ["python", "-m", "pipeline", stage.name], stage.cmd
        assert all(a.startswith("--") for a in argv[4::2]) and len(argv[4:]) % 2 == 0, stage.cmd


def test_graph_rules(tmp_path):
    spec = tmp_path / "dvc.yaml"
    spec.write_text(textwrap.dedent("""
        stages:
          a: {cmd: x, outs: [data/a]}
          b: {cmd: x, deps: [data/a/file.npz], metrics: [{data/b.json: {cache: false}}]}
          c: {cmd: x, deps: [data/b.json, data]}
          d: {cmd: x, deps: [elsewhere]}
    """))
    stages = load_stages(spec)
    assert stages["b"].upstream == {"a"}  # a dep inside an out
    assert stages["c"].upstream == {"a", "b"}  # a metrics file, and a dep that contains outs
    assert stages["d"].upstream == set()
    assert descendants(stages, {"a"}) == {"b", "c"}
    spec.write_text("stages:\n  a: {cmd: x, deps: [q], outs: [p]}\n  b: {cmd: x, deps: [p], outs: [q]}\n")
    with pytest.raises(ValueError, match="cycle"):
        load_stages(spec)


def _dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_dag_folder_imports_without_errors(airflow_db):
    bag = _dagbag()
    assert bag.import_errors == {}
    dag = bag.get_dag("pipeline")
    stages = load_stages(DAG_WORKSPACE / "dvc.yaml")
    assert set(dag.task_ids) == set(stages) | {"start", "finish"}
    for name, stage in stages.items():
        task = dag.get_task(name)
        expected = stage.upstream or {"start"}
        assert task.upstream_task_ids == expected
        assert task.pool == "dvc_workspace" and task.execution_timeout is not None
        assert f"dvc repro --single-item {name}" in task.bash_command
        assert task.env["PATH"].startswith(str(Path(sys.executable).parent))  # stages use this environment
    assert dag.params["profile"] is None


@pytest.mark.slow
def test_dag_runs_end_to_end_on_tiny(airflow_db, mirror, monkeypatch):
    """dag.test() on the tiny profile: every stage succeeds, one MLflow parent run holds the stages."""
    import mlflow

    uri = f"sqlite:///{DAG_WORKSPACE / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DATA_MIRROR", str(mirror))
    monkeypatch.delenv("PIPELINE_HOME", raising=False)
    dag = _dagbag().get_dag("pipeline")
    run = dag.test(run_conf={"profile": "tiny"})
    assert run.state == "success", [(ti.task_id, ti.state) for ti in run.get_task_instances()]

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parents = [r for r in runs if r.data.tags.get("pipeline_parent") == "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["airflow.dag_id"] == "pipeline" and parent.data.params["profile"] == "tiny"
    children = {r.data.tags["dvc_stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(load_stages(DAG_WORKSPACE / "dvc.yaml"))
    for child in children.values():
        assert child.info.status == "FINISHED"
        assert child.data.tags["airflow.dag_id"] == "pipeline"
        assert child.data.tags["airflow.run_id"] == parent.data.tags["airflow.run_id"]

    def dvc(*args):
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=DAG_WORKSPACE, capture_output=True,
                              text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    # a second reproduction changes nothing; params and metrics are readable by DVC
    assert "Data and pipelines are up to date" in dvc("repro")
    assert "profile" in dvc("params", "diff")  # the run switched params.yaml to tiny
    metrics = dvc("metrics", "show")
    for stage in ("classifier", "compressor", "evaluation"):
        assert f"data/{stage}/metrics.json" in metrics

    # the report scored the shipped record of the coursework recipe's long run against the real test labels
    from pipeline.data.cifar import load_batch
    from pipeline.records import ClassifierRun

    record = ClassifierRun.read(DAG_WORKSPACE / "models/coursework-run.json")
    _, labels = load_batch(DAG_WORKSPACE / "data/raw/cifar-10-batches-py/test_batch")
    acc = float(np.mean(np.array([int(c) for c in record.predictions]) == labels))
    md = (DAG_WORKSPACE / "data/report/report.md").read_text()
    assert "on the coursework's own recipe" in md and f"{acc:.2%} ({record.epochs_done} of" in md


def _load_dag_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipeline_dag_under_test", REPO / "dags" / "pipeline_dag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_remote_mode_routes_gpu_stages_and_passes_locks(airflow_db, monkeypatch):
    """PIPELINE_EXECUTION=remote: tasks run remote_exec, GPU stages go to their queue and pool."""
    monkeypatch.setenv("PIPELINE_EXECUTION", "remote")
    module = _load_dag_module()
    dag = module.pipeline_dag
    for name, stage in module.STAGES.items():
        task = dag.get_task(name)
        assert "remote_exec " + name in task.bash_command
        assert task.queue == stage.meta.get("queue", "default")
        for up in stage.upstream:
            assert f"xcom_pull(task_ids='{up}')" in task.env["PIPELINE_UPSTREAM_LOCKS"]
    assert any(s.meta.get("queue") == "gpu" for s in module.STAGES.values())
    # the model Assets do not name this checkout's path: every worker's copy declares the same URIs
    uris = {a.uri for assets in module.ASSETS.values() for a in assets}
    assert uris and all(u.startswith("x-dvc://pipeline/") and str(module.WORKSPACE) not in u for u in uris)
    assert module.asset_uri("data/compressor/model.pt") == "x-dvc://pipeline/data/compressor/model.pt"


def test_failure_callback_marks_parent_run(airflow_db, tmp_path, monkeypatch):
    import mlflow

    from pipeline import tracking

    record_failure = _load_dag_module().record_failure
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracking.start_parent_run("exp", "pipeline test")

    class TI:
        task_id = "train_classifier"

        def xcom_pull(self, task_ids):
            assert task_ids == "start"
            return parent

    record_failure({"ti": TI(), "exception": RuntimeError("boom")})
    run = mlflow.MlflowClient(tracking.tracking_uri()).get_run(parent)
    assert run.info.status == "FAILED" and run.data.tags["failed_stage"] == "train_classifier"


# ---------------------------------------------------------------------------------------------
# issue 9: user errors fail `start` at once, params.yaml writers are serialised, stages die with their task


def test_start_shares_the_workspace_slot_and_stages_run_under_the_guard(airflow_db):
    bag = _dagbag()
    for dag_id in ("pipeline", "evaluate_report"):
        dag = bag.get_dag(dag_id)
        start = dag.get_task("start")
        assert start.pool == "dvc_workspace"  # one slot: never beside a stage or another run's start
        for task in dag.tasks:
            if task.task_id not in ("start", "finish"):
                assert task.bash_command.split("&& ", 1)[1].startswith("exec ")
                assert "-m pipeline.orchestration.guard -- " in task.bash_command


@pytest.fixture
def bad_workspace(tmp_path):
    from tests.conftest import make_workspace

    return make_workspace(tmp_path / "ws", profile="tiny")


#: issue 29: a run conf names knobs, never a path, a URI or a model (refused by the params' types)
SOURCES = {"refused": "data.mirror=/tmp/elsewhere", "init_model": "train_compressor.init=models:/evil/1",
           "scheme": "evaluate.rnn_model=s3://bucket/model", "folder": "augment.patch_source=/etc"}


@pytest.mark.parametrize("case", ["yaml", *SOURCES, "non_finite", "dataset_path"])
def test_start_fails_at_once_without_retry_on_a_user_error(airflow_db, bad_workspace, monkeypatch, case):
    """A YAML error, a refused run-conf key or an invalid value: AirflowFailException (never retried)
    with one line naming the problem, and params.yaml untouched; no request is made."""
    import socket

    from airflow.sdk.exceptions import AirflowFailException

    params_file = bad_workspace / "params.yaml"
    overrides = []
    if case == "yaml":
        params_file.write_text(params_file.read_text().replace("seed: 0", "seed: [0"))
    elif case in SOURCES:
        overrides = ["train_classifier.epochs=1", SOURCES[case]]
    elif case == "dataset_path":  # evaluate.dataset is a set's name (issue 26): a path is invalid, not a folder read
        overrides = ["evaluate.dataset=../../etc"]
    else:
        overrides = ["train_classifier.epochs=.inf"]
    before = params_file.read_bytes()
    monkeypatch.setenv("PIPELINE_WORKSPACE", str(bad_workspace))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{bad_workspace / 'mlflow.db'}")
    module = _load_dag_module()
    start = module.pipeline_dag.get_task("start")

    def no_request(*args, **kwargs):
        raise AssertionError("start made a request")

    monkeypatch.setattr(socket.socket, "connect", no_request)
    with pytest.raises(AirflowFailException) as info:
        start.python_callable(params={"profile": None, "overrides": overrides}, dag_run=None, ti=None)
    message = str(info.value)
    assert message.startswith("error: ") and "\n" not in message.strip()
    assert {"yaml": "not valid YAML", "non_finite": "finite", "dataset_path": "evaluate.dataset",
            **{c: f"run conf may not set {o.split('=')[0]}" for c, o in SOURCES.items()}}[case] in message
    assert params_file.read_bytes() == before
    assert not (bad_workspace / "mlflow.db").exists()  # failed before any MLflow run was opened
