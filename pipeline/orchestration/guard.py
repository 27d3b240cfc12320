"""``python -m pipeline.orchestration.guard [--] CMD...``: run CMD so that it never outlives its task.

An Airflow stage task runs ``dvc repro`` in a new session (BashOperator). When the process that runs
the task dies without cleaning up (``kill -9`` of ``airflow dags test``, a worker crash), that command
and the stage under it would go on under PID 1, still holding DVC's lock and writing outputs. The
DAG's stage command is ``exec python -m pipeline.orchestration.guard -- dvc repro ...``, so the guard
replaces bash and its parent is the task process. It

- asks the kernel for SIGTERM when that parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``; it also polls
  its parent pid, so it works where prctl does not);
- runs CMD in its own process group (it leads it) and, on SIGTERM/SIGINT/SIGHUP or the parent's
  death, sends SIGTERM to the whole group (DVC and the stage process), then SIGKILL after
  ``PIPELINE_KILL_GRACE_S`` seconds (default 10), and exits with 128 + the signal.

CMD runs with this interpreter's folder first on PATH, so that dvc.yaml's ``python -m pipeline`` is the
interpreter that runs the guard: the task's ``bash -c`` may have read a ~/.bashrc (Debian's bash does when
its stdin is a socket) whose ``pyenv init`` or ``conda activate`` put another ``python`` first, and the
stage then failed with ``No module named 'mlflow'``.

Otherwise it exits with CMD's exit status, except when the stage under it failed for a reason a retry
cannot fix: the stage says so in the file the guard names in ``PIPELINE_STATUS_FILE``
(``pipeline.errors.run_cli``), and the guard then exits with ``errors.EXIT_PERMANENT``, which the DAG
fails without a retry. It also reports the task's start and end to ``make run``'s console
(``pipeline.events``: the task is ``PIPELINE_TASK``, else CMD's last argument).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline import events
from pipeline.errors import EXIT_PERMANENT

PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Linux: deliver ``sig`` to this process when its parent dies. False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _group_members(pgid: int) -> list[int]:
    """Pids of the other processes of process group ``pgid`` (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _stop_group(child: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the whole group (this process ignores it), SIGKILL to what is left after ``grace_s``."""
    pgid = os.getpgrp()
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        child.poll()
        if not _group_members(pgid):
            return
        time.sleep(0.1)
    for pid in _group_members(pgid):  # the stage under DVC, torchrun ranks...
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    child.poll()


def interpreter_first(path: str) -> str:
    """``path`` (a PATH value) with this interpreter's folder first, and not again further on."""
    own = str(Path(sys.executable).parent)
    return os.pathsep.join([own, *(p for p in path.split(os.pathsep) if p and p != own)])


def _say(message: str) -> None:
    """One line to stderr, if anyone still reads it: when the task process died, stderr is a pipe with
    no reader, and a BrokenPipeError here would end the guard before it stops the group (the stage
    then lived on under PID 1 until its own next write failed, and its MLflow run ended FAILED)."""
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m pipeline.orchestration.guard [--] CMD [ARG...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        return 128 + signal.SIGTERM
    if os.getpgrp() != os.getpid():
        try:
            os.setpgid(0, 0)  # lead a group of our own, so stopping it never reaches our caller
        except PermissionError:  # a session leader already leads its group
            pass
    received: list[int] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    grace = float(os.environ.get("PIPELINE_KILL_GRACE_S", "10"))
    task = os.environ.get("PIPELINE_TASK") or args[-1]
    fd, status = tempfile.mkstemp(prefix="pipeline-status-", suffix=".json")
    os.close(fd)
    os.unlink(status)  # the stage creates it only when it fails
    started = time.monotonic()
    events.emit("task_start", task=task)
    try:
        child = subprocess.Popen(args, env={**os.environ, events.STATUS_ENV: status,
                                            "PATH": interpreter_first(os.environ.get("PATH", ""))})
    except OSError as err:
        print(f"error: cannot run {args[0]}: {err}", file=sys.stderr)
        events.emit("task_end", task=task, rc=127, seconds=0.0, retryable=False, error=str(err))
        return 127
    try:
        while True:
            if received or os.getppid() != parent:
                why = signal.Signals(received[0]).name if received else "parent died"
                _say(f"guard: {why}: stopping {' '.join(args[:4])} (process group {os.getpgrp()})")
                _stop_group(child, grace)
                rc = 128 + (received[0] if received else signal.SIGTERM)
                events.emit("task_end", task=task, rc=rc, seconds=time.monotonic() - started, retryable=True,
                            error=f"stopped ({why})")
                return rc
            try:
                rc = child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            return _finish(task, rc, Path(status), time.monotonic() - started)
    finally:
        Path(status).unlink(missing_ok=True)


def _finish(task: str, rc: int, status: Path, seconds: float) -> int:
    """The task's exit status: CMD's, or ``EXIT_PERMANENT`` when the stage failed for good."""
    said = events.read_status(status) if rc else None
    retryable = bool(said.get("retryable", True)) if said else True
    events.emit("task_end", task=task, rc=rc, seconds=seconds, retryable=retryable,
                error=(said or {}).get("error", ""))
    if rc and not retryable:
        _say(f"guard: {task} failed for a reason a retry cannot fix (no retry): {said.get('error', '')}")
        return EXIT_PERMANENT
    return rc


if __name__ == "__main__":
    sys.exit(main())
