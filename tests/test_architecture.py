"""The architecture is checked, not just written: the import contracts in pyproject.toml hold (import-linter), a
planted wrong-way import or cycle breaks them, schedules/ imports only kernels and core, every part says what it
may import, and no module outside kernels/ grows past ~400 lines."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wq_compile"
PARTS = ("core", "kernels", "compiler", "tuning", "runtime", "integrations", "tools")
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def _lint(cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*LINT, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    proc = _lint()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("where,planted,broken", [
    ("core/windows.py", "from ..runtime import backend  # planted: the method reaching up into the runtime",
     "wq_compile.core is not allowed to import wq_compile.runtime"),
    ("runtime/library.py", "from ..tuning import tune  # planted: the runtime reaching into its sibling",
     "wq_compile.runtime is not allowed to import wq_compile.tuning"),
    ("core/quant.py", "from .windows import Windows  # planted: windows imports quant, a cycle", "cycle"),
])
def test_a_planted_violation_breaks_the_contracts(tmp_path, where, planted, broken):
    """The same check on a copy of the package with one bad import added must fail and name it."""
    shutil.copytree(PACKAGE, tmp_path / "wq_compile", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "wq_compile" / where
    target.write_text(target.read_text() + "\n" + planted + "\n")
    proc = _lint(tmp_path, {**os.environ, "PYTHONPATH": str(tmp_path)})  # the copy shadows the installed package
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert broken in out.lower() if broken == "cycle" else broken in out, out


def _imports(path: Path) -> set[str]:
    """Every wq_compile module a file imports, function-level imports included (resolved against its package)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level == 1:  # a sibling schedule module
            found.add(f"wq_compile.schedules.{node.module or ''}")
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}: schedules/ is installed as wq_compile.schedules: no imports above it")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("wq_compile")}


def test_schedules_import_only_kernels_and_core():
    """schedules/ sits with the kernels (it imports them); it is handed specs and never reads the host or a log."""
    allowed = ("wq_compile.kernels", "wq_compile.core", "wq_compile.schedules")
    for path in sorted((ROOT / "schedules").glob("*.py")):
        bad = sorted(m for m in _imports(path) if not m.startswith(allowed))
        assert not bad, f"{path.name} imports {bad}; schedules may import only {allowed}"


def test_every_part_says_what_it_may_import():
    for part in PARTS:
        doc = ast.get_docstring(ast.parse((PACKAGE / part / "__init__.py").read_text())) or ""
        assert "May import" in doc or "may import" in doc, f"wq_compile/{part}/__init__.py: no import rule in its docstring"


def test_no_module_outside_kernels_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if "kernels" not in p.relative_to(PACKAGE).parts[:1] and (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these by concept: {long}"


def test_the_package_lists_its_parts():
    parts = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.is_symlink() and (p / "__init__.py").exists()}
    assert parts == set(PARTS)  # (a symlink to schedules/ in a developer's worktree is not a part)
    # beside the parts: the public names, and the stable command name of the GPU visit
    assert {p.name for p in PACKAGE.glob("*.py")} == {"__init__.py", "gpu_visit.py"}


def test_every_import_inside_the_package_resolves():
    """Function-level imports run only when called: a moved module must not leave one pointing nowhere."""
    import importlib.util

    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        package = list(rel.parts[:-1])  # a module's package, or the package itself for __init__
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("wq_compile") and importlib.util.find_spec(target) is None:
                missing.append(f"{rel}:{node.lineno}: {target}")
    assert not missing, missing


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_anywhere_root_package_included():
    """import-linter checks siblings; this walks every module (the root package's lazy names, function-level and
    type-only imports included) and fails on any cycle, naming its modules."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    deps: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    if target in modules and target != name:
                        found.add(target)
        deps[name] = found
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in deps[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(deps):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
