"""The production topology of docker/compose.yaml, run for real without Docker (scripts/prod_stack.py).

PostgreSQL, Redis, an S3 server (moto, in MinIO's place), the MLflow server (PostgreSQL + S3 artifacts)
and Airflow 3 with the Celery executor and two workers (``airflow-worker``: queue ``default``;
``airflow-worker-gpu``: ``gpu,default``), every one configured from compose.yaml + scripts/gen_env.py.
The ``pipeline`` DAG runs on the tiny profile with ``PIPELINE_EXECUTION=remote`` (each worker its own
working copy; only the S3 DVC remote shared), and three faults are injected into that one run:

1. the worker running ``download`` is SIGKILLed mid-stage: the task is retried on the other worker
   and its outputs are the mirror's files, byte for byte;
2. PostgreSQL is shut down (fast: every connection dropped) and restarted while ``train_classifier``
   trains: Airflow and MLflow carry on;
3. S3 becomes unreachable while ``evaluate`` runs ``dvc push``: the attempt fails with one clear
   line, its MLflow run is marked FAILED (``unpublished``; FINISHED again if the retry only pushes), the
   retry completes, and every ``dvc.lock``
   entry handed downstream points at objects that are in the remote.

Then: the run succeeded, the training tasks ran on the GPU-queue worker, the MLflow parent run has one
finished child per stage whose artifacts are in the S3 bucket, and a fresh clone ``dvc pull``s every
output from the S3 remote. Every process started is gone afterwards; every listener was on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.orchestration.dvcgraph import load_stages, model_outputs
from tests.conftest import REPO, make_workspace

_spec = importlib.util.spec_from_file_location("prod_stack", REPO / "scripts" / "prod_stack.py")
prod_stack = sys.modules["prod_stack"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prod_stack)

STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
RUN_TIMEOUT_S = float(os.environ.get("PROD_STACK_RUN_TIMEOUT_S", "1800"))
pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.timeout(2700)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, mirror):
    missing = prod_stack.missing_tools()
    if missing:
        msg = f"production stack needs {', '.join(missing)} (make services setup)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    tmp = tmp_path_factory.mktemp("prod")
    source = make_workspace(tmp / "source", profile="tiny", git=True)
    st = prod_stack.Stack(tmp / "stack", source=source, mirror=mirror,
                          settings={"GPU_WORKER_QUEUES": "gpu,default"})
    t0 = time.monotonic()
    try:
        st.start()
        yield st
    finally:
        st.stop()
        shutil.rmtree(st.workdir / "copies", ignore_errors=True)  # ~0.6 GB of working copies; logs stay
        st.timings["total_s"] = round(time.monotonic() - t0, 1)
        print(f"\nproduction stack timings: {st.timings}\nevents:\n  " + "\n  ".join(st.events))
    assert not prod_stack.marked_pids(st.id), "processes of the stack survived stop()"


def _stage_processes(st) -> list[tuple[str, str]]:
    """(command line, service that started it) of every process of the stack."""
    found = []
    for pid, cmd in prod_stack.process_cmdlines(prod_stack.marked_pids(st.id)).items():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(prod_stack.SERVICE_MARK.encode() + b"="):
                found.append((cmd, item.split(b"=", 1)[1].decode()))
    return found


def _wait_for_process(st, needle: str, timeout: float, interval: float = 0.05) -> None:
    """Return as soon as a process of the stack has ``needle`` in its command line."""
    mark = f"{prod_stack.MARK}={st.id}".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if needle.encode() not in Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" "):
                    continue
                if mark in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    return
            except OSError:
                continue
        time.sleep(interval)
    raise AssertionError(f"no process `{needle}` within {timeout:.0f} s")


def _quiet(call):
    """The call's result, or None while a service is briefly unreachable (PostgreSQL restarting)."""
    try:
        return call()
    except (OSError, urllib.error.URLError, KeyError):
        return None


def _task_instances(st, run_id: str) -> dict[str, dict]:
    tis = st.api("GET", f"/api/v2/dags/pipeline/dagRuns/{urllib.parse.quote(run_id)}/taskInstances")
    return {t["task_id"]: t for t in tis["task_instances"]}


def _attempt_logs(st, run_id: str, task: str) -> dict[int, str]:
    """attempt number -> the worker whose AIRFLOW_HOME holds that attempt's log."""
    out = {}
    for worker in prod_stack.WORKERS:
        folder = st.homes[worker] / "logs" / "dag_id=pipeline" / f"run_id={run_id}" / f"task_id={task}"
        for log in folder.glob("attempt=*.log"):
            out[int(log.stem.split("=")[1])] = worker
    return out


def _read_log(st, run_id: str, task: str, attempt: int) -> str:
    worker = _attempt_logs(st, run_id, task)[attempt]
    path = (st.homes[worker] / "logs" / "dag_id=pipeline" / f"run_id={run_id}" / f"task_id={task}"
            / f"attempt={attempt}.log")
    return path.read_text(errors="replace")


def _mlflow(st, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(st.mlflow_url() + path, method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def _artifact_files(st, run_id: str, path: str = "") -> list[str]:
    query = urllib.parse.urlencode({"run_id": run_id, **({"path": path} if path else {})})
    listing = _mlflow(st, f"/api/2.0/mlflow/artifacts/list?{query}")
    files = []
    for item in listing.get("files", []):
        files += _artifact_files(st, run_id, item["path"]) if item["is_dir"] else [item["path"]]
    return files


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_pipeline_dag_on_the_production_stack_with_faults(stack, mirror, tmp_path):
    st = stack
    timings = st.timings

    # every listener of every process the stack started is on 127.0.0.1
    listeners = prod_stack.listening_sockets(prod_stack.marked_pids(st.id))
    assert listeners, "no listening socket found"
    assert {addr for _, addr, _ in listeners} <= {"127.0.0.1"}, listeners
    if st.s3_gate:  # the gate lives in this process
        assert st.s3_gate.is_open

    st.api("PATCH", "/api/v2/dags/pipeline", {"is_paused": False})
    run_id = f"prod-{int(time.time())}"
    st.api("POST", "/api/v2/dags/pipeline/dagRuns",
           {"dag_run_id": run_id, "logical_date": None, "conf": {"profile": "tiny"}})
    t_run = time.monotonic()

    killed = None            # (worker, seconds into the run)
    pg_down_s = None
    s3_cut = None
    state, last_poll = None, 0.0
    while time.monotonic() - t_run < RUN_TIMEOUT_S:
        procs = _stage_processes(st)
        # fault 1: SIGKILL the worker running the download stage, mid-stage
        if killed is None:
            workers = [svc for cmd, svc in procs if "-m pipeline download" in cmd]
            if workers:
                time.sleep(2)  # well inside the stage (it extracts ~190 MB)
                st.kill_service(workers[0])
                killed = (workers[0], round(time.monotonic() - t_run, 1))
        elif st.services[killed[0]].down:
            ti = _quiet(lambda: _task_instances(st, run_id)["download"])
            if ti and ti["try_number"] >= 2 and ti["state"] in ("running", "success"):
                st.start_service(killed[0])  # the machine comes back (compose: restart policy)
        # fault 2: PostgreSQL restarted while the classifier trains
        if pg_down_s is None and any("-m pipeline train_classifier" in cmd for cmd, _ in procs):
            time.sleep(3)
            pg_down_s = round(st.restart_postgres(down_s=3.0), 1)
        # fault 3: S3 unreachable during evaluate's dvc push; reachable again once the attempt failed
        if s3_cut is None and any("-m pipeline evaluate" in cmd for cmd, _ in procs):
            # from the stage's end on, watch closely: the push must be caught before its first request
            _wait_for_process(st, "-m dvc push evaluate", timeout=RUN_TIMEOUT_S)
            st.s3_gate.close()
            s3_cut = round(time.monotonic() - t_run, 1)
            st.event("S3 gate closed during `dvc push evaluate`")
        elif s3_cut is not None and not st.s3_gate.is_open:
            ti = _quiet(lambda: _task_instances(st, run_id)["evaluate"])
            if ti and (ti["state"] in ("up_for_retry", "failed", "success") or ti["try_number"] >= 2):
                st.s3_gate.open()
                st.event(f"S3 gate open again (evaluate {ti['state']})")
        if time.monotonic() - last_poll > 2:
            last_poll = time.monotonic()
            run = _quiet(lambda: st.api("GET", f"/api/v2/dags/pipeline/dagRuns/{urllib.parse.quote(run_id)}"))
            state = run["state"] if run else state
            if state in ("success", "failed"):
                break
        time.sleep(0.3)
    timings["dag_run_s"] = round(time.monotonic() - t_run, 1)
    tis = _task_instances(st, run_id)
    summary = {t: (ti["state"], ti["try_number"]) for t, ti in tis.items()}
    print(f"\nDAG run {run_id}: {state} in {timings['dag_run_s']} s; tasks {summary}")
    assert state == "success", f"DAG run {state}: {summary}\n{st.events}"
    assert killed and pg_down_s and s3_cut, f"a fault was not injected: {killed}, {pg_down_s}, {s3_cut}"
    timings.update(worker_killed_at_s=killed[1], postgres_down_s=pg_down_s, s3_cut_at_s=s3_cut)

    # --- the training tasks ran on the GPU-queue worker -----------------------------------------------
    for stage in STAGES:
        attempts = _attempt_logs(st, run_id, stage)
        assert attempts, f"no log for {stage}"
        if stage == "train_classifier":  # meta: {queue: gpu, pool: gpu} in dvc.yaml
            assert set(attempts.values()) == {"airflow-worker-gpu"}, attempts
            assert tis[stage]["queue"] == "gpu" and tis[stage]["pool"] == "gpu"
    gpu_copy, cpu_copy = st.copies["airflow-worker-gpu"], st.copies["airflow-worker"]
    assert (gpu_copy / "data/classifier/model.pt").is_file()
    assert not (cpu_copy / "data/classifier/model.pt").exists()

    # --- fault 1: the killed download was retried on the other worker, same result --------------------
    attempts = _attempt_logs(st, run_id, "download")
    other = next(w for w in prod_stack.WORKERS if w != killed[0])
    assert attempts[1] == killed[0] and attempts[max(attempts)] == other, attempts
    assert tis["download"]["state"] == "success" and tis["download"]["try_number"] >= 2

    # --- fault 3: a clear failure while S3 was unreachable, then a complete retry ----------------------
    failed_attempt = _read_log(st, run_id, "evaluate", 1)
    assert "error: dvc push evaluate failed" in failed_attempt, failed_attempt[-3000:]
    assert tis["evaluate"]["try_number"] >= 2

    # --- the model Assets: each training task's outlet events reached the Assets the DAG declares ------
    # (remote mode names them x-dvc://pipeline/<out>: the same URI in every worker's copy, whatever its path)
    events = st.api("GET", "/api/v2/assets/events?source_dag_id=pipeline&source_run_id="
                           f"{urllib.parse.quote(run_id)}&limit=100")["asset_events"]
    outlets = {(e["source_task_id"], e["uri"]) for e in events}
    models = model_outputs(load_stages(REPO / "dvc.yaml"))
    assert outlets == {(stage, f"x-dvc://pipeline/{out}") for stage, outs in models.items() for out in outs}, outlets

    # --- what the tasks handed downstream: each stage's dvc.lock entry (XCom) --------------------------
    locks = {}
    for stage in STAGES:
        xcom = st.api("GET", f"/api/v2/dags/pipeline/dagRuns/{urllib.parse.quote(run_id)}/taskInstances/"
                             f"{stage}/xcomEntries/return_value")
        value = xcom["value"]
        entry = json.loads(value) if isinstance(value, str) else value
        assert set(entry) == {stage}
        locks.update(entry)

    # each stage ran on the versions of its inputs that its upstream stages handed on (never on stale
    # files a failed attempt left in a worker's copy)
    produced = {out["path"]: out["md5"] for entry in locks.values() for out in entry.get("outs", [])}
    for stage, entry in locks.items():
        for dep in entry.get("deps", []):
            if dep["path"] in produced:
                assert dep["md5"] == produced[dep["path"]], f"{stage} ran on another {dep['path']} than was pushed"

    # --- a fresh clone pulls every output from the S3 remote -------------------------------------------
    t0 = time.monotonic()
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(st.source), str(clone)], check=True)
    (clone / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": locks}, sort_keys=False))
    worker_env = st.services["airflow-worker"].env
    env = {**os.environ, **{k: worker_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
           "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]
    for args in (["remote", "add", "--local", "--default", "shared", worker_env["DVC_REMOTE_URL"]],
                 ["remote", "modify", "--local", "shared", "endpointurl", worker_env["DVC_REMOTE_ENDPOINT_URL"]],
                 ["pull"], ["status", "--json"]):
        proc = subprocess.run(dvc + args, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"dvc {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    stages = yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]
    uncached = {path for spec in stages.values() for kind in ("outs", "metrics", "plots")
                for out in spec.get(kind, []) if isinstance(out, dict)
                for path, opts in out.items() if (opts or {}).get("cache") is False}
    problems = [(stage, kind, path, what) for stage, changes in json.loads(proc.stdout or "{}").items()
                for change in changes for kind, files in (change.items() if isinstance(change, dict) else [])
                for path, what in files.items()
                if not (kind == "changed outs" and what == "deleted" and path in uncached)]
    assert not problems, f"dvc status after pull (only cache: false outputs may be absent): {problems}"
    for stage, spec in stages.items():
        for out in spec.get("outs", []):
            out = out if isinstance(out, str) else next(iter(out))
            assert (clone / out).exists(), f"{stage}: {out} not pulled"
    timings["fresh_clone_pull_s"] = round(time.monotonic() - t0, 1)

    # the retried download's outputs are the mirror's files, byte for byte (independent of DVC)
    with tarfile.open(mirror / "cifar-10-python.tar.gz") as tar:
        members = {Path(m.name).name: _sha256(tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()}
    pulled = {p.name: _sha256(p.read_bytes()) for p in (clone / "data/raw/cifar-10-batches-py").iterdir()}
    assert pulled and all(members[name] == digest for name, digest in pulled.items()), "CIFAR-10 differs"
    for png in (clone / "data/raw/kodak").iterdir():
        assert png.read_bytes() == (mirror / "kodak" / png.name).read_bytes(), png.name

    # --- MLflow: one finished child per stage under the parent, artifacts in the S3 bucket -------------
    parent = st.api("GET", f"/api/v2/dags/pipeline/dagRuns/{urllib.parse.quote(run_id)}/taskInstances/"
                           "start/xcomEntries/return_value")["value"]
    parent = json.loads(parent) if parent.startswith('"') else parent
    parent_run = _mlflow(st, f"/api/2.0/mlflow/runs/get?run_id={parent}")["run"]
    assert parent_run["info"]["status"] == "FINISHED"
    children = _mlflow(st, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [parent_run["info"]["experiment_id"]], "max_results": 100,
        "filter": f"tags.mlflow.parentRunId = '{parent}'"}).get("runs", [])
    finished, unpublished = {}, []
    for child in children:
        tags = {t["key"]: t["value"] for t in child["data"].get("tags", [])}
        if "unpublished" in tags:
            unpublished.append((tags["dvc_stage"], child["info"]["status"]))
        if child["info"]["status"] == "FINISHED":
            assert tags["dvc_stage"] not in finished, f"two finished {tags['dvc_stage']} children"
            finished[tags["dvc_stage"]] = child
    assert sorted(finished) == sorted(STAGES), sorted(finished)
    # fault 3's first attempt ran evaluate but could not push it: its run is FAILED (not a second result)
    # when the retry re-ran the stage, or FINISHED again when the retry found it up to date and only pushed
    evaluate_tags = {t["key"] for t in finished["evaluate"]["data"].get("tags", [])}
    assert unpublished == [("evaluate", "FAILED")] or (not unpublished and "published_on_retry" in evaluate_tags), \
        (unpublished, evaluate_tags)
    s3 = st.s3_client()
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
            for o in page.get("Contents", [])}
    with_artifacts = 0
    for stage, child in finished.items():
        uri = child["info"]["artifact_uri"]  # mlflow-artifacts:/<experiment>/<run>/artifacts (proxied)
        prefix = "artifacts/" + uri.split(":", 1)[1].lstrip("/")
        files = _artifact_files(st, child["info"]["run_id"])
        assert all(f"{prefix}/{f}" in keys for f in files), (stage, files, prefix)
        with_artifacts += bool(files)
    assert with_artifacts >= 4, "too few stages logged artifacts"
    for stage in ("train_classifier", "train_compressor"):
        metrics = {m["key"] for m in finished[stage]["data"].get("metrics", [])}
        assert metrics, f"{stage} logged no metrics"

    # what survived PostgreSQL's restart: services that exited and were restarted, if any
    timings["service_restarts"] = sum(max(0, s.starts - 1) for s in st.services.values())
    print(f"timings: {timings}")
