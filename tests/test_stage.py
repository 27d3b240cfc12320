"""The stage contract (pipeline/stage.py): path options, params once, one MLflow run, torchrun hand-off."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from pipeline import stage as contract
from pipeline.stage import StagePaths

REPO = Path(__file__).resolve().parents[1]


def _fake_stage(calls: list, name: str = "fake_stage") -> types.ModuleType:
    module = types.ModuleType(f"tests._fake_{name}")
    module.PATHS = {"data_in": "data/in.npz", "out": "data/out"}
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
    monkeypatch.setitem(contract.STAGES, "fake_stage", module.__name__)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
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
    module = sys.modules[contract.STAGES["fake_stage"]]
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


def test_every_stage_declares_paths_matching_its_dvc_cmd():
    """Each stage's dvc.yaml cmd gives every declared path, at its default (a bare call = DVC's)."""
    import importlib
    import shlex

    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(contract.STAGES)
    for name, module_name in contract.STAGES.items():
        module = importlib.import_module(module_name)
        assert isinstance(module.PATHS, dict) and callable(module.run), name  # the contract: PATHS and run
        argv = shlex.split(stages[name]["cmd"])
        assert argv[:4] == ["python", "-m", "pipeline", name], name
        given = dict(zip(argv[4::2], argv[5::2]))
        assert given == {contract.option(k): v for k, v in module.PATHS.items()}, name
