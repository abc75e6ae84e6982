"""An event log for driving the app from outside (the X-input end-to-end test, screen recorders, scripts): with
KN_STUDIO_EVENT_LOG=FILE set, the window appends one JSON line per job start and end, status-bar message, window
title and project opened / saved / autosaved, so a driver waits on the app's state instead of sleeping."""

from __future__ import annotations

import json
import os
import time

ENV = "KN_STUDIO_EVENT_LOG"


def attach(window) -> None:
    path = os.environ.get(ENV)
    if not path:
        return

    def write(kind: str, **fields):
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"t": round(time.time(), 3), "event": kind, **fields}) + "\n")

    from .controllers import project as P

    window.runner.job_started.connect(lambda name: write("job_started", name=name))
    window.runner.job_ended.connect(lambda name, outcome, message: write("job_ended", name=name, outcome=outcome,
                                                                         message=message))
    window.statusBar().messageChanged.connect(lambda message: message and write("status", message=message))
    window.windowTitleChanged.connect(lambda title: write("title", title=title))
    window.project_opened.connect(lambda path: write("project_opened", path=path))
    window.project_saved.connect(lambda path: write("project_saved", path=path))
    window.model_loaded.connect(lambda lm: write("model_loaded", source=str(lm.source)))
    window.edit_evaluated.connect(lambda report: write("edit_evaluated", title=report.get("title", "")))
    window.history_view.lane_changed.connect(lambda lane: lane == "model" and write(
        "edits_index", index=window.history.index(lane)))
    window.error_shown.connect(lambda title, message: write("error", title=title, message=message))
    window.project.event.connect(lambda ev: isinstance(ev, P.Autosaved) and write("autosaved", path=ev.path,
                                                                                  error=ev.error))
    write("started", pid=os.getpid())
