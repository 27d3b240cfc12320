"""The one MLflow module every stage uses.

Default store: ``sqlite:///<project>/mlflow.db`` with artifacts in ``<project>/mlartifacts`` (both
git-ignored); ``MLFLOW_TRACKING_URI`` points elsewhere (a server, Postgres...).

Nesting: a pipeline run is one parent MLflow run; each stage is a child. A stage finds its parent
from ``MLFLOW_PARENT_RUN_ID`` (set by the Airflow DAG for every task) or, failing that, from
``PIPELINE_RUN_ID`` (any label shared by the stages of one run, e.g. set around ``dvc repro``).

This module is the stage-run API; models are logged and read back by ``pipeline.tracking_models``, and
``pipeline.tracking_runs`` keeps runs true to what reached the DVC remote. It reads no params.yaml: its
callers hand it the experiment's name (``params.tracking.experiment``).
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
#: a stage's run handed to its torchrun ranks (MLflow's own variable: ``mlflow.start_run()`` resumes it)
RUN_ID_ENV = "MLFLOW_RUN_ID"
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


def mlflow_module():
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


#: MLflow 3's UI opens an experiment of this kind on its runs and models (untagged: on its GenAI traces view)
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(name: str) -> str:
    """Get or create the experiment (tagged as model training, ``EXPERIMENT_TAGS``); locally its artifacts
    go to ``<project>/mlartifacts``."""
    from pipeline.errors import PipelineError

    mlflow = mlflow_module()
    try:  # the first call that opens the store: a store MLflow refuses (e.g. a file:// one) fails here
        exp = mlflow.get_experiment_by_name(name)
    except mlflow.exceptions.MlflowException as err:
        raise PipelineError(f"MLflow tracking store {tracking_uri()}: {err.message}") from None
    if exp is not None:
        if any(exp.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):  # created by an earlier version
            for k, v in EXPERIMENT_TAGS.items():
                mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (project_root() / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
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
    tags.update(process_tags())
    return tags


def _start_ticks(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, /proc): with the pid, names it uniquely."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_tags() -> dict[str, str]:
    """Which process (host, pid, start time) in which workspace owns a run: lets a later run tell an
    orphan (its process is gone: killed) from a run still in progress."""
    tags = {"pipeline.host": platform.node(), "pipeline.pid": str(os.getpid()),
            "pipeline.workspace": str(project_root())}
    ticks = _start_ticks(os.getpid())
    if ticks:
        tags["pipeline.pid_start"] = ticks
    return tags


def _owner_gone(tags: dict[str, str]) -> bool:
    """True when the run's owning process, on this host and in this workspace, no longer exists."""
    if tags.get("pipeline.host") != platform.node() or tags.get("pipeline.workspace") != str(project_root()):
        return False  # another machine or workspace: not ours to judge
    pid = tags.get("pipeline.pid")
    if not pid or not pid.isdigit():
        return False
    ticks = _start_ticks(int(pid))
    return ticks is None or ticks != tags.get("pipeline.pid_start", ticks)


def _close_orphan(client, run, note: str) -> None:
    client.set_tag(run.info.run_id, "orphaned", note[:5000])
    client.set_terminated(run.info.run_id, status="KILLED")
    log(f"[mlflow] run {run.info.run_id} ({run.info.run_name}) marked KILLED: {note}")


def close_orphaned_stage_runs(exp_id: str, stage: str | None = None) -> list[str]:
    """Mark KILLED, with a note, the RUNNING runs of ``stage`` (None: of every stage) whose process is
    gone (a killed stage, or one its killed orchestrator took down before it could close its run).

    Only runs of this host and workspace are judged. Returns their ids.
    """
    import datetime

    client = mlflow_module().MlflowClient()
    query = "attributes.status = 'RUNNING'" + (f" and tags.dvc_stage = '{stage}'" if stage else "")
    runs = client.search_runs([exp_id], filter_string=query, max_results=1000)
    closed = []
    for run in runs:
        tags = run.data.tags
        if "dvc_stage" in tags and tags.get("pipeline_parent") != "true" and _owner_gone(tags):
            when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            finder = f"the next {stage} run" if stage else "the next pipeline run"
            _close_orphan(client, run, f"process {tags['pipeline.pid']} ended without closing this run "
                                       f"(killed); found by {finder} at {when}")
            closed.append(run.info.run_id)
    return closed


def close_orphaned_parents(experiment: str, dag_run_over) -> list[str]:
    """Mark KILLED the RUNNING pipeline parent runs of this workspace whose Airflow DAG run is over,
    then every stage run of this workspace left RUNNING by a process that is gone (a stage killed with
    its orchestrator, whatever stage it was: the next DAG run may never run that stage again).

    ``dag_run_over(dag_id, run_id)`` says whether Airflow considers that DAG run finished (a run whose
    orchestrator was killed, or whose failure was never recorded). Returns the ids of the runs closed.
    """
    client = mlflow_module().MlflowClient()
    runs = client.search_runs([experiment_id(experiment)], filter_string="tags.pipeline_parent = 'true' and "
                              "attributes.status = 'RUNNING'", max_results=200)
    closed = []
    for run in runs:
        tags = run.data.tags
        if tags.get("pipeline.workspace") != str(project_root()) or "airflow.run_id" not in tags:
            continue
        if dag_run_over(tags.get("airflow.dag_id", ""), tags["airflow.run_id"]):
            _close_orphan(client, run, f"Airflow run {tags['airflow.run_id']} is over but never closed this "
                                       "parent run (orchestrator killed?)")
            closed.append(run.info.run_id)
    closed.extend(close_orphaned_stage_runs(experiment_id(experiment)))
    return closed


def check_reachable(uri: str | None = None, timeout_s: float | None = None) -> None:
    """Fail fast (PipelineError, one line) when an HTTP tracking server does not answer.

    MLflow's own client would retry for minutes before the first log call fails, which is after
    the stage has already loaded its data. Checked before any training starts.
    """
    import urllib.error
    import urllib.parse
    import urllib.request

    from pipeline.errors import PipelineError

    uri = uri or tracking_uri()
    if urllib.parse.urlparse(uri).scheme not in ("http", "https"):
        return
    timeout_s = timeout_s or float(os.environ.get("PIPELINE_MLFLOW_CHECK_TIMEOUT_S", "10"))
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # it answers (a proxy or an older server without /health): reachable
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise PipelineError(f"MLflow tracking server {uri} unreachable ({reason}); start it, or unset "
                            "MLFLOW_TRACKING_URI to log to the local mlflow.db. Nothing was trained.") from None


def start_parent_run(experiment: str, run_name: str, params: dict[str, Any] | None = None,
                     tags: dict[str, str] | None = None) -> str:
    """Create the parent run of one pipeline run and return its id (the run stays open)."""
    mlflow = mlflow_module()
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id(experiment), run_name=run_name,
                            tags={**run_tags(), **(tags or {}), "pipeline_parent": "true"})
    if params:
        for key, value in params.items():
            client.log_param(run.info.run_id, key, _param_value(value))
    return run.info.run_id


def end_parent_run(run_id: str, status: str = "FINISHED") -> None:
    mlflow_module().MlflowClient().set_terminated(run_id, status=status)


def _find_parent(experiment: str) -> str | None:
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    label = os.environ.get(PIPELINE_RUN_ENV)
    if not label:
        return None
    mlflow = mlflow_module()
    exp_id = experiment_id(experiment)
    found = mlflow.search_runs([exp_id], filter_string=f"tags.pipeline_run_id = '{label}' "
                               "and tags.pipeline_parent = 'true'", output_format="list", max_results=1)
    if found:
        return found[0].info.run_id
    return start_parent_run(experiment, f"pipeline {label}")


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def _dvc_hashes(root: Path) -> dict[str, str]:
    """path -> the md5 DVC recorded for it as some stage's output (``dvc.lock``); {} without a lock."""
    import yaml

    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    out = {}
    for entry in (lock.get("stages") or {}).values():
        for item in (entry or {}).get("outs") or []:
            if isinstance(item, dict) and isinstance(item.get("path"), str) and isinstance(item.get("md5"), str):
                out[item["path"].rstrip("/")] = item["md5"]
    return out


def log_datasets(datasets: dict[str, Path], root: Path | None = None) -> None:
    """Log a stage's data inputs to the active run as MLflow dataset inputs (the runs table's Dataset column):
    the name, the local path as source, and DVC's hash of it as digest (from ``dvc.lock``, where the stage
    that wrote it recorded it; a file's own md5 when DVC has not, e.g. a stage run by hand)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    mlflow = mlflow_module()
    root = (root or Path.cwd()).resolve()
    hashes = _dvc_hashes(root)
    for name, path in datasets.items():
        path = Path(path)
        if not path.exists():
            continue
        try:
            rel = path.resolve().relative_to(root).as_posix()
        except ValueError:
            rel = str(path)
        digest = hashes.get(rel)
        if digest is None and path.is_file():
            from pipeline.utils import file_digest

            digest = file_digest(path, "md5")
        source = LocalArtifactDatasetSource(str(path.resolve()))
        dataset = MetaDataset(source, name=name, digest=(digest or "").removesuffix(".dir")[:32] or None)
        mlflow.log_input(dataset, context=rel)


@contextlib.contextmanager
def stage_run(stage: str, params, sections: tuple[str, ...] | None = None,
              datasets: dict[str, Path] | None = None) -> Iterator[Any]:
    """Start the MLflow run of one stage, nested under the pipeline run when there is one.

    Logs the profile, seed and the resolved values of the stage's params sections (default: the
    section named like the stage) and tags the run with the git commit, DVC stage and Airflow ids.
    First fails fast when the tracking server is unreachable, and closes (KILLED, with a note) the
    RUNNING runs of this stage left by a killed process.
    """
    check_reachable()
    mlflow = mlflow_module()
    experiment = params.tracking.experiment
    exp_id = experiment_id(experiment)
    close_orphaned_stage_runs(exp_id, stage)
    tags = run_tags(stage, params.profile)
    parent = _find_parent(experiment)
    if parent:
        tags["mlflow.parentRunId"] = parent
    flat = params.flat()
    sections = sections or (stage,)  # section names, or dotted parts of one (train_classifier.augmentation)
    logged = {k: v for k, v in flat.items() if any(k == s or k.startswith(s + ".") for s in sections)}
    logged.update(profile=params.profile, seed=params.seed)
    with mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=tags) as run:
        try:
            mlflow.log_params({k: _param_value(v) for k, v in logged.items()})
            if datasets:
                log_datasets(datasets)
            log(f"[mlflow] {stage}: run {run.info.run_id} in {tracking_uri()}")
            yield run
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from the task's guard: say so rather than FAILED
            _close_interrupted(run.info.run_id)
            raise


def _close_interrupted(run_id: str) -> None:
    """Close an interrupted stage's run as KILLED, with a note, and pop it off MLflow's active stack.

    Further SIGTERM/SIGINT are held off meanwhile (a second signal must not leave the run half-closed
    or turn it FAILED). Should this fail (the store itself was interrupted mid-write, or the guard's
    SIGKILL comes first), the run stays RUNNING with this process's pid, and the next run of the stage
    or of the pipeline closes it (``close_orphaned_stage_runs``).
    """
    import signal
    import threading

    held = {}
    if threading.current_thread() is threading.main_thread():
        held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        mlflow = mlflow_module()
        client = mlflow.MlflowClient()
        client.set_tag(run_id, "orphaned", "stage interrupted (SIGINT/SIGTERM)")
        client.set_terminated(run_id, status="KILLED")
        mlflow.end_run("KILLED")
    except Exception as err:  # noqa: BLE001 - the next run closes it; the interrupt must go on
        log(f"[mlflow] could not close interrupted run {run_id} ({type(err).__name__}); the next run will")
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)


def handoff_env() -> dict[str, str]:
    """What a child process (a torchrun rank) needs to log into this process's active run (empty: none)."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return {}
    return {RUN_ID_ENV: run.info.run_id, "MLFLOW_TRACKING_URI": tracking_uri()}


@contextlib.contextmanager
def joined_run(run_id: str) -> Iterator[Any]:
    """Make another process's open run (the torchrun launcher's) this process's active run.

    On exit the run is left RUNNING, whatever happened here: its owner (the launcher, whose pid its
    tags name) closes it FINISHED, FAILED or KILLED when the ranks are done.
    """
    mlflow = mlflow_module()
    run = mlflow.start_run(run_id=run_id)
    try:
        yield run
    finally:
        mlflow.end_run(status="RUNNING")


def record_failure(parent_run_id: str, stage: str, message: str = "") -> None:
    """Mark a pipeline's parent run FAILED, naming the stage that failed."""
    client = mlflow_module().MlflowClient()
    client.set_tag(parent_run_id, "failed_stage", stage)
    if message:
        client.set_tag(parent_run_id, "failure", message[:5000])
    client.set_terminated(parent_run_id, status="FAILED")
