"""The package is layers, not a web: no module imports, however indirectly, a module that imports it.

Every import inside the package counts, wherever it is written: at module level, inside a function, or under
`if TYPE_CHECKING:`, relative or absolute. A lazy import only hides a cycle; it does not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import prefect_pydantic_ai

PACKAGE = Path(prefect_pydantic_ai.__file__).parent


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module → the package modules it imports, for every `.py` file under `root` (the package `package`)."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1])
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    edges.add(submodule if submodule in modules else target)
        graph[name] = {edge for edge in edges if edge in modules and edge != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or `None` if the graph has none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph[module]):
            if cycle := visit(imported):
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE, "prefect_pydantic_ai")
    assert {"prefect_pydantic_ai.capability", "prefect_pydantic_ai.testing.faults"} <= set(graph)
    assert "prefect_pydantic_ai.records" in graph["prefect_pydantic_ai.agent"]  # edges are really found
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_the_cycle_check_sees_lazy_type_checking_and_absolute_imports(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "low.py").write_text("def f():\n    from .sub import inner\n")
    (root / "sub" / "inner.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.high\n"
    )
    (root / "high.py").write_text("from pkg.low import f\n")
    assert find_cycle(import_graph(root, "pkg")) == ["pkg.high", "pkg.low", "pkg.sub.inner", "pkg.high"]
    (root / "high.py").write_text("")
    assert find_cycle(import_graph(root, "pkg")) is None


def test_all_is_the_table_of_lazy_exports_and_every_name_resolves() -> None:
    exports: dict[str, str] = prefect_pydantic_ai._EXPORTS  # type: ignore[attr-defined]
    assert prefect_pydantic_ai.__all__ == sorted(exports)
    declared = {
        alias.asname or alias.name: node.module
        for node in ast.walk(ast.parse((PACKAGE / "__init__.py").read_text()))
        if isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names
    }
    assert declared == exports  # the TYPE_CHECKING imports say what the lazy table loads
    for name in exports:
        assert getattr(prefect_pydantic_ai, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = prefect_pydantic_ai.nope  # type: ignore[attr-defined]
