"""The app's "Causal trace" tab: the Trace button runs kn_core.tracing as a worker job on the current fact's first
prompt, the heat map shows exactly the engine's numbers with the subject marked, and the figure exports."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pytestqt")

from kn_core.tracing import TraceParams, embedding_std, trace  # noqa: E402
from test_gui import FRANCE, app, geo_factset, lm, make_window, settings  # noqa: E402,F401


def test_trace_tab_runs_a_job_and_shows_the_engines_numbers(app, qtbot, settings, lm, tmp_path):  # noqa: F811
    window = make_window(qtbot, settings, lm)
    panel = window.trace_panel
    assert window.attribution_panel.tabs.indexOf(panel) >= 0
    window.facts_panel.select_fact(FRANCE)
    panel.samples.setValue(2)
    panel.trace_button.click()
    qtbot.waitUntil(lambda: panel.result is not None, timeout=60000)
    assert window.runner.wait_idle(30000)
    result = panel.result
    prompt = window.session.prompts_for(FRANCE)[0][0]
    subjects = [f.subject for f in geo_factset().facts]
    expect = trace(lm, prompt.text, "France", prompt.answer_ids, TraceParams(samples=2),
                   noise_scale=embedding_std(lm, subjects))
    for kind in ("residual", "mlp", "attn"):
        assert np.array_equal(result.restored[kind], expect.restored[kind])
    shown = panel.image.image
    assert np.allclose(shown, result.restored["mlp"].astype(np.float32))  # the MLP kind is shown first
    start, end = result.subject_span
    assert [label.endswith("*") for label in panel.token_axis.labels] == [start <= i < end
                                                                          for i in range(len(result.tokens))]
    assert "France" in panel.summary.text() and "P(clean)" in panel.summary.text()
    panel.kind.setCurrentIndex(0)
    assert np.allclose(panel.image.image, result.restored["residual"].astype(np.float32))
    path = panel.export(tmp_path / "trace.svg")
    assert path.stat().st_size > 1000
    window.close()


def test_trace_needs_a_fact(app, qtbot, settings, lm):  # noqa: F811
    window = make_window(qtbot, settings, lm)
    window.current_fact = None
    assert window.trace.start(window.trace_panel.params()) is False
    assert "pick a fact" in window.statusBar().currentMessage()
    window.close()
