"""The package layout the README and docs/ARCHITECTURE.md describe: few top-level modules, every sub-package
listed in pyproject.toml (so a non-editable install carries it), and imports that go one way (no cycle)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "nanopeft"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every nanopeft module `path` imports, at the top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import x` names a module; `from .x import y` names x
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nanopeft"):
            found.add(node.module)
    return {m for m in found if m in modules and m != name}


def test_few_top_level_modules_and_every_package_listed_in_pyproject():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 16, top
    packages = {module_name(p.parent / "__init__.py") for p in PKG.rglob("__init__.py")}
    listed = set(re.findall(r'"(nanopeft(?:\.\w+)*)"', (ROOT / "pyproject.toml").read_text().split("packages =")[1]
                            .split("]")[0]))
    assert packages == listed, (packages ^ listed)


def test_imports_go_one_way():
    files = list(PKG.rglob("*.py"))
    modules = {module_name(p) for p in files}
    graph = {module_name(p): imports_of(p, modules) for p in files}
    assert "nanopeft.methods.lora" in graph["nanopeft.methods.dora"]  # the walk sees relative imports
    assert "nanopeft.kernels.nf4_cuda" in graph["nanopeft.nf4_linear"]   # and `from .kernels import nf4_cuda`
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: tuple[str, ...]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, "import cycle: " + " → ".join(path + (m,))
        state[m] = 1
        for d in graph[m] - {"nanopeft"}:  # the package's __init__ re-exports; nothing imports it back
            visit(d, path + (m,))
        state[m] = 2

    for m in graph:
        if m != "nanopeft":
            visit(m, ())
    # sub-package __init__ files only describe their package
    for p in PKG.rglob("__init__.py"):
        if p.parent != PKG:
            assert not imports_of(p, modules), p
