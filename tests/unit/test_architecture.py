"""The package's parts import one way (docs/architecture.md), and no module imports itself back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sidecar"

# Which parts each part may import (besides itself). Top: api, cli; middle: serving, retrieval,
# ingest; below them: model, stores; at the bottom: config, errors, types, threads, logs, sqlite_files.
BOTTOM = {"config", "errors", "types", "threads", "logs", "sqlite_files"}
ALLOWED = {
    "config": {"errors"},  # its SettingsError is a UserFixable
    "errors": set(),
    "types": set(),
    "threads": set(),
    "logs": set(),
    "sqlite_files": set(),
    "model": BOTTOM,
    "stores": BOTTOM,
    "serving": BOTTOM | {"model"},
    "retrieval": BOTTOM | {"model", "stores"},
    "ingest": BOTTOM | {"model", "stores"},
    "api": BOTTOM | {"model", "stores", "serving", "retrieval", "ingest"},
    "cli": BOTTOM | {"model", "stores", "serving", "retrieval", "ingest", "api"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path) -> set[str]:
    """Every sidecar module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sidecar"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("sidecar"))
    return found


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def test_every_module_belongs_to_a_known_part():
    unknown = {name for name in MODULES if _part(name) not in ALLOWED and name != "sidecar"}
    assert not unknown, f"modules outside the parts docs/architecture.md names: {sorted(unknown)}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m != "sidecar"))
def test_module_imports_only_parts_below_it(name):
    part = _part(name)
    wrong = sorted(m for m in GRAPH[name] if _part(m) != part and _part(m) not in ALLOWED[part])
    assert not wrong, f"{name} ({part}/) imports {wrong}; {part}/ may import only {sorted(ALLOWED[part])}"


def test_no_import_cycles():
    # Package __init__ modules re-export their children; an edge into one is an edge into the part.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if target == "sidecar" or MODULES[target].name == "__init__.py" and name.startswith(target + "."):
                continue  # a child naming its own package
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
