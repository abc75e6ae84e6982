"""The app on a tiny mixture-of-experts model: the map shows expert boundaries, the hover line and the inspector
name the expert and how many of the fact's prompts route their answer to it."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

from test_gui import FRANCE, app, make_window, run_fact, settings  # noqa: E402,F401 (fixtures)
from tiny import make_tiny  # noqa: E402


def test_map_and_inspector_name_the_expert(app, qtbot, settings):  # noqa: F811
    lm = make_tiny("qwen2_moe")  # layer 0 dense (72 neurons), layers 1-2: 4 experts x 24 + a shared 48
    window = make_window(qtbot, settings, lm)
    try:
        run = run_fact(qtbot, window, FRANCE, steps=2)
        heat = window.attribution_panel.heat_widget
        assert heat.experts is lm.layout.experts
        shared = lm.layout.experts[2][-1]
        assert heat.plot.getAxis("bottom").labelText.startswith("neuron (experts")
        # each MoE layer's boundaries (one curve), 5 expert labels, the dense layer's padding greyed out
        assert len(heat._expert_items) == 1 + 5 + 1
        text = window.attribution_panel.describe_neuron(2, shared.offset + 2)
        assert text.startswith(f"layer 2, expert {shared.expert} (shared), neuron 2 (index {shared.offset + 2})")
        routed = lm.layout.experts[1][1]
        window.neurons_panel.run = run
        window.editing.inspect_neuron(1, routed.offset + 5)
        qtbot.waitUntil(lambda: "expert 1" in window.neurons_panel.inspect_title.text(), timeout=20000)
        title = window.neurons_panel.inspect_title.text()
        reached = sum(bool(s.activations[1, routed.offset:routed.offset + routed.size].any()) for s in run.scores)
        assert f"neuron 5 (index {routed.offset + 5})" in title
        assert f"{reached}/{len(run.scores)} of the fact's prompts route their answer to it" in title
        assert window.runner.wait_idle(30000)
    finally:
        window.lifecycle.auto_discard = True
        window.close()
