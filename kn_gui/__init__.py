"""Knowledge Neuron Studio's desktop app (PySide6)."""

from .binding_guard import install

install()  # before any Qt call can add up: PySide6 6.12.0 on Python < 3.12 uses up None's references (binding_guard)
