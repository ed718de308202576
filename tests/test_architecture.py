"""The package's import structure, read from the source (ast), so it holds for lazy imports too.

- no cycle between rpo's files (modules and package __init__ files), and so none between its sub-packages
  (rpo.ops, rpo.losses, rpo.distributed, rpo.data, rpo.models, rpo.train, rpo.evaluation, rpo.compat, ... and
  top-level modules such as rpo._C);
- rpo.ops is a leaf: it imports no other rpo package (only the compiled extension rpo._C);
- megatron-core's CPU redirects (rpo.compat.megatron_cpu) are applied from one place, rpo.models.parallel.

Every import counts: module-level, inside functions (lazy), under `if TYPE_CHECKING`, absolute and relative.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "rpo"
LEAF = "rpo.ops"
LEAF_MAY_IMPORT = {"rpo._C"}
MEGATRON_CPU = "rpo.compat.megatron_cpu"
MEGATRON_CPU_APPLIED_FROM = {"rpo.models.parallel"}


@dataclass(frozen=True)
class Import:
    importer: str  # module doing the import
    target: str  # the rpo module (or package) imported
    where: str  # file:line


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def rpo_modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module and package of rpo (source files; a compiled extension counts as a module too)."""
    out = {}
    for path in sorted(package_dir.rglob("*")):
        if path.suffix == ".py" or (path.suffix in (".so", ".pyd") and path.parent == package_dir):
            name = module_name(path.with_name(path.name.split(".")[0] + ".py"), package_dir)
            out.setdefault(name, path)
    return out


def imports_in(path: Path, module: str, known: Iterable[str], package_dir: Path = PACKAGE_DIR) -> list[Import]:
    """The rpo modules `module` (source `path`) imports, wherever the import statement is."""
    known = set(known)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(package_dir.parent)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, where) for alias in node.names
                      if alias.name == "rpo" or alias.name.startswith("rpo.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source != "rpo" and not source.startswith("rpo."):
                continue
            for alias in node.names:
                # `from rpo.x import y` imports the module rpo.x.y when it exists, else a name of rpo.x.
                candidate = f"{source}.{alias.name}"
                found.append(Import(module, candidate if candidate in known else source, where))
    return found


def import_graph(package_dir: Path = PACKAGE_DIR) -> list[Import]:
    modules = rpo_modules(package_dir)
    return [imp for name, path in modules.items() if path.suffix == ".py"
            for imp in imports_in(path, name, modules, package_dir)]


def unit_of(module: str) -> str:
    """The sub-package (or top-level module) a module belongs to: rpo.models.gpt -> rpo.models; rpo -> rpo."""
    return ".".join(module.split(".")[:2])


def unit_edges(imports: Iterable[Import]) -> dict[str, dict[str, list[str]]]:
    """{importing unit: {imported unit: [file:line, ...]}} for imports that cross units."""
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for imp in imports:
        source, target = unit_of(imp.importer), unit_of(imp.target)
        if source != target:
            edges[source][target].append(imp.where)
    return edges


def find_cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted; [] when acyclic."""
    graph = {node: sorted(targets) for node, targets in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(set(graph) | {t for targets in graph.values() for t in targets}):
        if node not in index:
            visit(node)
    return sorted(components)


def cycle_report(edges: Mapping[str, Mapping[str, list[str]]]) -> list[str]:
    """One line per import that closes a cycle: 'a -> b (file:line, ...)' for the edges inside each cycle."""
    lines = []
    for component in find_cycles(edges):
        members = set(component)
        lines.append("cycle: " + " <-> ".join(component))
        for source in component:
            for target, where in sorted(edges.get(source, {}).items()):
                if target in members:
                    lines.append(f"  {source} -> {target} ({', '.join(where)})")
    return lines


def leaf_violations(edges: Mapping[str, Mapping[str, list[str]]], leaf: str = LEAF,
                    allowed: Iterable[str] = LEAF_MAY_IMPORT) -> list[str]:
    allowed = set(allowed)
    return [f"{leaf} -> {target} ({', '.join(where)})" for target, where in sorted(edges.get(leaf, {}).items())
            if target not in allowed]


# ------------------------------------------------------------------------------------------- the checks ---
@pytest.fixture(scope="module")
def imports() -> list[Import]:
    found = import_graph()
    assert len(found) > 20 and {unit_of(i.importer) for i in found} >= {"rpo.models", "rpo.train", "rpo.losses"}
    return found


def test_no_cycle_between_subpackages(imports):
    report = cycle_report(unit_edges(imports))
    assert not report, "import cycles between rpo's sub-packages:\n" + "\n".join(report)


def module_edges(imports: Iterable[Import]) -> dict[str, dict[str, list[str]]]:
    """{importing module: {imported module or package: [file:line, ...]}}, every import between two files."""
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for imp in imports:
        if imp.importer != imp.target:
            edges[imp.importer][imp.target].append(imp.where)
    return edges


def test_no_cycle_between_files(imports):
    report = cycle_report(module_edges(imports))
    assert not report, "import cycles between rpo's files:\n" + "\n".join(report)


def test_ops_is_a_leaf(imports):
    violations = leaf_violations(unit_edges(imports))
    assert not violations, "rpo.ops imports other rpo packages:\n" + "\n".join(violations)


def test_megatron_cpu_redirects_applied_from_one_place(imports):
    importers = {i.importer for i in imports if i.target == MEGATRON_CPU}
    assert importers == MEGATRON_CPU_APPLIED_FROM, sorted(importers)


# ------------------------------------------------------------------------- the checker on known graphs ---
def test_checker_finds_a_synthetic_cycle_and_a_leaf_violation(tmp_path):
    """The same functions, on a package written here: a -> b (lazy, inside a function) -> c -> a (relative),
    and its leaf `a` importing `b`. They must report both; removing the back edge must clear the cycle."""
    root = tmp_path / "rpo"
    for package in ("a", "b", "c", "d"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "a" / "core.py").write_text("def f():\n    from rpo.b import helpers\n    return helpers\n")
    (root / "b" / "helpers.py").write_text("import rpo.c.tools\n")
    (root / "c" / "tools.py").write_text("from ..a import core\nfrom . import other\n")
    (root / "c" / "other.py").write_text("")
    (root / "d" / "__init__.py").write_text("from rpo.a.core import f\nfrom rpo import b\n")

    found = import_graph(root)
    assert {(i.importer, i.target) for i in found} == {
        ("rpo.a.core", "rpo.b.helpers"), ("rpo.b.helpers", "rpo.c.tools"), ("rpo.c.tools", "rpo.a.core"),
        ("rpo.c.tools", "rpo.c.other"), ("rpo.d", "rpo.a.core"), ("rpo.d", "rpo.b")}
    edges = unit_edges(found)
    assert find_cycles(edges) == [["rpo.a", "rpo.b", "rpo.c"]]
    report = cycle_report(edges)
    assert report[0] == "cycle: rpo.a <-> rpo.b <-> rpo.c" and any("rpo.c -> rpo.a" in line for line in report)
    assert leaf_violations(edges, leaf="rpo.a", allowed=()) == ["rpo.a -> rpo.b (rpo/a/core.py:2)"]
    assert leaf_violations(edges, leaf="rpo.a", allowed={"rpo.b"}) == []
    # Between files: the same cycle, module by module (rpo.d and the helper rpo.c.other are on no cycle).
    assert find_cycles(module_edges(found)) == [["rpo.a.core", "rpo.b.helpers", "rpo.c.tools"]]

    (root / "c" / "tools.py").write_text("from . import other\n")
    acyclic = import_graph(root)
    assert find_cycles(unit_edges(acyclic)) == [] and cycle_report(unit_edges(acyclic)) == []
    assert find_cycles(module_edges(acyclic)) == []


def test_file_level_cycle_inside_one_subpackage_is_found(tmp_path):
    """Two files of one sub-package importing each other (one lazily) form no cycle between sub-packages but
    one between files; a package __init__ that re-exports a module importing the package's names is one too."""
    root = tmp_path / "rpo"
    (root / "x").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "x" / "__init__.py").write_text("from rpo.x.registry import build\n")
    (root / "x" / "registry.py").write_text("def build():\n    from rpo.x.combination import combine\n")
    (root / "x" / "combination.py").write_text("from rpo.x.registry import build\nfrom rpo.x import build as b\n")
    found = import_graph(root)
    assert find_cycles(unit_edges(found)) == []
    assert find_cycles(module_edges(found)) == [["rpo.x", "rpo.x.combination", "rpo.x.registry"]]


def test_find_cycles_on_plain_graphs():
    assert find_cycles({"x": ["y"], "y": ["z"]}) == []
    assert find_cycles({"x": ["y"], "y": ["x"], "z": ["x"]}) == [["x", "y"]]
    assert find_cycles({"p": ["q"], "q": ["p"], "r": ["s"], "s": ["r"]}) == [["p", "q"], ["r", "s"]]
