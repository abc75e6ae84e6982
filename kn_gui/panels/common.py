"""Small widgets and helpers shared by the panels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QStandardItem, QStandardItemModel
from PySide6.QtWidgets import (QAbstractItemView, QFileDialog, QHBoxLayout, QHeaderView, QLabel, QPushButton,
                               QTableView, QVBoxLayout, QWidget)


def hint(text: str) -> QLabel:
    label = QLabel(text)
    label.setObjectName("hint")
    label.setWordWrap(True)
    return label


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


def fmt_prob(p: float | None) -> str:
    if p is None:
        return ""
    if p >= 0.001:
        return f"{p:.3f}"
    return f"{p:.1e}"


def fmt_delta(d: float | None) -> str:
    if d is None:
        return ""
    return f"{d:+.3f}" if abs(d) >= 0.001 else f"{d:+.1e}"


class TableView(QTableView):
    """A read-only table over a QStandardItemModel with CSV export."""

    def __init__(self, headers: list[str], parent=None):
        super().__init__(parent)
        self.table = QStandardItemModel(0, len(headers), self)
        self.table.setHorizontalHeaderLabels(headers)
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

    def add_row(self, values: list, data=None, colors: dict | None = None):
        items = []
        for col, value in enumerate(values):
            item = QStandardItem()
            if isinstance(value, float):
                item.setData(value, Qt.UserRole + 1)
                item.setText(fmt_prob(value) if abs(value) < 1 else f"{value:.3g}")
            elif isinstance(value, int) and not isinstance(value, bool):
                item.setData(value, Qt.DisplayRole)
            else:
                item.setText("" if value is None else str(value))
            if data is not None and col == 0:
                item.setData(data, Qt.UserRole)
            if colors and col in colors:
                from PySide6.QtGui import QBrush, QColor
                item.setForeground(QBrush(QColor(colors[col])))
            items.append(item)
        self.table.appendRow(items)
        return items

    def rows(self) -> list[list[str]]:
        out = []
        for r in range(self.table.rowCount()):
            out.append([self.table.item(r, c).text() if self.table.item(r, c) else ""
                        for c in range(self.table.columnCount())])
        return out

    def headers(self) -> list[str]:
        return [self.table.horizontalHeaderItem(c).text() for c in range(self.table.columnCount())]

    def write_csv(self, path: str | Path):
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.headers())
            writer.writerows(self.rows())

    def export_csv_dialog(self, parent, default_name: str = "table.csv") -> str | None:
        path, _ = QFileDialog.getSaveFileName(parent, "Export table as CSV", default_name, "CSV (*.csv)")
        if path:
            self.write_csv(path)
            return path
        return None


def write_json(path: str | Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")


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
