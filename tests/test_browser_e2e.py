"""End to end in a real browser: the local stack (scripts/stack.sh) in a copy of the project, Debian's
headless Chromium driven by Playwright. Log into Airflow with the generated password, trigger the
`pipeline` DAG with profile `tiny` from the UI's trigger form, wait for the run to succeed, then find
the run in the MLflow UI. Screenshots go to $BROWSER_SCREENSHOTS (default tests/artifacts/browser).

Needs: apt-get install chromium chromium-driver; pip install playwright (never `playwright install`:
the browser is /usr/bin/chromium); the dataset mirror ($DATA_MIRROR or ../shared/datasets).
Takes a few minutes on 2 CPU cores (stack start-up about 1 minute, the tiny pipeline 2-3 minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

from tests.conftest import make_workspace, mirror_path

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(os.environ.get("BROWSER_SCREENSHOTS") or ROOT / "tests" / "artifacts" / "browser")
RUN_TIMEOUT_S = float(os.environ.get("BROWSER_RUN_TIMEOUT", "900"))  # the tiny DAG run, 2 shared cores
EXPERIMENT = "rnn-compression-cifar10"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    workspace: Path
    airflow: str
    mlflow: str
    password: str
    env: dict[str, str]

    def logs(self) -> str:
        out = []
        for name in ("airflow", "mlflow"):
            log = self.workspace / ".stack" / f"{name}.log"
            if log.exists():
                out.append(f"--- {log} (tail) ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(out)


def _stack_env(workspace: Path, airflow_port: int, mlflow_port: int, mirror: Path) -> dict[str, str]:
    # The test session's own Airflow/MLflow/pipeline settings must not leak into the stack.
    keep = {"PIPELINE_NO_PROGRESS", "PIPELINE_TASK_RETRIES"}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "MLFLOW_", "PIPELINE_")) or k in keep}
    env.update(VENV=str(Path(sys.executable).parent.parent), AIRFLOW_HOME=str(workspace / "airflow"),
               AIRFLOW_PORT=str(airflow_port), MLFLOW_PORT=str(mlflow_port), DATA_MIRROR=str(mirror),
               STACK_TIMEOUT="300")
    return env


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket in LISTEN state on ``port``, read from the kernel (/proc/net/tcp*),
    independently of what any script prints."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)
            if width == 8:
                found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    mirror = mirror_path()
    workspace = make_workspace(tmp_path_factory.mktemp("browser") / "project", "tiny", git=True)
    shutil.rmtree(workspace / ".stack", ignore_errors=True)  # pid files of a stack running in the checkout
    airflow_port, mlflow_port = free_port(), free_port()
    env = _stack_env(workspace, airflow_port, mlflow_port, mirror)
    script = workspace / "scripts" / "stack.sh"
    up = subprocess.run([str(script), "up"], cwd=workspace, env=env, capture_output=True, text=True, timeout=420)
    pids = {name: (workspace / ".stack" / f"{name}.pid").read_text().strip()
            for name in ("airflow", "mlflow") if (workspace / ".stack" / f"{name}.pid").exists()}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"http://127.0.0.1:{airflow_port}" in up.stdout and f"http://127.0.0.1:{mlflow_port}" in up.stdout
        password_file = workspace / "airflow" / "simple_auth_manager_passwords.json.generated"
        password = json.loads(password_file.read_text())["admin"]
        yield Stack(workspace, f"http://127.0.0.1:{airflow_port}", f"http://127.0.0.1:{mlflow_port}", password, env)
    finally:
        down = subprocess.run([str(script), "down"], cwd=workspace, env=env, capture_output=True, text=True,
                              timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        for name, pid in pids.items():  # each service ran in its own process group: all of it is gone
            alive = subprocess.run(["kill", "-0", "--", f"-{pid}"], capture_output=True).returncode == 0
            assert not alive, f"{name} process group {pid} still alive after stack.sh down"


def test_stack_listens_on_loopback_only(stack: Stack) -> None:
    """Both services listen on 127.0.0.1 and nowhere else (the kernel's socket table, not the URLs the
    script prints), and both answer there."""
    import urllib.request

    for url in (stack.airflow, stack.mlflow):
        port = int(url.rsplit(":", 1)[1])
        assert listening_addresses(port) == {"127.0.0.1"}, (url, listening_addresses(port))
    with urllib.request.urlopen(stack.mlflow + "/health", timeout=10) as r:
        assert r.read().decode().strip() == "OK"
    with urllib.request.urlopen(stack.airflow + "/api/v2/monitor/health", timeout=10) as r:
        assert json.loads(r.read())["metadatabase"]["status"] == "healthy"


def test_listening_addresses_reads_the_socket_table() -> None:
    """The helper itself, against sockets bound here: loopback, and all interfaces."""
    with socket.socket() as lo, socket.socket() as anywhere:
        lo.bind(("127.0.0.1", 0))
        lo.listen()
        anywhere.bind(("0.0.0.0", 0))
        anywhere.listen()
        assert listening_addresses(lo.getsockname()[1]) == {"127.0.0.1"}
        assert listening_addresses(anywhere.getsockname()[1]) == {"0.0.0.0"}


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian Chromium not installed (apt-get install -y chromium chromium-driver)")
    pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    if SCREENSHOTS.is_relative_to(ROOT / "tests" / "artifacts"):  # run outputs: never committed
        ignore = ROOT / "tests" / "artifacts" / ".gitignore"
        ignore.parent.mkdir(parents=True, exist_ok=True)
        ignore.write_text("# screenshots of tests/test_browser_e2e.py\n*\n")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_trigger_tiny_pipeline_from_the_ui_and_find_it_in_mlflow(stack: Stack, browser) -> None:
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(30_000)
    # assertions wait as long as actions: on 2 busy cores (CI builds the container images beside the suite)
    # the UI once took more than expect's default 5 s to render the DAG page's translations and grid
    expect.set_options(timeout=30_000)
    page = context.new_page()

    # 1. log into Airflow with the password Airflow generated on first start
    page.goto(stack.airflow + "/")
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(stack.password)
    shot(page, "01_airflow_login")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(stack.airflow + "/")
    assert any(c["name"] == "_token" for c in context.cookies()), "no session after login"

    # 2. the DAG is there, with no import errors; open its trigger form and pick profile `tiny`
    page.goto(stack.airflow + "/dags/pipeline")
    expect(page.get_by_text("train_classifier").first).to_be_visible()
    errors = page.request.get(stack.airflow + "/api/v2/importErrors").json()
    assert errors["total_entries"] == 0, errors
    shot(page, "02_airflow_dag")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text("Run Parameters")).to_be_visible()
    dialog.get_by_role("combobox").first.click()
    page.get_by_role("option", name="tiny", exact=True).click()
    expect(dialog.get_by_text("tiny", exact=True)).to_be_visible()
    shot(page, "03_airflow_trigger_form")
    dialog.get_by_role("button", name="Trigger").click()
    page.wait_for_url("**/dags/pipeline/runs/**")
    run_id = unquote(page.url.rsplit("/runs/", 1)[1].split("?")[0].strip("/"))
    shot(page, "04_airflow_run_started")

    # 3. the run carries the form's values; wait for it (REST with the UI's session cookie)
    api_run = f"{stack.airflow}/api/v2/dags/pipeline/dagRuns/{quote(run_id, safe='')}"
    run = page.request.get(api_run).json()
    assert run["conf"]["profile"] == "tiny", run["conf"]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while run["state"] not in ("success", "failed") and time.monotonic() < deadline:
        time.sleep(5)
        run = page.request.get(api_run).json()
    tasks = page.request.get(api_run + "/taskInstances").json()["task_instances"]
    states = {t["task_id"]: t["state"] for t in tasks}
    page.reload()
    expect(page.get_by_role("link", name="finish", exact=True).first).to_be_visible()
    page.wait_for_timeout(2000)  # let the grid render the final states (the UI keeps polling)
    shot(page, "05_airflow_run_finished")
    assert run["state"] == "success", f"run {run_id} ended {run['state']}: {states}\n{stack.logs()}"
    assert set(states) >= {"start", "download", "augment", "finish"}
    assert all(state in ("success", "skipped") for state in states.values()), states

    # 4. MLflow: the run's parent run (named after the Airflow run) and its stage runs
    mlflow = context.new_page()
    exp = mlflow.request.get(f"{stack.mlflow}/api/2.0/mlflow/experiments/get-by-name",
                             params={"experiment_name": EXPERIMENT}).json()["experiment"]
    found = mlflow.request.post(f"{stack.mlflow}/api/2.0/mlflow/runs/search", data={
        "experiment_ids": [exp["experiment_id"]], "max_results": 50,
        "filter": f"tags.`airflow.run_id` = '{run_id}'"}).json()["runs"]
    parents = [r for r in found if any(t["key"] == "pipeline_parent" for t in r["data"].get("tags", []))]
    assert len(parents) == 1, found
    parent = parents[0]["info"]
    assert parent["status"] == "FINISHED"
    children = {r["info"]["run_name"] for r in found if r["info"]["run_id"] != parent["run_id"]}
    assert {"download", "augment"} <= children, children

    mlflow.goto(f"{stack.mlflow}/#/experiments/{exp['experiment_id']}/runs")
    link = mlflow.get_by_role("link", name=parent["run_name"])
    expect(link).to_be_visible(timeout=60_000)
    shot(mlflow, "06_mlflow_runs")
    link.click()
    mlflow.wait_for_url(f"**/runs/{parent['run_id']}**")
    expect(mlflow.get_by_text(parent["run_name"]).first).to_be_visible(timeout=60_000)
    expect(mlflow.get_by_role("cell", name="tiny", exact=True).first).to_be_visible()  # param profile
    shot(mlflow, "07_mlflow_parent_run")

    # 5. MLflow opens the experiment on its runs (model training), not on GenAI traces; each stage run lists
    # the data it read as dataset inputs, DVC's hash as the digest (issue 22)
    assert {t["key"]: t["value"] for t in exp.get("tags", [])}.get("mlflow.experimentKind") == \
        "custom_model_development"
    # MLflow 3.17's UI picks its view from a global switch (GenAI by default), which a link can set: the links
    # make run and make up print carry workflowType=machine_learning
    mlflow.goto(f"{stack.mlflow}/#/experiments/{exp['experiment_id']}?workflowType=machine_learning")
    expect(mlflow.get_by_role("link", name=parent["run_name"])).to_be_visible(timeout=60_000)
    shot(mlflow, "08_mlflow_experiment_opens_on_runs")
    augment = next(r for r in found if r["info"]["run_name"] == "augment")
    inputs = [d["dataset"] for d in augment.get("inputs", {}).get("dataset_inputs", [])]
    assert [d["name"] for d in inputs] == ["CIFAR-10"] and len(inputs[0]["digest"]) >= 8, inputs
    mlflow.goto(f"{stack.mlflow}/#/experiments/{exp['experiment_id']}/runs/{augment['info']['run_id']}")
    expect(mlflow.get_by_text("CIFAR-10").first).to_be_visible(timeout=60_000)
    shot(mlflow, "09_mlflow_stage_run_dataset")

    # 6. the report: every section there and drawn (a screenshot of each, to be looked at)
    report = stack.workspace / "data" / "report" / "report.html"
    page.goto(report.as_uri())
    for sid in ("summary", "classifier", "compression", "claims", "provenance"):
        section = page.locator(f"section#{sid}")
        expect(section).to_be_visible()
        section.screenshot(path=str(SCREENSHOTS / f"10_report_{sid}.png"))
    classifier = page.locator("section#classifier")
    expect(classifier.get_by_role("rowheader", name="recipe", exact=True)).to_be_visible()
    expect(classifier.get_by_text("airplane")).to_be_visible()  # per-class accuracy
    expect(classifier.locator("h3#coursework-run")).to_be_visible()  # the shipped record of the 300-epoch run
    # Figures 1.1, 1.2 and the confusion matrix, of this run and of the coursework recipe's record
    assert page.locator("section#classifier img").count() == 3 + 3
    context.close()
