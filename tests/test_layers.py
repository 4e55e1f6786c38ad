"""The package's import graph: no cycles, and no module importing a higher layer."""

import ast
import pathlib

import skcarrot

ROOT = pathlib.Path(skcarrot.__file__).resolve().parent

# Lower layers first; a module may import its own layer and those below it.
LAYERS = [
    {"_util", "_util.math", "exceptions", "_util.threads", "_util.progress", "wire", "_util.split"},
    {"images", "datasets"},
    {"_util.validation", "_util.predict"},
    {"backends"},
    {"losses", "refiner", "search", "tools.pretrain"},
    {"doors", "_training"},
    {"classifier", "tools.baselines"},
    {"tools.presets", "__init__"},
    {"tools", "tools.bench", "tools.demo", "serve"},
    {"tools.cli", "__main__"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _modules():
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ["skcarrot", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(modules):
    """Every import of a skcarrot module, at module level or inside a function: {module: {imported}}."""
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)] if node.level else []
                stem = ".".join(base + ([node.module] if node.module else []))
                found = [f"{stem}.{alias.name}" for alias in node.names]
                targets.update(t if t in modules else stem for t in found)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        resolved = set()
        for target in targets:
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                resolved.add(target)
        graph[name] = resolved
    return graph


def _layer(module):
    """The rank of a module: its own entry (``tools.cli``) or its top-level package's (``search``)."""
    parts = module.split(".")
    if len(parts) == 1:
        return RANK["__init__"]
    return RANK.get(".".join(parts[1:3]), RANK.get(parts[1]))


def test_every_module_has_a_layer():
    assert {m for m in _modules() if m.count(".") and _layer(m) is None} == set()


def test_no_module_imports_a_higher_layer():
    graph = _imports(_modules())
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets if _layer(t) > _layer(m))
    assert upward == []


def test_the_import_graph_has_no_cycle():
    graph = _imports(_modules())
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
