"""A stage's MLflow runs kept true to what reached the DVC remote (``pipeline.orchestration.remote_exec``):
a run whose outputs were never pushed is marked FAILED, and FINISHED again when a later attempt's push
published them."""

from __future__ import annotations

import platform

from pipeline.tracking import mlflow_module, project_root
from pipeline.utils import log


def _workspace_stage_runs(client, stage: str, exp_id: str, query: str = "") -> list:
    """Runs of ``stage`` that this host and workspace started (newest first), in the experiment ``exp_id``,
    among those matching the MLflow filter ``query``."""
    runs = client.search_runs([exp_id], filter_string=query, order_by=["attributes.start_time DESC"],
                              max_results=1000)
    return [r for r in runs if r.data.tags.get("dvc_stage") == stage and r.data.tags.get("pipeline.host") ==
            platform.node() and r.data.tags.get("pipeline.workspace") == str(project_root())]


def mark_unpublished(stage: str, since_ms: int, note: str, exp_id: str) -> list[str]:
    """Mark FAILED, with ``note``, the FINISHED runs of ``stage`` that this workspace started since
    ``since_ms`` (epoch ms): the stage ran, but its outputs never reached the DVC remote (``dvc push``
    failed), so that attempt's run is not a result; the retry's run is. Returns their ids."""
    client = mlflow_module().MlflowClient()
    query = f"attributes.status = 'FINISHED' and attributes.start_time >= {int(since_ms)}"
    marked = []
    for run in _workspace_stage_runs(client, stage, exp_id, query):
        client.set_tag(run.info.run_id, "unpublished", note[:5000])
        client.set_terminated(run.info.run_id, status="FAILED")
        log(f"[mlflow] run {run.info.run_id} ({stage}) marked FAILED: {note}")
        marked.append(run.info.run_id)
    return marked


def republish_skipped(stage: str, since_ms: int, note: str, exp_id: str) -> str | None:
    """After a successful ``dvc push`` of ``stage``: when no run of it started in this workspace since
    ``since_ms`` (DVC skipped the stage as up to date, so what was pushed is an earlier attempt's output),
    the newest run of this workspace that :func:`mark_unpublished` failed is FINISHED again, with the
    tag ``published_on_retry``. Returns its id (None: the stage ran again, or nothing was unpublished)."""
    client = mlflow_module().MlflowClient()
    runs = _workspace_stage_runs(client, stage, exp_id)
    if not runs or runs[0].info.start_time >= since_ms:
        return None
    newest = runs[0]
    if newest.info.status != "FAILED" or "unpublished" not in newest.data.tags:
        return None
    run_id = newest.info.run_id
    client.delete_tag(run_id, "unpublished")
    client.set_tag(run_id, "published_on_retry", note[:5000])
    client.set_terminated(run_id, status="FINISHED")
    log(f"[mlflow] run {run_id} ({stage}) FINISHED again: {note}")
    return run_id
