"""Ctrl-C in `make run`: local_run stops `airflow dags test` even when it ignores SIGTERM (it may be slow to
stop, and meanwhile start the next task)."""

import signal
import subprocess
import sys
import time

from pipeline.orchestration.local_run import _stop

IGNORES_TERM = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"


def _child(code: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_stop_kills_a_child_that_ignores_sigterm():
    proc = _child(IGNORES_TERM)
    t0 = time.monotonic()
    _stop(proc, grace_s=0.5)
    assert proc.returncode == -signal.SIGKILL
    assert time.monotonic() - t0 < 10


def test_stop_lets_a_child_that_obeys_sigterm_end_by_it():
    proc = _child("import time; print('ready', flush=True); time.sleep(60)")
    _stop(proc, grace_s=10)
    assert proc.returncode == -signal.SIGTERM
