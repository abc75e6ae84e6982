"""One source for parameter bounds and defaults: `validation.RANGES` is what the CLI's checks accept."""

import argparse
import ast
from pathlib import Path

import pytest

from kn_core import validation as v
from kn_core.cli.checks import CHECKS


@pytest.mark.parametrize("dest", sorted(v.RANGES))
def test_cli_check_accepts_exactly_the_range(dest):
    allowed = v.RANGES[dest]
    check = CHECKS[dest]
    args = argparse.Namespace(force=False)
    integral = isinstance(allowed.minimum, int)
    step = 1 if integral else 1e-9
    check(allowed.minimum, args)
    with pytest.raises(v.ValidationError):
        check(allowed.minimum - step, args)
    if allowed.maximum is None:
        check(10 ** 6 if integral else 1e6, args)
    else:
        check(allowed.maximum, args)
        with pytest.raises(v.ValidationError):
            check(allowed.maximum + step, args)


def test_widget_maximum_is_the_range_or_the_cap():
    assert v.STEPS_RANGE.widget_maximum(200) == v.MAX_STEPS
    assert v.HOLD_OUT_RANGE.widget_maximum(20) == 20


def _literal_t_p_defaults(path) -> list[str]:
    """Places where a t or p default is written as a number instead of read from `kn_core.selection`: function
    parameters, dataclass fields and argparse `--t`/`--p` options."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
            defaults += node.args.kw_defaults
            found += [f"{path.name}:{node.lineno} {a.arg}" for a, d in zip(args, defaults)
                      if a.arg in ("t", "p") and isinstance(d, ast.Constant) and isinstance(d.value, float)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in ("t", "p"):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, float):
                found.append(f"{path.name}:{node.lineno} {node.target.id}")
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args
              and isinstance(node.args[0], ast.Constant) and node.args[0].value in ("--t", "--p")):
            found += [f"{path.name}:{node.lineno} {node.args[0].value}" for k in node.keywords
                      if k.arg == "default" and isinstance(k.value, ast.Constant) and isinstance(k.value.value, float)]
    return found


def test_t_and_p_defaults_come_from_selection():
    from kn_core.selection import DEFAULT_P, DEFAULT_T, NeuronSelection

    assert (NeuronSelection().t, NeuronSelection().p) == (DEFAULT_T, DEFAULT_P) == (0.2, 0.7)  # the paper's
    root = Path(__file__).resolve().parents[1]
    literal = [place for package in ("kn_core", "kn_gui") for path in sorted((root / package).rglob("*.py"))
               for place in _literal_t_p_defaults(path)]
    assert literal == [], "read DEFAULT_T / DEFAULT_P from kn_core.selection instead"


def test_the_app_offers_the_engine_s_steps_and_defaults(qtbot):
    from kn_core.facts import FactSet
    from kn_core.selection import DEFAULT_P, DEFAULT_T
    from kn_gui.panels.attribution_panel import AttributionPanel
    from kn_gui.session import Session

    panel = AttributionPanel(Session(FactSet("empty", {}, [])))
    qtbot.addWidget(panel)
    assert (panel.steps.minimum(), panel.steps.maximum()) == (v.STEPS_RANGE.minimum, v.STEPS_RANGE.maximum)
    assert (panel.t_control.value(), panel.p_control.value()) == (DEFAULT_T, DEFAULT_P)
