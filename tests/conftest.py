import os

# Qt widgets need a platform plugin; tests must run without a display.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
