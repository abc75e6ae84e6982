"""A threshold (t or p): a slider and a spin box bound together over 0..1."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QAbstractSpinBox, QDoubleSpinBox, QLabel, QSlider, QWidget

from .common import hbox


class ThresholdControl(QWidget):
    """A slider and a spin box bound together (0..1)."""

    changed = Signal(float)

    def __init__(self, label: str, value: float, tooltip: str, parent=None):
        super().__init__(parent)
        self.slider = QSlider(Qt.Horizontal)
        self.slider.setMinimumWidth(50)
        self.slider.setRange(0, 100)
        self.spin = QDoubleSpinBox()
        self.spin.setRange(0.0, 1.0)
        self.spin.setSingleStep(0.05)
        self.spin.setDecimals(2)
        self.spin.setKeyboardTracking(False)
        self.spin.setButtonSymbols(QAbstractSpinBox.UpDownArrows)
        name = QLabel(label)
        name.setObjectName("heading")
        name.setToolTip(tooltip)
        self.slider.setToolTip(tooltip)
        self.spin.setToolTip(tooltip)
        self.setLayout(hbox(name, self.slider, self.spin))
        self.set_value(value)
        self.slider.valueChanged.connect(self._from_slider)
        self.spin.valueChanged.connect(self._from_spin)

    def value(self) -> float:
        return round(self.spin.value(), 2)

    def set_value(self, value: float):
        self.spin.blockSignals(True)
        self.slider.blockSignals(True)
        self.spin.setValue(value)
        self.slider.setValue(int(round(value * 100)))
        self.spin.blockSignals(False)
        self.slider.blockSignals(False)

    def _from_slider(self, v: int):
        self.spin.blockSignals(True)
        self.spin.setValue(v / 100)
        self.spin.blockSignals(False)
        self.changed.emit(self.value())

    def _from_spin(self, v: float):
        self.slider.blockSignals(True)
        self.slider.setValue(int(round(v * 100)))
        self.slider.blockSignals(False)
        self.changed.emit(self.value())
