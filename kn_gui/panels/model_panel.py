"""Model panel: choose the embedded default, a Hugging Face id or a local folder; device and dtype; load it in
the worker and show what was loaded (family, layers, neurons, weight sha256)."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QGroupBox, QLabel, QLineEdit, QWidget)

from .common import button, hbox, hint, vbox

DEFAULT_LABEL = "default (SmolLM2-135M-Instruct, embedded)"


class ModelPanel(QWidget):
    load_requested = Signal(str, str, str)  # source, device, dtype

    def __init__(self, parent=None):
        super().__init__(parent)
        self.source = QComboBox()
        self.source.setEditable(True)
        self.source.addItem(DEFAULT_LABEL, "default")
        self.source.addItem("gpt2", "gpt2")
        self.source.addItem("bert-base-cased", "bert-base-cased")
        self.source.setCurrentIndex(0)
        self.source.setToolTip("The embedded default, a Hugging Face id (must be in the local cache when offline) "
                               "or a folder written by save_pretrained")
        self.source.lineEdit().setPlaceholderText("Hugging Face id or local folder")
        self.source.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)  # fits a narrow dock
        self.source.setMinimumContentsLength(14)
        self.source.lineEdit().setCursorPosition(0)  # the name's start, not its end, when the field is narrow
        browse = button("Folder\u2026", self._browse, "Pick a local model folder (with config.json)")
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        self.dtype = QComboBox()
        self.dtype.addItems(["auto", "float32", "bfloat16", "float16"])
        self.dtype.setToolTip("auto = float32: integrated gradients of probabilities want full precision")
        self.load_button = button("Load model", self._load, "Load in the background (Ctrl+L)", name="primary")

        form = QFormLayout()
        form.setLabelAlignment(Qt.AlignRight)
        form.addRow("Model", hbox(self.source, browse))
        form.addRow("Device", self.device)
        form.addRow("Dtype", self.dtype)

        self.info = {}
        info_box = QGroupBox("Loaded model")
        info_form = QFormLayout(info_box)
        info_form.setLabelAlignment(Qt.AlignRight)
        for key, label in [("name", "Name"), ("family", "Family"), ("kind", "Kind"), ("layers", "Layers"),
                           ("neurons", "Neurons / layer"), ("hidden", "Hidden size"), ("vocab", "Vocabulary"),
                           ("dtype", "Dtype"), ("device", "Device"), ("sha256", "Weights sha256")]:
            value = QLabel("\u2014")
            value.setObjectName("value")
            value.setTextInteractionFlags(Qt.TextSelectableByMouse)
            value.setWordWrap(True)
            info_form.addRow(label, value)
            self.info[key] = value
        self.status = hint("No model loaded. The embedded default works offline.")
        self.setLayout(vbox(form, self.load_button, self.status, info_box, None))

    def _browse(self):
        folder = QFileDialog.getExistingDirectory(self, "Choose a model folder (with config.json)")
        if folder:
            self.source.setEditText(folder)

    def chosen_source(self) -> str:
        text = self.source.currentText().strip()
        if text == DEFAULT_LABEL or not text:
            return "default"
        index = self.source.findText(text)
        if index >= 0 and self.source.itemData(index):
            return self.source.itemData(index)
        return text

    def _load(self):
        self.load_requested.emit(self.chosen_source(), self.device.currentText(), self.dtype.currentText())

    def set_loading(self, loading: bool, message: str = ""):
        self.load_button.setEnabled(not loading)
        if message:
            self.status.setText(message)

    def show_model(self, lm):
        info = lm.describe()
        for key, label in self.info.items():
            value = info.get(key)
            if key == "name":
                value = value or lm.source
            if key == "sha256" and value:
                label.setToolTip(value)
                value = value[:16] + "\u2026" + value[-8:]
            label.setText("\u2014" if value is None else str(value))
        self.status.setText(f"Loaded {info.get('name') or lm.source}.")

    def clear(self):
        for label in self.info.values():
            label.setText("\u2014")
