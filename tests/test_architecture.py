"""The import graph of src/resforge: dependencies point one way.

Edges are read with ast from every `import`/`from ... import` of a resforge module, the ones
inside functions (lazy imports) included: a lazy import is still a dependency, it only moves the
failure from import time to call time. importlib calls by string (resforge/__init__'s lazy
names) are not edges.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Back edges of the lower layers that break no import at run time (each is a function-level
# import, or the registry pattern) and cannot be removed without moving code between modules.
# A new cycle fails test_no_import_cycles; an entry that is no longer needed fails too.
ALLOWED_BACK_EDGES = {
    ("resforge.weights", "resforge.artifact"):
        "read_state_dict validates sidecars with artifact, which reads resume state with weights' safe reader",
    ("resforge.data.splits", "resforge.artifact"):
        "load_manifest delegates to artifact.read_manifest, which hashes with data.splits.manifest_hash",
    ("resforge.artifact", "resforge.training.loop"):
        "validate_state checks a resume state's fields against training.loop.FitState",
    ("resforge.backends", "resforge.export"):
        "open_backend exports a missing ONNX/TorchScript artifact on demand; export writes what backends read",
    ("resforge.models.resnet", "resforge.models"):
        "builders register themselves (register_model) in the package that imports them at its end",
    ("resforge.models.cifar_resnet", "resforge.models"):
        "builders register themselves (register_model) in the package that imports them at its end",
    ("resforge.models.fastnet", "resforge.models"):
        "builders register themselves (register_model) in the package that imports them at its end",
}
FACADE = "resforge.api"
MAY_IMPORT_FACADE = {"resforge.cli", "resforge"}


def _modules() -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is a package __init__)} of every module under src/resforge."""
    out = {}
    for path in sorted((SRC / "resforge").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _graph() -> dict[str, dict[str, str]]:
    """{module: {imported resforge module: 'file:line' of the first such import}}."""
    mods = _modules()

    def known(name: str) -> str:                 # resforge.data.loader.make_batches -> resforge.data.loader
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for mod, (path, is_pkg) in mods.items():
        edges: dict[str, str] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:                       # relative: from the module's own package
                    pkg = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                # `from pkg import sub` depends on pkg.sub when that is a module, else on pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                if t == "resforge" or t.startswith("resforge."):
                    t = known(t)
                    if t != mod:
                        edges.setdefault(t, f"{path.relative_to(SRC.parent)}:{node.lineno}")
        graph[mod] = edges
    return graph


def _find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}                   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, {})):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def _describe(cycle: list[str], graph) -> str:
    return "\n".join(f"  {a} -> {b}  ({graph[a][b]})" for a, b in zip(cycle, cycle[1:]))


def _reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), {}):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_graph_reader_sees_lazy_and_relative_imports():
    graph = _graph()
    assert "resforge.data.cifar" in graph["resforge.data"]                 # from .cifar import ...
    assert "resforge.finetune.run" in graph["resforge.finetune"]
    assert "resforge.artifact" in graph["resforge.weights"]               # inside read_state_dict
    assert FACADE in graph["resforge.cli"]                                # from resforge import api, in a function


def test_nothing_in_the_package_imports_the_facade():
    graph = _graph()
    importers = {m: e[FACADE] for m, e in graph.items() if FACADE in e and m not in MAY_IMPORT_FACADE}
    assert not importers, ("resforge.api is the façade for users and the CLI; import the module that "
                           f"defines the function instead: {importers}")


def test_no_import_cycles():
    graph = _graph()
    stale = [e for e in ALLOWED_BACK_EDGES if e[1] not in graph.get(e[0], {})]
    assert not stale, f"these allowed back edges no longer exist; remove them from ALLOWED_BACK_EDGES: {stale}"
    pruned = {m: {t: w for t, w in e.items() if (m, t) not in ALLOWED_BACK_EDGES} for m, e in graph.items()}
    cycle = _find_cycle(pruned)
    assert cycle is None, "import cycle (lazy imports count):\n" + _describe(cycle, pruned)


def test_commands_do_not_reach_back_to_api_or_cli():
    graph = _graph()
    layers = [m for m in graph if m in ("resforge.pipeline", "resforge.train_run", "resforge.evaluation",
                                        "resforge.weightfile")
              or m.startswith(("resforge.finetune", "resforge.experiments"))]
    assert len(layers) >= 10
    for m in layers:
        back = _reachable(graph, m) & {FACADE, "resforge.cli"}
        assert not back, f"{m} reaches {sorted(back)} through its imports: it must not depend on the façade"
