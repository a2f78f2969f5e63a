"""The house's arrows, read from the code's own imports (docs/architecture.md, "The arrows"):
gpunet/ never imports extensions/, kernels/ imports nothing of gpunet, no import circles,
and the notebook never ships a function to the scheduler."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"gpunet": ROOT / "gpunet", "gpunet.kernels": ROOT / "kernels", "gpunet.extensions": ROOT / "extensions"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [part for part in path.relative_to(folder).with_suffix("").parts if part != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The gpunet modules ``name`` imports anywhere in its code (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        found.update(target for target in targets if target in MODULES and target != name)
    return found


EDGES = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_core_never_imports_the_extensions():
    wrong = [(name, target) for name, targets in EDGES.items() for target in targets
             if not name.startswith(("gpunet.extensions", "gpunet.kernels")) and name != "gpunet"
             and target.startswith("gpunet.extensions")]
    assert wrong == []


def test_kernels_import_nothing_of_gpunet():
    wrong = [(name, target) for name, targets in EDGES.items() if name.startswith("gpunet.kernels")
             for target in targets if not target.startswith("gpunet.kernels")]
    assert wrong == []


def test_no_import_circles():
    faces = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    graph = {name: EDGES[name] - faces for name in MODULES if name not in faces}
    circles = []

    def visit(name: str, trail: list[str]) -> None:
        for target in sorted(graph.get(name, ())):
            if target in trail:
                circles.append(trail[trail.index(target):] + [target])
            elif target not in seen:
                seen.add(target)
                visit(target, trail + [target])

    seen: set[str] = set()
    for start in sorted(graph):
        if start not in seen:
            seen.add(start)
            visit(start, [start])
    assert circles == []


def test_nothing_ships_a_function_to_the_scheduler():
    shipped = [(name, node.lineno) for name, path in MODULES.items()
               for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)
               and node.attr in ("run_on_scheduler", "_send_to_scheduler", "register_plugin")]
    assert shipped == []
