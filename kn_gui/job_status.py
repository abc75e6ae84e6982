"""The status bar's job display: the running job's name and progress message, a progress bar with its ETA, and
the Cancel button. Job progress lives in its own label, so it never overwrites a note the window shows in the
status bar (a cancelled run's note, an error); once Cancel is pressed the label says so until the job ends."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QProgressBar, QPushButton, QStatusBar, QStyle

from .icons import crisp_icon
from .worker import JobRunner

CANCELLING = "Cancelling\u2026 (the job stops at the next batch)"


class JobStatus:
    def __init__(self, bar: QStatusBar, runner: JobRunner, cancel):
        self.bar = bar
        self.job_label = QLabel("")
        self.job_label.setObjectName("jobLabel")
        self.job_label.setMaximumWidth(420)
        self.job_label.setTextFormat(Qt.PlainText)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setFixedWidth(160)
        self.progress.setVisible(False)
        self.eta = QLabel("")
        self.cancel_button = QPushButton(crisp_icon(bar.style(), QStyle.SP_BrowserStop), "Cancel")
        self.cancel_button.setObjectName("danger")
        self.cancel_button.clicked.connect(cancel)
        self.cancel_button.setVisible(False)
        self.model_label = QLabel("no model")
        self.model_label.setObjectName("hint")
        for widget in (self.job_label, self.progress, self.eta, self.cancel_button, self.model_label):
            bar.addPermanentWidget(widget)
        self.cancelling = False
        runner.job_started.connect(self._started)
        runner.job_progress.connect(self._progress)
        runner.busy_changed.connect(self._busy)

    def _show(self, text: str):
        metrics = self.job_label.fontMetrics()
        self.job_label.setText(metrics.elidedText(text, Qt.ElideRight, self.job_label.maximumWidth()))
        self.job_label.setToolTip(text)

    def cancel_requested(self):
        """Cancel was pressed: said until the job ends (its progress messages no longer replace it)."""
        self.cancelling = True
        self._show(CANCELLING)

    def _started(self, name: str):
        self.cancelling = False
        self.progress.setVisible(True)
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.cancel_button.setVisible(True)
        self.eta.setText("")
        self._show(name + "\u2026")

    def _progress(self, fraction: float, message: str, eta: float):
        if fraction < 0:
            self.progress.setRange(0, 0)  # unknown: a busy indicator
        else:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(fraction * 1000))
        self.eta.setText(f"ETA {int(eta) // 60}:{int(eta) % 60:02d}" if eta >= 0 else "")
        if message and not self.cancelling:
            self._show(message)

    def _busy(self, busy: bool):
        self.progress.setVisible(busy)
        self.cancel_button.setVisible(busy)
        if not busy:
            self.eta.setText("")
            self._show("")
            self.cancelling = False
