"""Entry point of the desktop app: `kn-studio [project.knproj] [--model SOURCE]` or `python main.py`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

RESOURCES = Path(__file__).resolve().parent.parent / "resources"


def build_app(argv=None):
    from PySide6.QtGui import QIcon
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(argv or sys.argv[:1])
    app.setApplicationName("Knowledge Neuron Studio")
    app.setOrganizationName("KnowledgeNeuronStudio")
    app.setStyle("Fusion")
    style = RESOURCES / "style.qss"
    if style.exists():
        app.setStyleSheet(style.read_text(encoding="utf-8"))
    icon = RESOURCES / "icon.svg"
    if icon.exists():
        app.setWindowIcon(QIcon(str(icon)))
    return app


def install_excepthook(window):
    """A bug in a slot must never take the app down: show what happened and keep running."""
    import traceback

    previous = sys.excepthook

    def hook(kind, value, tb):
        traceback.print_exception(kind, value, tb)
        try:
            window.show_error("Unexpected error", f"{kind.__name__}: {value}. The app keeps running; if this "
                              "repeats, save your project and report it with the text printed on the console.")
        except Exception:  # noqa: BLE001
            previous(kind, value, tb)

    hook.window, hook.previous = window, previous  # teardown gives the previous hook back
    sys.excepthook = hook


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kn-studio", description="Knowledge Neuron Studio")
    parser.add_argument("project", nargs="?", help="a .knproj project to open")
    parser.add_argument("--model", help="load this model at start ('default' = embedded SmolLM2-135M, a Hugging Face "
                                        "id or a folder)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from .platform_check import startup_problem

    problem = startup_problem()
    if problem:
        print(f"kn-studio: {problem}", file=sys.stderr)
        return 2
    app = build_app()
    from .main_window import MainWindow

    window = MainWindow()
    install_excepthook(window)
    from .event_log import attach

    attach(window)
    window.show()
    recovered = window.lifecycle.offer_recovery()  # work a killed app left in its autosave file
    if args.project and not recovered:
        window.lifecycle.open_project(args.project)
    if args.model:  # queued behind the opening: the project's edits are re-applied once the model is there
        window.model_panel.source.setEditText(args.model)
        window.load_model(args.model, args.device, args.dtype)
    code = app.exec()
    teardown(window, code, app)
    return code


def teardown(window, code: int = 0, app=None) -> None:
    """An orderly end while Python and Qt are whole, before Python's own finalisation destroys what is left in no
    set order (the "none_dealloc" once seen at quit was the binding's reference-count slip, which binding_guard
    covers; an ordered end keeps a quit from depending on which object Python finalises first), in this order:
    1. the worker: its jobs cancelled and its signals disconnected, the thread stopped and waited for, then the
       worker object and the thread deleted; an autosave being written waited for (its thread signals the window);
    2. the exception hook given back (it holds the window);
    3. the window deleted with everything it owns (docks, timers, the pyqtgraph plots), and the deletions Qt
       deferred delivered;
    4. Python's cycles collected while the QApplication still exists;
    5. with `app` (main's), the other top-level widgets (dialogs without a parent) and the QApplication deleted.
    A job step that cannot be cancelled leaves its thread running: the process then ends at once (os._exit)
    instead of destroying a running thread."""
    import gc

    import shiboken6
    from PySide6.QtCore import QCoreApplication, QEvent
    from PySide6.QtWidgets import QApplication

    runner = window.runner
    stopped = runner.shutdown()
    if not stopped:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    for part in (runner.worker, runner.thread):
        if shiboken6.isValid(part):
            shiboken6.delete(part)
    window.project.wait_autosave()
    if getattr(sys.excepthook, "window", None) is window:
        sys.excepthook = sys.excepthook.previous
    if shiboken6.isValid(window):
        shiboken6.delete(window)
    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
    QApplication.processEvents()
    gc.collect()
    if isinstance(app, QApplication) and shiboken6.isValid(app):
        for widget in app.topLevelWidgets():
            if shiboken6.isValid(widget):
                shiboken6.delete(widget)
        QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
        gc.collect()
        shiboken6.delete(app)


if __name__ == "__main__":
    raise SystemExit(main())
