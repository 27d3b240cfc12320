"""``python -m pipeline.orchestration.local_run DAG_ID [ARGS...]``: ``make run``'s orchestrator.

Runs ``airflow dags test DAG_ID ARGS...`` (the whole DAG in one process, no scheduler) and speaks to
people: Airflow's own records go to a log file (``$AIRFLOW_HOME/runs/<dag>-<time>.log``, named at the
start and the end); the console gets one line when a stage starts and one when it ends (status, wall
time, the stage's headline), a live line on a terminal, and a summary block at the end (profile,
commit, each stage's time, the classifier's accuracy, the codec against JPEG / JPEG 2000 / WebP, where
the report and the log are, how to open MLflow and Airflow). A failed run ends with the failing stage,
its error line and the log's path. The stages report through ``pipeline.events``.

Two guarantees a bare ``airflow dags test`` lacks:

- one at a time per ``AIRFLOW_HOME``: a second ``make run`` waits for the first (an exclusive
  ``flock`` on ``$AIRFLOW_HOME/local_run.lock``, held until ``airflow`` exits), so two runs never
  rewrite params.yaml or run DVC in the same workspace at once;
- a DAG run left ``running`` by an earlier orchestrator that was killed (kill -9, a closed terminal)
  is marked ``failed`` first, with its unfinished task instances: no scheduler would ever do it, and
  the next ``start`` task then closes that run's MLflow parent run as KILLED. Holding the lock
  proves no other local orchestrator is alive.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline import events
from pipeline.orchestration.guard import interpreter_first


def _log(msg: str) -> None:
    print(f"local_run: {msg}", file=sys.stderr, flush=True)


def fail_orphaned_test_runs() -> list[str]:
    """Mark ``failed`` every DAG run started by ``airflow dags test`` that is still running/queued.

    Only call while holding the lock (no live local orchestrator). Returns ``dag_id/run_id`` of each.
    """
    from sqlalchemy import select

    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState
    from airflow.utils.types import DagRunTriggeredByType

    unfinished = [TaskInstanceState.RUNNING, TaskInstanceState.QUEUED, TaskInstanceState.SCHEDULED,
                  TaskInstanceState.UP_FOR_RETRY, TaskInstanceState.UP_FOR_RESCHEDULE, TaskInstanceState.DEFERRED]
    failed = []
    with create_session() as session:
        runs = session.scalars(select(DagRun).where(DagRun.state.in_([DagRunState.RUNNING, DagRunState.QUEUED]),
                                                    DagRun.triggered_by == DagRunTriggeredByType.TEST)).all()
        for run in runs:
            tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == run.dag_id,
                                                             TaskInstance.run_id == run.run_id)).all()
            for ti in tis:
                if ti.state in unfinished or ti.state is None:
                    ti.state = TaskInstanceState.FAILED if ti.state in unfinished else TaskInstanceState.UPSTREAM_FAILED
            run.set_state(DagRunState.FAILED)
            failed.append(f"{run.dag_id}/{run.run_id}")
    for name in failed:
        _log(f"DAG run {name} was left running by a killed orchestrator: marked failed")
    return failed


class Console:
    """The run as a person sees it. On a terminal the running stage is a live line redrawn in place;
    elsewhere (CI, a pipe) only whole lines, and a stage's start line only once it has run a few
    seconds (DVC finds an up-to-date stage in about two)."""

    START_DELAY_S = 4.0

    def __init__(self, ws: Path, out=None):
        self.ws, self.out = ws, out or sys.stdout
        self.tty = self.out.isatty()
        self.running: dict[str, dict] = {}  # task -> {"t": start time, "shown": bool, "progress": str}
        self.ran: set[str] = set()
        self.times: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.failure: dict | None = None
        self.live = False

    def line(self, text: str = "") -> None:
        self._clear()
        print(text, file=self.out, flush=True)

    def _clear(self) -> None:
        if self.live:
            self.out.write("\r\033[K")
            self.live = False

    def handle(self, ev: dict) -> None:
        kind, task = ev.get("event"), str(ev.get("task") or ev.get("stage") or "")
        now = float(ev.get("t") or time.time())
        if kind == "task_start":
            retry = self.status.get(task) == "failed"
            self.running[task] = {"t": now, "shown": False, "progress": ""}
            if retry:
                self._say(task, "retrying", "", "")
                self.running[task]["shown"] = True
        elif kind == "stage_done":
            self.ran.add(task)
        elif kind == "progress" and task in self.running:
            total = ev.get("total")
            n = ev.get("n", 0)
            desc = str(ev.get("desc") or "").strip()
            where = f"{_count(n)}/{_count(total)}" if total else _count(n)
            self.running[task]["progress"] = f"{desc} {where} {ev.get('unit') or ''}".strip()
        elif kind == "task_end":
            info = self.running.pop(task, {"t": now})
            seconds = float(ev.get("seconds") or (now - info["t"]))
            self.times[task] = self.times.get(task, 0.0) + seconds
            if ev.get("rc") == 0:
                from pipeline.report.summary import headline

                self.status[task] = "done" if task in self.ran else "up to date"
                self._say(task, self.status[task], _dur(seconds), headline(task, self.ws))
            else:
                self.status[task] = "failed"
                error = _one_line(str(ev.get("error") or "")) or f"exit status {ev.get('rc')}"
                self.failure = {"task": task, "error": error, "retryable": ev.get("retryable", True)}
                self._say(task, "FAILED", _dur(seconds), error)

    def _say(self, task: str, status: str, took: str, text: str) -> None:
        self.line(f"  {task:<17} {status:<10} {took:>7}  {text}".rstrip())

    def tick(self) -> None:
        """Start lines for tasks that have run a while; the live line on a terminal."""
        now = time.time()
        for task, info in self.running.items():
            if not info["shown"] and (self.tty or now - info["t"] >= self.START_DELAY_S):
                if not self.tty:
                    self._say(task, "running", "", "")
                info["shown"] = True
        if self.tty and self.running:
            task, info = next(iter(self.running.items()))
            text = f"  {task:<17} running    {_dur(now - info['t']):>7}  {info['progress']}"
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.out.write("\r\033[K" + text[:width])
            self.out.flush()
            self.live = True


def _count(n) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    return f"{n:,.0f}" if n >= 1000 or float(n).is_integer() else f"{n:.1f}"


def _dur(seconds: float) -> str:
    from pipeline.report.summary import duration

    return duration(seconds)


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _git_commit(ws: Path) -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ws, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "not a git checkout"


def _profile(ws: Path, args: list[str]) -> str:
    """The run's profile: the one asked for with ``-c '{"profile": ...}'``, else params.yaml's."""
    for flag, value in zip(args, args[1:]):
        if flag in ("-c", "--conf"):
            try:
                asked = json.loads(value).get("profile")
            except (ValueError, AttributeError):
                asked = None
            if asked:
                return str(asked)
    try:
        import yaml

        return str(yaml.safe_load((ws / "params.yaml").read_text()).get("profile") or "?")
    except Exception:  # noqa: BLE001 - shown only
        return "?"


def _rel(path: Path, ws: Path) -> str:
    try:
        return str(path.relative_to(ws))
    except ValueError:
        return str(path)


def _last_error(log: Path) -> str:
    """The last line of the log that reads like an error (when no stage reported one)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 200_000))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    pattern = re.compile(r"(^|\s)(error:|ERROR|Error|Exception|Traceback)")
    for line in reversed(lines):
        if pattern.search(line):
            return _one_line(line)
    return ""


def summary(console: Console, ws: Path, log: Path, profile: str, commit: str, seconds: float, ok: bool) -> None:
    from pipeline.report.summary import classifier_line, codec_lines, duration

    say = console.line
    say()
    if not ok:
        failure = console.failure or {"task": "?", "error": _last_error(log)}
        say(f"pipeline FAILED after {duration(seconds)} (profile {profile}, commit {commit})")
        say(f"  failing stage: {failure['task']}")
        say(f"  error: {failure['error'] or 'see the log'}")
        say(f"  full log: {_rel(log, ws)}")
        return
    say(f"pipeline done in {duration(seconds)}: profile {profile}, commit {commit}")
    if console.times:
        say("  stages: " + ", ".join(f"{t} {duration(s)}" for t, s in console.times.items()))
    acc = classifier_line(ws)
    if acc:
        say(f"  classifier: {acc}")
    for text in codec_lines(ws):
        say(f"  {text}")
    if (ws / "data/report/report.html").is_file():
        say("  report: data/report/report.html (and report.md)")
    say(f"  full log: {_rel(log, ws)}")
    from pipeline.tracking import tracking_uri

    venv_bin = Path(sys.executable).parent
    mlflow = venv_bin / "mlflow"
    say(f"  MLflow: {_rel(mlflow, ws) if mlflow.exists() else 'mlflow'} ui --backend-store-uri {tracking_uri()}"
        f"  -> http://127.0.0.1:5000/#/experiments{_experiment_path(ws)}?workflowType=machine_learning")
    say("  Airflow UI: make up  -> http://127.0.0.1:8080 (make down to stop)")


def _die_with_parent() -> None:
    """In the ``airflow dags test`` child: SIGKILL when local_run dies, as when local_run exec'ed it; a killed
    orchestrator (kill -9, a closed terminal) takes the run down with it, and the stage guards stop the stages."""
    import signal

    from pipeline.orchestration.guard import set_parent_death_signal

    set_parent_death_signal(signal.SIGKILL)


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop ``airflow dags test``: SIGTERM, then SIGKILL after ``grace_s`` (or at a second Ctrl-C). Airflow
    finishes its SIGTERM handling slowly and may start the next task meanwhile; the stage guards stop a
    running stage when Airflow is gone."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.kill()
        proc.wait()


def _experiment_path(ws: Path) -> str:
    """``/<id>`` of the project's MLflow experiment in the local store ('' when unknown). MLflow 3's UI opens
    on its GenAI view unless the link says ``workflowType=machine_learning``."""
    import sqlite3

    from pipeline.tracking import tracking_uri

    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return ""
    try:
        import yaml

        name = yaml.safe_load((ws / "params.yaml").read_text())["tracking"]["experiment"]
        with sqlite3.connect(f"file:{uri.removeprefix('sqlite:///')}?mode=ro", uri=True) as db:
            row = db.execute("select experiment_id from experiments where name = ?", (name,)).fetchone()
    except Exception:  # noqa: BLE001 - a link without the id still opens MLflow
        return ""
    return f"/{row[0]}" if row else ""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m pipeline.orchestration.local_run DAG_ID [airflow dags test args...]",
              file=sys.stderr)
        return 2
    home = Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / "local_run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _log(f"another run holds {home / 'local_run.lock'}: waiting for it to finish")
        fcntl.flock(fd, fcntl.LOCK_EX)
    fail_orphaned_test_runs()
    airflow = shutil.which("airflow", path=interpreter_first(os.environ.get("PATH", "")))
    if airflow is None:
        _log("airflow not found (run `make setup`)")
        return 1
    ws = Path(os.environ.get("PIPELINE_WORKSPACE") or Path.cwd()).resolve()
    runs = home / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log, feed = runs / f"{args[0]}-{stamp}.log", runs / f"{args[0]}-{stamp}.events"
    console = Console(ws)
    profile, commit = _profile(ws, args), _git_commit(ws)
    console.line(f"pipeline: DAG {args[0]}, profile {profile}, commit {commit}")
    console.line(f"  Airflow's log: {_rel(log, ws)}")
    started = time.monotonic()
    env = {**os.environ, events.ENV: str(feed)}
    with open(log, "ab") as out:  # the lock stays held by `airflow dags test` too (a killed local_run)
        proc = subprocess.Popen([airflow, "dags", "test", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, pass_fds=(fd,), preexec_fn=_die_with_parent)
    offset = 0
    try:
        while True:
            done = proc.poll() is not None
            batch, offset = events.read(feed, offset)
            for ev in batch:
                console.handle(ev)
            if done:
                break
            console.tick()
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.line("interrupted: stopping the run (Ctrl-C again to force)")
        _stop(proc)
        console.line(f"  full log: {_rel(log, ws)}")
        return 130
    rc = proc.returncode
    summary(console, ws, log, _profile(ws, []), commit, time.monotonic() - started, rc == 0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
