"""The one worker thread for long jobs (model loading, checks, attribution, evaluations, saving).

A job is a plain callable `fn(task) -> result` that gets a `kn_core.tasks.Task`: `task.progress(fraction,
message)` reports progress, `task.partial(obj)` streams a partial result to the main thread, and the engine calls
`task.check()` between batches, which raises `Cancelled` once the Cancel button called `task.cancel()`. Jobs
never touch widgets: results travel back through queued signals.

Jobs run one at a time: a job submitted while another runs waits in a FIFO queue.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from PySide6.QtCore import QObject, QThread, Signal, Slot

from kn_core.tasks import Cancelled, Task


_COLLECTOR = None


def collect_garbage_in_gui_thread():
    """Python's cyclic garbage collector runs in whichever thread crosses its threshold. When that is the worker
    thread and the garbage holds Qt widgets (a closed window's menus), Qt deletes them there and deadlocks against
    the GUI thread (seen: a QMenu destroyed under gc in an attribution job while the GUI thread painted).
    pyqtgraph's GarbageCollector turns automatic collection off and collects on a timer in the GUI thread."""
    global _COLLECTOR
    if _COLLECTOR is None:
        from pyqtgraph.util.garbage_collector import GarbageCollector

        _COLLECTOR = GarbageCollector(interval=1.0)
    return _COLLECTOR


def format_error(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


class Worker(QObject):
    progress = Signal(float, str)
    partial = Signal(object)
    finished = Signal(object)
    failed = Signal(str, str)  # one-line message, traceback
    cancelled = Signal()
    _run = Signal(object, object)

    def __init__(self):
        super().__init__()
        self._run.connect(self._execute)
        self._niced = False

    def _lower_priority(self):
        """The UI thread must win the CPU when both want it: run the worker thread at a lower priority (Linux:
        per-thread nice; elsewhere Qt's thread priority)."""
        if self._niced:
            return
        self._niced = True
        import os

        try:
            if hasattr(os, "setpriority") and sys.platform.startswith("linux"):
                import threading

                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 5))
            else:
                QThread.currentThread().setPriority(QThread.LowPriority)
        except OSError:
            pass
        import torch  # leave a core to the UI thread on small machines (torch's intra-op pool takes them all)

        cores = os.cpu_count() or 1
        if cores <= 4 and torch.get_num_threads() >= cores:
            torch.set_num_threads(max(1, cores - 1))

    def make_task(self) -> Task:
        last = [0.0]

        def progress(fraction, message):
            now = time.monotonic()
            # at most ~25 updates a second: the UI thread must never drown in progress events
            if fraction is not None and fraction < 1.0 and now - last[0] < 0.04:
                return
            last[0] = now
            self.progress.emit(-1.0 if fraction is None else float(fraction), str(message))

        return Task(on_progress=progress, on_partial=self.partial.emit)

    @Slot(object, object)
    def _execute(self, fn, task: Task):
        self._lower_priority()
        try:
            result = fn(task)
        except Cancelled:
            self.cancelled.emit()
            return
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a message, never a crash
            self.failed.emit(format_error(exc), traceback.format_exc())
            return
        if task.cancelled:  # cancelled after its last check: what it returns is not what the user asked for
            self.cancelled.emit()
            return
        self.finished.emit(result)


@dataclass
class Job:
    name: str
    fn: Callable[[Task], Any]
    on_done: Callable[[Any], None] | None = None
    on_partial: Callable[[Any], None] | None = None
    on_error: Callable[[str, str], None] | None = None
    on_cancel: Callable[[], None] | None = None
    uses: frozenset = frozenset()  # what the job reads while it runs: "model", "session"
    quick: bool = False  # a second or so (an answer check): a new attribution or check may queue behind it
    project: Any = None  # the project token when it was submitted; None: its result belongs to no project
    started_at: float = 0.0
    task: Task | None = field(default=None)

    def cancel(self):
        if self.task is not None:
            self.task.cancel()


class JobRunner(QObject):
    """Owns the worker thread; queues jobs and routes the worker's signals to each job's callbacks."""

    job_started = Signal(str)
    job_progress = Signal(float, str, float)  # fraction (-1 = unknown), message, eta seconds (-1 = unknown)
    job_ended = Signal(str, str, str)  # name, outcome ("done" | "failed" | "cancelled" | "dropped"), message
    busy_changed = Signal(bool)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.thread = QThread()
        self.thread.setObjectName("kn-worker")
        self.worker = Worker()
        self.worker.moveToThread(self.thread)
        self.worker.progress.connect(self._on_progress)
        self.worker.partial.connect(self._on_partial)
        self.worker.finished.connect(self._on_finished)
        self.worker.failed.connect(self._on_failed)
        self.worker.cancelled.connect(self._on_cancelled)
        self.thread.start()
        self.current: Job | None = None
        self.queue: deque[Job] = deque()
        self._shut = False  # shutdown() ran: the worker's signals are disconnected
        # the open project's token (MainWindow: Session.generation); a job's callbacks run only while the project
        # it was submitted for is still open, so a result is never applied to the next project
        self.project_token: Callable[[], Any] = lambda: None

    @property
    def busy(self) -> bool:
        return self.current is not None

    def in_use(self, resource: str) -> Job | None:
        """The running or queued job that reads `resource` ("model", "session"), if any."""
        for job in ([self.current] if self.current else []) + list(self.queue):
            if resource in job.uses:
                return job
        return None

    @property
    def only_quick(self) -> bool:
        """Every running and queued job is a quick one: the window lets the user queue an attribution behind it
        (picking a fact starts its answer check; F5 pressed at once did nothing)."""
        return all(job.quick for job in ([self.current] if self.current else []) + list(self.queue))

    def submit(self, name: str, fn, on_done=None, on_partial=None, on_error=None, on_cancel=None,
               uses=("model",), project_bound: bool = True, quick: bool = False) -> Job:
        """`project_bound` (the default): the job's result belongs to the project open now and is dropped if
        another one is opened before it arrives. False for jobs that make the project (opening) or act outside
        it (loading a model, exports). `quick`: see Job.quick."""
        job = Job(name, fn, on_done, on_partial, on_error, on_cancel, frozenset(uses),
                  project=self.project_token() if project_bound else None, quick=quick)
        self.queue.append(job)
        if self.current is None:
            self._start_next()
        return job

    def cancel(self):
        """Cancels the running job and drops the queued ones."""
        dropped = list(self.queue)
        self.queue.clear()
        for job in dropped:
            if job.on_cancel:
                self._safe(job.on_cancel)
        if self.current is not None:
            self.current.cancel()

    def _stale(self, job: Job | None) -> bool:
        return job is not None and job.project is not None and job.project != self.project_token()

    def _start_next(self):
        if self.current is not None:  # a callback submitted a job that started at once: it runs first
            return
        if not self.queue:
            self.busy_changed.emit(False)
            return
        job = self.current = self.queue.popleft()
        job.started_at = time.monotonic()
        job.task = self.worker.make_task()
        self.busy_changed.emit(True)
        self.job_started.emit(job.name)
        self.worker._run.emit(job.fn, job.task)

    def _on_progress(self, fraction: float, message: str):
        job = self.current
        if job is None:
            return
        eta = -1.0
        elapsed = time.monotonic() - job.started_at
        if 0.02 < fraction < 1.0 and elapsed > 0.5:
            eta = elapsed * (1.0 - fraction) / fraction
        self.job_progress.emit(fraction, message, eta)

    def _on_partial(self, obj):
        job = self.current
        # Delivered even after a cancel was asked for: the job produced it before stopping (signals keep their
        # order, so it arrives before the job's end), and a finished prompt must not be lost to a late click.
        if job is not None and job.on_partial and not self._stale(job):
            self._safe(job.on_partial, obj)

    def _finish(self, outcome: str, callback, *args, message: str = ""):
        job, self.current = self.current, None
        if self._stale(job):
            outcome, message = "dropped", "it belongs to a project that is no longer open; its result was dropped"
        elif job is not None and callback is not None:
            self._safe(callback, *args)
        self.job_ended.emit(job.name if job else "", outcome, message)
        self._start_next()

    def _on_finished(self, result):
        job = self.current
        self._finish("done", job.on_done if job else None, result)

    def _on_failed(self, message: str, tb: str):
        job = self.current
        self._finish("failed", (job.on_error if job else None), message, tb, message=message)

    def _on_cancelled(self):
        job = self.current
        self._finish("cancelled", job.on_cancel if job else None)

    def _safe(self, fn, *args):
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - a broken callback must not take the app down
            traceback.print_exc()

    def wait_idle(self, timeout_ms: int = 30000) -> bool:
        from PySide6.QtCore import QCoreApplication, QEventLoop

        deadline = time.monotonic() + timeout_ms / 1000
        while self.busy and time.monotonic() < deadline:
            QCoreApplication.processEvents(QEventLoop.AllEvents, 20)
            time.sleep(0.005)
        return not self.busy

    def shutdown(self, timeout_ms: int = 60000) -> bool:
        """Cancels the jobs and ends the worker thread, the worker's signals disconnected first (a signal from a
        job that ends during the app's teardown must not reach half-destroyed objects). True when the thread
        ended; a thread still running (a step that cannot be cancelled) is left to the process's exit."""
        self.cancel()
        connections = ((self.worker.progress, self._on_progress), (self.worker.partial, self._on_partial),
                       (self.worker.finished, self._on_finished), (self.worker.failed, self._on_failed),
                       (self.worker.cancelled, self._on_cancelled))
        if not self._shut:
            self._shut = True
            for signal, slot in connections:
                signal.disconnect(slot)
        self.thread.quit()
        return self.thread.wait(timeout_ms)
