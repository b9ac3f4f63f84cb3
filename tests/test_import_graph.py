"""The package's import graph is a DAG and every module imports on its own in a fresh interpreter.

Static: every ``import`` of a package module (module level and inside functions, so lazy imports count
too) is an edge; the graph must have no cycle. Dynamic: ``python -c "import msbnb_pass.<module>"`` for each
module. Also: importing the rules, the replacements or the kernels registers nothing anywhere.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "msbnb_pass"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> list[str]:
    return sorted(
        _module_name(p) for p in PACKAGE.rglob("*.py") if "_rules" not in p.parts and "__pycache__" not in p.parts
    )


def import_graph() -> nx.DiGraph:
    """module -> every package module it imports (relative or absolute, at any depth in the file)."""
    modules = set(package_modules())
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for path in PACKAGE.rglob("*.py"):
        if "_rules" in path.parts or "__pycache__" in path.parts:
            continue
        name = _module_name(path)
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    root = base[: len(base) - (node.level - 1)]
                    module = ".".join(root + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if node.module is None:  # from . import x: the submodules x (the package is being imported)
                    targets.update(f"{module}.{a.name}" for a in node.names)
                else:
                    targets.add(module)
                    targets.update(f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in modules)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            # the package __init__ only loads names lazily (importlib in __getattr__): not an edge
            if target and target != name and target != "msbnb_pass":
                graph.add_edge(name, target)
    return graph


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert graph.number_of_edges() > 20  # the analysis sees the imports
    assert graph.has_edge("msbnb_pass.passes", "msbnb_pass.rules")
    assert graph.has_edge("msbnb_pass.config_rules", "msbnb_pass.rules")
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles}"
    # the layering the design asks for: lower layers never reach the pass or the command line
    for low in ("msbnb_pass.formats", "msbnb_pass.kernels", "msbnb_pass.nn", "msbnb_pass.rules"):
        reach = nx.descendants(graph, low)
        assert not reach & {"msbnb_pass.passes", "msbnb_pass.cli", "msbnb_pass.rewrite"}, (low, reach)
    assert "msbnb_pass.config_rules" not in nx.descendants(graph, "msbnb_pass.rules")


def test_a_cycle_would_be_found(tmp_path):
    graph = import_graph()
    graph.add_edge("msbnb_pass.rules", "msbnb_pass.config_rules")
    assert list(nx.simple_cycles(graph))


@pytest.mark.parametrize("module", package_modules())
def test_every_module_imports_alone_in_a_fresh_interpreter(module):
    env = {**os.environ, "GLOG_v": "3", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_importing_registers_nothing():
    code = (
        "import msbnb_pass.rules as r, msbnb_pass.replacements, msbnb_pass.kernels.ops as o, msbnb_pass.passes\n"
        "d = r._DEFAULTS\n"
        "assert not d.linears and not d.checks and not d.replacements, d\n"
        "assert not o._USER_KERNELS\n"
        "assert type(r.BUILTIN_CHECKS).__name__ == 'mappingproxy' and type(o.KERNELS).__name__ == 'mappingproxy'\n"
        "print('clean')\n"
    )
    env = {**os.environ, "GLOG_v": "3", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "clean", out.stderr[-2000:]
