"""The folders form a stack: no module imports a folder above its own, and nothing imports lazily to
dodge a cycle (every project import is at module level)."""

import ast
from pathlib import Path

from tests.support.helpers import ROOT

# Bottom to top; folders on one level do not import each other.
LAYERS = [("core",), ("moe", "data_shards"), ("model",), ("eval",), ("train",), ("launch", "bench")]
LEVEL = {folder: i for i, group in enumerate(LAYERS) for folder in group}


def project_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported top-level folder, line, at module level) for every import of a project folder."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            head = name.split(".")[0]
            if head in LEVEL:
                found.append((head, node.lineno, id(node) in top_level))
    return found


def test_every_project_folder_has_a_layer():
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {p.name for p in ROOT.iterdir()
                                                                    if p.is_dir() and any(p.glob("*.py"))}
    assert folders - {"tests", "scripts"} <= set(LEVEL), f"folders without a layer: {folders - set(LEVEL)}"


def test_no_module_imports_upward_or_sideways():
    wrong = []
    for folder, level in LEVEL.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for head, line, _ in project_imports(path):
                if head != folder and LEVEL[head] >= level:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {head} (layer {LEVEL[head]} >= {level})")
    assert not wrong, "imports against the stack:\n" + "\n".join(wrong)


def module_graph() -> dict[str, set[str]]:
    """Project module -> project modules it imports, wherever the import statement stands."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for folder in LEVEL for p in (ROOT / folder).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_no_import_cycles_even_through_imports_inside_functions():
    """A cycle hidden by an import inside a function still is a cycle: there must be none."""
    graph = module_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))
