"""The package is layers, not a web: no module imports, however indirectly, a module that imports it, and no
layer imports a layer above it.

Every import inside the package counts, wherever it is written: at module level, inside a function, or under
`if TYPE_CHECKING:`, relative or absolute. A lazy import only hides a cycle; it does not remove it.

The private modules and names of the libraries we build on are imported in `compat/` alone, the bottom layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import prefect_pydantic_ai

PACKAGE = Path(prefect_pydantic_ai.__file__).parent
README = PACKAGE.parents[1] / "README.md"

# The layers, top down: each imports only from the ones below it. "(root)" is the package's own modules
# (errors, settings, ledger); the package `__init__` and `__main__` are the entry points above every layer.
# `compat` is the one door to the private parts of the libraries below us (tests/test_compat_private.py).
LAYERS = ["demo", "cli", "web", "testing", "ops", "durable", "infra", "store", "(root)", "compat"]
ROOT_MODULES = ["errors", "prefect_settings", "settings", "ledger"]  # "(root)", in the README's order

# The libraries whose private modules and names only `compat` may import.
GUARDED = {"prefect", "pydantic_ai", "prefect_redis", "typer", "click"}

# The one import allowed to run upward, and why: the CLI's `demo` command imports the walkthrough (which renders
# with `cli.display`) only when it runs, so no other command pays for it. It must stay inside a function.
LAZY_UPWARD = {("prefect_pydantic_ai.cli.app", "prefect_pydantic_ai.demo.walkthrough")}


def import_graph(root: Path, package: str, *, top_level_only: bool = False) -> dict[str, set[str]]:
    """Module → the package modules it imports, for every `.py` file under `root` (the package `package`);
    with `top_level_only`, only the imports that run when the module is imported (not those inside a function)."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path)), top_level_only):
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


def _imports(tree: ast.Module, top_level_only: bool) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            if not (top_level_only and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)):
                visit(child)

    visit(tree)
    return found


def layer_of(module: str) -> int:
    """The module's layer as an index into LAYERS (0 is the top); -1 for the package's entry points."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return -1
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else LAYERS.index("(root)")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every edge whose target sits in a layer above its importer, as `importer → imported`."""
    return sorted(
        f"{module} → {imported}"
        for module, edges in graph.items()
        for imported in edges
        if layer_of(imported) < layer_of(module)
    )


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


def private_imports(root: Path, package: str) -> list[str]:
    """Every import, outside `<package>.compat`, of a private module or name (`_x`, not `__x__`) of a library in
    GUARDED, as `module: dotted.name`."""
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join([package, *path.relative_to(root).with_suffix("").parts])
        if module.split(".")[1:2] == ["compat"]:
            continue
        for node in _imports(ast.parse(path.read_text(), str(path)), top_level_only=False):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif node.level == 0 and node.module:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] in GUARDED and any(p.startswith("_") and not p.startswith("__") for p in parts):
                    found.append(f"{module}: {name}")
    return found


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE, "prefect_pydantic_ai")
    assert {"prefect_pydantic_ai.durable.capability", "prefect_pydantic_ai.testing.faults"} <= set(graph)
    assert (
        "prefect_pydantic_ai.store.records" in graph["prefect_pydantic_ai.durable.agent"]
    )  # edges are really found
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


def test_no_layer_imports_a_layer_above_it() -> None:
    graph = import_graph(PACKAGE, "prefect_pydantic_ai")
    assert {layer_of(module) for module in graph} == {-1, *range(len(LAYERS))}  # every layer is populated
    allowed = {f"{low} → {high}" for low, high in LAZY_UPWARD}
    assert upward_imports(graph) == sorted(allowed), "imports that run upward between layers"
    eager = import_graph(PACKAGE, "prefect_pydantic_ai", top_level_only=True)
    assert not set(upward_imports(eager)), "an allowed upward import must stay inside a function"


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    root = tmp_path / "prefect_pydantic_ai"
    for layer in ("durable", "ops"):
        (root / layer).mkdir(parents=True)
        (root / layer / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "errors.py").write_text("")
    (root / "ops" / "runs.py").write_text(
        "from prefect_pydantic_ai.durable import steps\nfrom .. import errors\n"
    )
    (root / "durable" / "steps.py").write_text("def f():\n    from ..ops.runs import x\n")
    graph = import_graph(root, "prefect_pydantic_ai")
    assert upward_imports(graph) == ["prefect_pydantic_ai.durable.steps → prefect_pydantic_ai.ops.runs"]
    assert upward_imports(import_graph(root, "prefect_pydantic_ai", top_level_only=True)) == []


def test_the_readme_lists_the_layers_in_the_tests_order() -> None:
    section = README.read_text().split("Layout (`src/prefect_pydantic_ai/`)", 1)[1].split("\n\n", 2)[1]
    listed = [line.split("`")[1].rstrip("/") for line in section.splitlines() if line.startswith("- `")]
    root = LAYERS.index("(root)")
    assert listed == [*LAYERS[:root], *ROOT_MODULES, *LAYERS[root + 1 :]]


def test_private_parts_of_other_libraries_are_imported_only_in_compat() -> None:
    assert private_imports(PACKAGE, "prefect_pydantic_ai") == [], (
        "move each into prefect_pydantic_ai/compat/ with a test in tests/test_compat_private.py"
    )


def test_the_private_import_check_sees_modules_and_names_and_spares_compat(tmp_path: Path) -> None:
    root = tmp_path / "prefect_pydantic_ai"
    (root / "compat").mkdir(parents=True)
    (root / "compat" / "prefect.py").write_text("from prefect._internal.uuid7 import uuid7\n")
    (root / "cli.py").write_text(
        "import typer._click.exceptions\nfrom prefect import __version__, flow\n"
        "def f():\n    from pydantic_ai.models import _private\n"
    )
    (root / "steps.py").write_text(
        "from prefect.types._datetime import now\nfrom prefect_pydantic_ai import _x\n"
    )
    assert private_imports(root, "prefect_pydantic_ai") == [
        "prefect_pydantic_ai.cli: typer._click.exceptions",
        "prefect_pydantic_ai.cli: pydantic_ai.models._private",
        "prefect_pydantic_ai.steps: prefect.types._datetime.now",
    ]
