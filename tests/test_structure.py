"""Structure rules of the engine, checked from the source: no import circles, nothing of ours on third-party objects."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "vramwise"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module an ``import`` anywhere in the file (top level or inside functions) names, minus
    ``if TYPE_CHECKING:`` blocks (they never run)."""
    package = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)  # ``from . import x`` names a submodule
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def engine_import_graph() -> dict[str, set[str]]:
    """Module -> engine modules it imports. Importing ``a.b.c`` also runs the packages ``a`` and ``a.b``, so those
    are edges too (except the importer's own enclosing packages, which are already running)."""
    files = {_module_name(p): p for p in ENGINE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        own = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}
        edges: set[str] = set()
        for target in _imports(ast.parse(path.read_text()), name, is_package):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in files and candidate not in own:
                    edges.add(candidate)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_cycle_finder_sees_a_function_local_circle():
    tree = ast.parse("def f():\n    from ..memory.planner import x\n")
    edges = _imports(tree, "vramwise.offload.modes", False)
    assert "vramwise.memory.planner" in edges
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_engine_has_no_import_circles():
    graph = engine_import_graph()
    assert "vramwise.offload.stream" in graph and graph["vramwise.offload.stream"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_nothing_of_ours_is_named_on_third_party_objects():
    """State we create lives in objects we own (``offload.placement.Placement``), never as ``_vramwise_*``
    attributes on diffusers or transformers objects."""
    pattern = re.compile(r"_vramwise_\w*")
    hits = [f"{p.relative_to(ROOT)}: {m}" for folder in (ENGINE, ROOT / "nodes") for p in sorted(folder.rglob("*.py"))
            for m in pattern.findall(p.read_text())]
    assert not hits, hits


def test_offload_mechanisms_never_import_the_planner():
    graph = engine_import_graph()
    offload = [m for m in graph if m == "vramwise.offload" or m.startswith("vramwise.offload.")]
    assert len(offload) >= 5
    assert not [m for m in offload if any(t.startswith("vramwise.memory") for t in graph[m])]


def test_one_file_per_architecture_description():
    from vramwise.architectures import ARCHITECTURES, DenoiserArchitecture

    files = sorted(p.stem for p in (ENGINE / "architectures").glob("*.py") if p.stem != "__init__")
    assert files == sorted(ARCHITECTURES) == ["easyanimate", "wan"]
    for name in files:
        source = (ENGINE / "architectures" / f"{name}.py").read_text()
        assert source.count("DenoiserArchitecture(") == 1 and isinstance(ARCHITECTURES[name], DenoiserArchitecture)
