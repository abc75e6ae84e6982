"""PySide6 6.12.0 on Python 3.10/3.11 takes one reference from None on every call of a Qt method that returns
nothing (QLabel.setText, QTreeView.setRowHidden, QStandardItem.appendRow, ...: measured 100 calls -> None's
reference count 100 lower; 6.11.3 loses none). None is not immortal before Python 3.12, so after as many such
calls as None has references (a few 10 000 in this app), Python aborts with "Fatal Python error: none_dealloc":
importing the PARAREL dev folder (22 425 facts into the facts tree) took the app down every time, and long
sessions died at random, often at quit.

pyproject.toml keeps new installs off 6.12.0 on those Pythons; `protect_none` covers an environment that already
has it: when a probe shows the leak, None gets 2**48 extra references (what Python 3.12 does by making it
immortal), so no session can use them up. None itself is a static object that is never freed, so the extra count
changes nothing else."""

from __future__ import annotations

import ctypes
import sys

PROBE_CALLS = 64
EXTRA_REFERENCES = 1 << 48


def leaks_none() -> bool:
    """Whether calling a Qt method that returns nothing takes a reference from None (the PySide6 6.12.0 bug)."""
    from PySide6.QtCore import QObject

    probe = QObject()
    before = sys.getrefcount(None)
    for _ in range(PROBE_CALLS):
        probe.setObjectName("probe")
    return sys.getrefcount(None) <= before - PROBE_CALLS // 2


def protect_none() -> bool:
    """Makes None's reference count unreachable when this PySide6 leaks it; True when it had to. A no-op on
    Python 3.12+ (None is immortal) and without PySide6."""
    if sys.version_info >= (3, 12):
        return False
    try:
        if not leaks_none():
            return False
    except ImportError:
        return False
    ctypes.c_ssize_t.from_address(id(None)).value += EXTRA_REFERENCES
    return True
