"""The stage contract (pipeline/stage.py): path options, params once, one MLflow run, torchrun hand-off."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from pipeline import stage as contract
from pipeline.errors import PipelineError
from pipeline.stage import StagePaths

REPO = Path(__file__).resolve().parents[1]


FAKE_DVC = """stages:
  fake_stage:
    cmd: >-
      python -m pipeline fake_stage --data-in data/in.npz
      --out data/out
"""


def _fake_stage(calls: list, name: str = "fake_stage") -> types.ModuleType:
    module = types.ModuleType(f"tests._fake_{name}")
    module.STAGE = name
    module.PATHS = ("data_in", "out")
    module.SECTIONS = ("augment", "train_classifier.augmentation")

    def run(params, paths):
        import mlflow

        active = mlflow.active_run()
        calls.append({"params": params, "paths": dict(paths), "run": active.info.run_id if active else None})
        if active:
            mlflow.log_metric("x", 1.0)

    module.run = run
    return module


@pytest.fixture
def fake(monkeypatch, tmp_path):
    calls: list = []
    module = _fake_stage(calls)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(contract.discover(), "fake_stage", module.__name__)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text(FAKE_DVC)  # where its paths are written
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path))
    for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MLFLOW_RUN_ID", "MLFLOW_PARENT_RUN_ID", "PIPELINE_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    return calls


def _runs(tmp_path: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exps, filter_string="tags.dvc_stage = 'fake_stage'")


def test_paths_roundtrip_through_options():
    paths = StagePaths({"cifar_dir": "a/b", "out": "c"})
    assert paths.cifar_dir == Path("a/b") and paths["out"] == Path("c") and list(paths) == ["cifar_dir", "out"]
    assert paths.argv() == ["--cifar-dir", "a/b", "--out", "c"]
    with pytest.raises(AttributeError, match="declared: cifar_dir, out"):
        paths.nope  # noqa: B018


def test_defaults_options_params_and_one_run(fake, tmp_path):
    from pipeline.__main__ import main

    assert main(["fake_stage"]) == 0
    assert main(["fake_stage", "--data-in", "elsewhere/x.npz"]) == 0
    assert [c["paths"] for c in fake] == [{"data_in": Path("data/in.npz"), "out": Path("data/out")},
                                          {"data_in": Path("elsewhere/x.npz"), "out": Path("data/out")}]
    assert fake[0]["params"].augment.patches == 20000  # the validated params.yaml, not a section
    client, runs = _runs(tmp_path)
    assert len(runs) == 2 and {r.info.run_id for r in runs} == {c["run"] for c in fake}
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.metrics["x"] == 1.0
    logged = set(run.data.params)
    assert "augment.patches" in logged and "train_classifier.augmentation.translate" in logged
    assert not any(k.startswith("train_classifier.fast") for k in logged)  # only the declared part


def test_unknown_path_option_is_a_usage_error(fake):
    from pipeline.__main__ import main

    with pytest.raises(SystemExit) as err:
        main(["fake_stage", "--nope", "x"])
    assert err.value.code == 2 and not fake


def test_a_store_mlflow_refuses_is_one_error_line_and_nothing_runs(fake, tmp_path, monkeypatch, capsys):
    from pipeline.__main__ import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())  # a file store: MLflow 3.7+ refuses it
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    code = main(["fake_stage"])
    err = capsys.readouterr().err
    assert code == 1 and not fake
    assert err.startswith("error: MLflow tracking store file://") and "Traceback" not in err


def test_torchrun_rank0_joins_the_launchers_run_and_leaves_it_open(fake, tmp_path, monkeypatch):
    """A rank logs into the run its launcher opened (MLFLOW_RUN_ID) and never closes or duplicates it."""
    import mlflow

    from pipeline import tracking
    from pipeline.__main__ import run_stage

    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri())
    launcher = client.create_run(tracking.experiment_id("rnn-compression-cifar10"),
                                 tags={"dvc_stage": "fake_stage"}).info.run_id
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher)
    module = sys.modules[contract.discover()["fake_stage"]]
    run_stage("fake_stage", module, contract.defaults(module))
    assert fake[-1]["run"] == launcher and mlflow.active_run() is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher)
    run_stage("fake_stage", module, contract.defaults(module))
    assert fake[-1]["run"] is None  # rank 1: no active run, nothing logged
    _, runs = _runs(tmp_path)
    assert [r.info.run_id for r in runs] == [launcher]
    assert runs[0].info.status == "RUNNING"  # the launcher closes it
    assert runs[0].data.metrics["x"] == 1.0


def test_handoff_env_names_the_active_run(fake, tmp_path):
    from pipeline import tracking

    assert tracking.handoff_env() == {}
    params = __import__("pipeline.config", fromlist=["load_params"]).load_params()
    with tracking.stage_run("fake_stage", params, ("augment",)) as run:
        env = tracking.handoff_env()
    assert env == {"MLFLOW_RUN_ID": run.info.run_id, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def test_stages_are_found_and_are_exactly_dvc_yamls():
    """Each dvc.yaml stage runs ``python -m pipeline <its name>``, and a module declares ``STAGE = <its name>``."""
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    found = contract.check(REPO / "dvc.yaml")
    assert found is contract.discover() and list(stages) == list(contract.dvc_commands(REPO / "dvc.yaml"))
    assert set(found) == set(stages)
    assert found["train_classifier"] == "pipeline.classifier.train" and found["report"] == "pipeline.report.build"


@pytest.mark.parametrize("stage", ["download", "augment", "train_classifier", "train_compressor", "evaluate",
                                   "report"])
def test_bare_help_shows_dvc_yamls_paths(stage, capsys, monkeypatch):
    """A stage's path options and their defaults are its dvc.yaml cmd's, read from there (PATHS: names only)."""
    import importlib
    import shlex

    import yaml

    from pipeline.__main__ import main

    monkeypatch.chdir(REPO)
    module = importlib.import_module(contract.discover()[stage])
    assert isinstance(module.PATHS, tuple) and all(isinstance(n, str) for n in module.PATHS) and callable(module.run)
    argv = shlex.split(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"])
    assert argv[:4] == ["python", "-m", "pipeline", stage]
    given = dict(zip(argv[4::2], argv[5::2]))
    assert {contract.option(k): str(v) for k, v in contract.defaults(module).items()} == given
    with pytest.raises(SystemExit) as done:
        main([stage, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0
    for opt, value in given.items():
        assert f"{opt} PATH default (dvc.yaml): {value}" in out, (opt, out)


def test_a_cmd_that_disagrees_with_paths_is_named(tmp_path):
    dvc = tmp_path / "dvc.yaml"
    dvc.write_text(FAKE_DVC)
    assert dict(contract.default_paths("fake_stage", ("data_in", "out"), dvc)) == {
        "data_in": Path("data/in.npz"), "out": Path("data/out")}
    with pytest.raises(PipelineError, match=r"stage fake_stage: cmd gives --data-in, which is not a path option.*"
                                            r"PATHS: out\)"):
        contract.default_paths("fake_stage", ("out",), dvc)
    with pytest.raises(PipelineError, match=r"stage fake_stage: cmd lacks --preview \(PATHS declares 'preview'"):
        contract.default_paths("fake_stage", ("data_in", "out", "preview"), dvc)
    with pytest.raises(PipelineError, match=r"no stage other with cmd `python -m pipeline other"):
        contract.default_paths("other", ("out",), dvc)
    dvc.write_text(FAKE_DVC.replace("--out data/out", "--out"))
    with pytest.raises(PipelineError, match=r"stage fake_stage: cmd: expected `--<path> PATH` pairs"):
        contract.default_paths("fake_stage", ("data_in", "out"), dvc)


def test_a_module_without_a_dvc_stage_and_a_dvc_stage_without_a_module_are_named(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "sub" / "fake.py").write_text('STAGE = "fake_stage"\nPATHS = ("data_in", "out")\n')
    (package / "other.py").write_text('"""Not stages:\nSTAGE = "in a docstring"\n"""\nSTAGES = ("a", "b")\n\n\n'
                                      'def f():\n    STAGE = "in a function"\n')
    dvc = tmp_path / "dvc.yaml"
    dvc.write_text(FAKE_DVC)
    assert contract.check(dvc, package) == {"fake_stage": "pkg.sub.fake"}
    dvc.write_text(FAKE_DVC + "  lone:\n    cmd: python -m pipeline lone --out x\n  shell:\n    cmd: echo hi\n")
    with pytest.raises(PipelineError, match=r"stage lone: cmd runs `python -m pipeline lone`, but no module under "
                                            r"pipeline/ declares STAGE = 'lone'"):
        contract.check(dvc, package)
    dvc.write_text("stages:\n  shell:\n    cmd: echo hi\n")
    with pytest.raises(PipelineError, match=r"pkg.sub.fake declares STAGE = 'fake_stage', but .* has no stage "
                                            r"fake_stage"):
        contract.check(dvc, package)


NEW_STAGE = '''"""A throwaway stage: its module, with its params section, is one file."""

from pydantic import Field

from pipeline.schema import Section

STAGE = "hello"
PATHS = ("source", "out")
SECTIONS = ("hello",)


class HelloParams(Section):
    greeting: str = "hi"
    times: int = Field(1, ge=1)


PARAMS_SECTIONS = {"hello": HelloParams}


def run(params, paths) -> None:
    import json

    import mlflow

    paths.out.parent.mkdir(parents=True, exist_ok=True)
    paths.out.write_text(json.dumps({"said": params.hello.greeting * params.hello.times,
                                     "paths": {k: str(v) for k, v in paths.items()}}))
    mlflow.log_metric("times", params.hello.times)
'''
NEW_PARAMS = "\nhello:\n  greeting: hey\n  times: 1\n  profiles:\n    tiny:\n      times: 2\n"
NEW_DVC = """  hello:
    cmd: >-
      python -m pipeline hello --source data/prepared/preview.png
      --out data/hello/said.json
    deps:
      - pipeline/hello.py
    params:
      - hello
    outs:
      - data/hello/said.json
"""


def test_a_new_stage_is_three_edits(tmp_path):
    """In a copy of the project: a module (marker, PATHS names, params class), a params.yaml section and a dvc.yaml
    stage make a stage that ``python -m pipeline`` finds and runs with its params and dvc.yaml's paths."""
    import json
    import os
    import subprocess

    import mlflow

    from tests.conftest import make_workspace

    ws = make_workspace(tmp_path / "ws", profile="tiny")
    (ws / "pipeline" / "hello.py").write_text(NEW_STAGE)  # 1. the module, with its params class
    with open(ws / "params.yaml", "a") as f:  # 2. its params.yaml section
        f.write(NEW_PARAMS)
    dvc = (ws / "dvc.yaml").read_text()  # 3. its dvc.yaml stage
    (ws / "dvc.yaml").write_text(dvc.replace("\nstages:\n", "\nstages:\n" + NEW_DVC, 1))

    assert contract.check(ws / "dvc.yaml", ws / "pipeline")["hello"] == "pipeline.hello"
    env = {**os.environ, "PYTHONPATH": str(ws), "MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}",
           "PIPELINE_HOME": str(ws), "OMP_NUM_THREADS": "1"}
    for var in ("MLFLOW_RUN_ID", "MLFLOW_PARENT_RUN_ID", "PIPELINE_RUN_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(var, None)

    def pipeline(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ws, env=env, capture_output=True,
                              text=True, timeout=300)

    done = pipeline("hello")  # a bare call: dvc.yaml's paths
    assert done.returncode == 0, done.stderr
    said = json.loads((ws / "data/hello/said.json").read_text())
    assert said == {"said": "heyhey", "paths": {"source": "data/prepared/preview.png", "out": "data/hello/said.json"}}
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.dvc_stage = 'hello'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["times"] == 2 and runs[0].data.params["hello.greeting"] == "hey"

    helped = pipeline("hello", "--help")
    assert helped.returncode == 0 and "--out PATH" in helped.stdout and "data/hello/said.json" in helped.stdout
    text = (ws / "params.yaml").read_text()  # its section is validated like any other: the bad key is named
    (ws / "params.yaml").write_text(text.replace("  greeting: hey\n", "  greeting: hey\n  loud: true\n"))
    refused = pipeline("hello", "--out", "data/hello/other.json")
    assert refused.returncode == 2 and "hello.loud: unknown key" in refused.stderr, refused.stderr
    assert not (ws / "data/hello/other.json").exists()
