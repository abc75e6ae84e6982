"""Knowledge Neuron Studio's desktop app (PySide6)."""

from .none_refcount import protect_none

protect_none()  # before any Qt call: PySide6 6.12.0 on Python < 3.12 would use up None's references (none_refcount.py)
