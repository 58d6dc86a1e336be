"""The node's layers hold: imports run downward only, and no two of its packages import each other.

The layers are declared once, in pyproject.toml ([tool.importlinter]); import-linter checks them. The
cycle check here reads the import graph itself (grimp) so that a failure names the module imports
that close each cycle.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import tomllib

import grimp
import pytest
from helpers import REPO

#: Upward imports the contract may ignore, at most (each needs its reason, in a comment on its line).
MAX_UPWARD_IMPORTS = 3


def _package(module: str) -> str:
    """``node.receive.ingest`` -> ``node.receive``; a module directly in node is its own package."""
    return ".".join(module.split(".")[:2])


def test_layers_contract_is_kept() -> None:
    """lint-imports with the contracts in pyproject.toml: its report names each import that breaks a layer."""
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[test]'")
    done = subprocess.run(
        [lint, "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"Contracts: [1-9]\d* kept, 0 broken", done.stdout), done.stdout


def test_upward_imports_are_few_and_each_has_its_reason() -> None:
    text = (REPO / "pyproject.toml").read_text()
    contracts = tomllib.loads(text)["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")
    ignored = layers.get("ignore_imports", [])
    assert len(ignored) <= MAX_UPWARD_IMPORTS, f"{len(ignored)} upward imports are ignored: {ignored}"
    for entry in ignored:
        line = next((line for line in text.splitlines() if f'"{entry}"' in line), "")
        assert "#" in line.partition(f'"{entry}"')[2], f"ignored import {entry!r} needs its reason in a comment"


def package_cycles(graph: grimp.ImportGraph) -> list[str]:
    """Each pair of node's packages that import each other, with the imports that close the cycle."""
    packages = sorted({_package(m) for m in graph.modules} - {"node"})
    report = []
    for a, b in itertools.combinations(packages, 2):
        there = graph.find_shortest_chain(importer=a, imported=b, as_packages=True)
        back = graph.find_shortest_chain(importer=b, imported=a, as_packages=True)
        if there and back:
            report.append(f"{a} <-> {b}: " + "; ".join(_chain(graph, chain) for chain in (there, back)))
    return report


def _chain(graph: grimp.ImportGraph, chain: tuple[str, ...]) -> str:
    """``node.a.x -> node.b.y (l.12) -> ...``: each import of the chain with the line that makes it."""
    out = chain[0]
    for importer, imported in itertools.pairwise(chain):
        lines = [d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported)]
        out += f" -> {imported}" + (f" (l.{min(lines)})" if lines else "")
    return out


def test_no_two_packages_of_node_import_each_other() -> None:
    cycles = package_cycles(grimp.build_graph("node", cache_dir=None))
    assert not cycles, "packages of node that import each other:\n" + "\n".join(cycles)


def test_a_cycle_is_reported_with_the_imports_that_make_it() -> None:
    """The check itself: an import from the bottom (config) up to the command line closes cycles, named by it."""
    graph = grimp.build_graph("node", cache_dir=None)
    graph.add_import(importer="node.config", imported="node.cli", line_number=7, line_contents="import node.cli")
    cycles = package_cycles(graph)
    assert any(c.startswith("node.cli <-> node.config: ") and "node.config -> node.cli (l.7)" in c for c in cycles), (
        cycles
    )
