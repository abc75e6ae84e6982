"""Controls declared from the parameters they edit: one `Param` row (the name it edits, its label, tooltip, the
engine's choices or range and default) becomes a combo or spin box, so a range or a default lives in the engine
(kn_core.validation, kn_core.attribution, kn_core.quadrature) and a form cannot drift from it."""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtWidgets import QComboBox, QDoubleSpinBox, QLabel, QSpinBox, QWidget


@dataclass(frozen=True)
class Param:
    name: str  # the panel's attribute and the parameter it edits
    label: str  # shown before the control ("" for none: a spin box's prefix names it)
    tip: str
    default: object
    choices: tuple = ()  # a combo box of these values, or of (shown text, value) pairs
    bounds: tuple | None = None  # else a spin box over this closed range
    prefix: str = ""
    step: float = 0  # 0: an integer spin box; else a float one moving by this step


def build_control(param: Param) -> QWidget:
    if param.choices:
        control = QComboBox()
        for choice in param.choices:
            text, value = choice if isinstance(choice, tuple) else (str(choice), choice)
            control.addItem(text, value)
        control.setCurrentIndex(max(0, control.findData(param.default)))
    else:
        control = QDoubleSpinBox() if param.step else QSpinBox()
        control.setRange(*param.bounds)
        if param.step:
            control.setSingleStep(param.step)
        control.setValue(param.default)
        if param.prefix:
            control.setPrefix(param.prefix)
    control.setToolTip(param.tip)
    return control


def build_controls(owner, params: tuple[Param, ...]) -> list[QWidget]:
    """Each param's control set as `owner.<name>`; returned with their labels in order, for a row."""
    row = []
    for param in params:
        control = build_control(param)
        setattr(owner, param.name, control)
        row += ([QLabel(param.label)] if param.label else []) + [control]
    return row
