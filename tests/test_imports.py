"""The package structure: every module imports on its own, kn_core has no import cycle, and the engine never
imports Qt (it must run headless and from the CLI)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QT = ("PySide6", "PyQt5", "PyQt6", "shiboken6", "qtpy")


def modules_of(package: str) -> dict[str, Path]:
    """{dotted name: file} for every module of a package (a package is named by its __init__)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_names(name: str, path: Path) -> set[str]:
    """Dotted names of everything `path` imports, anywhere in the file (lazy imports in functions count:
    they close a cycle as soon as that function runs)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return found


def import_graph(package: str) -> dict[str, set[str]]:
    modules = modules_of(package)
    graph = {}
    for name, path in modules.items():
        targets = {m for m in imported_names(name, path) if m in modules and m != name}
        # a module imports its parent packages implicitly; that is no cycle when the parent imports it back
        graph[name] = {m for m in targets if not name.startswith(m + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_relative_and_lazy_imports():
    graph = import_graph("kn_core")
    assert "kn_core.tasks" in graph["kn_core.cli.common"]
    assert "kn_core.reproduce" in graph["kn_core.cli.reproduce"]  # imported inside cmd_reproduce


def test_kn_core_has_no_import_cycle():
    assert find_cycle(import_graph("kn_core")) is None


def test_reproduce_pipeline_does_not_import_the_cli():
    graph = import_graph("kn_core")
    pipeline = [m for m in graph if m == "kn_core.reproduce" or m.startswith("kn_core.reproduce.")]
    assert pipeline and not any(t.startswith("kn_core.cli") for m in pipeline for t in graph[m])


def test_kn_core_never_imports_qt():
    for name, path in modules_of("kn_core").items():
        qt = {m for m in imported_names(name, path) if m.split(".")[0] in QT}
        assert not qt, f"{name} imports {sorted(qt)}"


def test_no_import_error_of_ours_is_swallowed():
    """`try: from .x import y  except ImportError` hides a real bug in x (it once silently dropped whole CLI
    verbs). Guards around a platform's own module (fcntl is POSIX-only) are fine."""
    for package in ("kn_core", "kn_gui"):
        for name, path in modules_of(package).items():
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Try):
                    continue
                ours = [n for stmt in node.body for n in ast.walk(stmt)
                        if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").split(".")[0] in
                                                              ("kn_core", "kn_gui"))
                        or isinstance(n, ast.Import) and any(a.name.split(".")[0] in ("kn_core", "kn_gui")
                                                             for a in n.names)]
                caught = {n.id for h in node.handlers if h.type is not None for n in ast.walk(h.type)
                          if isinstance(n, ast.Name)}
                bare = any(h.type is None for h in node.handlers)
                assert not (ours and (bare or caught & {"ImportError", "ModuleNotFoundError"})), \
                    f"{name}:{node.lineno}"


ISOLATED = r"""
import importlib, json, sys, traceback
ours = ("kn_core", "kn_gui")
failures = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ours]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-3)
    if name.startswith("kn_core") and any(m.split(".")[0] in %r for m in sys.modules):
        failures[name] = "imports Qt"
print(json.dumps(failures))
""" % (QT,)


def test_every_module_imports_in_isolation():
    """Each module imported first, with none of our modules loaded (third-party ones stay cached to keep this
    fast): an import that only works after another module was imported fails here."""
    names = list(modules_of("kn_core")) + list(modules_of("kn_gui"))
    names = [n for n in names if not n.endswith("__main__")]  # running them is their import
    env = dict(os.environ, PYTHONPATH=str(ROOT), QT_QPA_PLATFORM="offscreen")
    done = subprocess.run([sys.executable, "-c", ISOLATED, *names], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{k}:\n{v}" for k, v in failures.items())


@pytest.mark.parametrize("argv", [["--help"], ["edit", "update", "--help"], ["reproduce", "--help"]])
def test_kn_runs_as_a_module(argv):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "kn_core.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0 and "usage: kn" in done.stdout, done.stderr
