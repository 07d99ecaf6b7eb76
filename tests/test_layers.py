"""The import rules of docs/architecture.md, checked by parsing every module's imports.

Each top-level part of ``spectralmc_server`` may import only the parts listed for it in
``MAY_IMPORT`` (function-local imports count too: a lazy import is still a dependency),
the parts form no cycle, and the parts marked torch-free import neither torch nor
anything that does at module level (what a process that never computes loads).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "spectralmc_server"

# part -> the other parts it may import (docs/architecture.md, "Import rules")
MAY_IMPORT: dict[str, set[str]] = {
    "rfc3339": set(),
    "lazy_torch": set(),  # torch on first use, for the HTTP process of spectralmc serve
    "ipc": set(),
    "models": set(),
    "client": set(),  # a client needs nothing of the server's code
    "engine": set(),  # numerics: nothing above it
    "store": {"engine"},  # checkpoints and certificates are the engine's formats
    "training": {"engine", "store"},
    "marketdata": {"rfc3339", "store"},
    "pricing": {"engine", "marketdata", "rfc3339"},
    "settings": {"engine", "pricing", "store"},
    "engine_service": {"engine", "ipc", "marketdata", "models", "pricing", "rfc3339", "settings", "store", "training"},
    "service": {
        "engine",
        "engine_service",
        "ipc",
        "marketdata",
        "models",
        "pricing",
        "rfc3339",
        "settings",
        "store",
        "training",
    },
    "cli": {
        "engine",
        "engine_service",
        "lazy_torch",
        "marketdata",
        "models",
        "pricing",
        "rfc3339",
        "service",
        "settings",
        "store",
        "training",
    },
}
# parts whose modules import no torch at module level
TORCH_FREE = {"rfc3339", "lazy_torch", "ipc", "client", "marketdata", "store", "training"}


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(("spectralmc_server", *parts))


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """The absolute module names ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                out.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                out.add(node.module)
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _edges() -> dict[str, dict[str, list[str]]]:
    """part -> imported part -> the modules that import it."""
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in _modules():
        src = _part(path)
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "spectralmc_server" or len(parts) < 2 or parts[1] == src:
                continue
            edges[src][parts[1]].append(str(path.relative_to(PACKAGE)))
    return edges


def test_every_part_has_a_rule() -> None:
    parts = {_part(p) for p in _modules()} - {"__init__"}
    assert parts <= set(MAY_IMPORT), f"parts without an import rule: {sorted(parts - set(MAY_IMPORT))}"


@pytest.mark.parametrize("part", sorted(MAY_IMPORT))
def test_each_part_imports_only_what_its_rule_allows(part: str) -> None:
    bad = {dep: where for dep, where in _edges().get(part, {}).items() if dep not in MAY_IMPORT[part]}
    assert not bad, f"{part}/ imports {sorted(bad)}: {bad}"


def test_the_parts_form_no_cycle() -> None:
    graph = {src: set(deps) for src, deps in _edges().items()}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for dep in sorted(graph.get(node, ())):
            if seen.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep] if dep in path else [node, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in seen:
                visit(dep, [*path, dep])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node, [node])


@pytest.mark.parametrize("part", sorted(TORCH_FREE))
def test_torch_free_parts_load_no_torch(part: str) -> None:
    """Importing every module of the part, in a fresh interpreter, loads neither torch
    nor cupy (what they import lazily, inside a function, is theirs to load when used)."""
    names = [_module(p) for p in _modules() if _part(p) == part]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "    heavy = sorted(m for m in ('torch', 'cupy') if m in sys.modules)\n"
        "    if heavy:\n"
        "        print(name, heavy)\n"
        "        break\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout == "", f"{part}/ loads torch at import: {out.stdout.strip()}"


def test_the_rules_see_function_local_imports(tmp_path: Path) -> None:
    """A lazy import counts: the parser reads imports inside functions."""
    module = PACKAGE / "engine" / "__init__.py"
    assert _imports(module) >= _imports(module, top_level_only=True)
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from spectralmc_server.service import app\n")
    tree_imports = {
        n.module for n in ast.walk(ast.parse(sample.read_text())) if isinstance(n, ast.ImportFrom) and n.module
    }
    assert tree_imports == {"spectralmc_server.service"}
