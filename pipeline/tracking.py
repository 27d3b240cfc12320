"""The one MLflow module every stage uses.

Default store: ``sqlite:///<project>/mlflow.db`` with artifacts in ``<project>/mlartifacts`` (both
git-ignored); ``MLFLOW_TRACKING_URI`` points elsewhere (a server, Postgres...).

Nesting: a pipeline run is one parent MLflow run; each stage is a child. A stage finds its parent
from ``MLFLOW_PARENT_RUN_ID`` (set by the Airflow DAG for every task) or, failing that, from
``PIPELINE_RUN_ID`` (any label shared by the stages of one run, e.g. set around ``dvc repro``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterator

from pipeline.utils import log

PARENT_ENV = "MLFLOW_PARENT_RUN_ID"
PIPELINE_RUN_ENV = "PIPELINE_RUN_ID"
AIRFLOW_TAGS = {  # env var Airflow exports to a task -> tag name
    "AIRFLOW_CTX_DAG_ID": "airflow.dag_id",
    "AIRFLOW_CTX_DAG_RUN_ID": "airflow.run_id",
    "AIRFLOW_CTX_TASK_ID": "airflow.task_id",
    "AIRFLOW_CTX_TRY_NUMBER": "airflow.try_number",
}


def project_root() -> Path:
    return Path(os.environ.get("PIPELINE_HOME", Path.cwd())).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def _mlflow():
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def experiment_id(name: str) -> str:
    """Get or create the experiment; locally its artifacts go to ``<project>/mlartifacts``."""
    mlflow = _mlflow()
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (project_root() / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # created meanwhile by a concurrent stage
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def run_tags(stage: str | None = None, profile: str | None = None) -> dict[str, str]:
    tags = {"git_commit": git_commit(), "host": platform.node(), "python": platform.python_version()}
    if stage:
        tags["dvc_stage"] = stage
    if profile:
        tags["profile"] = profile
    for env, tag in AIRFLOW_TAGS.items():
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    if os.environ.get(PIPELINE_RUN_ENV):
        tags["pipeline_run_id"] = os.environ[PIPELINE_RUN_ENV]
    return tags


def start_parent_run(experiment: str, run_name: str, params: dict[str, Any] | None = None,
                     tags: dict[str, str] | None = None) -> str:
    """Create the parent run of one pipeline run and return its id (the run stays open)."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id(experiment), run_name=run_name,
                            tags={**run_tags(), **(tags or {}), "pipeline_parent": "true"})
    if params:
        for key, value in params.items():
            client.log_param(run.info.run_id, key, _param_value(value))
    return run.info.run_id


def end_parent_run(run_id: str, status: str = "FINISHED") -> None:
    _mlflow().MlflowClient().set_terminated(run_id, status=status)


def _find_parent(experiment: str) -> str | None:
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    label = os.environ.get(PIPELINE_RUN_ENV)
    if not label:
        return None
    mlflow = _mlflow()
    exp_id = experiment_id(experiment)
    found = mlflow.search_runs([exp_id], filter_string=f"tags.pipeline_run_id = '{label}' "
                               "and tags.pipeline_parent = 'true'", output_format="list", max_results=1)
    if found:
        return found[0].info.run_id
    return start_parent_run(experiment, f"pipeline {label}")


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


@contextlib.contextmanager
def stage_run(stage: str, params, sections: tuple[str, ...] | None = None) -> Iterator[Any]:
    """Start the MLflow run of one stage, nested under the pipeline run when there is one.

    Logs the profile, seed and the resolved values of the stage's params sections (default: the
    section named like the stage) and tags the run with the git commit, DVC stage and Airflow ids.
    """
    mlflow = _mlflow()
    experiment = params.tracking.experiment
    exp_id = experiment_id(experiment)
    tags = run_tags(stage, params.profile)
    parent = _find_parent(experiment)
    if parent:
        tags["mlflow.parentRunId"] = parent
    flat = params.flat()
    sections = sections or (stage,)
    logged = {k: v for k, v in flat.items() if k.split(".")[0] in sections}
    logged.update(profile=params.profile, seed=params.seed)
    with mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=tags) as run:
        mlflow.log_params({k: _param_value(v) for k, v in logged.items()})
        log(f"[mlflow] {stage}: run {run.info.run_id} in {tracking_uri()}")
        yield run


def record_failure(parent_run_id: str, stage: str, message: str = "") -> None:
    """Mark a pipeline's parent run FAILED, naming the stage that failed."""
    client = _mlflow().MlflowClient()
    client.set_tag(parent_run_id, "failed_stage", stage)
    if message:
        client.set_tag(parent_run_id, "failure", message[:5000])
    client.set_terminated(parent_run_id, status="FAILED")
