"""The stage contract: what ``python -m pipeline <stage>`` expects of a stage module, and what it gives it.

Adding a stage is three edits: its module, its ``params.yaml`` section, its ``dvc.yaml`` stage. Nothing
lists the stages: they are found (``discover``). A stage module (any ``pipeline/**/*.py``) declares, at
module level::

    STAGE = "<name>"               # the marker: the dvc.yaml stage it is (a string literal)
    PATHS = ("<name>", ...)        # the names of its path options: its inputs and outputs
    SECTIONS = ("<section>", ...)  # the params sections it reads (logged to its MLflow run)
    def run(params: Params, paths: StagePaths) -> None

and, optionally, ``DATASETS: dict[str, str]`` (a ``PATHS`` name -> the dataset's name, e.g.
``{"data": "CIFAR-10"}``): the data inputs logged to its MLflow run as dataset inputs, with DVC's hash
as digest (``tracking.log_datasets``). Nothing else about its plumbing.

The paths themselves are written once, in dvc.yaml: the stage's ``cmd`` is
``python -m pipeline <name> --<path> PATH ...``, one option per ``PATHS`` name (``-`` in the option for
``_`` in the name), and those values are also the defaults of a bare ``python -m pipeline <name>``
(``default_paths``). A cmd that gives an option ``PATHS`` lacks, or lacks one it declares, is a clear
error naming the stage and the option; so is a marked module with no dvc.yaml stage, or a dvc.yaml
``python -m pipeline <name>`` with no module (``check``, run by tests/test_stage.py). dvc.yaml is read
from the working directory (where DVC runs the cmd, beside params.yaml), else from the project root
above the ``pipeline`` package.

Its params section: a ``pipeline.schema.Section`` subclass registered in a module-level
``PARAMS_SECTIONS = {"<section>": TheParams}`` of a module that is light to import (no torch, PIL,
mlflow... at module level): ``pipeline.config`` finds every such dict (``marked``), imports its module and
assembles ``Params`` from them. Today each package keeps them in its ``params.py``; a stage module whose
heavy imports are inside its functions may hold its own (one file for the module and its params).

``python -m pipeline <stage> [--<name> PATH ...]`` (``pipeline/__main__.py``), in this order:

1. parses one ``--<name> PATH`` option per ``PATHS`` name, its default dvc.yaml's value, so
   ``python -m pipeline <stage>`` alone runs it as DVC does (``--help`` lists them with those values);
2. loads and validates ``params.yaml`` once (``pipeline.config.load_params``) and gives the stage the
   whole ``Params`` (the stage reads only its ``SECTIONS``; tests/test_dvc_deps.py checks them against
   dvc.yaml's ``params``);
3. outside torchrun: removes the temporaries a killed run of the stage left (``pipeline.cleanup``)
   and opens the stage's MLflow run (``tracking.stage_run(stage, params, SECTIONS)``); the stage
   logs with MLflow's fluent API (``mlflow.log_metrics`` ...) into that active run, and never opens
   one itself;
4. calls ``run(params, paths)``; a PipelineError ends in one line and exit 1 (``errors.run_cli``).

Stages never import ``pipeline.config``: it imports the params sections; a stage gets ``Params`` as an
argument.

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

import ast
import functools
import os
import re
import shlex
from pathlib import Path
from typing import Iterator, Mapping

from pipeline.errors import PipelineError

#: the ``pipeline`` package: where stage modules and params sections are looked for
PACKAGE = Path(__file__).resolve().parent
DVC_FILE = "dvc.yaml"
#: how dvc.yaml runs a stage: ``python -m pipeline <stage> [--<path> PATH ...]``
COMMAND = ("python", "-m", "pipeline")


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


# ----------------------------------------------------------------------------- found, not listed

def marked(marker: str, package: str | os.PathLike = PACKAGE) -> dict[str, str | None]:
    """Module name -> the string assigned to ``marker`` at module level (None: not a string literal), for
    every ``*.py`` of ``package`` that assigns it at module level. Read from the source (nothing is
    imported, so finding a torch-heavy stage costs a file read); cached for the process."""
    return dict(_marked(marker, str(Path(package).resolve())))


@functools.cache
def _marked(marker: str, package: str) -> tuple[tuple[str, str | None], ...]:
    pattern = re.compile(rf"^{re.escape(marker)}\s*(?::[^=\n]*)?=", re.M)  # at column 0: module level
    root = Path(package)
    found = []
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        match = pattern.search(text)
        if not match:
            continue
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        # the line may be inside a string: the syntax tree decides. The source up to the end of that line's
        # statement parses when the line is code (cheap: markers sit near the top), else the whole file
        end = text.find("\n", match.end())
        try:
            body = ast.parse(text[:end if end >= 0 else len(text)], str(path)).body
        except SyntaxError:  # cut inside a string, or a statement going on past that line
            body = ast.parse(text, str(path)).body
        for node in body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == marker for t in targets):
                value = node.value
                found.append((module, value.value if isinstance(value, ast.Constant) and isinstance(value.value, str)
                              else None))
                break
    return tuple(found)


@functools.cache
def _discover(package: str) -> dict[str, str]:
    stages: dict[str, str] = {}
    for module, name in marked("STAGE", package).items():
        if name is None:
            raise PipelineError(f"{module}: STAGE must be a string literal, the name of its dvc.yaml stage")
        if name in stages:
            raise PipelineError(f"stage {name}: STAGE = {name!r} in both {stages[name]} and {module}")
        stages[name] = module
    return stages


def discover(package: str | os.PathLike = PACKAGE) -> dict[str, str]:
    """Stage name -> module: every module of the package that declares ``STAGE = "<name>"`` (pipeline/stage.py).
    The mapping is cached for the process (the same dict each call)."""
    return _discover(str(Path(package).resolve()))


def dvc_file() -> Path:
    """dvc.yaml: in the working directory (where DVC runs a stage's cmd), else at the project root."""
    for path in (Path(DVC_FILE), PACKAGE.parent / DVC_FILE):
        if path.is_file():
            return path
    raise PipelineError(f"{DVC_FILE}: not found (run stages from the project root, where dvc.yaml lives)")


def dvc_commands(path: str | os.PathLike | None = None) -> dict[str, tuple[str, dict[str, str]]]:
    """dvc.yaml stage -> (the stage its cmd runs, its ``--option`` -> value), in file order, for every stage
    whose cmd is ``python -m pipeline <stage> [--<path> PATH ...]``; other cmds are left out."""
    import yaml

    path = Path(path) if path is not None else dvc_file()
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise PipelineError(f"{path}: not readable as YAML ({type(err).__name__}: {first})") from None
    out = {}
    for stage, spec in ((doc.get("stages") or {}) if isinstance(doc, dict) else {}).items():
        cmds = spec.get("cmd") if isinstance(spec, dict) else None
        for cmd in [cmds] if isinstance(cmds, str) else cmds or []:
            parsed = _parse_cmd(path, stage, str(cmd))
            if parsed is not None:
                out[stage] = parsed
                break
    return out


def _parse_cmd(path: Path, stage: str, cmd: str) -> tuple[str, dict[str, str]] | None:
    try:
        argv = shlex.split(cmd)
    except ValueError as err:
        raise PipelineError(f"{path}: stage {stage}: cmd: {err}") from None
    if tuple(argv[:3]) != COMMAND:
        return None
    if len(argv) < 4 or argv[3].startswith("-"):
        raise PipelineError(f"{path}: stage {stage}: cmd `{cmd}` names no stage after `python -m pipeline`")
    name, rest, given = argv[3], argv[4:], {}
    for i in range(0, len(rest), 2):
        opt, value = rest[i], rest[i + 1] if i + 1 < len(rest) else None
        if not opt.startswith("--") or "=" in opt or value is None or value.startswith("--"):
            raise PipelineError(f"{path}: stage {stage}: cmd: expected `--<path> PATH` pairs after `python -m "
                                f"pipeline {name}`, got {' '.join(rest[i:i + 2])!r}")
        if opt in given:
            raise PipelineError(f"{path}: stage {stage}: cmd gives {opt} twice")
        given[opt] = value
    return name, given


def default_paths(stage: str, declared: tuple[str, ...] | list[str],
                  path: str | os.PathLike | None = None) -> StagePaths:
    """The paths dvc.yaml's cmd gives ``stage`` (the defaults of a bare ``python -m pipeline <stage>``), one per
    ``declared`` name (the module's ``PATHS``), in that order. PipelineError, naming the stage and the
    option, when dvc.yaml has no such stage or its cmd gives an option not declared or lacks one."""
    path = Path(path) if path is not None else dvc_file()
    commands = dvc_commands(path)
    if stage not in commands:
        raise PipelineError(f"{path}: no stage {stage} with cmd `python -m pipeline {stage} ...` (a module declares "
                            f"STAGE = {stage!r}: its paths are written in its dvc.yaml cmd)")
    runs, given = commands[stage]
    _check_runs_own_name(path, stage, runs)
    if isinstance(declared, str) or not all(isinstance(n, str) for n in declared):
        raise PipelineError(f"stage {stage}: PATHS must be a tuple of path names, e.g. (\"data\", \"out\")")
    wanted = {option(name): name for name in declared}
    for opt in given:
        if opt not in wanted:
            raise PipelineError(f"{path}: stage {stage}: cmd gives {opt}, which is not a path option of the stage "
                                f"(its PATHS: {', '.join(declared) or 'none'})")
    for opt, name in wanted.items():
        if opt not in given:
            raise PipelineError(f"{path}: stage {stage}: cmd lacks {opt} (PATHS declares {name!r}; the cmd writes "
                                "every path of the stage)")
    return StagePaths({name: given[opt] for opt, name in wanted.items()})


def _check_runs_own_name(path: str | os.PathLike, stage: str, runs: str) -> None:
    """A dvc.yaml stage's cmd runs ``python -m pipeline <the stage's own name>``."""
    if runs != stage:
        raise PipelineError(f"{path}: stage {stage}: cmd runs `python -m pipeline {runs}`; a dvc.yaml stage runs the "
                            "pipeline stage of its own name")


def defaults(module, path: str | os.PathLike | None = None) -> StagePaths:
    """A stage module's default paths (dvc.yaml's cmd for its ``STAGE``), e.g. for calling ``run`` from a test."""
    return default_paths(module.STAGE, tuple(getattr(module, "PATHS", ())), path)


def check(path: str | os.PathLike | None = None, package: str | os.PathLike = PACKAGE) -> dict[str, str]:
    """``discover()``, checked against dvc.yaml: each ``python -m pipeline <stage>`` cmd runs a found stage of
    the dvc.yaml stage's own name, and each found stage has such a cmd. PipelineError naming the first that
    does not."""
    path = Path(path) if path is not None else dvc_file()
    found, commands = discover(package), dvc_commands(path)
    for stage, (runs, _) in commands.items():
        _check_runs_own_name(path, stage, runs)
        if runs not in found:
            raise PipelineError(f"{path}: stage {stage}: cmd runs `python -m pipeline {stage}`, but no module under "
                                f"pipeline/ declares STAGE = {stage!r}")
    for stage, module in found.items():
        if stage not in commands:
            raise PipelineError(f"{module} declares STAGE = {stage!r}, but {path} has no stage {stage} with cmd "
                                f"`python -m pipeline {stage} ...`")
    return found


def fill(stage: str, declared: tuple[str, ...] | list[str], **given: str | os.PathLike | None) -> StagePaths:
    """``given`` paths by name, any left ``None`` taken from dvc.yaml's cmd (``default_paths``; read only then):
    for a stage's helper called outside ``run``, e.g. from a test, with some folders of its own."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise TypeError(f"stage {stage}: no path {unknown[0]!r} (PATHS: {', '.join(declared)})")
    if any(given.get(name) is None for name in declared):
        base = dict(default_paths(stage, declared))
    else:
        base = {}
    return StagePaths({name: given[name] if given.get(name) is not None else base[name] for name in declared})
