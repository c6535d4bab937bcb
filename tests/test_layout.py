"""The package's shape: its import graph has no circle, and modules import each other at their
top (an import inside a function hides a dependency and, between package modules, a circle);
inside functions only heavy optional packages are imported, and none a module has at its top."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "chexnet_hvd"
# imported where used: each costs seconds or is missing from some installs (the package's light
# commands, --help among them, start without them)
HEAVY = {"tensorflow", "horovod", "matplotlib", "openvino", "nncf", "pydicom", "mpi4py"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> tuple[set[str], list[str]]:
    """(package modules imported at run time, those imported inside a function body) by `path`
    (imports under `if TYPE_CHECKING:` are for annotations only)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    in_functions = {id(n) for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                    for n in ast.walk(node)}
    found, hidden = set(), []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names = {a.name for a in node.names}
        else:
            continue
        names &= modules
        found |= names
        if names and id(node) in in_functions:
            hidden += sorted(names)
    return found, hidden


def test_the_package_imports_in_one_direction_at_the_top_of_its_modules():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph, hidden = {}, {}
    for name, path in paths.items():
        graph[name], inside = imports(path, set(paths) - {name})
        if inside:
            hidden[name] = inside
    assert not hidden, f"package modules imported inside functions: {hidden}"
    done, on_path = set(), []

    def visit(name):
        assert name not in on_path, f"an import circle: {' -> '.join(on_path[on_path.index(name):] + [name])}"
        if name in done:
            return
        on_path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        on_path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert "chexnet_hvd.sources" in graph["chexnet_hvd.records.writer"]  # the walk sees the imports


def top_packages(nodes) -> set[str]:
    """The top-level packages the import statements among `nodes` import."""
    nodes = list(nodes)
    return ({a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for a in n.names}
            | {n.module.split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom) and n.module and not n.level})


def test_only_heavy_packages_are_imported_inside_functions():
    light = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        at_top = top_packages(tree.body) - {"__future__"}
        inside = top_packages(n for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                              for n in ast.walk(f))
        if wrong := sorted((inside - HEAVY - {"chexnet_hvd"}) | (inside & at_top)):
            light[module_name(path)] = wrong
    assert not light, f"imported inside functions though light or already at the module's top: {light}"
