"""The app survives more Qt calls that return nothing than None has references: PySide6 6.12.0 on Python < 3.12
takes one reference from None on each (kn_gui/binding_guard.py); importing the PARAREL dev folder into the facts
tree made that many and aborted the app with "Fatal Python error: none_dealloc"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import sys
import kn_gui  # what every part of the app imports first
from PySide6.QtCore import QObject

from kn_gui.binding_guard import IMMORTAL

probe = QObject()
for _ in range(2 * (sys.getrefcount(None) % IMMORTAL) + 1000):  # more calls than None had references
    probe.setObjectName("x")
print("alive")
"""


def test_many_qt_calls_never_use_up_none():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QT_QPA_PLATFORM": "offscreen"}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "alive" in done.stdout, done.stderr[-2000:]
    assert "none_dealloc" not in done.stderr
