"""How this project logs a model to MLflow and reads it back: its own checkpoint file, never a pickle.

``log_model_checkpoint`` logs a checkpoint as the active run's model (registered when named),
``log_model_file`` in a run of its own (``python -m pipeline log-model``); ``logged_checkpoint`` gives
back the file logged at ``models:/…`` or ``runs:/…``, checked (kind, sha256) before anyone reads it.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Iterator

from pipeline.tracking import experiment_id, mlflow_module, run_tags

#: How this project logs a model to MLflow: its own checkpoint file (config + state dict, read back with
#: ``torch.load(weights_only=True)`` and the format's own checks), never a pickled module. The run, its
#: logged model and the registered version carry the tag MODEL_FORMAT_TAG = CHECKPOINT_FORMAT.
MODEL_FORMAT_TAG = "pipeline.model_format"
CHECKPOINT_FORMAT = "pipeline-checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"  # beside MLmodel, whose flavour CHECKPOINT_FLAVOR gives its kind and sha256
CHECKPOINT_FLAVOR = "pipeline_checkpoint"
#: the only model URIs loaded: this tracking server's registry or runs (no host, no other scheme)
_MLFLOW_MODEL_URI = re.compile(r"^(models|runs):/[^/]")


def is_model_uri(spec: str) -> bool:
    """``models:/…``, ``runs:/…`` or any other ``scheme:/…`` (refused by ``logged_checkpoint``): not a path."""
    return "://" in spec or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", spec) is not None


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def log_model_checkpoint(checkpoint: str | os.PathLike, kind: str, registered_name: str | None = None,
                         signature: Any = None) -> str:
    """Log a checkpoint file of this project (``kind``: its format, e.g. rnn-compressor) to the active run
    as its MLflow model ``model``: ``checkpoint.pt`` and an ``MLmodel`` (flavour ``pipeline_checkpoint``:
    the file, its kind and sha256; ``signature``), registered as ``registered_name`` when given.
    Loading it needs no pickle (``logged_checkpoint``). Returns the logged model's id."""
    import shutil
    import tempfile

    from mlflow.models import Model

    mlflow = mlflow_module()
    tags = {MODEL_FORMAT_TAG: CHECKPOINT_FORMAT, "pipeline.model_kind": kind}
    logged = mlflow.initialize_logged_model(name="model", tags=tags, model_type=kind)
    try:
        with tempfile.TemporaryDirectory(prefix="pipeline-model-") as tmp:
            shutil.copyfile(checkpoint, Path(tmp) / CHECKPOINT_FILE)
            mlmodel = Model(artifact_path="model", run_id=logged.source_run_id, model_id=logged.model_id,
                            signature=signature)
            mlmodel.add_flavor(CHECKPOINT_FLAVOR, file=CHECKPOINT_FILE, format=CHECKPOINT_FORMAT, kind=kind,
                               sha256=_sha256(Path(tmp) / CHECKPOINT_FILE), loader="torch.load(weights_only=True)")
            mlmodel.save(str(Path(tmp) / "MLmodel"))
            mlflow.MlflowClient().log_model_artifacts(logged.model_id, tmp)
    except BaseException:
        mlflow.finalize_logged_model(logged.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(logged.model_id, "READY")
    mlflow.set_tags(tags)
    if registered_name:
        mlflow.register_model(f"models:/{logged.model_id}", registered_name, tags=tags)
    return logged.model_id


def log_model_file(checkpoint: str | os.PathLike, kind: str, experiment: str,
                   registered_name: str | None = None) -> str:
    """``python -m pipeline log-model``: log a checkpoint file in a run of its own; returns the run's id."""
    mlflow = mlflow_module()
    with mlflow.start_run(experiment_id=experiment_id(experiment), run_name="log-model", tags=run_tags()) as run:
        mlflow.log_param("file", str(checkpoint))
        log_model_checkpoint(checkpoint, kind, registered_name)
        return run.info.run_id


def _relog_hint(uri: str, kind: str) -> str:
    out = {"rnn-compressor": "data/compressor/model.pt", "cifar10-classifier": "data/classifier/model.pt"}
    name = re.split(r"[/@]", uri[len("models:/"):])[0] if uri.startswith("models:/") else "NAME"
    return (f"re-log it as weights: `python -m pipeline log-model {out.get(kind, 'MODEL.pt')} --register {name}` "
            "with the model.pt of the run that trained it, or run that stage again")


@contextlib.contextmanager
def logged_checkpoint(uri: str, kind: str, what: str, error: type[Exception] | None = None) -> Iterator[Path]:
    """The checkpoint file that ``log_model_checkpoint`` logged at ``models:/…`` or ``runs:/…``, downloaded
    to a temporary folder (removed afterwards); the caller reads it with ``torch.load(weights_only=True)``.

    Nothing is unpickled here. Errors are one line, raised as ``error`` (default PipelineError), before any
    request where they can be: another URI scheme; a URI that does not resolve; a model logged by an
    earlier version as a pickled module (never loaded: it says how to re-log it); a model of another kind
    than ``kind``; a file whose sha256 is not the one logged with it.
    """
    import tempfile

    import yaml

    from pipeline.errors import PipelineError

    error = error or PipelineError
    if not _MLFLOW_MODEL_URI.match(uri):
        raise error(f"model {uri}: not a model file, models:/NAME/VERSION or runs:/RUN_ID/model (no other "
                    "URI is loaded)")
    mlflow = mlflow_module()
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    bar = os.environ.get(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name)
    os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = "false"  # one line on error, none on success
    try:
        with tempfile.TemporaryDirectory(prefix="pipeline-model-") as tmp:
            try:
                repo = get_artifact_repository(uri, tracking_uri=mlflow.get_tracking_uri())
                files = {a.path.rsplit("/", 1)[-1] for a in repo.list_artifacts("") if not a.is_dir}
                mlmodel = yaml.safe_load(Path(repo.download_artifacts("MLmodel", tmp)).read_text()) \
                    if "MLmodel" in files else None
            except Exception as err:  # noqa: BLE001 - MLflow raises many types for a bad URI; all are the user's
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise error(f"model {uri}: cannot load from MLflow: {first}") from None
            flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
            flavors = flavors if isinstance(flavors, dict) else {}
            flavor = flavors.get(CHECKPOINT_FLAVOR)
            if not isinstance(flavor, dict) or CHECKPOINT_FILE not in files:
                if "pytorch" in flavors or "python_function" in flavors:
                    raise error(f"model {uri}: logged by an earlier version as a pickled module ({', '.join(flavors)}),"
                                f" which is never loaded (unpickling can run any code); {_relog_hint(uri, kind)}")
                raise error(f"model {uri}: holds no {CHECKPOINT_FILE} logged by this pipeline (not {what})")
            if flavor.get("kind") != kind:
                raise error(f"model {uri}: is a {flavor.get('kind')!r} model, not {what}")
            try:
                path = Path(repo.download_artifacts(CHECKPOINT_FILE, tmp))
            except Exception as err:  # noqa: BLE001 - as above
                raise error(f"model {uri}: cannot download {CHECKPOINT_FILE} ({type(err).__name__})") from None
            if _sha256(path) != flavor.get("sha256"):
                raise error(f"model {uri}: {CHECKPOINT_FILE} does not match the sha256 logged with it "
                            "(corrupt or replaced)")
            yield path
    finally:
        if bar is None:
            os.environ.pop(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, None)
        else:
            os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = bar
