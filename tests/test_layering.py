"""The package's import graph: no cycle (function-local imports count), each layer above the ones it uses."""

import ast
import collections
import fnmatch
import pathlib
import subprocess
import sys

import torchconstrain

ROOT = pathlib.Path(torchconstrain.__file__).resolve().parent

#: Bottom to top: a module imports modules of its own layer or of layers below, never above.
LAYERS = [
    ("foundations", ["torchconstrain.errors", "torchconstrain.report", "torchconstrain._distributed"]),
    ("constraints", ["torchconstrain.constraints", "torchconstrain.constraints.*"]),
    ("tensors", ["torchconstrain._tensors", "torchconstrain._tracked", "torchconstrain.fastpath"]),
    ("rule keys", ["torchconstrain.keys"]),
    ("registration", ["torchconstrain.checkpoint", "torchconstrain.registration"]),
    ("rules", ["torchconstrain.optim", "torchconstrain.rules", "torchconstrain.schedules"]),
    ("bake and check", ["torchconstrain.bake"]),
    ("surgery", ["torchconstrain.surgery", "torchconstrain.surgery.*"]),
    ("deploy", ["torchconstrain.deploy"]),
    ("rules files", ["torchconstrain.rulesfile", "torchconstrain.api", "torchconstrain.dryrun"]),
    ("top", ["torchconstrain", "torchconstrain.__main__", "torchconstrain.demo", "torchconstrain.demo.*",
             "torchconstrain.examples", "torchconstrain.examples.*"]),
]


def find_modules(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
    """Every module of the package at ``root`` by dotted name; a package is its ``__init__.py``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([package, *parts])] = path
    return modules


def import_graph(root: pathlib.Path, package: str) -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}`` among the package's modules, from every import statement.

    Function-local and relative imports count. ``import a.b`` and ``from a import b`` (``b`` a
    submodule) import ``a.b``; ``from a import name`` imports ``a``, a package's ``__init__``.
    """
    modules = find_modules(root, package)
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _imports(name: str, path: pathlib.Path, modules: dict) -> dict[str, int]:
    found = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = _from_targets(node, name, path.name == "__init__.py", modules)
        else:
            continue
        for target in targets:
            if target in modules:
                found.setdefault(target, node.lineno)
    return found


def _from_targets(node: ast.ImportFrom, name: str, is_package: bool, modules: dict) -> list[str]:
    """``from base import a, b``: the submodules among ``a, b``, and ``base`` when a name comes from it."""
    base = node.module or ""
    if node.level:
        package = name.split(".") if is_package else name.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
    return submodules + ([base] if len(submodules) < len(node.names) else [])


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """A shortest cycle through each module that is on one, skipping modules of cycles already found."""
    cycles, seen = [], set()
    for start in sorted(graph):
        if start not in seen:
            cycle = _shortest_cycle(graph, start)
            if cycle:
                cycles.append(cycle)
                seen.update(cycle)
    return cycles


def _shortest_cycle(graph: dict[str, dict[str, int]], start: str) -> list[str] | None:
    parents, queue = {}, collections.deque([start])
    while queue:
        module = queue.popleft()
        for target in sorted(graph[module]):
            if target == start:
                path = [module]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if target not in parents:
                parents[target] = module
                queue.append(target)
    return None


def _describe(cycle: list[str], graph: dict[str, dict[str, int]], modules: dict) -> str:
    hops = [f"{a} imports {b} ({modules[a].relative_to(ROOT.parent)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return "import cycle: " + "; ".join(hops)


def _layer(module: str) -> int | None:
    matches = (i for i, (_, patterns) in enumerate(LAYERS) if any(fnmatch.fnmatchcase(module, p) for p in patterns))
    return next(matches, None)


def test_no_import_cycle_between_torchconstrain_modules():
    graph, modules = import_graph(ROOT, "torchconstrain"), find_modules(ROOT, "torchconstrain")
    cycles = [_describe(cycle, graph, modules) for cycle in find_cycles(graph)]
    assert not cycles, "\n".join(cycles)


def test_every_module_imports_only_its_own_layer_or_lower_ones():
    graph, modules = import_graph(ROOT, "torchconstrain"), find_modules(ROOT, "torchconstrain")
    unplaced = [module for module in graph if _layer(module) is None]
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"
    upward = [
        f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]}) at "
        f"{modules[a].relative_to(ROOT.parent)}:{line}"
        for a, targets in graph.items() for b, line in targets.items() if _layer(b) > _layer(a)
    ]
    assert not upward, "\n".join(upward)


def test_the_graph_sees_function_local_relative_and_package_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg.low import thing\n")
    (package / "low.py").write_text("def thing():\n    from . import high\n")
    (package / "high.py").write_text("from .sub import leaf\nfrom pkg.sub.leaf import name\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "leaf.py").write_text("import pkg\nname = 1\n")
    graph = import_graph(package, "pkg")
    assert graph == {
        "pkg": {"pkg.low": 1},
        "pkg.low": {"pkg.high": 2},
        "pkg.high": {"pkg.sub.leaf": 1},
        "pkg.sub": {},
        "pkg.sub.leaf": {"pkg": 1},
    }
    assert find_cycles(graph) == [["pkg", "pkg.low", "pkg.high", "pkg.sub.leaf", "pkg"]]


def test_import_torchconstrain_loads_neither_the_surgery_nor_rules_files():
    heavy = "{'torchvision', 'yaml', 'torchconstrain.surgery', 'torchconstrain.rulesfile'}"
    code = f"import sys, torchconstrain; print(sorted({heavy} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
