"""The stage contract: what ``python -m pipeline <stage>`` expects of a stage module, and what it gives it.

A stage module (``STAGES`` below names them) declares, at module level::

    PATHS: dict[str, str]          # option name -> default path: the stage's inputs and outputs
    SECTIONS: tuple[str, ...]      # the params sections it reads (logged to its MLflow run)
    def run(params: Params, paths: StagePaths) -> None

and, optionally, ``DATASETS: dict[str, str]`` (a ``PATHS`` name -> the dataset's name, e.g.
``{"data": "CIFAR-10"}``): the data inputs logged to its MLflow run as dataset inputs, with DVC's hash
as digest (``tracking.log_datasets``). Nothing else about its plumbing. ``python -m pipeline <stage> [--<name> PATH ...]``
(``pipeline/__main__.py``), in this order:

1. parses one ``--<name> PATH`` option per ``PATHS`` entry (``-`` in the option for ``_`` in the
   name); an option left out takes its default, so ``python -m pipeline <stage>`` alone keeps
   working. dvc.yaml's ``cmd`` writes every path out: a stage's inputs and outputs are written there,
   the defaults only repeat them for a bare call;
2. loads and validates ``params.yaml`` once (``pipeline.config.load_params``) and gives the stage the
   whole ``Params`` (the stage reads only its ``SECTIONS``; tests/test_dvc_deps.py checks them against
   dvc.yaml's ``params``);
3. outside torchrun: removes the temporaries a killed run of the stage left (``pipeline.cleanup``)
   and opens the stage's MLflow run (``tracking.stage_run(stage, params, SECTIONS)``); the stage
   logs with MLflow's fluent API (``mlflow.log_metrics`` ...) into that active run, and never opens
   one itself;
4. calls ``run(params, paths)``; a PipelineError ends in one line and exit 1 (``errors.run_cli``).

Stages never import ``pipeline.config``: it is a leaf that imports the per-package params schemas;
a stage gets ``Params`` as an argument.

DDP (``pipeline.distributed``): a training stage with ``nproc > 1`` calls
``distributed.relaunch(stage, nproc, paths.argv())`` inside ``run``; torchrun starts
``python -m pipeline <stage> <the same path options>`` once per rank. The launching process owns the
MLflow run (opened in step 3, its pid in the run's tags, closed FINISHED/FAILED/KILLED by it); it
hands the run to the ranks in the environment (``MLFLOW_RUN_ID``, ``MLFLOW_TRACKING_URI``). In a rank,
step 3 changes: no cleanup; rank 0 joins the launcher's run (``tracking.joined_run``: active, left
RUNNING on exit for the launcher to close); the other ranks drop ``MLFLOW_RUN_ID`` and have no
active run (they must not log). So one stage run is one MLflow run, whatever ``nproc``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping

#: stage name -> module; dvc.yaml runs each as ``python -m pipeline <stage> [--<path> PATH ...]``
STAGES: dict[str, str] = {
    "download": "pipeline.data.download",
    "augment": "pipeline.data.augment",
    "train_classifier": "pipeline.classifier.train",
    "train_compressor": "pipeline.compression.train",
    "evaluate": "pipeline.evaluation.evaluate",
    "report": "pipeline.report.build",
}


class StagePaths(Mapping[str, Path]):
    """A stage's paths by name: ``paths.out`` or ``paths["out"]``, each a ``pathlib.Path``."""

    def __init__(self, values: Mapping[str, str | os.PathLike]):
        self._values = {name: Path(value) for name, value in values.items()}

    def __getattr__(self, name: str) -> Path:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(f"no path {name!r} (declared: {', '.join(self.__dict__['_values'])})") from None

    def __getitem__(self, name: str) -> Path:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"StagePaths({', '.join(f'{k}={str(v)!r}' for k, v in self._values.items())})"

    def argv(self) -> list[str]:
        """The command-line options that give these paths (what a torchrun rank is started with)."""
        return [arg for name, value in self._values.items() for arg in (option(name), str(value))]


def option(name: str) -> str:
    """``patches`` -> ``--patches``; ``cifar_dir`` -> ``--cifar-dir``."""
    return "--" + name.replace("_", "-")


def defaults(module) -> StagePaths:
    """A stage module's default paths (its ``PATHS``), e.g. for calling ``run`` from a test."""
    return StagePaths(getattr(module, "PATHS", {}))
