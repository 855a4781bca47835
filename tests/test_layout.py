"""The package layout keeps its arrows: no import cycles, no cross-module private names, the
demo outside the library, a short top level. Read from the sources with `ast`, so a lazy
import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Source folder -> the package name it is installed as.
PACKAGES = {"qcompile": "qcompile", "passes": "qcompile.passes", "backends": "qcompile.backends"}


def _modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import of qcompile in `path`, wherever it sits."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("qcompile")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qcompile"):
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def _edges(name: str) -> set[str]:
    """The qcompile modules that importing `name` runs (a package's __init__ included)."""
    targets = set()
    for module, names in _imports(MODULES[name]):
        for imported in names or [None]:
            full = f"{module}.{imported}" if imported else module
            target = full if full in MODULES else module
            targets.add(target)
            parent = target.rpartition(".")[0]
            while parent:  # importing a.b.c runs a/__init__ and a/b/__init__ first
                targets.add(parent)
                parent = parent.rpartition(".")[0]
    targets.discard(name)
    return {t for t in targets if t in MODULES and not name.startswith(t + ".")}


def test_no_import_cycle_between_modules():
    graph = {name: _edges(name) for name in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{name} imports {module}.{imported}"
        for name, path in MODULES.items()
        for module, names in _imports(path)
        for imported in names
        if imported.startswith("_") and not imported.endswith("__") and module != name
    ]
    assert not private, "\n".join(private)


def test_the_library_never_imports_the_demo():
    users = [
        name for name, path in MODULES.items()
        if not name.startswith("qcompile.demo") and name != "qcompile.cli"
        and any(m.startswith("qcompile.demo") or "qcompile.demo" in [f"{m}.{n}" for n in names]
                for m, names in _imports(path))
    ]
    assert not users, f"library modules that import qcompile.demo: {users}"


def test_the_top_level_holds_at_most_twelve_modules():
    top = sorted(p.name for p in (ROOT / "qcompile").glob("*.py"))
    assert len(top) <= 12, top


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path, monkeypatch):
    """The checks above can fail: a planted cycle and a planted private import are found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from qcompile.fake_b import _secret\n")
    b.write_text("import qcompile.fake_a\n")
    monkeypatch.setitem(MODULES, "qcompile.fake_a", a)
    monkeypatch.setitem(MODULES, "qcompile.fake_b", b)
    try:
        test_no_import_cycle_between_modules()
    except AssertionError as error:
        assert "qcompile.fake_a" in str(error) and "qcompile.fake_b" in str(error)
    else:
        raise AssertionError("the planted cycle was not found")
    try:
        test_no_module_imports_another_modules_private_names()
    except AssertionError as error:
        assert "qcompile.fake_b._secret" in str(error)
    else:
        raise AssertionError("the planted private import was not found")


def test_every_package_is_installed_by_pyproject():
    """A non-editable install ships each subpackage only when pyproject lists it."""
    import pytest

    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert packages == listed, f"missing: {sorted(packages - listed)}, stale: {sorted(listed - packages)}"
