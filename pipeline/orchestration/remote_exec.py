"""Run one DVC stage in a worker's own working copy, sharing only the DVC remote.

``python -m pipeline.orchestration.remote_exec STAGE [--upstream LOCKJSON ...]``

0. apply the DAG run's profile and overrides to this copy's params.yaml;
1. merge the ``dvc.lock`` entries of the upstream stages (each the JSON this command printed on the
   worker that ran it; the DAG passes them through XCom) into the local ``dvc.lock``, so DVC knows
   which versions of the inputs to fetch;
2. ``dvc repro --pull --single-item STAGE``: pull the inputs from the remote, run the stage if changed;
3. ``dvc push STAGE``: send its outputs to the remote. If that fails, this attempt's MLflow run of the
   stage is marked FAILED (tag ``unpublished``); if a retry then finds the stage up to date and only
   pushes, that run is FINISHED again (tag ``published_on_retry``): one finished run per result;
4. print the stage's own ``dvc.lock`` entry as one JSON line (the last line: Airflow's XCom).

No shared disk is needed between workers: only the DVC remote (MinIO/S3 in the Compose stack).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

LOCK = Path("dvc.lock")


def merge_lock(entries: dict[str, dict], lock: Path = LOCK) -> None:
    doc = yaml.safe_load(lock.read_text()) if lock.exists() else None
    doc = doc or {"schema": "2.0", "stages": {}}
    doc.setdefault("stages", {}).update(entries)
    tmp = lock.with_suffix(".lock.tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, lock)


def lock_entry(stage: str, lock: Path = LOCK) -> dict:
    doc = yaml.safe_load(lock.read_text()) or {}
    return doc["stages"][stage]


def upstream_inputs(stage: str, entries: dict[str, dict], dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """The dependencies of ``stage`` that are outputs of the upstream stages in ``entries``."""
    deps = yaml.safe_load(dvc_yaml.read_text())["stages"][stage].get("deps") or []
    outs = {out["path"] for entry in entries.values() for out in entry.get("outs") or []}
    return [dep for dep in deps if dep in outs]


def apply_run_conf() -> None:
    """Apply the DAG run's profile/overrides (``PIPELINE_PROFILE``, ``PIPELINE_OVERRIDES`` as JSON) to
    this copy's params.yaml: every worker must see the same params."""
    from pipeline.config import check_run_overrides, set_params

    profile = os.environ.get("PIPELINE_PROFILE") or None
    overrides = json.loads(os.environ.get("PIPELINE_OVERRIDES") or "[]")
    check_run_overrides(overrides)  # run conf: knobs only, never data/model sources
    if profile or overrides:
        set_params("params.yaml", profile, overrides)


def dvc(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], stdout=sys.stderr, stderr=sys.stderr,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"error: dvc {' '.join(args)} failed (exit {proc.returncode})")


def _track(action: str, stage: str, started_ms: int, note: str) -> None:
    """Keep the stage's MLflow runs true to what reached the remote (pipeline.tracking_runs.mark_unpublished /
    republish_skipped): one FINISHED run per published result. Best effort: a push's error, or the task's
    success, is not changed by a tracking server that is unreachable too."""
    try:
        from pipeline import tracking, tracking_runs
        from pipeline.config import load_params

        experiment = load_params(tracking.project_root() / "params.yaml").tracking.experiment
        getattr(tracking_runs, action)(stage, started_ms, note, tracking.experiment_id(experiment))
    except Exception as err:  # noqa: BLE001
        print(f"warning: MLflow: {action} for {stage} failed ({type(err).__name__}: {err})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage")
    parser.add_argument("--upstream", action="append", default=[], metavar="JSON",
                        help='{"stage": {dvc.lock entry}} printed by an upstream run of this command')
    args = parser.parse_args(argv)
    from pipeline.errors import PipelineError

    try:  # first: a refused or invalid run conf ends here, before any pull, stage or request
        apply_run_conf()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    entries: dict[str, dict] = {}
    texts = args.upstream + [json.dumps(e) for e in json.loads(os.environ.get("PIPELINE_UPSTREAM_LOCKS") or "[]")]
    for text in texts:
        if text.strip():
            entries.update(json.loads(text))
    if entries:
        merge_lock(entries)
        # the upstream versions of this stage's inputs, even over files a failed earlier attempt left
        # in this copy (`repro --pull` would keep those and record them as the inputs)
        targets = upstream_inputs(args.stage, entries)
        if targets:
            dvc("pull", "--force", *targets)
    started_ms = int(time.time() * 1000)
    dvc("repro", "--pull", "--single-item", args.stage)
    try:
        dvc("push", args.stage)
    except SystemExit:
        _track("mark_unpublished", args.stage, started_ms, f"dvc push {args.stage} failed: the outputs never "
               "reached the DVC remote; the task's retry holds the result")
        raise
    if os.environ.get("AIRFLOW_CTX_TRY_NUMBER") != "1":  # a retry (or outside Airflow): an earlier attempt's run?
        _track("republish_skipped", args.stage, started_ms, "the outputs of this run were pushed by a later "
               "attempt of the task (dvc skipped the stage as up to date)")
    print(json.dumps({args.stage: lock_entry(args.stage)}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
