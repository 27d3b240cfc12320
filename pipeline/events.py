"""What a pipeline run tells the console of ``make run`` (``pipeline/orchestration/local_run.py``).

Airflow's own records go to a log file; the console shows the pipeline's progress from these events
instead. When the environment names a file in ``PIPELINE_EVENTS`` (``local_run`` does, and Airflow
passes its environment down to the stage tasks), ``emit`` appends one JSON line per event to it:

- ``task_start`` / ``task_end`` (``pipeline.orchestration.guard``, around each stage task: its exit
  status, wall time, whether a retry may help, and the stage's error line);
- ``stage_done`` (``python -m pipeline <stage>``: the stage ran, rather than DVC finding it up to date,
  with its one-line headline, e.g. the test accuracy);
- ``progress`` (``pipeline.utils.progress``: a bar's position, at most every few seconds).

Without ``PIPELINE_EVENTS`` nothing is written. Standard library only: every layer may import it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV = "PIPELINE_EVENTS"
#: a stage writes its error here (``errors.run_cli``) for the guard of its task to read
STATUS_ENV = "PIPELINE_STATUS_FILE"


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def emit(event: str, **fields) -> None:
    """Append one event (a JSON line, written with one ``write`` in append mode) when ``PIPELINE_EVENTS`` is set."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"t": round(time.time(), 3), "event": event, **fields}, default=str) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:  # the console's view is a convenience: never fail a stage over it
        pass


def read(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The complete events written after byte ``offset``, and the offset to read from next time."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a line still being written is read next time
    events = []
    for line in data[:end].splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            events.append(value)
    return events, offset + end


def write_status(retryable: bool, error: str) -> None:
    """Tell the stage task's guard how this stage failed (``STATUS_ENV``), when one is listening."""
    path = os.environ.get(STATUS_ENV)
    if not path:
        return
    try:
        Path(path).write_text(json.dumps({"retryable": retryable, "error": error[:2000]}))
    except OSError:
        pass


def read_status(path: Path) -> dict | None:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
