"""One report for both front ends: the app's File > Export > Report and `kn report` on the project the app saved
write the same report.json (all but the provenance: when and by what). A project made in the test: a tiny
model, a run, an automatic and a hand-made neuron set, a measured edit."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("pytestqt")

from kn_core.cli import main  # noqa: E402
from kn_gui.session import NeuronSet  # noqa: E402
from test_gui import apply_edit, app, lm, run_fact, settings, window  # noqa: E402,F401


def _without_provenance(path):
    data = json.loads(path.read_text())
    return data, {k: v for k, v in data.items() if k != "provenance"}


def test_app_export_and_kn_report_write_the_same_report(window, qtbot, tmp_path, capsys):  # noqa: F811
    run_fact(qtbot, window, steps=2)
    window.neurons_panel.add_set(NeuronSet("mine", "user", [(0, 1), (2, 3)], "picked by hand"))
    window.attribution_panel.select_neuron(0, 1)
    apply_edit(qtbot, window, {"kind": "Suppress", "target": ("selection", None), "scope": "answer"})
    assert window.runner.wait_idle(60000)
    project = str(tmp_path / "p.knproj")
    assert window.lifecycle.save_to(project, wait=True)
    assert window.files.export_report(str(tmp_path / "app"))
    assert window.runner.wait_idle(60000)
    assert main(["report", project, "--out", str(tmp_path / "cli")]) == 0
    app_data, app_report = _without_provenance(tmp_path / "app" / "report.json")
    cli_data, cli_report = _without_provenance(tmp_path / "cli" / "report.json")
    assert app_report == cli_report
    assert app_data["provenance"]["command"].startswith("Knowledge Neuron Studio")
    assert cli_data["provenance"]["command"].startswith("kn report")
    assert {"refined: France \u2192 Paris", "mine"} <= {s["name"] for s in app_report["neuron_sets"]}
    assert app_report["edits"]["in_force"] == 1 and app_report["edits"]["entries"][0]["measurement"]["metrics"]
    assert (tmp_path / "app" / "report.md").read_text() == (tmp_path / "cli" / "report.md").read_text()
