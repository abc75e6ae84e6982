"""Can Qt open a window here? Checked before QApplication exists, because Qt aborts the process (SIGABRT, a
core dump and a raw message) when it has no display or its xcb platform plugin cannot load.

`python -m kn_gui.platform_check` prints the shared libraries that Qt's xcb plugin lacks (nothing when it can
load) and exits 1 when some are missing; setup.sh uses it to install them or to print the command that does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

DEBIAN_PACKAGES = ("libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-xkb1 "
                   "libxkbcommon-x11-0 libxcb-randr0 libxcb-shape0 libxcb-xinerama0 libegl1 libgl1 libfontconfig1 "
                   "libdbus-1-3")
FEDORA_PACKAGES = ("xcb-util-cursor xcb-util-wm xcb-util-keysyms xcb-util-image xcb-util-renderutil "
                   "libxkbcommon-x11 mesa-libEGL mesa-libGL fontconfig dbus-libs")
INSTALL_HINT = (f"Debian/Ubuntu: sudo apt-get update && sudo apt-get install -y {DEBIAN_PACKAGES}; "
                f"Fedora: sudo dnf install -y {FEDORA_PACKAGES}")
# Platforms that need no display server (tests, screenshots, remote viewing).
_HEADLESS_PLATFORMS = ("offscreen", "minimal", "vnc", "linuxfb", "eglfs")


def _qt_root() -> Path:
    import PySide6  # only its location: loading no Qt library here

    return Path(PySide6.__file__).resolve().parent / "Qt"


def missing_xcb_libraries() -> list[str]:
    """Shared libraries that Qt's xcb platform plugin (or the Qt libraries it loads) cannot find; [] elsewhere."""
    if not sys.platform.startswith("linux"):
        return []
    root = _qt_root()
    files = [root / "plugins" / "platforms" / "libqxcb.so"]
    files += [root / "lib" / name for name in ("libQt6XcbQpa.so.6", "libQt6Gui.so.6", "libQt6Widgets.so.6")]
    missing: set[str] = set()
    for path in files:
        if not path.exists():
            continue
        try:
            out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return []  # no ldd (e.g. a musl system): Qt itself will say what it lacks
        missing |= {line.split()[0] for line in out.splitlines() if "not found" in line}
    # Qt 6.5+ refuses to start xcb without xcb-cursor, which it loads at run time rather than links.
    if ctypes.util.find_library("xcb-cursor") is None:
        missing.add("libxcb-cursor.so.0")
    return sorted(missing)


def startup_problem(environ=None) -> str | None:
    """One line saying why the app cannot open its window here and what to do, or None when it can."""
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return None  # macOS and Windows bring their own platform plugins
    platform = environ.get("QT_QPA_PLATFORM", "").split(":")[0]
    if platform in _HEADLESS_PLATFORMS:
        return None
    has_x, has_wayland = bool(environ.get("DISPLAY")), bool(environ.get("WAYLAND_DISPLAY"))
    uses_xcb = platform == "xcb" or (platform == "" and not has_wayland)
    if (platform == "xcb" and not has_x) or (platform == "" and not has_x and not has_wayland):
        return ("no display: Knowledge Neuron Studio needs a desktop session (DISPLAY or WAYLAND_DISPLAY is not "
                "set); run it in one, or under a virtual screen with `xvfb-run -a kn-studio`, or use the `kn` "
                "command line instead")
    missing = missing_xcb_libraries() if uses_xcb else []
    if missing:
        return f"Qt's xcb platform plugin cannot load: missing {', '.join(missing)}. Install them: {INSTALL_HINT}"
    if uses_xcb and has_x and not x_display_reachable(environ["DISPLAY"]):
        return (f"cannot connect to the X display {environ['DISPLAY']!r} (DISPLAY): is the X server running and "
                "may this user use it? Or run under a virtual screen with `xvfb-run -a kn-studio`")
    return None


def x_display_reachable(display: str) -> bool:
    """Whether an X server answers at `display`, asked through libxcb as Qt would ask it."""
    name = ctypes.util.find_library("xcb")
    if name is None:
        return True  # no libxcb: missing_xcb_libraries() names it
    xcb = ctypes.CDLL(name)
    xcb.xcb_connect.restype = ctypes.c_void_p
    xcb.xcb_connect.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    xcb.xcb_connection_has_error.argtypes = [ctypes.c_void_p]
    xcb.xcb_disconnect.argtypes = [ctypes.c_void_p]
    connection = xcb.xcb_connect(display.encode(), None)
    try:
        return xcb.xcb_connection_has_error(connection) == 0
    finally:
        xcb.xcb_disconnect(connection)


def main() -> int:
    missing = missing_xcb_libraries()
    if missing:
        print(" ".join(missing))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
