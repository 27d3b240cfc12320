"""Removing what a killed stage left behind.

Every output is written under a temporary name beside it (``pipeline.utils.atomic_path``:
``.<name>.<random>.tmp``, a file or a folder) and renamed into place when complete. A stage killed
mid-write (kill -9, power loss) leaves that temporary behind; the next run of the same stage removes
the ones of its own outputs before it starts (DVC's workspace lock means no other run of the stage is
writing them at that moment).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.utils import log


def stale_temps(target: str | os.PathLike) -> list[Path]:
    """The temporaries of ``target`` beside it (``.<name>.*.tmp``, nested ones included)."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    marker = f".{target.name}."
    return sorted(p for p in target.parent.iterdir()
                  if p.name.startswith(".") and marker in p.name and p.name.endswith(".tmp"))


def remove_stale_temps(*targets: str | os.PathLike, stage: str = "") -> int:
    """Delete the temporaries a killed run left beside ``targets``; returns how many were removed."""
    removed = 0
    for target in targets:
        for path in stale_temps(target):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
            log(f"[{stage or 'cleanup'}] removed {path} (left by an interrupted run)")
    return removed


def stage_targets(stage: str, dvc_yaml: str | os.PathLike = "dvc.yaml") -> list[Path]:
    """What ``stage`` writes: its dvc.yaml outs (and metrics, plots), the folders holding them below
    ``data/`` (written whole by some stages), and its checkpoints in ``data/checkpoints/<stage>/``."""
    from pipeline.dvcfile import load_stages

    if not Path(dvc_yaml).is_file():
        return []
    stages = load_stages(dvc_yaml)
    if stage not in stages:
        return []
    targets: list[Path] = []
    for out in stages[stage].outs:
        path = Path(out)
        targets.append(path)
        targets.extend(parent for parent in path.parents if len(parent.parts) > 1)  # not "data" or "."
    scratch = Path("data/checkpoints") / stage
    if scratch.is_dir():
        targets.extend(scratch / _final_name(p.name) for p in scratch.iterdir()
                       if p.name.startswith(".") and p.name.endswith(".tmp"))
    return list(dict.fromkeys(targets))


def _final_name(temp_name: str) -> str:
    """``.last.pt.ab12cd.tmp`` -> ``last.pt`` (atomic_path's naming)."""
    return temp_name[1:].rsplit(".", 2)[0]


def clean_stage(stage: str, dvc_yaml: str | os.PathLike = "dvc.yaml") -> int:
    """Before ``stage`` runs: remove what an interrupted run of it left (see the module docstring)."""
    return remove_stale_temps(*stage_targets(stage, dvc_yaml), stage=stage)
