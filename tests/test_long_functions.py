"""House rule: functions under ~80 lines. A longer function in kn_core or kn_gui says why at its top, in a
comment that starts with `# long:` between its `def` line and its first statement after the docstring (a long
docstring alone does not count). Run this file with `-s` to see the list."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 80
MARKER = re.compile(r"^\s*# long: \S.{9,}")  # a reason of at least ten characters


def long_functions(packages=("kn_core", "kn_gui")) -> list[tuple[str, int, str, int, bool]]:
    """(file, line, name, lines, has its reason) of every function over LIMIT lines, decorators excluded."""
    found = []
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            lines = path.read_text(encoding="utf-8").splitlines()
            for node in ast.walk(ast.parse("\n".join(lines), str(path))):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                length = node.end_lineno - node.lineno + 1
                if length <= LIMIT:
                    continue
                found.append((str(path.relative_to(ROOT)), node.lineno, node.name, length, _has_reason(node, lines)))
    return found


def _has_reason(node, lines: list[str]) -> bool:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # the docstring: the reason may come before or after it
    last = (body[0].lineno - 1) if body else node.end_lineno
    return any(MARKER.match(line) for line in lines[node.lineno - 1:last])


def test_the_marker_is_read_where_it_belongs():
    source = ("def f():\n    # long: the steps read top to bottom\n    '''doc'''\n" + "    x = 1\n" * 90 +
              "def g():\n    '''doc'''\n" + "    x = 1\n" * 90 + "    # long: too late, at the bottom\n")
    tree = ast.parse(source)
    lines = source.splitlines()
    f, g = tree.body
    assert _has_reason(f, lines) and not _has_reason(g, lines)


def test_every_function_over_80_lines_says_why():
    found = long_functions()
    for file, line, name, length, _ in sorted(found, key=lambda f: -f[3]):
        print(f"{length:4d} lines  {file}:{line} {name}")
    missing = [f"{file}:{line} {name} ({length} lines)" for file, line, name, length, ok in found if not ok]
    assert not missing, ("split these, or give the reason in a `# long: ...` comment at the top: "
                         + "; ".join(missing))
