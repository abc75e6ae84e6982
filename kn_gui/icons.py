"""Icons that stay crisp on 2x screens: Material Design icons drawn from qtawesome's font at any size. Qt's
Fusion standard icons are bitmaps (16, 32 and sometimes 128 px): an 18 px toolbar icon on a 2x screen needs 36 px
and got the 32 px bitmap scaled up (blurred). Without qtawesome (or for a pixmap it does not name) the standard
icon is used."""

from __future__ import annotations

import os

from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QStyle

# standard pixmap -> (qtawesome name, colour)
AWESOME = {
    QStyle.SP_FileIcon: ("mdi6.file-plus-outline", "#2e4053"),
    QStyle.SP_DialogOpenButton: ("mdi6.folder-open-outline", "#b9770e"),
    QStyle.SP_DialogSaveButton: ("mdi6.content-save-outline", "#1f618d"),
    QStyle.SP_ArrowBack: ("mdi6.undo", "#2e4053"),
    QStyle.SP_ArrowForward: ("mdi6.redo", "#2e4053"),
    QStyle.SP_ComputerIcon: ("mdi6.chip", "#1f618d"),
    QStyle.SP_MediaPlay: ("mdi6.play", "#1e8449"),
    QStyle.SP_DialogApplyButton: ("mdi6.check-circle-outline", "#1e8449"),
    QStyle.SP_BrowserStop: ("mdi6.stop-circle-outline", "#c0392b"),
    QStyle.SP_DialogHelpButton: ("mdi6.help-circle-outline", "#2e4053"),
}


def crisp_icon(style: QStyle, standard: QStyle.StandardPixmap) -> QIcon:
    """The icon for a standard pixmap, drawn at any size where qtawesome names it (see the module notes)."""
    if standard in AWESOME:
        try:
            os.environ.setdefault("QT_API", "pyside6")  # qtawesome's QtPy: the binding the app runs on
            import qtawesome

            name, color = AWESOME[standard]
            return qtawesome.icon(name, color=color)
        except Exception:  # noqa: BLE001 - qtawesome missing or without this icon: the style's own, as before
            pass
    return style.standardIcon(standard)
