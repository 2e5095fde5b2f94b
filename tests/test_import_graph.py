"""quantkit's imports point one way (docs/DESIGN.md section 3): no cycles, and backends are leaves.

The graph is read from the source with ``ast``: every ``import`` of a quantkit module, at module
level or inside a function (a deferred import is still an arrow), is an edge.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "quantkit"

#: What a backend module may import besides its own backend's modules.
LEAVES = {"quantkit._constants", "quantkit._arrays", "quantkit.reference", "quantkit._buffers"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(current: str, is_package: bool, level: int, name) -> str:
    if level == 0:
        return name or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph() -> dict:
    """{module: set of quantkit modules it imports}."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                for alias in node.names:  # `from . import x` names a module x when there is one
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                while target and target not in modules:  # a name inside a module
                    target = target.rpartition(".")[0]
                if target.startswith("quantkit") and target != name and target != "quantkit":
                    edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict) -> list:
    """Each cycle found by depth-first search, as a list of modules."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def _backend_of(module: str):
    """The backend a module belongs to ("numba", "cuda", "native_cpu"), or None: the modules of a
    backend are flat under backends/ with its name as prefix (numba_stats, cuda_layout, ...)."""
    if not module.startswith("quantkit.backends."):
        return None
    leaf = module.split(".")[2]
    return leaf.split("_")[0] if leaf.startswith(("numba", "cuda")) else leaf


def test_the_graph_sees_the_known_arrows():
    graph = import_graph()
    assert "quantkit.qtensor" in graph["quantkit.ops"]
    assert "quantkit.backends.numba_calib" in graph["quantkit.calibration._args"]  # deferred
    assert "quantkit.backends.cuda_quantize" in graph["quantkit.ops"] | graph["quantkit._dispatch"]
    assert "quantkit.backends.cuda_library" in graph["quantkit.backends.cuda_quantize"]
    assert _backend_of("quantkit.backends.cuda_stats") == \
        _backend_of("quantkit.backends.cuda_library")


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_backends_import_only_leaves_and_their_own_backend():
    graph = import_graph()
    wrong = []
    for module, edges in graph.items():
        backend = _backend_of(module)
        if backend is None:
            continue
        for target in edges:
            if target in LEAVES or target == "quantkit.backends":
                continue
            if _backend_of(target) == backend:
                continue
            wrong.append((module, target))
    assert wrong == []


def test_leaves_import_nothing_above_them():
    graph = import_graph()
    for leaf in LEAVES:
        assert graph[leaf] <= LEAVES, leaf


def test_only_the_command_imports_the_command():
    """cli prints; nothing it calls (convert, calibration, io, ...) imports it back."""
    graph = import_graph()
    users = sorted(m for m, edges in graph.items()
                   if any(t.startswith("quantkit.cli") for t in edges)
                   and not m.startswith("quantkit.cli") and m != "quantkit.__main__")
    assert users == []
    assert "quantkit.convert" in graph["quantkit.cli.commands"]
