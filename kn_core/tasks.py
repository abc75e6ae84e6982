"""One protocol for long work: progress, partial results and cooperative cancel.

Every long engine call (model loading, attribution, evaluations, experiments, the reproduction) takes a
``task: Task | None`` argument. The engine reports through it and checks it between batches; the GUI's worker
and the CLI's progress bar are just two ways of listening to it. Nothing here knows about Qt.

    task = Task(on_progress=lambda fraction, message: ..., on_partial=lambda result: ...)
    attribute(lm, prompt, params, task=task)      # another thread may call task.cancel()

A phase of a longer job reports into a slice of its parent's bar with ``task.slice(start, end)``; cancelling
the parent cancels every slice.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

ProgressFn = Callable[["float | None", str], None]
PartialFn = Callable[[Any], None]


class Cancelled(Exception):
    """The task was cancelled; whatever was running stops and returns nothing partial."""


class Task:
    """Progress (fraction in [0, 1], or None when unknown, with a short message), partial results and cancel."""

    def __init__(self, on_progress: ProgressFn | None = None, on_partial: PartialFn | None = None):
        self._on_progress = on_progress
        self._on_partial = on_partial
        self._cancel = threading.Event()
        self._start, self._end = 0.0, 1.0
        self._parent: Task | None = None

    # cancel -----------------------------------------------------------------------------------------------
    def cancel(self) -> None:
        (self._root())._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._root()._cancel.is_set()

    def check(self) -> None:
        """Raise Cancelled if the task was cancelled: call this between batches."""
        if self.cancelled:
            raise Cancelled("cancelled")

    # reporting --------------------------------------------------------------------------------------------
    def progress(self, fraction: float | None, message: str = "") -> None:
        if fraction is not None:
            fraction = self._start + (self._end - self._start) * min(max(float(fraction), 0.0), 1.0)
        root = self._root()
        if root._on_progress is not None:
            root._on_progress(fraction, message)

    def partial(self, result: Any) -> None:
        root = self._root()
        if root._on_partial is not None:
            root._on_partial(result)

    def slice(self, start: float, end: float) -> "Task":
        """A view whose fraction 0..1 maps onto start..end of this task's bar; same cancel, same partials."""
        child = Task.__new__(Task)
        child._on_progress = child._on_partial = None
        child._cancel = self._root()._cancel
        child._parent = self._root()
        width = self._end - self._start
        child._start, child._end = self._start + width * start, self._start + width * end
        return child

    def relay(self, on_progress: ProgressFn | None = None, on_partial: PartialFn | None = None) -> "Task":
        """A task with its own listeners (e.g. one that labels a job's phases) that is cancelled with this one."""
        child = Task(on_progress, on_partial)
        child._cancel = self._root()._cancel
        return child

    def _root(self) -> "Task":
        return self._parent if self._parent is not None else self


def as_task(task: Task | None) -> Task:
    """The task to report to: the caller's, or a silent one that is never cancelled."""
    return task if task is not None else Task()
