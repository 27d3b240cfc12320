"""dvc.yaml's deps and params cover what each stage's code imports and reads, so DVC's skip decision holds.

For every stage: the pipeline modules its module imports, transitively (module-level and inside
functions), must each be a dep (the file, or a folder above it), and every params section it reads
(``params.<section>``) must be in its ``params``. Exempt, because they cannot change a stage's
outputs: the runner and its plumbing (``__main__``, ``stage``, ``config``, ``schema``: params are
checked by value through ``params``), MLflow (``tracking``, ``tracking_models``, ``tracking_runs``;
``params.tracking``), error messages
(``errors``), temporary-file cleanup (``cleanup``) and package ``__init__`` files.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.stage import discover

REPO = Path(__file__).resolve().parents[1]
EXEMPT = {"pipeline/__main__.py", "pipeline/stage.py", "pipeline/config.py", "pipeline/schema.py",
          "pipeline/tracking.py", "pipeline/tracking_models.py", "pipeline/tracking_runs.py", "pipeline/errors.py",
          "pipeline/cleanup.py", "pipeline/events.py"}  # the runner and its console reports: they never change an output
EXEMPT_PARAMS = {"tracking"}


def module_file(name: str) -> Path | None:
    """``pipeline.a.b`` -> pipeline/a/b.py or pipeline/a/b/__init__.py in this checkout (None: not a module)."""
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """Every ``pipeline.*`` module a file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pipeline"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pipeline"):
            found.add(node.module)
            for alias in node.names:  # ``from pipeline import training``: a module, not a name
                sub = f"{node.module}.{alias.name}"
                if module_file(sub) is not None:
                    found.add(sub)
    return found


def closure(module: str) -> set[Path]:
    files, todo, seen = set(), [module], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:
            continue
        files.add(path.resolve())
        if path.relative_to(REPO).as_posix() not in EXEMPT:  # plumbing: what it uses is not the stage's
            todo.extend(imported_modules(path))
    return files


def sections_read(files: set[Path], sections: set[str]) -> set[str]:
    """``params.<section>`` (and ``params.<section>.<field>``) read anywhere in ``files``."""
    read = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "params" \
                    and node.attr in sections:
                read.add(node.attr)
    return read


def covered(rel: str, deps: list[str]) -> bool:
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def param_covered(section: str, declared: list[str]) -> bool:
    return any(p == section or p.startswith(section + ".") for p in declared)


DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
STAGES = discover()  # stage -> module (pipeline/stage.py)


@pytest.mark.parametrize("stage", list(STAGES))
def test_deps_cover_the_modules_a_stage_imports(stage):
    files = closure(STAGES[stage])
    deps = [d for d in DVC[stage].get("deps", [])]
    rels = sorted(p.relative_to(REPO).as_posix() for p in files if REPO in p.parents)
    missing = [r for r in rels if r not in EXEMPT and not r.endswith("__init__.py") and not covered(r, deps)]
    assert not missing, f"dvc.yaml {stage}.deps lacks {missing}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_params_cover_the_sections_a_stage_reads(stage):
    from pipeline.config import SECTIONS

    files = closure(STAGES[stage])
    read = sections_read(files, set(SECTIONS) | {"profile", "seed"}) - EXEMPT_PARAMS
    declared = [p if isinstance(p, str) else next(iter(p)) for p in DVC[stage].get("params", [])]
    missing = sorted(s for s in read if not param_covered(s, declared) and s not in declared)
    assert not missing, f"dvc.yaml {stage}.params lacks {missing}"


def test_the_checker_sees_lazy_and_package_imports():
    """Independent of dvc.yaml: known facts about the import graph the checks rely on."""
    augment = {p.relative_to(REPO).as_posix() for p in closure("pipeline.data.augment")}
    assert "pipeline/data/transforms.py" in augment  # imported inside a function
    assert "pipeline/data/photos.py" in augment
    clf = {p.relative_to(REPO).as_posix() for p in closure("pipeline.classifier.train")}
    assert {"pipeline/training.py", "pipeline/distributed.py", "pipeline/classifier/figures.py"} <= clf
    assert not covered("pipeline/evaluation/codecs.py", ["pipeline/report"])
    assert covered("pipeline/evaluation/codecs.py", ["pipeline/evaluation"])


@pytest.mark.parametrize("stage", list(STAGES))
def test_no_stage_imports_config(stage):
    """Config is a leaf: a stage gets its params as an argument (pipeline/stage.py)."""
    assert REPO / "pipeline/config.py" not in closure(STAGES[stage])


def test_config_imports_only_schemas():
    imported = imported_modules(REPO / "pipeline/config.py")
    assert imported and all(m.endswith(".params") or m in ("pipeline.errors", "pipeline.schema", "pipeline.stage",
                                                           "pipeline.utils")
                            for m in imported), imported


@pytest.mark.parametrize("stage", list(STAGES))
def test_no_stage_depends_on_the_orchestrators(stage):
    """pipeline/orchestration holds the orchestrators' helpers (its __init__): no stage, nor the clean-up every
    stage runs, imports it (both read dvc.yaml through pipeline/dvcfile.py)."""
    files = closure(STAGES[stage]) | closure("pipeline.cleanup")
    assert not [p for p in files if (REPO / "pipeline/orchestration") in p.parents]
    assert "pipeline.dvcfile" in imported_modules(REPO / "pipeline/cleanup.py")
