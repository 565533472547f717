"""The import graph of the project: cache <- trainer <- eval <- pipeline, and no cycles.

Every import counts: module-level and function-local, `import x` and `from x import y`, relative
imports, and `importlib.import_module` of a module named by a string literal in the same file.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("cache", "trainer", "eval", "pipeline")  # each imports only the packages to its left
CACHE_FORBIDDEN = ("ray", "transformers", "torch", "deepspeed", "accelerate")  # cache knows no Ray and no models


def module_name(path: Path) -> str:
    """Dotted module name of a source file (a package's __init__.py names the package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(path): path for layer in LAYERS for path in sorted((ROOT / layer).rglob("*.py"))}


def _is_import_module_call(node: ast.AST) -> bool:
    """A call of importlib.import_module(...), import_module(...) or __import__(...)."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in ("import_module", "__import__")


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in a file; `from a import b` names a.b when it is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base == "__future__":
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule if submodule in SOURCES else base, node.lineno))
        elif _is_import_module_call(node):
            dynamic = True
    if dynamic:  # the names it may load: every string literal naming a project module
        found += [(node.value, node.lineno) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in SOURCES]
    return list(dict.fromkeys(found))


def _layer(module: str) -> str:
    return module.split(".")[0]


def project_graph() -> dict[str, dict[str, int]]:
    """module -> {imported project module: first line}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in SOURCES.items():
        edges: dict[str, int] = {}
        for target, line in imports_of(module, path):
            if _layer(target) in LAYERS and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def wrong_way_imports() -> list[str]:
    """Imports of a package to the right of the importer's, and cache's imports of Ray or model code."""
    problems = []
    for module, path in SOURCES.items():
        rank = LAYERS.index(_layer(module))
        for target, line in imports_of(module, path):
            top = target.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line}"
            if top in LAYERS and LAYERS.index(top) > rank:
                problems.append(f"{where} imports {target} ({_layer(module)} may import only {LAYERS[:rank + 1]})")
            elif _layer(module) == "cache" and top in CACHE_FORBIDDEN:
                problems.append(f"{where} imports {target} (cache knows nothing of Ray or models)")
    return problems


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def describe_cycle(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    """The files of a cycle and the imports that tie them."""
    members = set(component)
    ties = [f"  {SOURCES[a].relative_to(ROOT)}:{line} -> {SOURCES[b].relative_to(ROOT)}"
            for a in component for b, line in graph[a].items() if b in members]
    return "cycle of " + ", ".join(str(SOURCES[m].relative_to(ROOT)) for m in component) + "\n" + "\n".join(ties)


def test_the_graph_reads_every_kind_of_import():
    graph = project_graph()
    assert "cache.codec" in graph["cache.shard"]  # `from cache import codec` names the module
    assert "cache.atomic" in graph["cache.writer"]  # a module-level `from cache.atomic import ...`
    assert len(SOURCES) > 60 and all(_layer(m) in LAYERS for m in SOURCES)


def test_the_graph_finds_a_cycle_and_function_local_imports(tmp_path):
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    source = tmp_path / "x.py"
    source.write_text("import importlib\ndef f():\n    from .y import z\n    importlib.import_module('cache.codec')\n")
    found = dict(imports_of("pipeline.x", source))
    assert found["pipeline.y"] == 3 and found["cache.codec"] == 4


def test_imports_run_one_way_cache_trainer_eval_pipeline():
    problems = wrong_way_imports()
    assert not problems, "imports that run the wrong way:\n" + "\n".join(problems)


def test_no_import_cycles():
    graph = project_graph()
    cycles = strongly_connected(graph)
    assert not cycles, "\n".join(describe_cycle(c, graph) for c in cycles)
