"""The packages' layers point one way, read from the source: every import counts, lazy ones inside functions too."""

from __future__ import annotations

import ast
import os
from pathlib import Path

from infra.state import STATE_DIR_ENV, state_dir

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "flows", "server", "clients", "privacy", "infra")


def _imported_packages(path: Path) -> set[str]:
    """Return the project packages (and ``tests``) that the module at ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & {*PACKAGES, "tests"}
    return found


def _imported_modules(path: Path) -> set[str]:
    """Return the project modules that the module at ``path`` imports anywhere (``from pkg import mod`` included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    modules = {_module(p) for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    return {name for name in found if name in modules} - {_module(path)}


def _module(path: Path) -> str:
    """Return the dotted module name of a project file (a package's __init__ is the package)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_itself_through_others():
    graph = {_module(path): _imported_modules(path) for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        for imported in sorted(graph.get(module, ())):
            if imported in trail:
                cycles.append(trail[trail.index(imported):] + [imported])
            elif imported not in done:
                visit(imported, [*trail, imported])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])

    assert cycles == []


def test_infra_is_a_leaf_that_imports_no_other_project_package():
    upward = {str(path.relative_to(ROOT)): sorted(_imported_packages(path) - {"infra"})
              for path in sorted((ROOT / "infra").rglob("*.py"))}

    assert {path: packages for path, packages in upward.items() if packages} == {}


def test_only_the_cli_imports_the_cli():
    importers = [str(path.relative_to(ROOT)) for package in PACKAGES if package != "cli"
                 for path in sorted((ROOT / package).rglob("*.py")) if "cli" in _imported_packages(path)]

    assert importers == []


def test_no_production_module_imports_the_tests():
    # test-only hooks, such as the fault injector tests/faults_mod.py, reach a node as client mods the tests install
    importers = [str(path.relative_to(ROOT)) for package in PACKAGES
                 for path in sorted((ROOT / package).rglob("*.py")) if "tests" in _imported_packages(path)]

    assert importers == []


def test_one_module_reads_the_state_directory_variable():
    naming = [str(path.relative_to(ROOT)) for package in (*PACKAGES, "benchmarks")
              for path in sorted((ROOT / package).rglob("*.py"))
              if any(isinstance(node, ast.Constant) and node.value == STATE_DIR_ENV
                     for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))))]

    assert naming == ["infra/state.py"]


def test_state_dir_prefers_the_flag_then_the_environment_then_the_default(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(STATE_DIR_ENV, raising=False)
    assert state_dir() == tmp_path / ".fedcompare"

    monkeypatch.setenv(STATE_DIR_ENV, "from-env")
    assert state_dir() == tmp_path / "from-env"
    assert state_dir("") == tmp_path / "from-env", "an empty flag is no flag"
    assert state_dir(os.path.join("a", "flag")) == tmp_path / "a" / "flag"
