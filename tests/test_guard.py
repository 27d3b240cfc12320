"""pipeline.orchestration.guard: a DAG stage's command never outlives the task that runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUARD = [sys.executable, "-m", "pipeline.orchestration.guard", "--"]
# CMD under the guard: a child that starts a grandchild (as dvc starts the stage), both sleeping
TREE = [sys.executable, "-c", textwrap.dedent("""
    import subprocess, sys, time
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(sys.argv[1], "w").write(str(g.pid))
    time.sleep(120)
""")]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_KILL_GRACE_S": "3"}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def read_pid(path: Path) -> int:
    assert wait_for(lambda: path.is_file() and path.read_text().strip()), "the command under the guard did not start"
    return int(path.read_text())


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")


def test_exit_status_passes_through():
    assert subprocess.run([*GUARD, sys.executable, "-c", "raise SystemExit(3)"], env=env()).returncode == 3
    assert subprocess.run(GUARD[:-1], env=env(), capture_output=True).returncode == 2  # no command


def test_sigterm_stops_the_whole_group(tmp_path):
    pidfile = tmp_path / "pid"
    guard = subprocess.Popen([*GUARD, *TREE, str(pidfile)], env=env(), stderr=subprocess.PIPE, text=True)
    grandchild = read_pid(pidfile)
    guard.send_signal(signal.SIGTERM)
    assert guard.wait(timeout=20) == 128 + signal.SIGTERM
    assert wait_for(lambda: not alive(grandchild)), "the grandchild outlived the guard"
    assert "guard: SIGTERM: stopping" in guard.stderr.read()


def test_parent_killed_with_sigkill_takes_the_command_down(tmp_path):
    """The task process dies without cleaning up (kill -9): the guard notices and stops the group."""
    pidfile = tmp_path / "pid"
    parent_code = f"import subprocess, time; subprocess.Popen({[*GUARD, *TREE, str(pidfile)]!r}); time.sleep(120)"
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=env(), stderr=subprocess.DEVNULL)
    try:
        grandchild = read_pid(pidfile)
        assert alive(grandchild)
        parent.kill()
        parent.wait(timeout=10)
        assert wait_for(lambda: not alive(grandchild)), "the stage outlived its killed task process"
    finally:
        parent.kill()
