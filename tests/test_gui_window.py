"""Issue 12, "a window a researcher would work in all day": the default layout at 1600x1000 and 1280x800, and a
toolbar that never hides Cancel (tiny random models, fast)."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import QCoreApplication  # noqa: E402

from test_gui import FRANCE, apply_edit, app, lm, make_window, run_fact, settings, window  # noqa: E402,F401
from tiny import TINY_CAUSAL, make_tiny  # noqa: E402


def shown_height(widget) -> int:
    """Pixels of `widget`'s height on screen: its rectangle clipped by every parent (scroll areas, docks)."""
    if not widget.isVisible():
        return 0
    rect = widget.rect()
    while widget.parentWidget() is not None:
        rect = rect.translated(widget.pos()).intersected(widget.parentWidget().rect())
        widget = widget.parentWidget()
    return max(0, rect.height())


def rows_shown(table) -> float:
    """How many rows of `table` are on screen."""
    return min(table.viewport().height(), shown_height(table)) / max(1, table.verticalHeader().defaultSectionSize())


@pytest.mark.parametrize("size", [(1600, 1000), (1280, 800)])
def test_default_layout_shows_every_panel(app, qtbot, settings, size):
    window = make_window(qtbot, settings, make_tiny(TINY_CAUSAL, n_layer=30))
    window.resize(*size)
    window.docks.default_dock_sizes()
    run_fact(qtbot, window, steps=1)
    window.attribution_panel.select_neuron(3, 5)
    QCoreApplication.processEvents()
    assert (window.width(), window.height()) == size  # no panel's minimum pushes the window past the screen
    ap, np_ = window.attribution_panel, window.neurons_panel
    assert shown_height(ap) >= 400  # the plots, not a strip
    assert shown_height(ap.heat_widget) >= (200 if size[1] >= 1000 else 100)  # the rest scrolls into view
    ap.tabs.setCurrentIndex(1)
    QCoreApplication.processEvents()
    assert shown_height(ap.prompt_widget) >= 100  # the per-prompt plot
    window.neurons_dock.raise_()
    QCoreApplication.processEvents()
    assert rows_shown(np_.contents) >= 3 and rows_shown(np_.promoted) >= 3  # neuron table and inspector
    assert shown_height(window.edits_panel) >= 200
    assert shown_height(window.edits_panel.apply_button) > 0
    window.close()


def test_toolbar_has_icons_short_labels_and_always_shows_cancel(window, qtbot):
    run_fact(qtbot, window, steps=2)
    window.attribution_panel.select_neuron(0, 1)
    apply_edit(qtbot, window, {"kind": "Suppress", "target": ("selection", None), "scope": "answer"})
    undo = window.menus.act_undo
    assert undo.text().startswith("&Undo Suppress") and undo.iconText() == "Undo"
    assert "Suppress" in undo.toolTip()
    window.resize(1024, 768)
    QCoreApplication.processEvents()
    tb = window.menus.toolbar
    for action in tb.actions():
        if not action.isSeparator():
            assert not action.icon().isNull(), action.text()
            assert tb.widgetForAction(action).isVisible(), f"{action.iconText()} is hidden in the overflow"
    assert tb.widgetForAction(window.menus.act_cancel).text() == "Cancel"


def test_toolbar_and_cancel_icons_are_crisp_at_2x(app, qtbot, settings):  # noqa: F811
    """Issue 24: every toolbar icon (and the status bar's Cancel) is drawn at twice its size on a 2x screen: an SVG
    (scalable: no fixed sizes) or a bitmap at least twice the icon size, never a small bitmap scaled up."""
    window = make_window(qtbot, settings)
    need = 2 * window.menus.toolbar.iconSize().width()
    icons = {a.text(): a.icon() for a in window.menus.toolbar.actions() if not a.icon().isNull()}
    icons["status Cancel"] = window.job_status.cancel_button.icon()
    assert len(icons) >= 8
    small = {name: [s.width() for s in icon.availableSizes()] for name, icon in icons.items()
             if icon.availableSizes() and max(s.width() for s in icon.availableSizes()) < need}
    assert not small, small
    for icon in icons.values():
        assert icon.pixmap(window.menus.toolbar.iconSize(), 2.0).size().width() == need
    window.close()


def test_quit_tears_down_in_order_while_qt_is_up(app, qtbot, settings, request):
    """Issue 24 ("Fatal Python error: none_dealloc" once at quit): nothing is left for Python's finalisation to
    destroy in no set order. The worker thread ends before the window goes; the worker, the thread, the window,
    its timers and its pyqtgraph plots are deleted; the exception hook no longer holds the window."""
    import sys
    import time

    import shiboken6
    from PySide6.QtCore import QObject, Qt, QTimer

    from kn_gui.app import install_excepthook, teardown

    window = make_window(qtbot, settings, make_tiny(TINY_CAUSAL))
    run_fact(qtbot, window, steps=1)  # the plots have drawn a run
    runner = window.runner
    thread, worker = runner.thread, runner.worker
    order = []
    thread.finished.connect(lambda: order.append("thread finished"), Qt.DirectConnection)
    window.destroyed.connect(lambda: order.append("window destroyed"))
    timers = window.findChildren(QTimer)
    plots = [window.attribution_panel.heat_widget, window.attribution_panel.heat_widget.plot]
    window._autosave_timer.start()
    before = sys.excepthook
    install_excepthook(window)
    runner.submit("a job the quit cancels", lambda task: [task.check() or time.sleep(0.01) for _ in range(10000)])
    window.session.results_dirty = True  # unsaved work: written in a thread that signals the window when done
    saving = window.project.autosave() or window.project._autosaving  # or the one the finished run started
    teardown(window)
    assert saving is not None and not saving.is_alive()
    request.node.qt_widgets = [entry for entry in request.node.qt_widgets if entry[0]() is not window]  # gone
    assert order == ["thread finished", "window destroyed"]
    assert not any(shiboken6.isValid(o) for o in (thread, worker, window, *timers, *plots))
    assert len(timers) >= 2 and sys.excepthook is before
    assert shiboken6.isValid(app) and isinstance(app, QObject)  # a test's application is left alone



def test_the_bindings_lost_references_never_free_none(app, monkeypatch):
    """Issue 24's "Fatal Python error: none_dealloc": PySide6 6.12.0 on Python 3.11 drops a reference to None on
    each call of a method returning nothing (and to True on each emit); 100,000 such calls bring None's count
    (about 77,000 with the app imported) to zero. The app makes them immortal where the binding slips."""
    import sys

    from PySide6.QtWidgets import QLabel

    from kn_gui import binding_guard

    if sys.version_info >= (3, 12):
        pytest.skip("None, True and False are immortal (PEP 683)")
    label = QLabel()
    slipping = min(binding_guard.slips().values()) >= binding_guard.PROBE_CALLS // 2  # PySide6 6.12.0 here
    assert binding_guard._installed == (["None", "True", "False"] if slipping else [])  # by importing kn_gui
    none, true = sys.getrefcount(None), sys.getrefcount(True)
    if slipping:  # counts no session can use up
        assert none > binding_guard.IMMORTAL and true > binding_guard.IMMORTAL
    for _ in range(100_000):
        label.setText("x")  # without the guard on a slipping binding: none_dealloc here
    assert sys.getrefcount(None) > none - 100_001 and sys.getrefcount(None) > 0
    # a sound binding is left alone
    monkeypatch.setattr(binding_guard, "_installed", [])
    monkeypatch.setattr(binding_guard, "slips", lambda: {"None": 0, "True": 0})
    before = sys.getrefcount(None)
    assert binding_guard.install() == [] and abs(sys.getrefcount(None) - before) < 10
