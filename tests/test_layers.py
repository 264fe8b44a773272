"""The package's shape: each layer imports only itself and the layers below it, and no module imports itself back
through others. Every import counts, including those inside functions."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "debias"

#: Lowest first. A module may import modules of its own layer or of a lower one.
LAYERS = [
    ("debias.config", "debias.io"),
    ("debias.prompts", "debias.bias_spec", "debias.bias_checks", "debias.spec_check", "debias.statements"),
    ("debias.models", "debias.json_store"),
    ("debias.sae", "debias.cda", "debias.neutral_corpus"),
    ("debias.features",),
    ("debias.edits",),
    ("debias.training",),
    ("debias.evaluation",),
    ("debias.callbacks", "debias.export", "debias.model_card", "debias.harness", "debias.plots",
     "debias.dashboards"),
    ("debias.commands",),
    ("debias",),  # the public API re-exports from every layer
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    if best is None:
        raise AssertionError(f"{module} belongs to no layer in tests/test_layers.py")
    return best[0]


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports (`from debias.x import y` counts `debias.x.y` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("debias")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("debias"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
    return found & modules


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(paths)) - {name} for name, path in paths.items()}


def test_every_module_has_a_layer(graph):
    for name in graph:
        layer(name)


def test_no_module_imports_a_higher_layer(graph):
    bad = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})" for a, deps in graph.items() for b in deps
           if layer(b) > layer(a) and not a.startswith(b + ".") and b != "debias"]
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle(graph):
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if node.startswith(dep + ".") or dep == "debias":  # a package's __init__ is not a dependency of its modules
                continue
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_module_is_much_over_300_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 320}
    assert not long, long
