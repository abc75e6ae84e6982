"""Each result goes to the project it was computed for, and a project's flags come back with it (issue 24)."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

from kn_gui.worker import JobRunner  # noqa: E402
from test_gui import FRANCE, app, make_window, run_fact, settings  # noqa: E402,F401 (fixtures)
from test_gui_flags import MASSIVE, planted, window  # noqa: E402,F401 (fixtures)


def test_a_job_submitted_from_a_callback_gets_its_own_result(app, qtbot):
    """A job queued behind another, while a callback submits a third: every callback gets its own job's result
    (the runner once started the queued job over the one the callback had started and swapped their results)."""
    runner = JobRunner()
    got = []
    runner.submit("first", lambda task: "first result",
                  on_done=lambda r: (got.append(("first", r)),
                                     runner.submit("from callback", lambda task: "callback result",
                                                   on_done=lambda r: got.append(("from callback", r)))))
    runner.submit("queued", lambda task: "queued result", on_done=lambda r: got.append(("queued", r)))
    assert runner.wait_idle(10000)
    assert sorted(got) == [("first", "first result"), ("from callback", "callback result"),
                           ("queued", "queued result")]
    runner.shutdown()


def test_result_for_a_closed_project_is_dropped_and_said(app, qtbot):
    runner = JobRunner()
    project = [1]
    runner.project_token = lambda: project[0]
    got, ended = [], []
    runner.job_ended.connect(lambda name, outcome, message: ended.append((name, outcome)))
    runner.submit("slow", lambda task: project.__setitem__(0, 2) or "result of project 1", on_done=got.append)
    assert runner.wait_idle(10000)
    assert got == [] and ended == [("slow", "dropped")]
    runner.submit("loader", lambda task: "model", on_done=got.append, project_bound=False)
    assert runner.wait_idle(10000) and got == ["model"]
    runner.shutdown()


def test_switching_project_while_its_flags_job_runs(window, qtbot, tmp_path, capfd):
    """Open A, and while its activation-statistics job runs open B: no traceback, and B's flags are B's."""
    run_fact(qtbot, window)
    a = str(tmp_path / "a.knproj")
    assert window.lifecycle.save_to(a, wait=True)
    window.lifecycle.new_project()
    b = str(tmp_path / "b.knproj")  # no runs: no flags describe it; no answer checks
    window.session.checks.clear()
    assert window.lifecycle.save_to(b, wait=True)
    window.session.saved_flags = None
    opened, statuses = [], []

    def open_b_while_a_is_measured(path):
        opened.append(path)
        if path == a:
            window.session.saved_flags = None  # measured again: a job runs for A now
            window.attributions.flags_for_model()
            assert window.runner.busy
            window.lifecycle.open_project(b)
            assert window.attribution.check([FRANCE])  # queued behind B's opening: its answers are A's

    window.project_opened.connect(open_b_while_a_is_measured)
    window.statusBar().messageChanged.connect(statuses.append)
    capfd.readouterr()
    window.lifecycle.open_project(a)
    qtbot.waitUntil(lambda: len(opened) == 2, timeout=30000)
    assert window.runner.wait_idle(30000)
    assert "Traceback" not in capfd.readouterr().err
    s = window.session
    assert window.project_path == b and not s.runs
    assert all(template in s.factset.relations[key[0]].templates for key, template in s.checks)  # none of A's
    assert window.session.flags is None and window.attribution_panel.flags is None
    assert any("no longer open" in m for m in statuses), statuses


def test_flags_come_back_with_the_project_at_once(window, qtbot, tmp_path):
    run_fact(qtbot, window)
    flags = window.session.flags
    assert MASSIVE in flags.massive
    path = str(tmp_path / "p.knproj")
    assert window.lifecycle.save_to(path, wait=True)
    window.lifecycle.new_project()
    seen = []
    window.project_opened.connect(lambda _: seen.append((window.session.flags, window.runner.busy)))
    with qtbot.waitSignal(window.project_opened, timeout=30000):
        window.lifecycle.open_project(path)
    restored, busy = seen[0]
    assert restored is not None and restored.massive == flags.massive and restored.unspecific == flags.unspecific
    assert not busy  # nothing to measure: the saved flags describe these weights and these runs
    assert window.attribution_panel.flags is restored
    assert MASSIVE not in window.session.refined(window.session.runs[("P36", "France", "Paris")])
    stats = window.session.activation_stats
    assert stats is not None and stats.mean.shape == flags_shape(window)


def flags_shape(window):
    layout = window.session.lm.layout
    return (layout.layers, layout.neurons)


def test_saved_flags_of_other_weights_are_measured_again(window, qtbot, tmp_path):
    from tiny import TINY_CAUSAL, make_tiny

    run_fact(qtbot, window)
    path = str(tmp_path / "p.knproj")
    assert window.lifecycle.save_to(path, wait=True)
    window.set_model(make_tiny(TINY_CAUSAL, seed=3))
    assert window.runner.wait_idle(30000)
    with qtbot.waitSignal(window.project_opened, timeout=30000):
        window.lifecycle.open_project(path)
    assert window.session.flags is None  # the saved flags describe other weights
    assert window.runner.wait_idle(30000)
