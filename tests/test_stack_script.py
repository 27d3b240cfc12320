"""scripts/stack.sh without starting the services (fast): refusals and state handling. The full
start-trigger-stop cycle runs in tests/test_browser_e2e.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "stack.sh", tmp_path / "scripts" / "stack.sh")
    return tmp_path


def stack(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_"))}
    return subprocess.run([str(project / "scripts" / "stack.sh"), *args], cwd=project, capture_output=True,
                          text=True, timeout=60, env={**base, "VENV": str(VENV), **env})


def test_usage(project: Path) -> None:
    proc = stack(project, "restart")
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_status_and_down_when_nothing_runs(project: Path) -> None:
    status = stack(project, "status")
    assert status.returncode == 3
    assert "airflow stopped" in status.stdout and "mlflow stopped" in status.stdout
    down = stack(project, "down")
    assert down.returncode == 0 and "not running" in down.stdout


def test_up_refuses_a_taken_port_before_starting_anything(project: Path) -> None:
    with socket.socket() as busy, socket.socket() as spare:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        spare.bind(("127.0.0.1", 0))
        busy_port, free_port = busy.getsockname()[1], spare.getsockname()[1]
        spare.close()
        proc = stack(project, "up", AIRFLOW_PORT=str(busy_port), MLFLOW_PORT=str(free_port))
    assert proc.returncode != 0
    assert f"port {busy_port} is taken" in proc.stderr
    assert not list((project / ".stack").glob("*.pid")), "nothing may be started"
    assert (project / ".stack" / ".gitignore").read_text().splitlines()[-1] == "*"


def test_stale_pid_file_is_not_mistaken_for_a_running_stack(project: Path) -> None:
    state = project / ".stack"
    state.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (state / "mlflow.pid").write_text(f"{dead.pid}\n")
    status = stack(project, "status")
    assert status.returncode == 3 and "mlflow stopped" in status.stdout
    assert stack(project, "down").returncode == 0
    assert not (state / "mlflow.pid").exists()
