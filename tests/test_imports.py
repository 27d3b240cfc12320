"""The package's import structure: configuration is a leaf, and no module under pipeline/ imports itself
back through others (imports inside functions count too)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
#: the configuration modules: loading params.yaml needs these and nothing heavier
CONFIG_MODULES = ["pipeline.config", "pipeline.schema", "pipeline.evaluation.specs",
                  *sorted(f"pipeline.{p.parent.name}.params" for p in PACKAGE.glob("*/params.py"))]
HEAVY = ("torch", "PIL", "imagecodecs", "mlflow")
STAGE_PACKAGES = ("pipeline.classifier", "pipeline.compression", "pipeline.data", "pipeline.evaluation",
                  "pipeline.report")
#: the modules of the stage packages that configuration and tracking may read
LEAF_OK = {"pipeline.evaluation.specs", *CONFIG_MODULES}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The pipeline modules ``path`` imports anywhere in its text (top level or inside functions):
    ``from pipeline.x import y`` counts as pipeline.x.y when that is a module, else as pipeline.x."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # import pipeline.a.b.c -> the deepest known module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def a_cycle(edges: dict[str, set[str]], members: list[str]) -> list[str]:
    """One concrete cycle through the component ``members`` (for the failure message)."""
    inside = set(members)
    start = members[0]
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(edges[v] & inside):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                todo.append(w)
    return members


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pipeline"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "sub" / "b.py").write_text("from pipeline.sub.c import thing\n")
    (pkg / "sub" / "c.py").write_text("import pipeline.sub.a\nthing = 1\n")
    known = {"pipeline", "pipeline.sub", "pipeline.sub.a", "pipeline.sub.b", "pipeline.sub.c"}
    assert imports("pipeline.sub.a", pkg / "sub" / "a.py", known) == {"pipeline.sub.b"}
    assert imports("pipeline.sub.b", pkg / "sub" / "b.py", known) == {"pipeline.sub.c"}
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert a_cycle(edges, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    edges = graph()
    found = cycles(edges)
    assert not found, "import cycles: " + "; ".join(" -> ".join(a_cycle(edges, c)) for c in found)


def test_configuration_and_tracking_import_no_stage_module():
    edges = graph()
    for root in ("pipeline.config", "pipeline.schema", "pipeline.tracking"):
        reach, todo = set(), [root]
        while todo:  # everything it imports, directly or not
            for w in edges[todo.pop()] - reach:
                reach.add(w)
                todo.append(w)
        upward = sorted(m for m in reach if m.startswith(STAGE_PACKAGES) and m not in LEAF_OK
                        and m not in STAGE_PACKAGES)
        assert not upward, f"{root} reaches stage modules: {upward}"


def test_loading_params_imports_no_heavy_library():
    code = ("import importlib, json, sys\n"
            f"for m in {CONFIG_MODULES!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(m for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert "pipeline.config" in loaded and not heavy, f"configuration imports {heavy[:10]}"
