"""Airflow DAGs derived from dvc.yaml — the pipeline graph is never repeated here.

``pipeline``: ``start`` (write the run's profile/overrides into params.yaml, open the MLflow parent
run) -> one task per DVC stage, wired as DVC's graph says, each running ``dvc repro --single-item``
so up-to-date stages are skipped -> ``finish`` (close the parent run). Adding a stage to dvc.yaml
adds its task.

``evaluate_report``: re-runs the stages downstream of training (evaluate, report) when a trained
model Asset is updated, or by hand after adding a codec.

Execution modes (``PIPELINE_EXECUTION``):
- ``shared`` (default): every task works in one workspace (the project folder, or
  ``PIPELINE_WORKSPACE``); DVC locks it, so all DVC calls go through the one-slot pool
  ``dvc_workspace``.
- ``remote``: each worker has its own working copy and shares only the DVC remote: a task pulls its
  inputs, runs its stage, pushes its outputs and hands its ``dvc.lock`` entry to downstream tasks by
  XCom (``pipeline.orchestration.remote_exec``). A stage's ``meta: {queue: gpu, pool: gpu}`` in
  dvc.yaml sends it to the GPU workers' Celery queue and pool (one slot per GPU).
"""

from __future__ import annotations

import os
import shlex
import sys
from datetime import timedelta
from pathlib import Path

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Asset, AssetAny, Param, task
from airflow.sdk.exceptions import AirflowFailException

from pipeline import events
from pipeline.errors import EXIT_PERMANENT
from pipeline.orchestration.dvcgraph import descendants, load_stages, model_outputs
from pipeline.orchestration.guard import interpreter_first
from pipeline.schema import PROFILES  # the one list of profile names

WORKSPACE = Path(os.environ.get("PIPELINE_WORKSPACE") or Path(__file__).resolve().parents[1]).resolve()
DVC_POOL = os.environ.get("PIPELINE_DVC_POOL", "dvc_workspace")
#: wall-clock limit of one stage task (hours); a GPU-profile training run may need raising it
STAGE_TIMEOUT_H = float(os.environ.get("PIPELINE_STAGE_TIMEOUT_H", "12"))
EXECUTION = os.environ.get("PIPELINE_EXECUTION", "shared")
if EXECUTION not in ("shared", "remote"):
    raise ValueError(f"PIPELINE_EXECUTION must be 'shared' or 'remote', not {EXECUTION!r}")
STAGES = load_stages(WORKSPACE / "dvc.yaml")


def asset_uri(out: str) -> str:
    """The Airflow Asset of one DVC output. shared: the file in the workspace; remote: the DVC-tracked
    output itself, one URI whichever worker's working copy (at whatever path) produced it."""
    return f"file://{WORKSPACE / out}" if EXECUTION == "shared" else f"x-dvc://pipeline/{out}"


ASSETS = {stage: [Asset(uri=asset_uri(out), name=f"{stage}:{out}") for out in outs]
          for stage, outs in model_outputs(STAGES).items()}

DEFAULT_ARGS = {
    "owner": "pipeline",
    "retries": int(os.environ.get("PIPELINE_TASK_RETRIES", "2")),
    "retry_delay": timedelta(seconds=20),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
}


def _stage_env() -> dict[str, str]:
    # dvc.yaml's `python -m pipeline ...` must find this interpreter's environment first (the guard
    # puts it first again for what it runs, whatever the task's shell read)
    return {
        "PATH": interpreter_first(os.environ.get("PATH", "")),
        "PIPELINE_HOME": str(WORKSPACE),
        "MLFLOW_PARENT_RUN_ID": "{{ ti.xcom_pull(task_ids='start') or '' }}",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONUNBUFFERED": "1",
    }


class StageOperator(BashOperator):
    """A stage task: ``BashOperator``, except that the exit status ``EXIT_PERMANENT`` (the stage failed for a
    reason a retry cannot fix: pipeline/errors.py) fails the task at once, without the retries that
    ``DEFAULT_ARGS`` give a transient failure."""

    def execute(self, context):
        hook = self.subprocess_hook
        run_command = hook.run_command

        def run_and_judge(*args, **kwargs):
            result = run_command(*args, **kwargs)
            if result.exit_code == EXIT_PERMANENT:
                raise AirflowFailException(f"stage {self.task_id} failed for a reason a retry cannot fix "
                                           f"(exit status {EXIT_PERMANENT}): {result.output}")
            return result

        hook.run_command = run_and_judge
        return super().execute(context)


def record_failure(context) -> None:
    """on_failure_callback: mark the MLflow parent run FAILED and name the failed stage."""
    from pipeline import tracking

    ti = context["ti"]
    parent = ti.xcom_pull(task_ids="start")
    if parent:
        os.environ.setdefault("PIPELINE_HOME", str(WORKSPACE))
        tracking.record_failure(parent, ti.task_id, str(context.get("exception") or ""))


def stage_task(name: str) -> BashOperator:
    stage, env, extra = STAGES[name], _stage_env(), {}
    cd = f"cd {shlex.quote(str(WORKSPACE))} && "
    # the guard replaces bash and takes DVC and the stage down with the task (pipeline/orchestration/guard.py)
    guard = f"exec {shlex.quote(sys.executable)} -m pipeline.orchestration.guard -- "
    if EXECUTION == "shared":
        cmd = cd + guard + f"{shlex.quote(sys.executable)} -m dvc repro --single-item {name}"
        extra["pool"] = DVC_POOL
    else:
        cmd = cd + guard + f"{shlex.quote(sys.executable)} -m pipeline.orchestration.remote_exec {name}"
        ups = ", ".join(f"{{{{ ti.xcom_pull(task_ids='{u}') or '{{}}' }}}}" for u in sorted(stage.upstream))
        env.update(PIPELINE_UPSTREAM_LOCKS=f"[{ups}]", PIPELINE_PROFILE="{{ params.profile or '' }}",
                   PIPELINE_OVERRIDES="{{ params.overrides | tojson }}")
        extra.update(queue=stage.meta.get("queue", "default"), do_xcom_push=True)
        if stage.meta.get("pool"):
            extra["pool"] = stage.meta["pool"]
    env["PIPELINE_TASK"] = name
    return StageOperator(
        task_id=name,
        bash_command=cmd,
        env=env,
        append_env=True,
        execution_timeout=timedelta(hours=STAGE_TIMEOUT_H),
        on_failure_callback=record_failure,
        outlets=ASSETS.get(name, []),
        doc_md=f"`{stage.cmd}` through DVC (skipped when up to date).",
        **extra,
    )


def _dag_run_over(ti, dag_id: str, run_id: str) -> bool:
    """True when Airflow says that DAG run no longer runs (its MLflow parent run is an orphan)."""
    try:
        state = ti.get_dagrun_state(dag_id, run_id)
    except Exception:  # noqa: BLE001 - unknown (deleted run, API error): leave the parent run alone
        return False
    return str(getattr(state, "value", state)) not in ("running", "queued")


#: shared mode: ``start`` rewrites params.yaml, so it takes the workspace's one DVC slot: it never
#: runs while a stage of any DAG run reads params.yaml, nor beside another run's ``start``
START_POOL = {"pool": DVC_POOL} if EXECUTION == "shared" else {}


@task(**START_POOL)
def start(**context) -> str:
    """Apply the run's profile and overrides to params.yaml, then open the MLflow parent run.

    A user error (params.yaml invalid, an override refused or invalid) fails the run at once, with
    one line and no retry: retrying cannot fix it.
    """
    os.environ.setdefault("PIPELINE_HOME", str(WORKSPACE))
    from pipeline import tracking
    from pipeline.config import check_run_overrides, load_params, set_params
    from pipeline.errors import PipelineError

    conf = context["params"]
    try:
        overrides = list(conf.get("overrides") or [])
        check_run_overrides(overrides)
        changed = set_params(WORKSPACE / "params.yaml", conf.get("profile"), overrides)
        params = load_params(WORKSPACE / "params.yaml")
    except PipelineError as err:
        events.emit("task_end", task="start", rc=err.exit_code, seconds=0.0, retryable=False, error=f"error: {err}")
        raise AirflowFailException(f"error: {err}") from None
    print(f"params.yaml {'updated' if changed else 'unchanged'}; profile {params.profile}")
    dag_run = context["dag_run"]
    tracking.close_orphaned_parents(params.tracking.experiment,
                                    lambda dag_id, run_id: _dag_run_over(context["ti"], dag_id, run_id))
    return tracking.start_parent_run(
        params.tracking.experiment, f"{dag_run.dag_id} {dag_run.run_id}", params=params.flat(),
        tags={"airflow.dag_id": dag_run.dag_id, "airflow.run_id": dag_run.run_id, "profile": params.profile})


@task
def finish(parent_run_id: str) -> None:
    os.environ.setdefault("PIPELINE_HOME", str(WORKSPACE))
    from pipeline import tracking

    tracking.end_parent_run(parent_run_id, "FINISHED")


def build(dag: DAG, names: list[str]) -> None:
    with dag:
        parent = start()
        tasks = {name: stage_task(name) for name in names}
        for name, t in tasks.items():
            ups = [tasks[u] for u in STAGES[name].upstream if u in tasks]
            if ups:
                ups >> t
            else:
                parent >> t
        sinks = [t for name, t in tasks.items() if not any(name in STAGES[o].upstream for o in names)]
        sinks >> finish(parent)


PARAMS = {
    "profile": Param(None, type=["null", "string"], enum=[None, *PROFILES],
                     description="params.yaml profile for this run (null: keep the file's)"),
    "overrides": Param([], type="array", items={"type": "string", "pattern": r"^[A-Za-z_][\w.]*=.*$"},
                       description="KEY=VALUE params overrides, e.g. train_classifier.epochs=3 or "
                                   "evaluate.dataset=images (the image set, by name: kodak, images = data/images, "
                                   "or data.test_photos' name; never a path)"),
}

pipeline_dag = DAG(
    dag_id="pipeline",
    description="The whole DVC pipeline: " + " -> ".join(STAGES),
    schedule=None,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    tags=["dvc", "mlflow"],
    doc_md=__doc__,
)
build(pipeline_dag, list(STAGES))

_trained = set(ASSETS)
_rerun = [s for s in STAGES if s in descendants(STAGES, _trained)]
if _rerun:
    evaluate_report_dag = DAG(
        dag_id="evaluate_report",
        description="Re-run " + ", ".join(_rerun) + " for the current models",
        schedule=AssetAny(*(a for assets in ASSETS.values() for a in assets)),  # any model updated
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        params=PARAMS,
        tags=["dvc", "mlflow"],
        doc_md=__doc__,
    )
    build(evaluate_report_dag, _rerun)
