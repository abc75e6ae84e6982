"""Small widgets and helpers shared by the panels."""

from __future__ import annotations

import csv
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QBrush, QColor, QStandardItem, QStandardItemModel
from PySide6.QtWidgets import (QAbstractItemView, QFileDialog, QHBoxLayout, QHeaderView, QLabel, QPushButton,
                               QSizePolicy, QTableView, QVBoxLayout, QWidget)

from kn_core.validation import csv_row


def hint(text: str) -> QLabel:
    label = QLabel(text)
    label.setObjectName("hint")
    label.setWordWrap(True)
    return label


def problem_label() -> QLabel:
    """A red line in a dialog saying what to fix; hidden until there is a problem."""
    label = QLabel("")
    label.setObjectName("problem")
    label.setWordWrap(True)
    label.hide()
    return label


class ElidedLabel(QLabel):
    """One line that ends in an ellipsis when the room is too short; the whole text is its tooltip (a wrapped
    heading took the before/after table's rows)."""

    def __init__(self, text: str = "", parent=None):
        super().__init__(parent)
        self.setMinimumWidth(1)
        self.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        self.setText(text)

    def setText(self, text: str) -> None:
        self._full = text
        self.setToolTip(text)
        self._elide()

    def text(self) -> str:
        return self._full

    def resizeEvent(self, event):
        super().resizeEvent(event)
        self._elide()

    def _elide(self):
        super().setText(self.fontMetrics().elidedText(self._full, Qt.ElideRight, max(self.width(), 1)))


def heading(text: str) -> QLabel:
    label = QLabel(text)
    label.setObjectName("heading")
    return label


def button(text: str, slot=None, tooltip: str = "", name: str = "") -> QPushButton:
    b = QPushButton(text)
    if slot is not None:
        b.clicked.connect(slot)
    if tooltip:
        b.setToolTip(tooltip)
    if name:
        b.setObjectName(name)
    return b


def fmt_activation(value) -> str:
    """An activation, or "not stored" (NaN: a compact run's activations were not saved)."""
    return "not stored" if value is None or value != value else f"{float(value):.4g}"


def fmt_prob(p: float | None) -> str:
    if p is None:
        return ""
    if p >= 0.001:
        return f"{p:.3f}"
    return f"{p:.1e}"


def fmt_delta(d: float | None) -> str:
    if d is None:
        return ""
    if d == 0:
        return "0"
    return f"{d:+.3f}" if abs(d) >= 0.001 else f"{d:+.1e}"


RAW = Qt.UserRole + 1  # the full value behind a cell (sorting and CSV use it, never the rounded display text)


def fmt_number(value: float) -> str:
    """Display text for a score-like number: 4 significant digits, scientific when tiny or huge."""
    return f"{value:.4g}"


class TableView(QTableView):
    """A read-only table over a QStandardItemModel with CSV export.

    Cells keep their raw value in the RAW role: numbers are shown rounded (`formats` maps a column to a
    formatter, default fmt_prob for |x| < 1 else 3 significant digits) but sorted and exported in full.
    `context` lines (e.g. the edit and the model) are written above the CSV header as "# " comments."""

    def __init__(self, headers: list[str], parent=None, formats: dict | None = None, missing: dict | None = None):
        super().__init__(parent)
        self.table = QStandardItemModel(0, len(headers), self)
        self.table.setHorizontalHeaderLabels(headers)
        self.table.setSortRole(RAW)
        self.formats = dict(formats or {})
        self.missing = dict(missing or {})  # column -> what a NaN means there (default an em dash)
        self.context: list[str] = []
        self.setModel(self.table)
        self.setAlternatingRowColors(True)
        self.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.verticalHeader().setVisible(False)
        self.verticalHeader().setDefaultSectionSize(22)
        self.horizontalHeader().setStretchLastSection(True)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.Interactive)
        self.setSortingEnabled(True)

    def clear_rows(self):
        self.table.removeRows(0, self.table.rowCount())

    def _text(self, col: int, value) -> str:
        if value is None:
            return ""
        if isinstance(value, float) and value != value:
            return self.missing.get(col, "\u2014")
        if col in self.formats:
            return self.formats[col](value)
        if isinstance(value, float):
            return fmt_prob(value) if 0 <= value < 1 else f"{value:.3g}"
        return str(value)

    def add_row(self, values: list, data=None, colors: dict | None = None, tooltips: dict | None = None):
        items = []
        for col, value in enumerate(values):
            item = QStandardItem(self._text(col, value))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                item.setData(value, RAW)
            else:
                item.setData("" if value is None else str(value), RAW)
            if data is not None and col == 0:
                item.setData(data, Qt.UserRole)
            if colors and col in colors:
                item.setForeground(QBrush(QColor(colors[col])))
            if tooltips and col in tooltips:
                item.setToolTip(tooltips[col])
            items.append(item)
        self.table.appendRow(items)
        return items

    def rows(self) -> list[list[str]]:
        """The table as text for CSV: numbers in full (repr round-trips a float), not as displayed."""
        out = []
        for r in range(self.table.rowCount()):
            row = []
            for c in range(self.table.columnCount()):
                item = self.table.item(r, c)
                raw = item.data(RAW) if item is not None else None
                if isinstance(raw, bool) or raw is None:
                    row.append(item.text() if item is not None else "")
                elif isinstance(raw, float):
                    row.append(repr(raw))
                else:
                    row.append(str(raw))
            out.append(row)
        return out

    def displayed_rows(self) -> list[list[str]]:
        return [[self.table.item(r, c).text() if self.table.item(r, c) else ""
                 for c in range(self.table.columnCount())] for r in range(self.table.rowCount())]

    def headers(self) -> list[str]:
        return [self.table.horizontalHeaderItem(c).text() for c in range(self.table.columnCount())]

    def write_csv(self, path: str | Path):
        with open(path, "w", newline="", encoding="utf-8") as handle:
            for line in self.context:
                handle.write(f"# {line}\n")
            writer = csv.writer(handle)
            writer.writerow(self.headers())
            writer.writerows(csv_row(row) for row in self.rows())  # text starting with = + - @ stays text

    def export_csv_dialog(self, parent, default_name: str = "table.csv") -> str | None:
        path = save_file_dialog(parent, "Export table as CSV", default_name, "CSV (*.csv)")
        if path:
            self.write_csv(path)
            return path
        return None


def default_folder() -> Path:
    """Where save dialogs start: the user's documents folder (the home folder when there is none)."""
    from PySide6.QtCore import QStandardPaths

    folder = QStandardPaths.writableLocation(QStandardPaths.DocumentsLocation)
    return Path(folder) if folder and Path(folder).is_dir() else Path.home()


_SETTINGS = []  # the window's QSettings (set_settings): where the export dialogs' last folder is remembered
EXPORT_FOLDER_KEY = "folders/export"


def set_settings(settings) -> None:
    _SETTINGS[:] = [settings]


def export_folder() -> Path:
    """The folder of the last export (remembered across sessions), else the documents folder."""
    folder = _SETTINGS[0].value(EXPORT_FOLDER_KEY, "") if _SETTINGS else ""
    return Path(folder) if folder and Path(folder).is_dir() else default_folder()


def remember_folder(path: str | Path) -> None:
    if _SETTINGS and path:
        _SETTINGS[0].setValue(EXPORT_FOLDER_KEY, str(Path(path).parent))


def save_file_dialog(parent, title: str, name: str, filters: str) -> str:
    """A save dialog starting in the last export folder; the chosen file's folder is remembered ("" if none)."""
    path, _ = QFileDialog.getSaveFileName(parent, title, str(export_folder() / name), filters)
    remember_folder(path)
    return path


def safe_file_name(name: str) -> str:
    """A set or fact name as a file name (a set is named e.g. "refined: France \u2192 Paris")."""
    cleaned = "".join(c if c.isalnum() or c in "-_. " else "_" for c in name).strip(" ._")
    return cleaned or "export"


def write_json(path: str | Path, obj) -> None:
    """The app's JSON exports: one strict document (kn_core.jsonio: a NaN becomes null with a note, never the
    invalid `NaN` token), written atomically (a full disk leaves an earlier file whole)."""
    from kn_core.jsonio import dumps, write_text_atomic

    write_text_atomic(path, dumps(obj, indent=2, default=str) + "\n")


def vbox(*widgets, margins=(6, 6, 6, 6), spacing=6) -> QVBoxLayout:
    layout = QVBoxLayout()
    layout.setContentsMargins(*margins)
    layout.setSpacing(spacing)
    for w in widgets:
        if isinstance(w, QWidget):
            layout.addWidget(w)
        elif w is None:
            layout.addStretch(1)
        else:
            layout.addLayout(w)
    return layout


def hbox(*widgets, margins=(0, 0, 0, 0), spacing=6) -> QHBoxLayout:
    layout = QHBoxLayout()
    layout.setContentsMargins(*margins)
    layout.setSpacing(spacing)
    for w in widgets:
        if isinstance(w, QWidget):
            layout.addWidget(w)
        elif w is None:
            layout.addStretch(1)
        else:
            layout.addLayout(w)
    return layout
