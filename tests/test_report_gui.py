"""The app's File -> Export -> Report (kn_core.report, as `kn report`) and File -> Open scores (tiny random models, fast)."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("pytestqt")

from kn_core.attribution import AttributionParams, attribute, encode_answer  # noqa: E402
from kn_core.scores_file import save_scores  # noqa: E402
from test_gui import FRANCE, apply_edit, app, errors, lm, make_window, run_fact, settings, window  # noqa: E402,F401
from test_html_report import _browse, chromium  # noqa: E402,F401
from tiny import TINY_CAUSAL, make_tiny  # noqa: E402


def test_export_report_has_runs_figures_edits_and_provenance(window, qtbot, tmp_path, chromium):  # noqa: F811
    run_fact(qtbot, window, steps=2)
    window.attribution_panel.select_neuron(0, 1)
    apply_edit(qtbot, window, {"kind": "Suppress", "target": ("selection", None), "scope": "answer"})
    folder = tmp_path / "report"
    assert window.files.export_report(str(folder))  # a snapshot now; the worker draws the figures and writes the folder
    assert window.runner.wait_idle(60000)
    path = folder / "report.html"
    page = path.read_text()
    for text in ("Attribution runs", "France \u2192 Paris", "Current run", "Edits in force", "mean(\u0394p)/mean(p)",
                 "reliability", "random neurons", "edit size", "|\u0394p|",
                 window.session.lm.sha256, "parameter: attribution.steps", "File &gt; Export &gt; Report"):
        assert text in page, text
    figures = page.count('src="data:image/png;base64,')
    assert figures >= 2
    dom = _browse(chromium, path, tmp_path)
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == figures and all(w > 100 for w in widths)


def test_export_report_without_runs_says_so_and_a_bad_folder_is_an_error(window, tmp_path):
    folder = tmp_path / "empty"
    assert window.files.export_report(str(folder))
    assert window.runner.wait_idle(30000)
    assert "No attribution run yet." in (folder / "report.html").read_text()
    seen = errors(window)
    (tmp_path / "a_file").write_text("not a folder")
    window.files.export_report(str(tmp_path / "a_file" / "r"))
    assert window.runner.wait_idle(30000)
    assert [t for t, _ in seen] == ["Exporting the report to r failed"]
    assert "a_file is a file" in seen[0][1] and "\n" not in seen[0][1]
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_open_scores_becomes_a_run_and_survives_save_and_reopen(window, qtbot, tmp_path):
    lm = window.session.lm
    prompt, answer = "The capital of Japan is", " Tokyo"
    ids = encode_answer(lm, prompt, answer)
    result = attribute(lm, prompt, AttributionParams(steps=2), answer_ids=ids)
    save_scores(tmp_path / "s.npz", result, AttributionParams(steps=2).to_dict(), prompt, answer,
                model=lm.describe(), answer_ids=ids)
    facts_before = len(window.session.factset.facts)
    assert window.files.open_scores(str(tmp_path / "s.npz"))
    s = window.session
    key = ("scores", prompt, "Tokyo")
    run = s.runs[key]
    assert np.array_equal(run.scores[0].scores, result.scores) and run.complete
    assert run.prompts[0].answer_ids == tuple(ids) and run.scores[0].prob == result.prob
    assert len(s.factset.facts) == facts_before + 1 and window.current_fact == run.fact
    assert window.attribution_panel.run is run
    assert s.refined(run) == [tuple(n) for n in s.refined(run)]  # the sets are computed over it like any run
    assert window.files.open_scores(str(tmp_path / "s.npz"))  # the same file again: already open, nothing doubled
    assert len(s.factset.facts) == facts_before + 1

    assert window.lifecycle.save_to(str(tmp_path / "p.knproj"), wait=True)
    window.lifecycle.open_project(str(tmp_path / "p.knproj"))
    assert window.runner.wait_idle(30000)
    reopened = window.session.runs[key]
    assert np.array_equal(reopened.scores[0].scores, result.scores)


def test_bad_scores_files_are_one_line_errors_and_lose_nothing(window, qtbot, tmp_path):
    run_fact(qtbot, window, steps=1)
    s = window.session
    factset, runs = s.factset, dict(s.runs)
    seen = errors(window)
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    other = make_tiny(TINY_CAUSAL, n_layer=5)
    result = attribute(other, "The capital of Japan is", AttributionParams(steps=1),
                       answer_ids=encode_answer(other, "The capital of Japan is", " Tokyo"))
    save_scores(tmp_path / "other.npz", result, {}, "The capital of Japan is", " Tokyo", model=other.describe())
    for name in ("junk.npz", "missing.npz", "other.npz"):
        assert not window.files.open_scores(str(tmp_path / name))
    assert [t for t, _ in seen] == ["Could not open the scores"] * 3
    assert all("\n" not in m and name in m for (_, m), name in zip(seen, ("junk.npz", "missing.npz", "other.npz")))
    assert "5 layers" in seen[2][1] and "load the model" in seen[2][1]
    assert s.factset is factset and s.runs == runs


def test_open_scores_without_a_model_and_the_menus(app, qtbot, settings, tmp_path):  # noqa: F811
    window = make_window(qtbot, settings)
    other = make_tiny(TINY_CAUSAL)
    ids = encode_answer(other, "The capital of Italy is", " Rome")
    result = attribute(other, "The capital of Italy is", AttributionParams(steps=1), answer_ids=ids)
    save_scores(tmp_path / "it.npz", result, {"steps": 1}, "The capital of Italy is", " Rome",
                model=other.describe(), answer_ids=ids)
    assert window.files.open_scores(str(tmp_path / "it.npz"))
    run = window.session.runs[("scores", "The capital of Italy is", "Rome")]
    assert run.model["sha256"] == other.sha256 and window.attribution_panel.run is run
    window.undo()  # the fact goes with its undo entry; the run stays in the session until the project drops it
    assert ("scores", "The capital of Italy is", "Rome") not in {(f.relation, f.subject, f.object)
                                                                 for f in window.session.factset.facts}
    assert window.files.open_scores(str(tmp_path / "it.npz"))  # opened again after the undo: the fact is back
    assert window.session.factset.facts[-1] == run.fact and window.current_fact == run.fact
    file_menu = window.menuBar().actions()[0].menu()
    texts = [a.text() for a in file_menu.actions()]
    assert "Open s&cores\u2026" in texts
    export = next(a.menu() for a in file_menu.actions() if a.menu() is not None and a.text() == "&Export")
    assert export.actions()[0].text() == "Export report (HTML)\u2026"
    window.lifecycle.auto_discard = True
    window.close()
