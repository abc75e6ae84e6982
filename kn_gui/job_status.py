"""The status bar's job display: the running job's name, a progress bar with its ETA, and the Cancel button."""

from __future__ import annotations

from PySide6.QtWidgets import QLabel, QProgressBar, QPushButton, QStatusBar, QStyle

from .worker import JobRunner


class JobStatus:
    def __init__(self, bar: QStatusBar, runner: JobRunner, cancel):
        self.bar = bar
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setFixedWidth(220)
        self.progress.setVisible(False)
        self.eta = QLabel("")
        self.eta.setMinimumWidth(170)
        self.cancel_button = QPushButton(bar.style().standardIcon(QStyle.SP_BrowserStop), "Cancel")
        self.cancel_button.setObjectName("danger")
        self.cancel_button.clicked.connect(cancel)
        self.cancel_button.setVisible(False)
        self.model_label = QLabel("no model")
        self.model_label.setObjectName("hint")
        for widget in (self.eta, self.progress, self.cancel_button, self.model_label):
            bar.addPermanentWidget(widget)
        runner.job_started.connect(self._started)
        runner.job_progress.connect(self._progress)
        runner.busy_changed.connect(self._busy)

    def _started(self, name: str):
        self.progress.setVisible(True)
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.cancel_button.setVisible(True)
        self.eta.setText(name)
        self.bar.showMessage(name + "\u2026", 0)

    def _progress(self, fraction: float, message: str, eta: float):
        if fraction < 0:
            self.progress.setRange(0, 0)  # unknown: a busy indicator
        else:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(fraction * 1000))
        self.eta.setText(f"ETA {int(eta) // 60}:{int(eta) % 60:02d}" if eta >= 0 else "")
        if message:
            self.bar.showMessage(message, 0)

    def _busy(self, busy: bool):
        self.progress.setVisible(busy)
        self.cancel_button.setVisible(busy)
        if not busy:
            self.eta.setText("")
