"""The package's architecture, checked from its imports: four rooms, arrows one way, no cycles.

commands -> report -> experiments -> study -> engine (an arrow may skip a room, never point up);
the engine imports nothing of the package outside itself and no third-party package but torch,
numpy and tqdm; no module is longer than about 500 lines.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "influence_over_inference"
ROOMS = ["engine", "study", "experiments", "report", "commands"]  # bottom to top
ENGINE_THIRD_PARTY = {"torch", "numpy", "tqdm"}
MAX_LINES = 520


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at the top or inside functions, as absolute dotted names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]  # `from . import plots` imports a module
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path) if m in files and m != name}
    return graph


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else None


def test_engine_imports_nothing_outside_itself():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for path in (PACKAGE / "engine").rglob("*.py"):
        for mod in _imports(path):
            top = mod.split(".")[0]
            if top == "influence_over_inference":
                assert mod.startswith("influence_over_inference.engine"), f"{path.name} imports {mod}"
            else:
                assert top in stdlib or top in ENGINE_THIRD_PARTY, f"{path.relative_to(PACKAGE)} imports {mod}"


def test_arrows_point_one_way():
    for module, deps in _graph().items():
        room = _room(module)
        if room is None:
            continue
        for dep in deps:
            other = _room(dep)
            if other is not None:
                assert ROOMS.index(other) <= ROOMS.index(room), f"{module} ({room}) imports {dep} ({other})"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in graph[node]:
            if dep.endswith("__main__"):
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep] if dep in stack else [node, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_no_module_is_too_long():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
