"""The code never deserializes code: no pickle, yaml.safe_load only, torch.load(weights_only=True), no remote code."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(path for package in ("cache", "trainer", "eval", "pipeline", "bench")
                 for path in (ROOT / package).rglob("*.py"))


def _calls(tree: ast.AST, module: str, name: str):
    """Calls of module.name(...) in a parsed file."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module):
            yield node


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def problems_in(source: str, where: str) -> list[str]:
    """Every pickle import, non-False trust_remote_code, unsafe yaml load and torch.load without weights_only=True."""
    tree = ast.parse(source, filename=where)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if {"pickle", "cloudpickle", "dill", "marshal"} & set(names):
                found.append(f"{where}:{node.lineno} imports a pickle module")
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and not (
                isinstance(node.value, ast.Constant) and node.value.value is False):
            found.append(f"{where}:{node.value.lineno} trust_remote_code is not the constant False")
    for name in ("load", "load_all", "unsafe_load", "full_load"):
        found += [f"{where}:{call.lineno} yaml.{name}: use yaml.safe_load" for call in _calls(tree, "yaml", name)]
    for call in _calls(tree, "torch", "load"):
        flag = _keyword(call, "weights_only")
        if not (isinstance(flag, ast.Constant) and flag.value is True):
            found.append(f"{where}:{call.lineno} torch.load without weights_only=True")
    return found


def test_the_checker_finds_each_unsafe_pattern():
    unsafe = ("import pickle\nimport yaml, torch\nyaml.load(s)\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
              "m = AutoModel.from_pretrained(p, trust_remote_code=True)\n")
    assert len(problems_in(unsafe, "x.py")) == 5
    safe = "yaml.safe_load(s)\ntorch.load(f, weights_only=True)\nf(trust_remote_code=False)\n"
    assert problems_in(safe, "y.py") == []


def test_no_source_file_deserializes_code():
    assert len(SOURCES) > 30
    assert [p for path in SOURCES for p in problems_in(path.read_text(), str(path.relative_to(ROOT)))] == []
