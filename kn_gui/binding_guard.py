"""A guard against a reference-count bug of the Qt binding that aborts Python: "Fatal Python error: none_dealloc"
(or bool_dealloc), seen at quit (issue 24).

Measured with PySide6 6.12.0 on Python 3.11: every call of a wrapped method that returns nothing (QLabel.setText,
QTimer.stop, processEvents, ...) drops one reference to None that it never took, and every Signal.emit (and
disconnect) one to True; PySide6 6.11.3 loses none (the same 1,000-call probe each). Python 3.12 made None, True
and False immortal, so there the slips are harmless; before 3.12 the count of None falls with every call, and
Python aborts when it reaches zero: in a long session, or at quit when Python's finalisation releases its own
references to None (the tester's "once in 7 quits").

`install()` measures the slips (a few dozen calls, well inside the counts at start) and, where there are any,
does what Python 3.12 does: it gives None, True and False a count that no session can use up (2**40). A sound
binding, or Python >= 3.12, is left alone."""

from __future__ import annotations

import ctypes
import sys

PROBE_CALLS = 64
IMMORTAL = 1 << 40  # references added: at a million slips a second, 12 days of use
_installed: list[str] = []  # what install() changed (once a process)


def slips() -> dict[str, int]:
    """References to None and to True lost over PROBE_CALLS calls of a method returning nothing and of
    Signal.emit (0 and 0 on a sound binding)."""
    from PySide6.QtCore import QObject, QTimer, Signal

    class Probe(QObject):
        fired = Signal()

    probe, timer = Probe(), QTimer()
    none, true = sys.getrefcount(None), sys.getrefcount(True)
    for _ in range(PROBE_CALLS):
        timer.stop()
        probe.fired.emit()
    return {"None": none - sys.getrefcount(None), "True": true - sys.getrefcount(True)}


def install() -> list[str]:
    """Makes None, True and False immortal when the binding loses references to them; the names it changed."""
    if _installed or sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return list(_installed)  # done, or immortal already (PEP 683), or another object layout
    lost = slips()
    if max(lost.values()) < PROBE_CALLS // 2:
        return []
    for name, obj in (("None", None), ("True", True), ("False", False)):
        before = sys.getrefcount(obj)
        count = ctypes.c_ssize_t.from_address(id(obj))  # ob_refcnt, the first field of every CPython object
        count.value += IMMORTAL
        if sys.getrefcount(obj) - before != IMMORTAL:  # not the layout expected: put it back, change nothing
            count.value -= IMMORTAL
            continue
        _installed.append(name)
    return list(_installed)
