"""The stage graph of ``dvc.yaml`` for orchestrators (Airflow): the stages (read by :mod:`pipeline.dvcfile`),
what lies downstream of a stage, and the model files the DAG publishes as Assets.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.dvcfile import Stage, load_stages

__all__ = ["Stage", "descendants", "load_stages", "model_outputs"]


def descendants(stages: dict[str, Stage], roots: set[str]) -> set[str]:
    """Every stage downstream of ``roots`` (not the roots themselves)."""
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for stage in stages.values():
            if stage.name not in found and stage.upstream & (roots | found):
                found.add(stage.name)
                changed = True
    return found - roots


def model_outputs(stages: dict[str, Stage]) -> dict[str, list[str]]:
    """Stage -> its model files (outputs ending in .pt): what the DAG publishes as Assets."""
    return {s.name: [o for o in s.outs if Path(o).suffix == ".pt"] for s in stages.values()
            if any(Path(o).suffix == ".pt" for o in s.outs)}
