"""The GUI's logic without widgets: each controller turns a user request into worker jobs and session changes and
reports what happened as typed events (dataclasses) on its `event` signal. MainWindow only builds the widgets
and wires panels to controllers; tests drive the controllers headless."""

from __future__ import annotations


class UserError(Exception):
    """A request the user must change: `title` for the dialog, the message names the problem and the fix."""

    def __init__(self, title: str, message: str):
        super().__init__(message)
        self.title = title
