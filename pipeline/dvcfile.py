"""``dvc.yaml``'s stages -- command, deps, outputs, and the stages each depends on -- read without importing
DVC (cheap enough for DAG parsing). Neutral ground: the orchestrators (``pipeline.orchestration.dvcgraph``)
and the stages' own clean-up (``pipeline.cleanup``) both read it here.

Stage B depends on stage A when one of B's ``deps`` is, contains or lies inside one of A's outputs
(``outs``, ``metrics`` or ``plots``) — the rule DVC itself uses to build its graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import yaml


@dataclass
class Stage:
    name: str
    cmd: str
    deps: list[str] = field(default_factory=list)
    outs: list[str] = field(default_factory=list)
    upstream: set[str] = field(default_factory=set)
    meta: dict = field(default_factory=dict)  # dvc.yaml `meta:` (DVC ignores it): e.g. {queue: gpu}


def _paths(entries) -> list[str]:
    """Paths of a deps/outs/metrics/plots list (plain strings or one-key mappings)."""
    out = []
    for entry in entries or []:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            out.extend(entry.keys())
    return [os.path.normpath(p) for p in out]


def _overlaps(dep: str, out: str) -> bool:
    return dep == out or dep.startswith(out + os.sep) or out.startswith(dep + os.sep)


def load_stages(dvc_yaml: str | os.PathLike) -> dict[str, Stage]:
    """Stages of ``dvc_yaml`` in file order, each with the names of the stages it depends on."""
    with open(dvc_yaml) as f:
        doc = yaml.safe_load(f) or {}
    stages: dict[str, Stage] = {}
    for name, spec in (doc.get("stages") or {}).items():
        if "foreach" in spec or "matrix" in spec:
            raise ValueError(f"{dvc_yaml}: stage {name}: foreach/matrix stages are not supported here")
        outs = _paths(spec.get("outs")) + _paths(spec.get("metrics")) + _paths(spec.get("plots"))
        cmd = spec["cmd"] if isinstance(spec["cmd"], str) else " && ".join(spec["cmd"])
        stages[name] = Stage(name, cmd, _paths(spec.get("deps")), outs, meta=spec.get("meta") or {})
    for stage in stages.values():
        for other in stages.values():
            if other is not stage and any(_overlaps(d, o) for d in stage.deps for o in other.outs):
                stage.upstream.add(other.name)
    _check_acyclic(stages)
    return stages


def _check_acyclic(stages: dict[str, Stage]) -> None:
    state: dict[str, int] = {}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise ValueError(f"dvc.yaml: cycle {' -> '.join(trail + (name,))}")
        state[name] = 1
        for up in stages[name].upstream:
            visit(up, trail + (name,))
        state[name] = 2

    for name in stages:
        visit(name, ())
