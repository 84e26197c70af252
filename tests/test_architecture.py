"""The package's shape: no import cycle among finetune's modules, counting imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the finetune modules it imports anywhere in its body (top level or inside functions)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                # `from finetune import x` imports the package and possibly module x.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("finetune"):
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    # `finetune/__init__.py` is imported by every submodule implicitly; it must import none of them.
    assert not graph["finetune"], f"finetune/__init__.py imports {graph['finetune']}"
    graph.pop("finetune")
    for deps in graph.values():
        deps.discard("finetune")
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Bottom to top: a module may import its own layer or a lower one, never a higher one.
# The base modules (errors, secrets, files) and the package itself are layer 0; the command line is the top.
LAYERS = [
    {"finetune", "finetune.errors", "finetune.secrets", "finetune.files"},
    {"finetune.recipe"},
    {"finetune.models"},
    {"finetune.data"},
    {"finetune.evaluation"},
    {"finetune.watermark"},
    {"finetune.tasks"},
    {"finetune.outputs"},
    {"finetune.training"},
    {"finetune.flows"},
    {"finetune.cli", "finetune.launch", "finetune.__main__"},
]


def layer_of(module: str) -> int:
    for index, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members if m != "finetune") or module == "finetune":
            return index
    raise AssertionError(f"{module} belongs to no layer: add its folder to LAYERS")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{name} (layer {layer_of(name)}) imports {dep} (layer {layer_of(dep)})"
        for name, deps in graph.items()
        for dep in deps
        if layer_of(dep) > layer_of(name)
    )


def test_the_checker_finds_a_planted_upward_import():
    assert upward_imports({"finetune.recipe.schema": {"finetune.flows.run"}}) == [
        "finetune.recipe.schema (layer 1) imports finetune.flows.run (layer 9)"
    ]
    assert upward_imports({"finetune.flows.run": {"finetune.recipe.schema"}}) == []


def test_every_module_imports_only_its_own_layer_or_lower():
    graph = import_graph()
    assert upward_imports(graph) == []


def test_the_package_is_folders_of_layers():
    """No flat module beside the layers but the base and the command line."""
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top <= {"__init__", "__main__", "errors", "secrets", "files", "cli", "launch"}, top
