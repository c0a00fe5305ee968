"""The package is the pipeline: imports flow one way between stages, and no file grows past 400 lines.

Stages, lowest first: ``errors``/``plan``/``split`` (shared vocabulary) -> ``capture`` -> ``planner`` -> ``runtime`` ->
``api`` (the entry points) -> ``io`` -> ``tools``. A module may import its own stage and those below it,
never one above; the library (everything but ``tools``) never imports ``tools``. Every import counts,
lazy ones inside functions included.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "autotp"
STAGES = {"errors": 0, "plan": 0, "split": 0, "capture": 1, "planner": 2, "runtime": 3, "api": 4, "pieces": 4, "io": 5, "__init__": 5,
          "tools": 6, "__main__": 6}
MAX_LINES = 400


def _stage(module: str) -> int:
    """Stage of a dotted module under autotp (``autotp.planner.rules.shapes`` -> planner)."""
    parts = module.split(".")
    assert parts[0] == "autotp", module
    if len(parts) == 1:
        return STAGES["__init__"]
    if parts[1] not in STAGES:
        raise AssertionError(f"autotp.{parts[1]} belongs to no stage: add it to STAGES in {__file__}")
    return STAGES[parts[1]]


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every autotp import in ``path``."""
    me = _module_of(path)
    return _imports_in(path.read_text(), me if path.name == "__init__.py" else me.rpartition(".")[0])


def _source(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a ``from ... import`` reads from (relative imports resolved against ``package``)."""
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports_in(source: str, package: str) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "autotp"]
        elif isinstance(node, ast.ImportFrom):
            mod = _source(node, package)
            if mod.split(".")[0] != "autotp":
                continue
            if mod == "autotp" or not node.module:  # from autotp import api / from . import layers
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return out


FILES = sorted(ROOT.rglob("*.py"))


def test_every_file_belongs_to_a_stage():
    for f in FILES:
        _stage(_module_of(f))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_imports_flow_one_way(path: Path):
    me = _module_of(path)
    mine = _stage(me)
    bad = []
    for line, mod in _imports(path):
        try:
            theirs = _stage(mod)
        except AssertionError:  # from autotp import make_plan: a name of the package itself
            theirs = STAGES["__init__"]
        if theirs > mine:
            bad.append(f"{path.name}:{line} imports {mod} (stage {theirs}) from stage {mine}")
    assert not bad, "imports against the pipeline's direction:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_files_stay_small(path: Path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT.parent)} has {n} lines (at most {MAX_LINES}): split it"


def test_the_contract_reads_every_form_of_import():
    """The checker itself: absolute, relative and lazy imports of a planner module are all seen."""
    src = "from autotp.runtime import layers\nfrom ..io import load\ndef f():\n    from .rules import shapes\n"
    assert sorted(m for _, m in _imports_in(src, "autotp.planner")) == \
        ["autotp.io", "autotp.planner.rules", "autotp.runtime"]
    assert _stage("autotp.runtime.layers") > _stage("autotp.planner.groups")


def _module_files() -> dict[str, Path]:
    return {_module_of(f): f for f in FILES}


def _targets(mod: str, modules: dict[str, Path]) -> set[str]:
    """The autotp modules ``mod`` imports, resolved to files (``from autotp.runtime import layers`` -> layers)."""
    path = modules[mod]
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            src = _source(node, package)
            for a in node.names:
                full = f"{src}.{a.name}"
                out.add(full if full in modules else src)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m in modules and m != mod and m != "autotp"}


def test_no_import_cycles():
    """Not even through imports inside functions: a cycle means two modules are one stage's halves."""
    modules = _module_files()
    graph = {m: _targets(m, modules) for m in modules}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
